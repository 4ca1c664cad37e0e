"""The one error type for bad user data, with messages that say where and how to fix it."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file, or one of its rows, does not follow the expected format.

    The message reads ``"{path}, row {i} (line {n}): field '{field}' {problem}. Fix: {fix}"``;
    the parts that do not apply (no row, no line, no field) are left out. The same parts are
    kept as attributes so callers and tests need not parse the text.

    Attributes:
        path: the file or directory the data came from.
        row: 0-based row index in the dataset, or None for a file-level problem.
        line: 1-based line number in a JSON-lines file, or None.
        field: the offending field, e.g. ``"chosen"`` or ``"completions[2].overall_score"``.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        fix: str,
        *,
        row: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.row, self.line, self.field = str(path), row, line, field
        self.problem, self.fix = problem, fix
        super().__init__(format_message(path, problem, fix, row=row, line=line, field=field))


def format_message(
    path: str | Path,
    problem: str,
    fix: str,
    *,
    row: int | None = None,
    line: int | None = None,
    field: str | None = None,
) -> str:
    """Build ``"{path}, row {i} (line {n}): field '{field}' {problem}. Fix: {fix}"``."""
    where = str(path)
    if row is not None:
        where += f", row {row}"
        if line is not None:
            where += f" (line {line})"
    elif line is not None:
        where += f", line {line}"
    what = f"field '{field}' {problem}" if field is not None else problem
    return f"{where}: {what.rstrip('.')}. Fix: {fix}"
