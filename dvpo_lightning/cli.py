"""``python -m dvpo_lightning``: LightningCLI for every stage, plus the task-data command.

    python -m dvpo_lightning fit --config configs/sft.yaml [--model.lr=3e-4 ...]
    python -m dvpo_lightning data --config configs/data.yaml [--out data/sorting ...]
    python -m dvpo_lightning pipeline --config configs/pipeline.yaml [--force true]
    python -m dvpo_lightning sweep configs/sweeps/kl.yaml [--out runs/sweeps/kl ...]
    python -m dvpo_lightning explain --gvm runs/sorting/gvm/model --prompt P --responses A B
    python -m dvpo_lightning convert --gguf smollm2-135m-instruct --out models/smollm2

Every ``fit`` logs to W&B through :class:`~dvpo_lightning.loggers.AutoWandbLogger` (offline by
itself without an API key); ``--trainer.logger=false`` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from dvpo_lightning.checkpointing import make_resumable
from dvpo_lightning.checks import KeySuggestingParser, check_trainer_config
from dvpo_lightning.loggers import AutoWandbLogger, LogConfigCallback

DEFAULT_LOGGER = {"class_path": "dvpo_lightning.loggers.AutoWandbLogger"}


class DVPOCLI(LightningCLI):
    """LightningCLI with model and data chosen by ``class_path``.

    The tokenizer is named once, in ``data``; the module receives the same path (a link, so
    the policy and its data can never disagree on the vocabulary). The default logger is
    :class:`AutoWandbLogger` (configs need not name it); its run directory goes under
    ``trainer.default_root_dir`` unless ``save_dir`` is set. Checkpoints are atomic, kept in
    ``<default_root_dir>/checkpoints`` with ``last.ckpt``, and SIGTERM saves one
    (:func:`~dvpo_lightning.checkpointing.make_resumable`).
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


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Frozen parts (reference, GVM, RM) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _data_task(args: list[str]) -> str:
    """The ``task`` a ``data`` command asks for: ``--task`` wins over the config file's key."""
    task = "sorting"
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            import yaml

            task = (yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("task", task)
    for i, a in enumerate(args):
        if a.startswith("--task="):
            task = a.split("=", 1)[1]
        elif a == "--task" and i + 1 < len(args):
            task = args[i + 1]
    return task


def data_main(args: list[str]) -> None:
    """``python -m dvpo_lightning data``: generate every split of an embedded task (the
    instruction task samples its responses from a model: ``make_instruct_data``)."""
    from jsonargparse import CLI

    if _data_task(args) == "instruct":
        from dvpo_lightning.tasks.make_instruct_data import make_instruct_data as make
    else:
        from dvpo_lightning.tasks.make_data import make_task_data as make

    manifest = CLI(make, args=args, as_positional=False)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(f"task data written: {counts}; mean gold {manifest['mean_gold']}")


def _convert(args: list[str]) -> None:
    from dvpo_lightning.models.named import convert_main

    convert_main(args)


def _pipeline(args: list[str]) -> None:
    from dvpo_lightning.pipeline import pipeline_main

    pipeline_main(args)


def _sweep(args: list[str]) -> None:
    from dvpo_lightning.sweep import sweep_main

    sweep_main(args)


def _explain(args: list[str]) -> None:
    from dvpo_lightning.explain import explain_main

    explain_main(args)


EXTRA_COMMANDS = {"data": data_main, "pipeline": _pipeline, "sweep": _sweep,
                  "explain": _explain, "convert": _convert}


def cli_main(args: list[str] | None = None, run: bool = True) -> DVPOCLI:
    """The LightningCLI entry (also used by tests with ``args=[...]``, ``run=False``)."""
    _quiet_libraries()
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        _quiet_libraries()
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return
    cli_main(argv if argv != sys.argv[1:] else None)
