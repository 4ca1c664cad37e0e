"""``python -m dvpo_lightning fit`` (and LightningCLI's ``validate``, ``test``, ``predict``):
every stage is a LightningCLI run with its own config.

    python -m dvpo_lightning fit --config configs/sft.yaml [--model.init_args.lr=3e-4 ...]

Every ``fit`` logs to W&B through :class:`~dvpo_lightning.runtime.loggers.AutoWandbLogger`
(offline by itself without an API key); ``--trainer.logger=false`` turns it off.
"""

from __future__ import annotations

import os
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dvpo_lightning.callbacks.preemption import SaveOnSigterm
from dvpo_lightning.commands.parser import KeySuggestingParser
from dvpo_lightning.runtime.checkpointing import AtomicCheckpointIO
from dvpo_lightning.runtime.hardware import check_trainer_config
from dvpo_lightning.runtime.loggers import AutoWandbLogger, LogConfigCallback, quiet_libraries

DEFAULT_LOGGER = {"class_path": "dvpo_lightning.runtime.loggers.AutoWandbLogger"}


class DVPOCLI(LightningCLI):
    """LightningCLI with model and data chosen by ``class_path``.

    The tokenizer is named once, in ``data``; the module receives the same path (a link, so
    the policy and its data can never disagree on the vocabulary). The default logger is
    :class:`AutoWandbLogger` (configs need not name it); its run directory goes under
    ``trainer.default_root_dir`` unless ``save_dir`` is set. Checkpoints are atomic, kept in
    ``<default_root_dir>/checkpoints`` with ``last.ckpt``, and SIGTERM saves one
    (:func:`make_resumable`).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        """Refuse a strategy / precision / accelerator this machine cannot run, before any
        model is loaded."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_config(config["trainer"])

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, AutoWandbLogger):
                logger.use_save_dir(trainer.default_root_dir)
        make_resumable(trainer)
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> DVPOCLI:
    """The LightningCLI entry (also used by tests with ``args=[...]``, ``run=False``)."""
    quiet_libraries()
    return DVPOCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_class=KeySuggestingParser,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def make_resumable(trainer) -> None:
    """The CLI's checkpoint defaults, applied to a built ``Trainer`` (explicit settings win):

    - checkpoints are written atomically (``AtomicCheckpointIO``) unless a strategy or a plugin
      brought its own checkpoint IO (DeepSpeed writes its own directories);
    - ``ModelCheckpoint`` without a ``dirpath`` writes to ``<default_root_dir>/checkpoints``
      (not under a logger's per-run version, which a new run would not find) and keeps
      ``last.ckpt``, so ``--ckpt_path last`` resumes; with an integer ``val_check_interval``
      it saves after every validation (Lightning would save only at the epoch's end when the
      interval is 1);
    - SIGTERM writes ``last.ckpt`` before the run stops (:class:`SaveOnSigterm`).
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.dirpath is None:
                cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if cb.save_last is None:
                cb.save_last = True
            # Lightning reads an integer val_check_interval of 1 (validate after every batch)
            # as "once per epoch" and would then save only at the epoch's end
            if (cb._save_on_train_epoch_end is None and isinstance(trainer.val_check_interval, int)
                    and trainer.limit_val_batches != 0):
                cb._save_on_train_epoch_end = False
    if trainer.checkpoint_callback is not None and not any(
            isinstance(cb, SaveOnSigterm) for cb in trainer.callbacks):
        trainer.callbacks.append(SaveOnSigterm())


def main(args: list[str]) -> None:
    """``python -m dvpo_lightning fit|validate|test|predict ...`` (``args`` from the
    subcommand on; LightningCLI reads ``sys.argv`` itself when they are the process's own)."""
    cli_main(None if args == sys.argv[1:] else args)
