"""Read a user's local data file (or ``save_to_disk`` directory) into a ``datasets.Dataset``.

Supported inputs:

- ``.jsonl``: one JSON object per line; empty lines are ignored.
- ``.json``: a JSON array of objects, or JSON lines.
- ``.parquet``.
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then
  ``split`` picks the split).

JSON is checked with the ``json`` module before ``datasets`` sees it, so a malformed line is
reported with its line number instead of as an Arrow error. Everything is loaded with
``keep_in_memory=True``; the JSON/Parquet builders cache in the ``datasets`` default cache,
never beside the user's data.

:func:`read_records` (what ``load_examples`` uses) returns plain dicts with the values as
written, bypassing ``datasets`` for JSON and Parquet (see its docstring for what ``datasets``
5.2 would change).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.packaged_modules.json.json import JsonConfig

from dvpo_lightning.data.errors import DataFormatError

SUPPORTED = (".jsonl", ".json", ".parquet", "a directory saved by datasets' save_to_disk")
_SINGLE_SPLIT = "train"  # the name `datasets` gives the one split of a plain file


def read_rows(path: str | Path, split: str | None = None) -> Dataset:
    """Read a local data file or ``save_to_disk`` directory into a ``Dataset``.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` directory.
        split: the split to take from a saved ``DatasetDict`` (required there). A plain file
            or a saved single ``Dataset`` has one split; ``None`` or ``"train"`` selects it.

    Raises:
        DataFormatError: missing path, unsupported suffix, malformed JSON (with the line
            number), a JSON value that is not an object, an empty file, or a bad ``split``.
    """
    return read_rows_with_lines(path, split)[0]


def read_rows_with_lines(
    path: str | Path, split: str | None = None
) -> tuple[Dataset, list[int] | None]:
    """Like :func:`read_rows`, plus the 1-based line number of each row for JSON lines files.

    The line numbers are ``None`` where rows do not map to lines (JSON arrays, Parquet,
    ``save_to_disk`` directories).
    """
    path = _check_path(path)
    if path.is_dir():
        return _read_saved(path, split), None
    _check_single_split(path, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _load(path, "parquet"), None
    if suffix == ".jsonl":
        _, lines, has_blank = _scan_json_lines(path, check_types=True)
        return _load_json_lines(path, has_blank), lines
    _, lines, has_blank = _scan_json(path, check_types=True)
    return (_load_json_lines(path, has_blank) if lines else _load(path, "json")), lines


def read_records(path: str | Path, split: str | None = None) -> tuple[list[dict], list[int] | None]:
    """The rows of a data file as Python dicts, with the values written in it, plus the
    1-based line number of each row for JSON lines files (else None).

    JSON is parsed by the ``json`` module alone. ``datasets`` 5.2 changes values in a JSON file
    whose fields mix types anywhere (even in unused columns): it re-reads the whole file with
    ujson, which rounds every float to 10 significant digits, and it decodes strings that spell
    JSON (``"4.5"`` becomes ``4.5``). Parquet files are typed and read by pyarrow;
    ``save_to_disk`` directories by ``datasets``.

    Raises:
        DataFormatError: as :func:`read_rows`.
    """
    path = _check_path(path)
    if path.is_dir():
        return _read_saved(path, split).to_list(), None
    _check_single_split(path, split)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path), None
    values, lines, _ = (_scan_json_lines(path) if path.suffix.lower() == ".jsonl"
                        else _scan_json(path))
    return values, lines


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


def _load(path: Path, builder: str) -> Dataset:
    kwargs = {}
    if builder == "json" and "parse_agent_traces" in JsonConfig.__dataclass_fields__:
        # datasets >= 5 rewrites files whose columns look like agent traces (type + message)
        kwargs["parse_agent_traces"] = False
    try:
        ds = load_dataset(builder, data_files=str(path), split=_SINGLE_SPLIT,
                          keep_in_memory=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a located error
        raise DataFormatError(
            path, f"could not be read by datasets ({type(e).__name__}: {e})",
            f"check that the file is valid {builder} with one record per row",
        ) from e
    if len(ds) == 0:
        raise _empty(path)
    return ds


def _load_json_lines(path: Path, has_blank: bool) -> Dataset:
    """Load validated JSON lines. datasets 5.2's json builder fails on empty lines when a
    field has mixed types (its ujson re-scan parses every line), so a file with empty lines
    that it rejects is retried from a compacted temporary copy."""
    try:
        return _load(path, "json")
    except DataFormatError:
        if not has_blank:
            raise
    with tempfile.TemporaryDirectory() as tmp:
        compact = Path(tmp) / path.name
        with open(path, encoding="utf-8-sig") as src, open(compact, "w", encoding="utf-8") as dst:
            dst.writelines(line for line in src if line.strip())
        try:
            return _load(compact, "json")
        except DataFormatError as e:
            raise DataFormatError(path, e.problem, e.fix) from e


def _scan_json_lines(path: Path, check_types: bool = False) -> tuple[list[dict], list[int], bool]:
    """Check every line is a JSON object; return the rows, the line number of each row and
    whether any empty lines were skipped. ``check_types``: refuse what ``datasets`` would
    change (see :class:`_MixedTypes`)."""
    values: list[dict] = []
    lines: list[int] = []
    has_blank = False
    types = _MixedTypes()
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
                has_blank = True
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
            if check_types:
                types.add(value, len(lines), n)
            values.append(value)
            lines.append(n)
    if not lines:
        raise _empty(path)
    types.check(path)
    return values, lines, has_blank


def _scan_json(path: Path, check_types: bool = False
               ) -> tuple[list[dict], list[int] | None, bool]:
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
            return _scan_json_lines(path, check_types)
        if isinstance(whole, dict) and text.strip().count("\n") > 0:
            keys = ", ".join(map(str, whole))[:200] or "none"
            raise DataFormatError(
                path, f"holds one JSON object (keys: {keys}), "
                "not an array of rows",
                "put the rows in a top-level JSON array, e.g. `jq '.data' in.json > out.json`, "
                "or write them as JSON lines",
            )
        return _scan_json_lines(path, check_types)
    try:
        rows = json.loads(text)
    except RecursionError as e:
        raise _too_deep(path) from e
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines whose first line is an array
            return _scan_json_lines(path, check_types)
        raise DataFormatError(path, f"not valid JSON ({e.msg} at column {e.colno})",
                              "fix the JSON syntax at that position", line=e.lineno) from e
    if not rows:
        raise _empty(path)
    types = _MixedTypes()
    for i, value in enumerate(rows):
        if not isinstance(value, dict):
            raise DataFormatError(path, f"is a JSON {_json_type(value)}, not an object",
                                  "make every element of the top-level array an object", row=i)
        if check_types:
            types.add(value, i, None)
    types.check(path)
    return rows, None, False


_CHECKED_FIELDS = frozenset(
    "prompt response completion score policy group id messages role content instruction input "
    "output completions overall_score model chosen rejected".split()
)


class _MixedTypes:
    """Find strings that datasets 5.2 would silently change.

    Where a field holds strings in some rows and other JSON values in others, the json
    builder stores it as a ``Json`` feature, and a string there that is itself valid JSON
    text (``"4.5"``, ``"true"``, ``"[1]"``, ``"null"``) is read back decoded (``4.5``, ...).
    We record, per field path, whether non-strings occur and the first such string; only
    the fields the parsers in ``formats.py`` read are checked (``_CHECKED_FIELDS``), so an
    unused annotation column never blocks a file.
    """

    def __init__(self) -> None:
        self.non_str: set[tuple] = set()
        self.first_jsonish: dict[tuple, tuple[str, int, int | None, str]] = {}

    def add(self, value: object, row: int, line: int | None) -> None:
        stack = [(value, (), "")]
        while stack:
            value, path, name = stack.pop()
            if isinstance(value, str):
                if path not in self.first_jsonish and _is_json_text(value):
                    self.first_jsonish[path] = (name, row, line, value)
                continue
            if value is None:
                continue
            self.non_str.add(path)
            if isinstance(value, dict):
                stack.extend((v, (*path, k), f"{name}.{k}" if name else k)
                             for k, v in value.items() if k in _CHECKED_FIELDS)
            elif isinstance(value, list):
                stack.extend((v, (*path, "*"), f"{name}[{j}]") for j, v in enumerate(value))

    def check(self, path: Path) -> None:
        for key, (name, row, line, value) in self.first_jsonish.items():
            if key in self.non_str:
                raise DataFormatError(
                    path, f"is the string {value[:40]!r}, but other rows hold non-strings in "
                    "this field, and datasets would read this string back as the JSON value "
                    "it spells", "write numbers, booleans and lists as JSON values, not quoted "
                    "strings (one type per field)", row=row, line=line, field=name,
                )


def _is_json_text(text: str) -> bool:
    head = text.lstrip()[:1]
    if not head or head not in '-0123456789[{"tfnNI':
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


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
