"""The end of every stage's ``fit``: the trained model written as a directory that every
stage and ``transformers`` load, atomically, with a manifest of what made it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from dvpo_lightning.callbacks.summary import run_summary
from dvpo_lightning.models.saving import save_model
from dvpo_lightning.runtime.artifacts import export_atomic


class Export(L.Callback):
    """Write ``pl_module.export_parts()`` — ``{sub-directory: model}``, ``""`` the main model —
    each with the module's tokenizer, into ``out_dir`` (write-then-rename, so a crash leaves
    the previous artifact whole), and ``dvpo_artifact.json`` from
    ``pl_module.export_manifest(summary)``.

    Args:
        out_dir: the artifact directory (a module's ``export_dir``).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        parts = pl_module.export_parts()

        def write(tmp: Path) -> None:
            for sub, model in parts.items():
                target = tmp / sub if sub else tmp
                save_model(model, target)
                pl_module.tokenizer.save_pretrained(str(target))

        meta = pl_module.export_manifest(run_summary(trainer, pl_module))
        out = export_atomic(self.out_dir, write, meta)
        rank_zero_info(f"{meta.get('kind', 'model')} written to {out}")
