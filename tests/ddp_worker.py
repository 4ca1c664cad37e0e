"""One RL step with 1 or 2 CPU processes (DDP over gloo); used by ``test_multiprocess.py``.

    python tests/ddp_worker.py OUT_DIR DEVICES KIND TASK_DATA POLICY GVM RM [ENGINE [REFERENCE]]

KIND: ``gvm`` (DVPO, greedy rollouts, the GVM standardised on the first rollout), ``refresh``
(``gvm`` with a semi-online refresh of the GVM after the step: 8 labels, noisy), ``grpo``
(GRPO, two sampled responses per prompt), ``kl_eval`` (DVPO with greedy rollouts, an adaptive KL
to REFERENCE — another policy, so the KL is not 0 — then the held-out evaluation of 5 prompts,
greedy, judged by the sorting task) or ``sft_gold`` (one SFT step of POLICY with the GoldEval
callback) or ``dpo_eval`` (one DPO step of POLICY, then its held-out pairs and prompts); the
last two use neither GVM nor RM.
Greedy rollouts (``temperature=0``) make the experience of a prompt independent of how prompts
are spread over processes. Each rank writes ``rank{r}.pt``: per prompt, the advantages it
computed and the responses; the gradient of the first update (after DDP's all-reduce) and the
policy loss; β after the step, the held-out evaluations, and torch's global RNG state.
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning as L
import torch

from dvpo_lightning.data.rollout import RolloutDataModule
from dvpo_lightning.estimators import GRPO, GVM
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.kl_penalty import KLSettings
from dvpo_lightning.modules.optim import OptimSettings, RLOptimSettings
from dvpo_lightning.modules.ppo import PPOSettings
from dvpo_lightning.modules.reward_scale import RewardSettings
from dvpo_lightning.refresh.settings import RefreshSettings
from dvpo_lightning.rollout.settings import RolloutSettings

warnings.filterwarnings("ignore")


class Recording(DVPOModule):
    """Records what the equivalence test compares."""

    def training_step(self, batch, batch_idx):
        self._prompts = batch["prompts"]
        return super().training_step(batch, batch_idx)

    def ppo_update(self, exp, advantages, returns):
        group = self.estimator.group_size  # the experience maker's copies of each prompt
        self.record = {
            "prompts": [p for p in self._prompts for _ in range(group)],
            "group_ids": [i for i in range(len(self._prompts)) for _ in range(group)],
            "responses": exp.response_ids.tolist(),
            "advantages": advantages.detach().cpu(),
            "mask": exp.response_mask.cpu(),
            "seq_kl": (exp.kl_penalty.sum(1) / self.kl.coef).cpu(),  # (β on the reward)
        }
        stats = super().ppo_update(exp, advantages, returns)
        self.record["policy_loss"] = float(stats["train/policy_loss"])
        return stats

    def _clip_and_step(self, opt):
        self.record["grad"] = torch.cat([p.grad.detach().flatten().cpu()
                                         for p in self.trained.parameters()])
        return super()._clip_and_step(opt)


def sft_gold_eval(out: str, devices: int, data: str, policy: str) -> dict:
    """One SFT step (lr 0: the policy does not move) of ``policy`` with the GoldEval callback
    sampling answers to 5 held-out prompts at the validation and at the end of ``fit``; the
    rank's logged and final numbers."""
    from dvpo_lightning.callbacks import GoldEval
    from dvpo_lightning.data.sft import SFTDataModule
    from dvpo_lightning.modules import SFTModule

    gold = GoldEval(prompts_path=f"{data}/eval_prompts.jsonl", max_prompts=5, max_new_tokens=6)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, callbacks=[gold], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(SFTModule(backbone=policy, tokenizer=f"{data}/tokenizer",
                          optim=OptimSettings(lr=0.0)),
                SFTDataModule(train_path=f"{data}/sft.jsonl", tokenizer=f"{data}/tokenizer",
                              batch_size=4, max_length=32))
    return {"rank": trainer.global_rank, "world_size": trainer.world_size, "final": gold.last,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("eval/")}}


