"""A test-only DeepSpeed strategy for CPU: Lightning refuses DeepSpeed without CUDA, but
DeepSpeed itself runs on CPU over gloo, so ZeRO-2/3 code paths can be exercised in CI.

It skips Lightning's CUDA check and device-index validation and gives the root device an
integer index (DeepSpeed reads ``device_rank`` from it).
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed on CPU (gloo); for tests only."""

    strategy_name = "cpu_deepspeed"

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)
