"""Canonical examples from the row formats people have, validated row by row.

A *prompt* ``P`` is a non-empty string or a chat message list
``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` whose last message is
from the user. Canonical rows, one per kind (``"id"`` is carried over when the row has one):

====================  ==========================================================================
kind                  canonical row
====================  ==========================================================================
``"prompt"``          ``{"prompt": P}``
``"sft"``             ``{"prompt": P, "response": str}``
``"scored"``          ``{"prompt": P, "response": str, "score": float, "policy": str | None}``
                      (+ ``"group"`` when given)
``"pairwise"``        ``{"prompt": P, "chosen": str, "rejected": str}`` (+ ``"policy"`` when given)
====================  ==========================================================================

Row formats per kind (``format=`` names), and the ``"auto"`` rule, which looks at the fields of
row 0 that are not null (the first matching line wins):

- prompt: ``messages`` field and no ``prompt`` → ``"messages"`` (all messages; a final
  assistant turn is dropped); otherwise ``"flat"`` (``prompt``).
- sft: ``messages`` and no ``prompt`` → ``"messages"`` (prompt = messages[:-1], response = the
  last, an assistant turn); ``instruction`` and ``output`` and no ``prompt`` → ``"alpaca"``
  (prompt = instruction, plus ``"\\n\\n" + input`` when input is non-empty); otherwise
  ``"flat"`` (``prompt`` + ``response``, or its alias ``completion``).
- scored: ``instruction`` and ``completions`` → ``"ultrafeedback"`` (one row per completion:
  response, ``overall_score`` → score, ``model`` → policy); otherwise ``"flat"``
  (``prompt``, ``response``, ``score``, optional ``policy``, ``group``, ``id``).
- pairwise: ``chosen`` is a list → ``"messages"`` (binarized UltraFeedback: chosen/rejected are
  chat lists ending in the assistant answer; prompt = the turns before it, or the ``prompt``
  field when the lists hold only the answer; ``"ultrafeedback"`` is accepted as an alias);
  no ``prompt`` and ``chosen`` is a string containing ``"Human:"`` → ``"hh"`` (Anthropic
  HH-RLHF transcripts); otherwise ``"flat"`` (``prompt``, ``chosen``, ``rejected`` strings).

A file of another kind: when row 0 has none of the requested kind's own fields
(:data:`KIND_FIELDS`) and reads as another kind (tried in :data:`KIND_ORDER`, the most specific
first), the error says which kind the file looks like, and the fix the caller gave for that kind
(``other_kinds``; a DataModule names the option or config that loads it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from datasets import Dataset

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.readers import read_records
from dvpo_lightning.data.rows import (
    FORMAT_ALIASES,
    PARSERS,
    ROLE_NAMES,
    Row,
    detect_format,
    type_name,
)

__all__ = ["PARSERS", "detect_format", "load_examples", "pairs_to_scored", "parse_rows",
           "render_messages_plain"]


# The fields only rows of a kind have: a row with none of them is not of that kind.
KIND_FIELDS: dict[str, frozenset[str]] = {
    "prompt": frozenset({"prompt", "messages"}),
    "sft": frozenset({"response", "completion", "output", "messages"}),
    "scored": frozenset({"score", "completions"}),
    "pairwise": frozenset({"chosen", "rejected"}),
}
# A row can read as several kinds (every pair has a prompt): the most specific is named.
KIND_ORDER = ("pairwise", "scored", "sft", "prompt")
KIND_NAMES = {"prompt": "a prompt file", "sft": "an SFT file", "scored": "a scored file",
              "pairwise": "a pairwise file"}


def guess_kind(row: dict, not_kind: str) -> str | None:
    """The kind other than ``not_kind`` that ``row`` reads as in some format (the first of
    :data:`KIND_ORDER`), or None; only when ``row`` has none of ``not_kind``'s own fields."""
    if not isinstance(row, dict) or any(row.get(f) is not None for f in KIND_FIELDS[not_kind]):
        return None
    for kind in KIND_ORDER:
        if kind == not_kind:
            continue
        for parse, expected in PARSERS[kind].values():
            try:
                parse(Row(row, "", 0, None, "", expected))
            except DataFormatError:
                continue
            return kind
    return None


def _other_kind_error(err: DataFormatError, row: dict, kind: str,
                      other_kinds: Mapping[str, str] | None) -> DataFormatError | None:
    """``err`` (row 0 failed as ``kind``) saying which kind the file looks like, with the
    caller's fix for that kind; None when row 0 reads as no other kind."""
    other = guess_kind(row, kind)
    if other is None:
        return None
    fix = (other_kinds or {}).get(other) or (
        f"load it as kind '{other}' (load_examples(..., kind='{other}')), or give a file of "
        f"'{kind}' rows")
    return DataFormatError(
        err.path, f"{err.problem.rstrip('.')}; this looks like {KIND_NAMES[other]} (row 0 "
        f"reads as '{other}' rows), not '{kind}' rows", fix, row=err.row, line=err.line,
        field=err.field)


def _check_kind_format(kind: str, fmt: str, source: str) -> str:
    if kind not in PARSERS:
        raise DataFormatError(source, f"unknown kind '{kind}'",
                              f"use one of: {', '.join(PARSERS)}")
    fmt = FORMAT_ALIASES.get((kind, fmt), fmt)
    if fmt != "auto" and fmt not in PARSERS[kind]:
        raise DataFormatError(source, f"unknown format '{fmt}' for kind '{kind}'",
                              f"use one of: auto, {', '.join(PARSERS[kind])}")
    return fmt


