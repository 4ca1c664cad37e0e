"""The end of every stage's ``fit``: its summary as JSON in the run directory, its tables and
pictures in W&B, and one line printed. The module says what its summary holds
(``summary()``, and optionally ``summary_tables()``, ``summary_pictures(log_dir)``,
``summary_line()``, printed); the :class:`~dvpo_lightning.callbacks.cost.CostMeter`, when present,
adds the cost and the per-step curve."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.callbacks.cost import CostMeter
from dvpo_lightning.runtime.loggers import has_wandb, log_files, log_table

SUMMARY_FILE = "summary.json"


def run_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """The module's ``summary()`` plus ``cost`` and ``train_curve`` from the trainer's
    :class:`CostMeter` (if it has one)."""
    summary = dict(pl_module.summary())
    for cb in trainer.callbacks:
        if isinstance(cb, CostMeter):
            summary["cost"] = cb.summary(pl_module)
            summary["train_curve"] = cb.records
    return summary


class RunSummary(L.Callback):
    """Write ``<log_dir>/summary.json`` at the end of ``fit`` and log the module's tables and
    pictures (the same numbers the run's artifact manifest records)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank
        if not trainer.is_global_zero:
            return
        summary = run_summary(trainer, pl_module)
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        try:  # optional: the summary is written and the model exported whatever happens here
            tables = getattr(pl_module, "summary_tables", dict)()
            for key, (columns, rows) in tables.items():
                log_table(trainer, key, columns, rows)
            if has_wandb(trainer) and hasattr(pl_module, "summary_pictures"):
                log_files(trainer, pl_module.summary_pictures(out, summary))
        except Exception as e:  # noqa: BLE001 (a picture must never fail a finished run)
            rank_zero_warn(f"the run's summary tables or pictures could not be made "
                           f"({type(e).__name__}: {e}); {out / SUMMARY_FILE} and the exported "
                           "model are complete. Please report this as a bug")
        line = getattr(pl_module, "summary_line", lambda s: "")(summary)
        if line:
            print(line, flush=True)
