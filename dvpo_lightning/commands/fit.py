"""``python -m dvpo_lightning fit`` (and LightningCLI's ``validate``, ``test``, ``predict``):
every stage is a LightningCLI run with its own config.

    python -m dvpo_lightning fit --config configs/sft.yaml [--model.init_args.optim.lr=3e-4 ...]

Every ``fit`` logs to W&B through :class:`~dvpo_lightning.runtime.loggers.AutoWandbLogger`
(offline by itself without an API key); ``--trainer.logger=false`` turns it off.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dvpo_lightning.callbacks.preemption import SaveOnSigterm
from dvpo_lightning.commands.parser import KeySuggestingParser
from dvpo_lightning.rollout.experience_maker import check_rollout_batch
from dvpo_lightning.runtime.checkpointing import AtomicCheckpointIO
from dvpo_lightning.runtime.hardware import check_trainer_config
from dvpo_lightning.runtime.loggers import AutoWandbLogger, LogConfigCallback, quiet_libraries
from dvpo_lightning.runtime.step_unit import count_in_steps, use_step_progress_bar

DEFAULT_LOGGER = {"class_path": "dvpo_lightning.runtime.loggers.AutoWandbLogger"}


class DVPOCLI(LightningCLI):
    """LightningCLI with model and data chosen by ``class_path``.

    The tokenizer is named once, in ``data``; the module receives the same path (a link, so
    the policy and its data can never disagree on the vocabulary). The default logger is
    :class:`AutoWandbLogger` (configs need not name it); its run directory goes under
    ``trainer.default_root_dir`` unless ``save_dir`` is set. Checkpoints are atomic, kept in
    ``<default_root_dir>/checkpoints`` with ``last.ckpt``, and SIGTERM saves one
    (:func:`make_resumable`). Before any model loads, the hardware, an RL config's rollout
    batch and the data files are checked (:meth:`before_instantiate_classes`).
    """

    _checked_data = None  # the DataModule before_instantiate_classes read the files of

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        """Check what can be checked before any model is loaded (a real one takes minutes):
        refuse a strategy / precision / accelerator this machine cannot run, an RL rollout batch
        that PPO's mini-batches cannot split (:func:`check_rl_batch`), and read, validate and
        tokenize the data files (:func:`checked_datamodule`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_config(config["trainer"])
        check_rl_batch(config)
        self._checked_data = checked_datamodule(config.get("data"))
        unit = step_unit(config)
        check_one_batch(self._checked_data, unit or "optimizer step")
        if unit is not None:  # RL steps / DPO steps: one unit, across passes over the file
            count_in_steps(config["trainer"], unit)

    def instantiate_classes(self) -> None:
        """LightningCLI's, then the DataModule whose files :meth:`before_instantiate_classes`
        read replaces the parser's copy of it (built from the same arguments, never set up), so
        the files are read once."""
        super().instantiate_classes()
        if self._checked_data is not None:
            self.datamodule = self._checked_data
            init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            init["data"] = self.datamodule

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, AutoWandbLogger):
                logger.use_save_dir(trainer.default_root_dir)
        make_resumable(trainer)
        unit = getattr(self.model, "STEP_UNIT", None)
        if unit is not None:
            use_step_progress_bar(trainer, unit)
        return trainer


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def checked_datamodule(data) -> object | None:
    """The DataModule of a parsed ``data`` config (``class_path`` + ``init_args``) with its
    files read, validated and tokenized (its ``check_files()``: the tokenizer loads, no model
    does); None when there is no ``data`` or its class has no ``check_files``.

    Raises:
        DataFormatError: a bad file or row, a file of another kind, a file written for another
            tokenizer (the DataModule's own checks).
    """
    if data is None or not data.get("class_path"):
        return None
    cls = _import(data["class_path"])
    if not hasattr(cls, "check_files"):
        return None
    init = data.get("init_args")
    datamodule = cls(**(init.as_dict() if init is not None else {}))
    datamodule.check_files()
    return datamodule


def step_unit(config) -> str | None:
    """The ``STEP_UNIT`` of a parsed config's model class (``"RL step"``, DPO's ``"step"``):
    the stage counts steps, not epochs (:mod:`dvpo_lightning.runtime.step_unit`); None for
    the stages that count epochs, or a model not named by ``class_path``."""
    class_path = config.get("model.class_path") if hasattr(config, "get") else None
    if not class_path:
        return None
    try:
        return getattr(_import(class_path), "STEP_UNIT", None)
    except (ImportError, AttributeError):  # (LightningCLI reports a bad class_path itself)
        return None