def dpo_eval(out: str, devices: int, data: str, policy: str) -> dict:
    """One DPO step on 8 pairs, then the held-out pairs' metrics and the held-out evaluation
    of 5 prompts (sampled with common random numbers, judged by the sorting task), and the
    final test evaluation (the same 5 prompts as the test file); the rank's records."""
    from dvpo_lightning.data.dpo import DPODataModule
    from dvpo_lightning.modules import DPOModule

    module = DPOModule(policy=policy, tokenizer=f"{data}/tokenizer", judge="sorting",
                       optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       rollout=RolloutSettings(max_new_tokens=6, eval_seed=5))
    dm = DPODataModule(train_path=f"{data}/pairs.jsonl", val_path=f"{data}/eval_pairs.jsonl",
                       tokenizer=f"{data}/tokenizer", eval_path=f"{data}/eval_prompts.jsonl",
                       max_eval_prompts=5, batch_size=8 // devices, val_batch_size=2,
                       max_length=32, test_path=f"{data}/eval_prompts.jsonl")
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out)
    trainer.fit(module, datamodule=dm)
    return {"rank": trainer.global_rank, "world_size": trainer.world_size,
            "evals": module.evals.rows, "reference_eval": module.evals.reference,
            "pair_history": module.pair_history, "heldout": module.heldout.summary()}


def main() -> None:
    out, devices, kind, data, policy, gvm, rm = sys.argv[1:8]
    if kind in ("sft_gold", "dpo_eval"):
        torch.set_num_threads(1)
        L.seed_everything(0)
        record = (sft_gold_eval if kind == "sft_gold" else dpo_eval)(out, int(devices), data,
                                                                     policy)
        torch.save(record, os.path.join(out, f"rank{record['rank']}.pt"))
        _leave_process_group()
        return
    engine = sys.argv[8] if len(sys.argv) > 8 else "hf"  # each rank drives its own engine
    reference = sys.argv[9] if len(sys.argv) > 9 else None
    devices = int(devices)
    torch.set_num_threads(1)
    L.seed_everything(0)
    total_prompts = 8
    if kind in ("gvm", "kl_eval", "refresh"):
        estimator, group = GVM(version="value_difference"), 1
        extra = dict(value_model=gvm)
        if kind in ("gvm", "refresh"):  # the GVM's scale fitted on every rank's first rollout
            extra["reward"] = RewardSettings(normalize="first_rollout")
        if kind == "refresh":
            extra["refresh"] = RefreshSettings(every=1, labels=8, steps=2, batch_size=4,
                                               replay=0, lr=1e-2)
        whiten, temperature = True, 0.0
    else:
        estimator, group = GRPO(group_size=2), 2
        extra = dict(reward_model=rm)
        whiten, temperature = False, 1.0
    evaluate = kind == "kl_eval"
    if evaluate:  # β moves by the rollout's KL to another policy; the task judges the answers
        extra.update(reference=reference, judge="sorting",
                     kl=KLSettings(adaptive=True, target=3.15, horizon=8))
        # (target: near the rollout's KL of about 3.15 per response, so that neither rank's
        # error is clipped to ±0.2: β would move alike on both ranks whatever they observed)
    per_rank = total_prompts // devices
    model = Recording(policy=policy, estimator=estimator, optim=RLOptimSettings(lr=1e-3),
                      rollout=RolloutSettings(engine=engine, max_new_tokens=6,
                                              temperature=temperature, eval_greedy=True),
                      ppo=PPOSettings(epochs=1, mini_batch_size=per_rank * group,
                                      whiten_advantages=whiten, max_grad_norm=None), **extra)
    # (5 held-out prompts: two processes get 3 each, one of them repeated by the sampler)
    dm = RolloutDataModule(f"{data}/rl_prompts.jsonl", f"{data}/eval_prompts.jsonl",
                           f"{data}/tokenizer", batch_size=per_rank, max_eval_prompts=5)
    validation = (dict(val_check_interval=1, check_val_every_n_epoch=None,
                       num_sanity_val_steps=0) if evaluate else dict(limit_val_batches=0))
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, **validation)
    trainer.fit(model, datamodule=dm)
    rank = trainer.global_rank
    if model.refresher is not None:
        model.record.update(buffer=model.refresher.buffer.state_dict()["rows"],
                            gvm={k: v.clone() for k, v in model.frozen["gvm"].state_dict().items()})
    torch.save({**model.record, "world_size": trainer.world_size, "kl_coef": model.kl.coef,
                "evals": model.evals.rows, "reference_eval": model.evals.reference,
                "rng": torch.get_rng_state(), "reward_scale": model.reward_scale.state_dict()},
               os.path.join(out, f"rank{rank}.pt"))
    _leave_process_group()


def _leave_process_group() -> None:
    # Leave the process group before the interpreter exits: gloo's threads torn down at exit
    # while the group is alive can abort the process ("terminate called without an active
    # exception", seen once in CI after the results were written).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