def parse_rows(
    kind: str,
    rows: Dataset | Iterable[dict],
    source: str,
    format: str = "auto",
    *,
    lines: Sequence[int] | None = None,
    other_kinds: Mapping[str, str] | None = None,
) -> list[dict]:
    """Validate every row and return canonical rows of ``kind`` (see the module docstring).

    Args:
        kind: ``"prompt"``, ``"sft"``, ``"scored"`` or ``"pairwise"``.
        rows: a ``datasets.Dataset`` or any iterable of dicts.
        source: the file name used in error messages.
        format: a format name for ``kind`` or ``"auto"`` (detected from row 0).
        lines: the 1-based line number of each row (JSON lines), for error messages.
        other_kinds: the fix to name when the file looks like another kind (kind → fix, e.g.
            ``{"pairwise": "set data.init_args.train_kind=pairwise"}``).

    Raises:
        DataFormatError: naming the source, the row (and line), the field and the fix.
    """
    fmt = _check_kind_format(kind, format, source)
    data = rows.to_list() if isinstance(rows, Dataset) else list(rows)
    if not data:
        raise DataFormatError(source, "has no rows (empty file)", "add at least one row")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataFormatError(source, f"must be an object, found {type_name(row)}",
                                  "make every row a dict", row=i, line=lines[i] if lines else None)
    if fmt == "auto":
        fmt = detect_format(kind, data[0])
    parse, expected = PARSERS[kind][fmt]
    out = []
    for i, row in enumerate(data):
        r = Row(row, source, i, lines[i] if lines else None, fmt, expected)
        try:
            parsed = parse(r)
        except DataFormatError as err:
            hinted = _other_kind_error(err, row, kind, other_kinds) if i == 0 else None
            if hinted is None:
                raise
            raise hinted from err
        row_id = row.get("id")
        if row_id is not None:
            if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
                raise r.error("id", f"must be a string or an integer, found {type_name(row_id)}",
                              "use a string or integer id, or leave it out")
            for p in parsed:
                p["id"] = row_id
        out.extend(parsed)
    return out


def parse_prompts(rows: Dataset | Iterable[dict], source: str, format: str = "auto", *,
                  lines: Sequence[int] | None = None) -> list[dict]:
    """Canonical ``{"prompt": P}`` rows (formats ``flat``, ``messages``)."""
    return parse_rows("prompt", rows, source, format, lines=lines)


def parse_sft(rows: Dataset | Iterable[dict], source: str, format: str = "auto", *,
              lines: Sequence[int] | None = None) -> list[dict]:
    """Canonical ``{"prompt": P, "response": str}`` rows (``flat``, ``messages``, ``alpaca``)."""
    return parse_rows("sft", rows, source, format, lines=lines)


def parse_scored(rows: Dataset | Iterable[dict], source: str, format: str = "auto", *,
                 lines: Sequence[int] | None = None) -> list[dict]:
    """Canonical ``{"prompt", "response", "score", "policy"}`` rows (``flat``,
    ``ultrafeedback``)."""
    return parse_rows("scored", rows, source, format, lines=lines)


def parse_pairwise(rows: Dataset | Iterable[dict], source: str, format: str = "auto", *,
                   lines: Sequence[int] | None = None) -> list[dict]:
    """Canonical ``{"prompt", "chosen", "rejected"}`` rows (``flat``, ``messages``, ``hh``)."""
    return parse_rows("pairwise", rows, source, format, lines=lines)


def load_examples(
    path: str | Path, kind: str, split: str | None = None, format: str = "auto", *,
    other_kinds: Mapping[str, str] | None = None,
) -> list[dict]:
    """Read a local file or ``save_to_disk`` directory and return its canonical rows.

    Args:
        path: see :func:`~dvpo_lightning.data.readers.read_records`.
        kind: ``"prompt"``, ``"sft"``, ``"scored"`` or ``"pairwise"``.
        split: the split of a saved ``DatasetDict``.
        format: a format name for ``kind``, or ``"auto"``.
        other_kinds: the fix to name when the file looks like another kind (see
            :func:`parse_rows`).

    Raises:
        DataFormatError: for an unreadable file or any invalid row (file, row, line, field).
    """
    _check_kind_format(kind, format, str(path))  # fail before reading a large file
    rows, lines = read_records(path, split)
    return parse_rows(kind, rows, str(path), format, lines=lines, other_kinds=other_kinds)


def pairs_to_scored(
    pairs: Iterable[dict], chosen_return: float = 1.0, rejected_return: float = -1.0
) -> list[dict]:
    """Turn each preference pair into two independent scored rows
    (docs/algorithm.md#from-data-to-rows).

    The chosen response gets ``chosen_return``, the rejected one ``rejected_return``; the
    pairing itself is not kept. ``policy`` (and ``id``) are carried over.
    """
    out = []
    for p in pairs:
        extra = {"id": p["id"]} if "id" in p else {}
        for key, score in (("chosen", chosen_return), ("rejected", rejected_return)):
            out.append({"prompt": p["prompt"], "response": p[key], "score": float(score),
                        "policy": p.get("policy"), **extra})
    return out


def render_messages_plain(messages: str | Sequence[dict[str, str]]) -> str:
    """Render a prompt or conversation as plain text, for tokenizers without a chat template.

    Each message becomes ``"{Role}: {content}\\n"`` (roles ``System``, ``User``,
    ``Assistant``); when the last message is the user's, ``"Assistant:"`` is appended (no
    trailing space or newline) so the text is a prompt for the next answer. A string is
    treated as one user message: ``"hi"`` → ``"User: hi\\nAssistant:"``.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = "".join(f"{ROLE_NAMES[m['role']]}: {m['content']}\n" for m in messages)
    if messages and messages[-1]["role"] == "user":
        text += "Assistant:"
    return text
