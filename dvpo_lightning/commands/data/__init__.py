"""``python -m dvpo_lightning data``: generate every split of an embedded task.

    python -m dvpo_lightning data --config configs/data.yaml [--out data/sorting ...]

The sorting task is made by :func:`~dvpo_lightning.commands.data.sorting.make_task_data`; the
instruction task samples its responses from a real model
(:func:`~dvpo_lightning.commands.data.instruct.make_instruct_data`).
"""

from __future__ import annotations

from pathlib import Path


def requested_task(args: list[str]) -> str:
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


def main(args: list[str]) -> None:
    """Generate the task's data with the arguments of its generator (``--help`` lists them)."""
    from jsonargparse import CLI

    if requested_task(args) == "instruct":
        from dvpo_lightning.commands.data.instruct import make_instruct_data as make
    else:
        from dvpo_lightning.commands.data.sorting import make_task_data as make

    manifest = CLI(make, args=args, as_positional=False)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(f"task data written: {counts}; mean gold {manifest['mean_gold']}")
