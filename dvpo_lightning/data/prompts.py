"""The prompts of a file: a prompt file's rows, or the distinct prompts of a preference file.

An RL run and DPO's held-out evaluation need prompts only. A user's data is usually a
preference file — scored responses (``{prompt, response, score}``, UltraFeedback's
``{instruction, completions}``) or pairs (``{prompt, chosen, rejected}``, binarized
UltraFeedback message lists, HH-RLHF transcripts) — so a prompt reader takes such a file as it
is: each distinct prompt once, in the order of its first row (the GVM, the reward model and the
RL run can then all point at the same file). A file is read as preferences when its row 0 has
the scored or pairwise kind's own fields (:data:`~dvpo_lightning.data.formats.KIND_FIELDS`:
``score`` / ``completions``, ``chosen`` / ``rejected``) and no format was named; everything
else is a prompt file, read row by row as before (``{prompt}``, ``{messages}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from dvpo_lightning.data.formats import KIND_FIELDS, parse_rows
from dvpo_lightning.data.readers import read_records

PREFERENCE_KINDS = ("pairwise", "scored")  # the most specific first (a pair has no score)


def preference_kind(row: object) -> str | None:
    """``"pairwise"`` or ``"scored"`` when ``row`` has that kind's own fields (not null), else
    None (a prompt file, or a row of no known kind: the prompt parser reports it)."""
    if not isinstance(row, dict):
        return None
    for kind in PREFERENCE_KINDS:
        if any(row.get(f) is not None for f in KIND_FIELDS[kind]):
            return kind
    return None


def distinct_prompts(rows: list[dict]) -> list[dict]:
    """``{"prompt": P}`` for each distinct ``P`` of canonical rows, in order of first
    appearance (chat message lists compare by their content)."""
    seen: dict[str, dict] = {}
    for r in rows:
        seen.setdefault(json.dumps(r["prompt"], sort_keys=True), {"prompt": r["prompt"]})
    return list(seen.values())


def load_prompts(path: str | Path, format: str = "auto", split: str | None = None, *,
                 other_kinds: Mapping[str, str] | None = None) -> list[dict]:
    """Canonical ``{"prompt": P}`` rows of ``path``: a prompt file's rows, or the distinct
    prompts of a scored or pairwise file (see the module docstring).

    Args:
        path: see :func:`~dvpo_lightning.data.readers.read_records`.
        format: a prompt format (``flat``, ``messages``) or ``auto``; a named format always
            reads the file as prompts.
        split: the split of a saved ``DatasetDict``.
        other_kinds: the fix to name when a prompt file turns out to be of another kind.

    Raises:
        DataFormatError: naming the file, the row (and line), the field and the fix.
    """
    rows, lines = read_records(path, split)
    kind = preference_kind(rows[0]) if format == "auto" and rows else None
    if kind is None:
        return parse_rows("prompt", rows, str(path), format, lines=lines,
                          other_kinds=other_kinds)
    return distinct_prompts(parse_rows(kind, rows, str(path), lines=lines))
