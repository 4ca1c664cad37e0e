"""What every stage's LightningModule shares: the callbacks that end a ``fit`` (cost, run
summary, export), and for the stage-1 modules, which train one ``self.model``, its optimizer,
schedule, context check and checkpoint trimming."""

from __future__ import annotations

import lightning as L
from torch import nn

from dvpo_lightning.callbacks.cost import CostMeter
from dvpo_lightning.callbacks.export import Export
from dvpo_lightning.callbacks.grad_norm import GradNorm
from dvpo_lightning.callbacks.summary import RunSummary
from dvpo_lightning.models.compat import check_fits_context
from dvpo_lightning.modules.optim import OptimSettings, adamw, warmup_cosine
from dvpo_lightning.runtime.checkpointing import drop_reloaded, reloaded_weights, restore_reloaded


def stage_callbacks(export_dir: str | None) -> list[L.Callback]:
    """Every stage's: :class:`CostMeter`, :class:`GradNorm` (the stages Lightning optimises),
    with an ``export_dir`` :class:`Export`, then
    :class:`RunSummary` (Lightning adds a module's ``configure_callbacks`` to the trainer's
    and runs their hooks in this order): the model is written before anything optional (a
    table, a picture) can fail."""
    return [CostMeter(), GradNorm(), *([Export(export_dir)] if export_dir else []),
            RunSummary()]


class SingleModelStage(L.LightningModule):
    """Base of the modules that train one ``self.model`` (SFT, reward model, GVM, DPO).

    A subclass sets ``self.optim`` (its :class:`OptimSettings`) and ``self.export_dir`` in its
    ``__init__``. With LoRA, checkpoints hold the adapters (and any head), not the frozen base
    weights, which are reloaded from the model directory at start-up.
    """

    model: nn.Module
    optim: OptimSettings
    export_dir: str | None
    STEP_UNIT: str | None = None  # a stage that counts steps, not epochs: the step's name

    def check_context(self, config) -> None:
        """Refuse data longer than the model's context (``data.max_length``)."""
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "max_length"):
            check_fits_context(dm.max_length, config, "data.init_args.max_length")

    def on_fit_start(self) -> None:
        # Models load in eval mode and Lightning (2.x) no longer switches a module to train
        # mode: without this, dropout and gradient checkpointing would be silently off.
        self.model.train()

    def configure_optimizers(self):
        """AdamW on the trainable weights (LoRA: the adapters), linear warm-up then cosine."""
        o = self.optim
        opt = adamw([p for p in self.model.parameters() if p.requires_grad], o.lr,
                    o.weight_decay, strategy=self.trainer.strategy)
        total = int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, o.warmup_steps, total, o.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        return stage_callbacks(self.export_dir)

    def export_parts(self) -> dict[str, nn.Module]:
        return {"": self.model}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_reloaded(checkpoint, reloaded_weights(self.model, "model."))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_reloaded(checkpoint, reloaded_weights(self.model, "model."))