def train_batches(datamodule) -> int | None:
    """Batches in one pass over a checked DataModule's training file (its loader drops the
    last, partial batch); None when it does not say."""
    train_set, batch_size = (getattr(datamodule, "train_set", None),
                             getattr(datamodule, "batch_size", None))
    if train_set is None or not batch_size:
        return None
    return len(train_set) // batch_size


def check_one_batch(datamodule, unit: str) -> None:
    """Refuse a training file with fewer rows than one batch, before any model loads: every
    stage's loader drops the last, partial batch, so such a file trains on nothing (a stage
    counted in epochs would otherwise stop in its sampler after the models loaded).

    Args:
        datamodule: a checked DataModule (:func:`checked_datamodule`), or None.
        unit: the stage's step (``"RL step"``, ``"optimizer step"``), for the message.

    Raises:
        ValueError: naming the file, its rows, ``data.batch_size`` and the fix.
    """
    if train_batches(datamodule) != 0:
        return
    rows, batch_size = len(datamodule.train_set), datamodule.batch_size
    path = getattr(datamodule, "train_path", "the training file")
    what = "prompts" if unit == "RL step" else "training rows"
    raise ValueError(f"data.init_args.train_path={path} gives {rows} {what}, fewer than "
                     f"data.init_args.batch_size={batch_size}, so not one {unit} can be formed. "
                     f"Fix: set --data.init_args.batch_size={rows} (or less), or add rows")


def estimator_group_size(estimator) -> int:
    """Responses per prompt of a parsed ``estimator`` config (``class_path`` + ``init_args``):
    the estimator is built (a few numbers, no model) and asked."""
    init = estimator.get("init_args")
    kwargs = init.as_dict() if hasattr(init, "as_dict") else dict(init or {})
    return _import(estimator["class_path"])(**kwargs).group_size


def check_rl_batch(config) -> None:
    """For an RL config (``model.init_args`` has an ``estimator`` and ``ppo`` settings), raise
    unless ``data.init_args.batch_size`` × the estimator's group size is a multiple of
    ``model.init_args.ppo.mini_batch_size`` (:func:`check_rollout_batch`, which the RL module
    applies again at fit start); other configs pass."""
    estimator, ppo = config.get("model.init_args.estimator"), config.get("model.init_args.ppo")
    batch_size = config.get("data.init_args.batch_size")
    if estimator is None or ppo is None or batch_size is None or not estimator.get("class_path"):
        return
    mini = ppo.get("mini_batch_size") if hasattr(ppo, "get") else ppo.mini_batch_size
    check_rollout_batch(batch_size, estimator_group_size(estimator), mini)


@contextmanager
def own_command_line(args: list[str]) -> Iterator[None]:
    """``sys.argv`` is ``[program, *args]`` inside, the caller's ``sys.argv`` again after.

    A stage run inside another command (the in-process pipeline, a test, a benchmark) then
    sees the command line it would have as a process of its own: LightningCLI parses it from
    ``sys.argv`` and has no outer arguments to warn about ("not recommended to provide both
    args and command line arguments", once per stage), and whatever else reads ``sys.argv``
    during the run (a DDP launcher re-running the script, W&B's record of the command) sees
    the stage's arguments, not the outer command's.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dvpo_lightning", *args]
    try:
        yield
    finally:
        sys.argv = saved


def cli_main(args: list[str] | None = None, run: bool = True) -> DVPOCLI:
    """The LightningCLI entry (also used by tests with ``args=[...]``, ``run=False``).

    Args:
        args: the stage's command line (``["fit", "--config", ...]``), run as the process's
            own (:func:`own_command_line`); None: the process's ``sys.argv``.
        run: run the subcommand; False only builds the CLI (model, data, trainer).
    """
    quiet_libraries()
    if args is None:
        return _build_cli(run)
    with own_command_line(list(args)):
        return _build_cli(run)


def _build_cli(run: bool) -> DVPOCLI:
    """:class:`DVPOCLI` parsing ``sys.argv``."""
    return DVPOCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_class=KeySuggestingParser,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
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
