"""Optimizer and learning-rate schedule shared by the LightningModules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dvpo_lightning.runtime.deepspeed import offloads_optimizer


@dataclass(frozen=True)
class AdamWSettings:
    """The optimizer: AdamW with betas (0.9, 0.95), ``model.init_args.optim`` in every stage.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        rules = [(self.lr >= 0, "lr must be >= 0"),
                 (self.weight_decay >= 0, "weight_decay must be >= 0")]
        rules += self.rules()
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"model.init_args.optim: {'; '.join(broken)} (got {self}). Fix the "
                             "model.init_args.optim.* keys named")

    def rules(self) -> list[tuple[bool, str]]:
        return []


@dataclass(frozen=True)
class OptimSettings(AdamWSettings):
    """The optimizer and its schedule: linear warm-up, then cosine decay (:func:`warmup_cosine`).

    Args:
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    warmup_steps: int = 50
    min_lr_ratio: float = 0.1

    def rules(self) -> list[tuple[bool, str]]:
        return [(self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")]


@dataclass(frozen=True)
class RLOptimSettings(AdamWSettings):
    """The RL update's optimizer: one AdamW, a parameter group per trained model, a constant
    learning rate.

    Args:
        critic_lr: the critic's learning rate (its own parameter group); None: ``lr``.
    """

    critic_lr: float | None = None

    def rules(self) -> list[tuple[bool, str]]:
        return [(self.critic_lr is None or self.critic_lr >= 0, "critic_lr must be >= 0")]


# Modules keep their settings in their hyper-parameters, which Lightning saves in every
# checkpoint: let `torch.load(weights_only=True)` (what resume uses) rebuild them.
torch.serialization.add_safe_globals([AdamWSettings, OptimSettings, RLOptimSettings])


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
