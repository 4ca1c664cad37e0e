"""One DVPO update with or without DeepSpeed ZeRO on CPU; used by ``test_deepspeed_cpu.py``.

    python tests/deepspeed_worker.py OUT STRATEGY TASK_DATA POLICY GVM [DEVICES [ENGINE [OPTIONS]]]
    # STRATEGY: plain|1|2|3; DEVICES processes (Lightning launches the others) share the batch;
    # ENGINE: hf (default) | vllm, the rollout engine (each process drives its own);
    # OPTIONS: JSON: max_grad_norm (default None), grad_accum, lr, precision, frozen_dtype,
    #   on_nonfinite, nan_grad (a hook makes one policy weight's gradient NaN), strategy
    #   (extra DeepSpeedStrategy arguments)

Greedy rollouts (``temperature=0``) make the experience identical across strategies; the
trained weights after one optimizer step (gathered under ZeRO-3) go to ``OUT``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_deepspeed import CPUDeepSpeedStrategy  # noqa: E402

from dvpo_lightning.data.rollout import RolloutDataModule  # noqa: E402
from dvpo_lightning.estimators import GVM  # noqa: E402
from dvpo_lightning.models.options import ModelOptions  # noqa: E402
from dvpo_lightning.modules.dvpo import DVPOModule  # noqa: E402
from dvpo_lightning.modules.optim import RLOptimSettings  # noqa: E402
from dvpo_lightning.modules.ppo import PPOSettings  # noqa: E402
from dvpo_lightning.rollout.settings import RolloutSettings  # noqa: E402
from dvpo_lightning.runtime.guards import GuardSettings  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    out, strategy, data, policy, gvm = sys.argv[1:6]
    devices = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    engine = sys.argv[7] if len(sys.argv) > 7 else "hf"
    opts = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
    torch.set_num_threads(1)
    L.seed_everything(0)
    accum = opts.get("grad_accum", 1)
    model = DVPOModule(policy=policy, estimator=GVM(), value_model=gvm,
                       optim=RLOptimSettings(lr=opts.get("lr", 1e-3)),
                       rollout=RolloutSettings(max_new_tokens=6, temperature=0.0,
                                               engine=engine),
                       ppo=PPOSettings(epochs=1, mini_batch_size=4 // devices // accum,
                                       grad_accum=accum,
                                       max_grad_norm=opts.get("max_grad_norm")),
                       models=ModelOptions(frozen_dtype=opts.get("frozen_dtype")),
                       guards=GuardSettings(on_nonfinite=opts.get("on_nonfinite", "stop")))
    if opts.get("nan_grad"):  # a real non-finite gradient, from the backward pass itself
        weight = model.policy.get_input_embeddings().weight
        weight.register_hook(lambda g: g * float("nan"))
    dm = RolloutDataModule(f"{data}/rl_prompts.jsonl", f"{data}/eval_prompts.jsonl",
                           f"{data}/tokenizer", batch_size=4 // devices)  # 4 prompts in all
    strat = ("auto" if strategy == "plain"
             else CPUDeepSpeedStrategy(stage=int(strategy), process_group_backend="gloo",
                                       **opts.get("strategy", {})))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strat, max_steps=1,
                        precision=opts.get("precision", "32-true"),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=out)
    try:
        trainer.fit(model, datamodule=dm)
    except Exception as e:  # (the tests read what stopped the run)
        error = f"{type(e).__name__}: {e}"
    else:
        error = None
    params = list(model.trained.parameters())
    partitioned = hasattr(params[0], "ds_id")
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            state = {k: v.detach().clone() for k, v in model.trained.state_dict().items()}
    else:
        state = {k: v.detach().clone() for k, v in model.trained.state_dict().items()}
    if trainer.global_rank == 0:
        torch.save({"state": state, "partitioned": partitioned, "steps": trainer.global_step,
                    "world_size": trainer.world_size, "error": error,
                    "skips": model.guard.skips,
                    "frozen_dtypes": {k: str(next(m.parameters()).dtype)
                                      for k, m in model.frozen.items()},
                    "frozen_sums": {k: sum(float(p.double().sum()) for p in m.parameters())
                                    for k, m in model.frozen.items()},
                    "policy_dtype": str(params[0].dtype)}, Path(out) / "result.pt")
    # Leave the process group before the interpreter exits: gloo's threads torn down at exit
    # while the group is alive can abort the process ("terminate called without an active
    # exception", seen once in CI after the results were written).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
