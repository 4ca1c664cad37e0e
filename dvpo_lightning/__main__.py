"""``python -m dvpo_lightning COMMAND [ARGS]``: one table of commands, each with its purpose."""

from __future__ import annotations

import importlib
import sys

# name → (module with ``main(args)``, one-line purpose). LightningCLI's own subcommands share
# the fit module.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("dvpo_lightning.commands.fit",
            "train one stage (SFT, reward model, GVM, RL) from a config: LightningCLI"),
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
    lines = ["usage: python -m dvpo_lightning COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {purpose}" for name, (_, purpose) in COMMANDS.items()]
    lines += ["", "python -m dvpo_lightning COMMAND --help shows a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from dvpo_lightning.runtime.loggers import quiet_libraries

    quiet_libraries()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv if argv[0] in LIGHTNING_COMMANDS else argv[1:])


if __name__ == "__main__":
    main()
