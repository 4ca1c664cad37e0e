"""One RL step with 1 or 2 CPU processes (DDP over gloo); used by ``test_multiprocess.py``.

    python tests/ddp_worker.py OUT_DIR DEVICES ESTIMATOR TASK_DATA POLICY GVM RM [ENGINE]

Rollouts are greedy (``temperature=0``) so the experience of a prompt does not depend on how
prompts are spread over processes. Each rank writes ``rank{r}.pt``: per prompt, the advantages
it computed; the gradient of the first update (after DDP's all-reduce) and the policy loss.
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
from dvpo_lightning.modules.ppo import PPOSettings
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
        }
        stats = super().ppo_update(exp, advantages, returns)
        self.record["policy_loss"] = float(stats["train/policy_loss"])
        return stats

    def _clip_and_step(self, opt):
        self.record["grad"] = torch.cat([p.grad.detach().flatten().cpu()
                                         for p in self.trained.parameters()])
        return super()._clip_and_step(opt)


def main() -> None:
    out, devices, kind, data, policy, gvm, rm = sys.argv[1:8]
    engine = sys.argv[8] if len(sys.argv) > 8 else "hf"  # each rank drives its own engine
    devices = int(devices)
    torch.set_num_threads(1)
    L.seed_everything(0)
    total_prompts = 8
    if kind == "gvm":
        estimator, group = GVM(version="value_difference"), 1
        extra = dict(value_model=gvm)
        whiten, temperature = True, 0.0
    else:
        estimator, group = GRPO(group_size=2), 2
        extra = dict(reward_model=rm)
        whiten, temperature = False, 1.0
    per_rank = total_prompts // devices
    model = Recording(policy=policy, estimator=estimator, lr=1e-3,
                      rollout=RolloutSettings(engine=engine, max_new_tokens=6,
                                              temperature=temperature),
                      ppo=PPOSettings(epochs=1, mini_batch_size=per_rank * group,
                                      whiten_advantages=whiten, max_grad_norm=None), **extra)
    dm = RolloutDataModule(f"{data}/rl_prompts.jsonl", f"{data}/eval_prompts.jsonl",
                           f"{data}/tokenizer", batch_size=per_rank)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=out)
    trainer.fit(model, datamodule=dm)
    rank = trainer.global_rank
    torch.save({**model.record, "world_size": trainer.world_size},
               os.path.join(out, f"rank{rank}.pt"))
    # Leave the process group before the interpreter exits: gloo's threads torn down at exit
    # while the group is alive can abort the process ("terminate called without an active
    # exception", seen once in CI after the results were written).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
