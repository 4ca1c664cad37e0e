"""``train/grad_norm`` for the stages Lightning optimises (SFT, reward model, GVM, DPO), under
any strategy: the norm of the whole gradient before clipping, as the RL module logs it."""

from __future__ import annotations

import lightning as L

from dvpo_lightning.runtime.deepspeed import local_grad_norm, zero_engine
from dvpo_lightning.runtime.log_steps import logs_this_step


class GradNorm(L.Callback):
    """Logs the gradient norm of each optimizer step of an automatically optimised module.

    Under a plain strategy or DDP it reads ``p.grad`` right before the step (after DDP's
    all-reduce, before Lightning clips at ``trainer.gradient_clip_val``). Under DeepSpeed ZeRO
    ``p.grad`` is None (the gradients live in the engine's partitions) and the engine clips
    inside its step: the norm is its global one, read after the step. A module that steps by
    hand (the RL module) logs its own.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if (pl_module.automatic_optimization and zero_engine(trainer) is None
                and logs_this_step(trainer)):
            pl_module.log("train/grad_norm", local_grad_norm(pl_module.parameters()),
                          batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = zero_engine(trainer)
        if not pl_module.automatic_optimization or engine is None or not logs_this_step(trainer):
            return
        norm = engine.get_global_grad_norm()  # (kept until the engine's next step)
        if norm is not None:
            pl_module.log("train/grad_norm", float(norm), batch_size=1)
