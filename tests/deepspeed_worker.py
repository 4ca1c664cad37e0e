"""One DVPO update with or without DeepSpeed ZeRO on CPU; used by ``test_deepspeed_cpu.py``.

    python tests/deepspeed_worker.py OUT STRATEGY TASK_DATA POLICY GVM      # STRATEGY: plain|2|3

Greedy rollouts (``temperature=0``) make the experience identical across strategies; the
trained weights after one optimizer step (gathered under ZeRO-3) go to ``OUT``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_deepspeed import CPUDeepSpeedStrategy  # noqa: E402

from dvpo_lightning.data.rollout import RolloutDataModule  # noqa: E402
from dvpo_lightning.estimators import GVM  # noqa: E402
from dvpo_lightning.modules.dvpo import DVPOModule  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    out, strategy, data, policy, gvm = sys.argv[1:6]
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = DVPOModule(policy=policy, estimator=GVM(), value_model=gvm, temperature=0.0,
                       ppo_epochs=1, mini_batch_size=4, max_new_tokens=6, lr=1e-3,
                       max_grad_norm=None)
    dm = RolloutDataModule(f"{data}/rl_prompts.jsonl", f"{data}/eval_prompts.jsonl",
                           f"{data}/tokenizer", batch_size=4)
    strat = ("auto" if strategy == "plain"
             else CPUDeepSpeedStrategy(stage=int(strategy), process_group_backend="gloo"))
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strat, max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=out)
    trainer.fit(model, datamodule=dm)
    params = list(model.trained.parameters())
    partitioned = hasattr(params[0], "ds_id")
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            state = {k: v.detach().clone() for k, v in model.trained.state_dict().items()}
    else:
        state = {k: v.detach().clone() for k, v in model.trained.state_dict().items()}
    torch.save({"state": state, "partitioned": partitioned, "steps": trainer.global_step},
               Path(out) / "result.pt")


if __name__ == "__main__":
    main()
