"""``python -m dvpo_lightning COMMAND [--debug] [ARGS]``: one table of commands, each with its
purpose, and one way of reporting errors (:mod:`dvpo_lightning.commands.errors`)."""

from __future__ import annotations

import importlib
import os
import sys

from dvpo_lightning.commands.errors import DEBUG_ENV, reported_errors

# name → (module with ``main(args)``, one-line purpose). LightningCLI's own subcommands share
# the fit module.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("dvpo_lightning.commands.fit",
            "train one stage (SFT, reward model, GVM, RL, DPO) from a config: LightningCLI"),
    "validate": ("dvpo_lightning.commands.fit", "evaluate a stage's model (LightningCLI)"),
    "test": ("dvpo_lightning.commands.fit", "test a stage's model (LightningCLI)"),
    "predict": ("dvpo_lightning.commands.fit", "predict with a stage's model (LightningCLI)"),
    "data": ("dvpo_lightning.commands.data", "generate every split of an embedded task"),
    "pipeline": ("dvpo_lightning.commands.pipeline",
                 "run the whole study: data, stage 1, every method x seed, the report"),
    "sweep": ("dvpo_lightning.commands.sweep", "run a W&B sweep file locally (offline)"),
    "explain": ("dvpo_lightning.commands.explain",
                "picture the token-level values a GVM gives responses"),
    "convert": ("dvpo_lightning.commands.convert",
                "turn a GGUF file or a named model into a Hugging Face directory"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m dvpo_lightning COMMAND [--debug] [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {purpose}" for name, (_, purpose) in COMMANDS.items()]
    lines += ["", "python -m dvpo_lightning COMMAND --help shows a command's arguments.", "",
              "errors: a mistake in the input (a bad data row, config value, path, batch size)",
              "is printed as one 'error: ...' line naming the fix, and the command exits with",
              f"status 2. --debug right after COMMAND (or {DEBUG_ENV}=1 in the environment)",
              "prints the traceback instead. Other exceptions always show their traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run ``argv`` (default: the process's arguments): ``COMMAND [--debug] [ARGS]``."""
    from_process = argv is None
    argv = list(sys.argv[1:] if from_process else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if argv[1:2] == ["--debug"]:
        del argv[1]
        os.environ[DEBUG_ENV] = "1"  # also reaches the subprocesses a pipeline starts
        if from_process:  # LightningCLI reads sys.argv itself
            sys.argv[1:] = argv
    from dvpo_lightning.runtime.loggers import quiet_libraries

    quiet_libraries()
    with reported_errors():
        module = importlib.import_module(COMMANDS[argv[0]][0])
        module.main(argv if argv[0] in LIGHTNING_COMMANDS else argv[1:])


if __name__ == "__main__":
    main()
