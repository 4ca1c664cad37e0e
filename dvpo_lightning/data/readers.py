"""Read a user's local data file (or ``save_to_disk`` directory) into plain rows, with the
values as written.

Supported inputs:

- ``.jsonl``: one JSON object per line; empty lines are ignored.
- ``.json``: a JSON array of objects, or JSON lines.
- ``.parquet``.
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then
  ``split`` picks the split).

JSON is parsed by the ``json`` module alone, so a malformed line is reported with its line
number and no value is changed on the way (``datasets``' JSON builder would round floats and
decode strings that spell JSON); Parquet is read by pyarrow; ``save_to_disk`` directories by
``datasets.load_from_disk`` (``keep_in_memory=True``). Nothing is cached beside the user's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_from_disk

from dvpo_lightning.data.errors import DataFormatError

SUPPORTED = (".jsonl", ".json", ".parquet", "a directory saved by datasets' save_to_disk")
_SINGLE_SPLIT = "train"  # the name `datasets` gives the one split of a plain file


def read_records(path: str | Path, split: str | None = None) -> tuple[list[dict], list[int] | None]:
    """The rows of a data file as Python dicts, with the values written in it, plus the
    1-based line number of each row for JSON lines files (None for JSON arrays, Parquet and
    ``save_to_disk`` directories).

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` directory.
        split: the split to take from a saved ``DatasetDict`` (required there). A plain file
            or a saved single ``Dataset`` has one split; ``None`` or ``"train"`` selects it.

    Raises:
        DataFormatError: missing path, unsupported suffix, malformed JSON (with the line
            number), a JSON value that is not an object, an empty file, or a bad ``split``.
    """
    path = _check_path(path)
    if path.is_dir():
        return _read_saved(path, split).to_list(), None
    _check_single_split(path, split)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path), None
    return _scan_json_lines(path) if path.suffix.lower() == ".jsonl" else _scan_json(path)


def _read_parquet(path: Path) -> list[dict]:
    """The rows of a Parquet file, read by pyarrow (``datasets`` fails on some valid files,
    e.g. one with no rows)."""
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(path, f"could not be read as Parquet ({type(e).__name__}: {e})",
                              "check that the file is a complete Parquet file (re-export it)"
                              ) from e
    if not rows:
        raise _empty(path)
    return rows


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(
            path, "no such file or directory", "check the path (relative paths are resolved "
            f"from the working directory, {Path.cwd()})"
        )
    if not path.is_dir() and path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise DataFormatError(
            path, f"unsupported file type '{path.suffix}'",
            f"use one of: {', '.join(SUPPORTED)} (convert other formats with pandas or "
            "datasets)",
        )
    return path


def _check_single_split(path: Path, split: str | None) -> None:
    if split not in (None, _SINGLE_SPLIT):
        raise DataFormatError(
            path, f"is a single file, which has only the split '{_SINGLE_SPLIT}', "
            f"not '{split}'", "leave split unset, or point at the file that holds that split",
        )


def _scan_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """Check every line is a JSON object (empty lines are skipped); return the rows and the
    line number of each row."""
    values: list[dict] = []
    lines: list[int] = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _unreadable(path, e) from e
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, f"is not UTF-8 text ({e})",
                                      "re-save the file with UTF-8 encoding", line=n) from e
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except RecursionError as e:
                raise _too_deep(path, line=n) from e
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    path, f"not valid JSON ({e.msg} at column {e.colno})"
                    if e.lineno == 1 else f"not valid JSON ({e.msg} at the end of the line)",
                    "write exactly one JSON object per line (no trailing commas, double-quoted "
                    "strings, no line breaks inside an object)", line=n,
                ) from e
            if not isinstance(value, dict):
                raise DataFormatError(
                    path, f"is a JSON {_json_type(value)}, not an object",
                    'write one object per line, e.g. {"prompt": "...", "response": "..."}',
                    line=n,
                )
            values.append(value)
            lines.append(n)
    if not lines:
        raise _empty(path)
    return values, lines


def _scan_json(path: Path) -> tuple[list[dict], list[int] | None]:
    """Check a ``.json`` file: a JSON array of objects (returns no line numbers) or JSON lines
    (returns them, as :func:`_scan_json_lines`)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"is not UTF-8 text ({e})",
                              "re-save the file with UTF-8 encoding") from e
    except OSError as e:
        raise _unreadable(path, e) from e
    if not text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            # JSON lines (or a malformed line, reported there)
            return _scan_json_lines(path)
        if isinstance(whole, dict) and text.strip().count("\n") > 0:
            keys = ", ".join(map(str, whole))[:200] or "none"
            raise DataFormatError(
                path, f"holds one JSON object (keys: {keys}), "
                "not an array of rows",
                "put the rows in a top-level JSON array, e.g. `jq '.data' in.json > out.json`, "
                "or write them as JSON lines",
            )
        return _scan_json_lines(path)
    try:
        rows = json.loads(text)
    except RecursionError as e:
        raise _too_deep(path) from e
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines whose first line is an array
            return _scan_json_lines(path)
        raise DataFormatError(path, f"not valid JSON ({e.msg} at column {e.colno})",
                              "fix the JSON syntax at that position", line=e.lineno) from e
    if not rows:
        raise _empty(path)
    for i, value in enumerate(rows):
        if not isinstance(value, dict):
            raise DataFormatError(path, f"is a JSON {_json_type(value)}, not an object",
                                  "make every element of the top-level array an object", row=i)
    return rows, None


def _read_saved(path: Path, split: str | None) -> Dataset:
    try:
        saved = load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError as e:
        raise DataFormatError(
            path, "is a directory but not one written by datasets' save_to_disk "
            "(no dataset_info.json or dataset_dict.json)",
            f"point at a save_to_disk directory or at a file ({', '.join(SUPPORTED[:3])})",
        ) from e
    if isinstance(saved, DatasetDict):
        names = ", ".join(repr(s) for s in saved)
        if split is None:
            raise DataFormatError(path, f"is a DatasetDict with splits {names}",
                                  "choose one with split=<name>")
        if split not in saved:
            raise DataFormatError(path, f"has no split '{split}'; the splits are {names}",
                                  "choose one of those with split=<name>")
        ds = saved[split]
    else:
        ds = saved
        if split not in (None, _SINGLE_SPLIT, ds.split):
            raise DataFormatError(path, f"is a single Dataset (no splits to choose '{split}' from)",
                                  "leave split unset")
    if len(ds) == 0:
        raise _empty(path)
    return ds


def _unreadable(path: Path, e: OSError) -> DataFormatError:
    return DataFormatError(path, f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                           "check that you may read it (permissions, ownership) and that its "
                           "drive is mounted")


def _too_deep(path: Path, line: int | None = None) -> DataFormatError:
    return DataFormatError(path, "nests JSON arrays or objects too deeply to parse",
                           "flatten the structure (rows need at most a list of messages)",
                           line=line)


def _empty(path: Path) -> DataFormatError:
    return DataFormatError(path, "has no rows (empty file)", "add at least one row")


def _json_type(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
