"""Embedded tasks: prompt generators, gold scorers and the tokenizer builder."""

from dvpo_lightning.tasks.base import Task
from dvpo_lightning.tasks.instruct import InstructTask
from dvpo_lightning.tasks.sorting import SortingTask

TASKS: dict[str, type] = {"sorting": SortingTask, "instruct": InstructTask}


def get_task(name: str, **kwargs) -> Task:
    """The embedded task called ``name``; the error lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "InstructTask", "SortingTask", "Task", "get_task"]
