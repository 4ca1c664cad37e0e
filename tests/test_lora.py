"""LoRA, gradient checkpointing and the attention option, on tiny models through real Trainers.

Checked: with LoRA only the adapters (and a value head) change; the base weights do not; the
reference is the policy with adapters off (no second copy, and its log-probs are exactly the
base model's); the export is the merged model, equal to base + adapter loaded by ``peft``;
gradient checkpointing gives the same loss and gradients as without it.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from test_rl_training import fit, make_cli
from transformers import AutoModelForCausalLM

from dvpo_lightning.callbacks import CostMeter
from dvpo_lightning.data.value import ValueDataModule
from dvpo_lightning.models import ValueModel, load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, merged_copy
from dvpo_lightning.models.options import LoadOptions
from dvpo_lightning.modules import GVMModule, OptimSettings, SFTModule
from dvpo_lightning.rollout.scoring import policy_logps


def pair_data(task_data: str, tokenizer: str) -> ValueDataModule:
    """The task's preference pairs for a value stage (16 per batch)."""
    return ValueDataModule(train_path=os.path.join(task_data, "pairs.jsonl"),
                           val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                           tokenizer=tokenizer, train_kind="pairwise", batch_size=16,
                           max_length=32)


def _split(module: torch.nn.Module, before: dict, prefix: str = "") -> tuple[set, set]:
    """Names of changed adapter / changed non-adapter parameters."""
    changed = {n for n, p in module.named_parameters()
               if not torch.equal(before[prefix + n], p.detach())}
    return {n for n in changed if "lora_" in n}, {n for n in changed if "lora_" not in n}


def test_dvpo_with_lora_trains_adapters_only_and_exports_merged(artifacts, task_data, tmp_path):
    cli, _ = make_cli("dvpo", tmp_path, artifacts, task_data, "--model.init_args.models.lora.r=4",
                      "--model.init_args.optim.lr=1e-2")
    module = cli.model
    assert module.experience.shared_reference and set(module.frozen) == {"gvm"}  # no copy
    base = AutoModelForCausalLM.from_pretrained(artifacts.policy)
    before = fit(cli)

    adapters, others = _split(module.trained, before, "trained.")
    assert others == set() and adapters, (others, adapters)
    n_lora = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" in n)
    meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CostMeter))
    cost = meter.summary(module)
    assert cost["params_trained_m"] == pytest.approx(n_lora / 1e6)

    # the reference is the base policy exactly: adapters off, not a drifted copy
    tok = module.tokenizer
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])  # vocab: 15 tokens
    pmask = ids != tok.pad_token_id
    resp = torch.tensor([[12, 13, tok.eos_token_id], [14, 4, 6]])
    rmask = torch.ones_like(resp, dtype=torch.bool)
    module.policy.eval()
    want, _ = policy_logps(base.eval(), ids, pmask, resp, rmask)
    got = module.experience.reference_logps(module.policy, ids, pmask, resp, rmask)
    assert torch.allclose(got, want, atol=1e-6)
    trained_logps, _ = policy_logps(module.policy, ids, pmask, resp, rmask)
    assert not torch.allclose(trained_logps, want, atol=1e-4), "adapters had no effect"

    # the export is the merged model; base + saved adapter gives the same outputs
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy")).eval()
    assert "lora" not in " ".join(exported.state_dict())
    from peft import PeftModel
    restored = PeftModel.from_pretrained(base, str(tmp_path / "policy" / "adapter")).eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = exported(x).logits, restored(x).logits
        c = module.policy(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_gvm_with_lora_trains_adapters_and_head(task_data, sft_model_dir, tmp_path,
                                                make_trainer):
    L.seed_everything(0, verbose=False)
    dm = pair_data(task_data, sft_model_dir)
    module = GVMModule(backbone=sft_model_dir, optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       export_dir=str(tmp_path / "gvm"),
                       models=LoadOptions(lora=LoraOptions(r=4)))
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    make_trainer(tmp_path, max_steps=3).fit(module, dm)

    adapters, others = _split(module.model, before)
    assert adapters and others == {"head.weight", "head.bias"}, others
    frozen = [n for n, p in module.model.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)

    tok = load_tokenizer(sft_model_dir)
    reloaded = ValueModel.from_pretrained(str(tmp_path / "gvm"), tok).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, mask), module.model(ids, mask), atol=1e-5)


def test_gradient_checkpointing_same_loss_and_gradients(task_data, tokenizer_dir):
    from dvpo_lightning.data.sft import SFTDataModule

    dm = SFTDataModule(train_path=os.path.join(task_data, "sft.jsonl"), tokenizer=tokenizer_dir,
                       batch_size=8, max_length=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        module = SFTModule(backbone="tiny-llama", tokenizer=tokenizer_dir,
                           models=LoadOptions(gradient_checkpointing=ckpt,
                                              attn_implementation="eager")).train()
        assert module.model.is_gradient_checkpointing == ckpt
        loss, _ = module(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in
                                      module.model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


def test_merged_copy_leaves_the_training_model_alone(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = load_causal_lm("test-llama", tok, lora=LoraOptions(r=2))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter count
    merged = merged_copy(model)
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, model(x).logits, atol=1e-5)
    assert any("lora_" in n for n, _ in model.named_parameters())  # still an adapter model


def test_bad_lora_and_attention_options_name_the_fix(tokenizer_dir):
    with pytest.raises(ValueError, match="r >= 1"):
        LoraOptions(r=0)
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(ValueError, match="attn_implementation='flash'.*not one of"):
        load_causal_lm("test-llama", tok, attn_implementation="flash")


class _RecordMode(L.Callback):
    """Whether every trained submodule was in train mode at each training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.model.modules()))


@pytest.mark.parametrize("lora", [None, LoraOptions(r=4, dropout=0.1)], ids=["full", "lora"])
def test_stages_train_in_train_mode(lora, task_data, sft_model_dir, tmp_path, make_trainer):
    """Models load in eval mode and Lightning 2.x keeps a module's mode: a stage must switch
    its model to train mode, or dropout, LoRA dropout and gradient checkpointing are off."""
    L.seed_everything(0, verbose=False)
    dm = pair_data(task_data, sft_model_dir)
    module = GVMModule(backbone=sft_model_dir, optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       models=LoadOptions(lora=lora, gradient_checkpointing=True))
    record = _RecordMode()
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.callbacks.append(record)
    trainer.fit(module, dm)
    assert record.modes == [True, True, True]
