"""Optimizer and learning-rate schedule shared by the LightningModules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dvpo_lightning.runtime.deepspeed import offloads_optimizer


def adamw(params: Iterable, lr: float, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.95),
          strategy: Any = None) -> torch.optim.Optimizer:
    """AdamW over ``params`` (parameters, or parameter-group dicts).

    Under a DeepSpeed strategy that offloads the optimizer to CPU memory
    (``configs/deepspeed/zero3_offload.yaml``) the update runs on the CPU, where DeepSpeed
    takes only its own vectorised ``DeepSpeedCPUAdam`` (the same AdamW update; its kernel is
    compiled on first use, about a minute): it is chosen then, else ``torch.optim.AdamW``.
    """
    if offloads_optimizer(strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × lr at
    ``total_steps`` (constant after)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
