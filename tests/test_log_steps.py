"""Metrics that cost work are computed only on the steps whose metrics reach the loggers
(``runtime/log_steps.py``): the loggers receive the same rows at the same steps, and training
is the same to the last bit, whatever the logging cadence."""

from __future__ import annotations

import csv
import os

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from test_stage1_training import head_file

from dvpo_lightning.callbacks import grad_norm
from dvpo_lightning.data.pairwise import PairwiseDataModule
from dvpo_lightning.modules import OptimSettings, RewardModelModule
from dvpo_lightning.runtime.deepspeed import local_grad_norm

STEPS = 10
EVERY = 3


def train(task_data: str, sft_model_dir: str, root, make_trainer, every: int):
    root.mkdir()
    L.seed_everything(0, verbose=False)
    pairs = head_file(os.path.join(task_data, "pairs.jsonl"), root / "pairs.jsonl", 16)
    dm = PairwiseDataModule(train_path=pairs, val_path=pairs, tokenizer=sft_model_dir,
                            batch_size=4, max_length=32)
    module = RewardModelModule(backbone=sft_model_dir,
                               optim=OptimSettings(lr=1e-2, warmup_steps=0))
    logger = CSVLogger(str(root), name="logs", version=0)
    make_trainer(root, max_steps=STEPS, logger=logger, log_every_n_steps=every).fit(module, dm)
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return module, rows


def steps_with(rows: list[dict], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


def test_costly_metrics_reach_the_loggers_on_their_steps_and_change_nothing(
        task_data, sft_model_dir, tmp_path, make_trainer, monkeypatch):
    norms = []  # the gradient norm's computations (the real function, counted)

    def counted(params):
        norms.append(1)
        return local_grad_norm(params)

    monkeypatch.setattr(grad_norm, "local_grad_norm", counted)
    sparse, rows = train(task_data, sft_model_dir, tmp_path / "sparse", make_trainer, EVERY)
    sparse_norms = len(norms)
    dense, dense_rows = train(task_data, sft_model_dir, tmp_path / "dense", make_trainer, 1)
    assert (sparse_norms, len(norms) - sparse_norms) == (STEPS // EVERY, STEPS)

    # every metric, the cheap loss and the gated ones alike, on the logger's steps, no others
    expected = [s for s in range(STEPS) if (s + 1) % EVERY == 0]
    for key in ("train/loss", "train/reward_acc", "train/reward_margin", "train/grad_norm",
                "perf/step_s"):
        assert steps_with(rows, key) == expected, (key, steps_with(rows, key))
        assert steps_with(dense_rows, key) == list(range(STEPS)), key
    # the same values at those steps as a run that computes them every step
    for step in expected:
        a = next(r for r in rows if int(r["step"]) == step and r.get("train/grad_norm"))
        b = next(r for r in dense_rows if int(r["step"]) == step and r.get("train/grad_norm"))
        for key in ("train/loss", "train/reward_acc", "train/reward_margin", "train/grad_norm"):
            assert float(a[key]) == float(b[key]), (step, key)
    # and the same weights, bit for bit
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(p, q), name
