"""``offload_frozen``: frozen models live in CPU memory except while they score (GPU only)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_rl_training import make_cli

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class WhereIsFrozen(Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # after the update
        self.seen += {p.device.type for p in pl_module.frozen.parameters()}


def test_frozen_models_are_offloaded_between_phases(artifacts, task_data, tmp_path):
    cli, _ = make_cli("ppo", tmp_path, artifacts, task_data, "--trainer.accelerator=gpu",
                      "--model.init_args.models.offload_frozen=true")
    probe = WhereIsFrozen()
    cli.trainer.callbacks.append(probe)
    scored_on = []
    orig = cli.model.reference_logps  # runs in the scoring phase and in evaluation

    def spy(*a, **k):
        scored_on.extend({p.device.type for p in cli.model.frozen.parameters()})
        return orig(*a, **k)

    cli.model.reference_logps = spy
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert set(scored_on) == {"cuda"} and set(probe.seen) == {"cpu"}
