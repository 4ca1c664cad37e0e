"""The ``instruct`` task: instructions with checkable constraints and a programmatic judge."""

from dvpo_lightning.tasks.instruct.constraints import (
    CONSTRAINT_TYPES,
    KINDS,
    MAX_CONSTRAINTS,
    BulletPoints,
    Constraint,
    EndingPhrase,
    ForbiddenWord,
    JsonFormat,
    Keywords,
    LetterCase,
    SentenceCount,
    TitleLine,
    WordCount,
    conflict,
    constraints_of,
    parse_constraint,
    sample_constraints,
)
from dvpo_lightning.tasks.instruct.task import InstructTask
from dvpo_lightning.tasks.instruct.topics import REQUEST_FORMS, TOPICS

__all__ = [
    "BulletPoints", "CONSTRAINT_TYPES", "Constraint", "EndingPhrase", "ForbiddenWord",
    "InstructTask", "JsonFormat", "KINDS", "Keywords", "LetterCase", "MAX_CONSTRAINTS",
    "REQUEST_FORMS", "SentenceCount", "TOPICS", "TitleLine", "WordCount", "conflict",
    "constraints_of", "parse_constraint", "sample_constraints",
]
