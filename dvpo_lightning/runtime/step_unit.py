"""One unit for stages that count steps, not epochs: an RL run's RL steps, DPO's optimizer
steps. ``trainer.max_steps``, ``trainer.val_check_interval`` and the progress bar all count
that unit, however many passes over the prompt file it takes.

A stage's LightningModule says it counts steps with a class attribute ``STEP_UNIT`` (the name
the progress bar shows: ``"RL step"``, ``"step"``). The CLI then applies
:func:`count_in_steps` to the parsed trainer settings before any model loads, and swaps
Lightning's progress bar for :class:`StepProgressBar` in the trainer it builds
(:func:`use_step_progress_bar`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


def count_in_steps(trainer: Any, unit: str) -> None:
    """Make an integer ``trainer.val_check_interval`` count ``unit``s across epochs (Lightning
    counts it within one epoch unless ``check_val_every_n_epoch`` is None, and refuses an
    interval longer than the prompt file); refuse an interval the run cannot reach. (A file
    too small for one batch is refused for every stage by the CLI's ``check_one_batch``.)

    Args:
        trainer: the parsed ``trainer`` section (a jsonargparse Namespace); edited in place.
        unit: the stage's step (``"RL step"``), for the messages.

    Raises:
        ValueError: an evaluation interval past ``trainer.max_steps`` (the run would end
            without an evaluation).
    """
    interval, max_steps = trainer.val_check_interval, trainer.max_steps
    if not isinstance(interval, int) or isinstance(interval, bool):
        return
    if trainer.limit_val_batches != 0 and max_steps is not None and 0 < max_steps < interval:
        raise ValueError(f"trainer.val_check_interval={interval} {unit}s is past "
                         f"trainer.max_steps={max_steps}: the run would end without a held-out "
                         f"evaluation. Fix: set trainer.val_check_interval to at most {max_steps}"
                         ", or trainer.limit_val_batches=0 to train without one")
    trainer.check_val_every_n_epoch = None  # the interval counts steps over the whole run


class StepProgressBar(RichProgressBar):
    """Lightning's progress bar with the training bar counting ``trainer.global_step`` out of
    ``trainer.max_steps`` across epochs (``RL step 12/200``), not batches within an epoch of
    unknown number (Lightning shows ``Epoch 1/-2`` when only ``max_steps`` is set).

    Args:
        unit: the step's name on the bar.
    """

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        description = self.unit
        if len(self.validation_description) > len(description):  # (as Lightning's: no flicker)
            description = f"{description:{len(self.validation_description)}}"
        return description

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # (resets the bar: count on)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)


def use_step_progress_bar(trainer: Any, unit: str) -> None:
    """Replace the trainer's progress bar by :class:`StepProgressBar` when it is Lightning's
    default one (nothing changes when the bar is off or the user configured another)."""
    callbacks = trainer.callbacks
    for i, cb in enumerate(callbacks):
        if type(cb) is RichProgressBar:
            callbacks[i] = StepProgressBar(unit)
