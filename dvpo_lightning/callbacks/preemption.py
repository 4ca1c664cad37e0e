"""Save a checkpoint when the job is told to stop (SIGTERM: preemption, ``scancel``,
``kill``), so a requeued run resumes from the last finished step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class SaveOnSigterm(L.Callback):
    """On SIGTERM, finish the current step (and its validation, if one is due), write
    ``last.ckpt``, then let Lightning stop.

    Lightning's signal handler marks the trainer (``trainer.received_sigterm``) and raises at
    the end of the step in progress; this callback writes the checkpoint just before that,
    through the trainer's checkpoint IO (atomic with the CLI's default). Resume with
    ``--ckpt_path last``.

    Args:
        filename: checkpoint file name, in the ``ModelCheckpoint`` directory if there is one,
            else in ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved: str | None = None

    def _path(self, trainer: L.Trainer) -> Path:
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return Path(cb.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def _save(self, trainer: L.Trainer) -> None:
        path = self._path(trainer)
        trainer.save_checkpoint(str(path))  # collective under DeepSpeed / FSDP
        self.saved = str(path)
        rank_zero_info(f"SIGTERM: checkpoint of step {trainer.global_step} written to "
                       f"{path}; resume with --ckpt_path last")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and self.saved is None:
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # A validation due at this step runs after on_train_batch_end and before Lightning
        # stops: save again so the checkpoint holds its results (and the RNG after it).
        if trainer.received_sigterm and not trainer.sanity_checking:
            self._save(trainer)
