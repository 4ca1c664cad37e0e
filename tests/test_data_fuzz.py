"""Seeded random malformed rows for every row format (prompt flat/messages; sft flat/messages/
alpaca; scored flat/ultrafeedback; pairwise flat/messages/hh) and container (.jsonl, .json,
.parquet): missing and renamed fields, wrong types (numbers, booleans, null, lists, dicts,
nested wrong messages), empty and huge strings, unicode, JSON-looking strings, extra fields,
and broken files (truncated lines, bad JSON, non-objects, bytes that are not UTF-8).

The property, for every case: loading either raises :class:`DataFormatError` whose short
message names the file, what it blames (a row that was actually broken, or a broken line) and
a fix, or returns exactly what the same values give when parsed in memory, every example well
typed. Never another exception, never a silently changed value. (No row format skips bad rows:
a bad row is an error; only the length policy drops rows, and it counts them.)
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dvpo_lightning.data import DataFormatError, load_examples
from dvpo_lightning.data.formats import PARSERS, parse_rows

SEED = 1234
N_FILE_CASES = 600  # split over the three containers
N_MEMORY_CASES = 600
FORMATS = [(kind, fmt) for kind, fmts in PARSERS.items() for fmt in fmts]
WORDS = ["sort", "these", "digits", "hello", "answer", "Zürich", "naïve", "日本語", "😀", "x y"]


# --- valid rows ----------------------------------------------------------------------------


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def _msg(rng, role):
    return {"role": role, "content": _text(rng)}


def _prompt(rng):
    if rng.random() < 0.6:
        return _text(rng)
    return ([_msg(rng, "system")] if rng.random() < 0.3 else []) + [_msg(rng, "user")]


def _hh(rng, prefix: str) -> str:
    return f"{prefix}\n\nAssistant: {_text(rng)}"


def valid_row(rng: random.Random, kind: str, fmt: str) -> dict:
    """A row of ``kind`` in format ``fmt`` that parses."""
    if (kind, fmt) == ("prompt", "flat"):
        row = {"prompt": _prompt(rng)}
    elif kind == "prompt":
        row = {"messages": [_msg(rng, "user")] + ([_msg(rng, "assistant")]
                                                  if rng.random() < 0.5 else [])}
    elif (kind, fmt) == ("sft", "flat"):
        row = {"prompt": _prompt(rng), rng.choice(["response", "completion"]): _text(rng)}
    elif (kind, fmt) == ("sft", "messages"):
        row = {"messages": [_msg(rng, "user"), _msg(rng, "assistant")]}
    elif kind == "sft":
        row = {"instruction": _text(rng), "input": rng.choice(["", _text(rng)]),
               "output": _text(rng)}
    elif (kind, fmt) == ("scored", "flat"):
        row = {"prompt": _prompt(rng), "response": _text(rng),
               "score": rng.choice([rng.uniform(-3, 3), rng.randint(-3, 3)]),
               "policy": rng.choice(["sft", "rl"]), "group": rng.randint(0, 3)}
    elif kind == "scored":
        row = {"instruction": _text(rng), "completions": [
            {"response": _text(rng), "overall_score": rng.uniform(0, 10), "model": "m"}
            for _ in range(rng.randint(1, 3))]}
    elif (kind, fmt) == ("pairwise", "flat"):
        row = {"prompt": _prompt(rng), "chosen": "good " + _text(rng),
               "rejected": "bad " + _text(rng)}
    elif kind == "pairwise" and fmt == "messages":
        user = _msg(rng, "user")
        row = {"chosen": [user, {"role": "assistant", "content": "good " + _text(rng)}],
               "rejected": [user, {"role": "assistant", "content": "bad " + _text(rng)}]}
    else:  # hh
        prefix = f"\n\nHuman: {_text(rng)}"
        row = {"chosen": _hh(rng, prefix) + " good", "rejected": _hh(rng, prefix) + " bad"}
    if rng.random() < 0.2:
        row["id"] = rng.choice([rng.randint(0, 99), f"id-{rng.randint(0, 99)}"])
    return row


# --- malformations -------------------------------------------------------------------------

BAD_VALUES = [
    0, -7, 3.5, math.nan, math.inf, True, False, None, [], {}, [1, 2], {"a": 1}, [None],
    [{"role": 5}], [{"role": "user"}], [{"role": "user", "content": None}],
    [{"role": "assistant", "content": "a"}], [{"role": "human", "content": "a"}],
    [{"content": "no role"}], [[{"role": "user", "content": "nested"}]],
    "", " ", "\n\t", "😀" * 3, "\u0000", "e\u0301", "مرحبا", "4.5", "true", "[1]", "null", "{}",
    "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi", "Human: hi\n\nAssistant: yo",
    "x" * 200_000, 10**30, -(2**63), 1e308, -0.0,
]


def _slots(value, out):
    """Every (container, key) pair inside ``value``, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((value, k))
            _slots(v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((value, i))
            _slots(v, out)
    return out


def mutate(rng: random.Random, row: dict) -> dict:
    """One to three random malformations of ``row`` (a copy)."""
    row = copy.deepcopy(row)
    for _ in range(rng.randint(1, 3)):
        slots = _slots(row, [])
        op = rng.random()
        if op < 0.15 or not slots:  # an extra field, top-level or nested
            dicts = [row] + [c[k] for c, k in slots if isinstance(c[k], dict)]
            rng.choice(dicts)[rng.choice(["extra", "Prompt", "rating", "meta"])] = \
                copy.deepcopy(rng.choice(BAD_VALUES))
            continue
        parent, key = rng.choice(slots)
        if op < 0.4:  # delete
            del parent[key]
        elif op < 0.5 and isinstance(key, str):  # rename (a typo)
            parent[key + "_"] = parent.pop(key)
        else:
            parent[key] = copy.deepcopy(rng.choice(BAD_VALUES))
    return row


def make_rows(rng: random.Random, kind: str, fmt: str) -> tuple[list, set[int]]:
    """1-4 rows, some malformed; returns the rows and the indices of the malformed ones."""
    rows, bad = [], set()
    for i in range(rng.randint(1, 4)):
        row = valid_row(rng, kind, fmt)
        if rng.random() < 0.5:
            row = mutate(rng, row)
            bad.add(i)
        rows.append(row)
    return rows, bad


# --- containers ----------------------------------------------------------------------------


def _dumps(row, rng) -> str:
    return json.dumps(row, ensure_ascii=rng.random() < 0.5)


class Written(NamedTuple):
    path: Path
    values: list  # the rows as the file holds them
    lines: set[int]  # 1-based lines of a JSON lines file broken on purpose
    rows: set[int]  # rows replaced by non-objects
    file: bool  # the file as a whole is broken (truncated array, bytes that are not UTF-8)
    changed: set[int] = set()  # rows the writer changed (pyarrow: 2 → 2.0 beside 3.5)


def _same(a, b) -> bool:
    """Equal values of equal types, a missing key the same as a null (as Arrow stores it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if a.get(k) is not None or b.get(k) is not None}
        return all(_same(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def write_case(rng: random.Random, path: Path, rows: list) -> Written | None:
    """Write ``rows`` as ``path.suffix``, sometimes broken on purpose (None when the
    container cannot hold the rows)."""
    lines_broken: set[int] = set()
    rows_broken: set[int] = set()
    if path.suffix == ".parquet":
        try:
            # pa.array infers the columns from every row (Table.from_pylist: row 0 only)
            table = pa.Table.from_struct_array(pa.array(rows))
            pq.write_table(table, path)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            return None  # pyarrow cannot store these rows (mixed types): not the reader's job
        if table.num_columns == 0:
            return None  # rows without any field: a table with no columns has no rows
        # pyarrow unifies a column's type (False → 0.0 beside floats, 2 → 2.0): such rows
        # count as changed, and the file's own values are the truth
        values = table.to_pylist()
        changed = {i for i, (a, b) in enumerate(zip(rows, values)) if not _same(a, b)}
        return Written(path, values, lines_broken, rows_broken, False, changed)
    if path.suffix == ".json" and rng.random() < 0.5:
        if rng.random() < 0.1:  # an element that is not an object
            rows = list(rows)
            j = rng.randrange(len(rows))
            rows[j] = rng.choice([[1], "row", 3, None])
            rows_broken.add(j)
        text = json.dumps(rows, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
        truncated = rng.random() < 0.1
        if truncated:
            text = text[: rng.randint(1, max(1, len(text) - 1))]
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return Written(path, json.loads(json.dumps(rows)), lines_broken, rows_broken, truncated)
    lines = [_dumps(r, rng) for r in rows]
    if rng.random() < 0.25:
        j = rng.randrange(len(lines))
        how = rng.randrange(7)
        if how == 0:
            lines[j] = lines[j][: rng.randint(1, max(1, len(lines[j]) - 1))]  # truncated
        elif how == 1:
            lines[j] = lines[j][:-1] + ", }"  # trailing comma
        elif how == 2:
            lines[j] = rng.choice(["[1, 2]", '"text"', "42", "null", "true"])  # not an object
        elif how == 3:
            lines[j] = repr(rows[j])  # Python, not JSON
        elif how == 4:
            lines.insert(j, rng.choice(["", "   ", "\t"]))  # blank lines are fine
            j = None
        elif how == 5:
            lines[j] = lines[j] + " " + lines[j]  # two objects on one line
        else:
            lines[j] = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"  # too deep
        if j is not None:
            lines_broken.add(j + 1)
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        data = "\ufeff".encode() + data  # a BOM is fine
    not_utf8 = rng.random() < 0.03
    if not_utf8:
        data = data.replace(b"\n", b"\n\xff\xfe", 1)
        lines_broken.add(2)
    path.write_bytes(data)
    # a .json file whose first line is broken may read as one JSON document (e.g. "[1, 2]")
    whole = not_utf8 or (path.suffix == ".json" and 1 in lines_broken)
    return Written(path, json.loads(json.dumps(rows)), lines_broken, rows_broken, whole)


# --- the property --------------------------------------------------------------------------


def check_example(kind: str, ex: dict) -> None:
    """Every canonical example is well typed: non-empty strings, messages, finite scores."""
    prompt = ex["prompt"]
    if isinstance(prompt, str):
        assert prompt.strip()
    else:
        assert isinstance(prompt, list) and prompt and prompt[-1]["role"] == "user"
        for m in prompt:
            assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
    fields = {"prompt": [], "sft": ["response"], "scored": ["response"],
              "pairwise": ["chosen", "rejected"]}[kind]
    for f in fields:
        assert isinstance(ex[f], str) and ex[f].strip(), (f, ex)
    if kind == "scored":
        assert isinstance(ex["score"], float) and math.isfinite(ex["score"])
        assert ex["policy"] is None or isinstance(ex["policy"], str)
    if "id" in ex:
        assert isinstance(ex["id"], (str, int)) and not isinstance(ex["id"], bool)


def check_error(err: DataFormatError, source: str, bad_rows: set[int] | None,
                written: Written | None = None) -> None:
    """A short message that names ``source``, the fix, and what it blames: a row in
    ``bad_rows`` (None: any row may be blamed), or a line / the file broken on purpose."""
    msg = str(err)
    assert msg.startswith(source), msg
    assert len(msg) < len(source) + 600, f"not a short message: {msg[:2000]}"
    assert "Fix: " in msg, msg
    if err.field is not None:
        assert f"field '{err.field}'" in msg, msg
    if err.row is not None:
        assert f"row {err.row}" in msg, msg
        allowed = (None if bad_rows is None or (written and written.file)
                   else bad_rows | (written.rows | written.changed if written else set()))
        assert allowed is None or err.row in allowed, f"blames row {err.row} ({allowed}): {msg}"
        return
    assert written is not None, f"no row named: {msg}"
    if err.line is not None:
        assert f"line {err.line}" in msg, msg
        assert err.line in written.lines or written.file, f"blames line {err.line}: {msg}"
    else:
        assert written.lines or written.file, f"blames the file: {msg}"


def outcome(fn, *args, **kwargs):
    """``("ok", examples)`` or ``("error", DataFormatError)``; anything else fails the test."""
    try:
        return "ok", fn(*args, **kwargs)
    except DataFormatError as e:
        return "error", e


def test_malformed_rows_in_memory():
    rng = random.Random(SEED)
    n_errors = 0
    for case in range(N_MEMORY_CASES):
        kind, fmt = rng.choice(FORMATS)
        rows, bad = make_rows(rng, kind, fmt)
        if rng.random() < 0.05:  # a row that is not an object at all
            j = rng.randrange(len(rows))
            rows[j], bad = rng.choice([None, "row", 3, ["prompt"]]), bad | {j}
        fmt_arg = fmt if rng.random() < 0.5 else "auto"
        try:
            status, result = outcome(parse_rows, kind, rows, "mem.jsonl", fmt_arg)
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"case {case}: {kind}/{fmt_arg} crashed on {rows!r:.600}") from e
        if status == "error":
            n_errors += 1
            # a broken row 0 may make "auto" pick another format, and then any row fails
            check_error(result, "mem.jsonl", None if fmt_arg == "auto" and 0 in bad else bad)
        else:
            for ex in result:
                check_example(kind, ex)
    assert 0.2 * N_MEMORY_CASES < n_errors < 0.9 * N_MEMORY_CASES  # both outcomes exercised


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_malformed_rows_in_files(tmp_path, suffix):
    rng = random.Random(f"{SEED}{suffix}")
    counts = {"ok": 0, "error": 0, "unwritable": 0}
    for case in range(N_FILE_CASES // 3):
        kind, fmt = rng.choice(FORMATS)
        rows, bad = make_rows(rng, kind, fmt)
        written = write_case(rng, tmp_path / f"case{case}{suffix}", rows)
        if written is None:
            counts["unwritable"] += 1
            continue
        path = written.path
        fmt_arg = fmt if rng.random() < 0.5 else "auto"
        # what the rows mean, parsed in memory from the values in the file
        truth = outcome(parse_rows, kind, written.values, str(path), fmt_arg)
        try:
            status, result = outcome(load_examples, path, kind, format=fmt_arg)
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"case {case}: {path.name} ({kind}/{fmt_arg}) crashed; "
                                 f"rows: {rows!r:.600}") from e
        counts[status] += 1
        if status == "error":
            check_error(result, str(path), None if fmt_arg == "auto" and 0 in bad else bad,
                        written)
            continue
        assert not (written.lines or written.rows or written.file), (
            f"case {case}: a broken file was read: {path.read_bytes()[:400]!r}")
        assert truth[0] == "ok", (f"case {case}: the file loaded, but the rows are invalid: "
                                  f"{truth[1]}")
        assert result == truth[1], (f"case {case}: values changed on the way through "
                                    f"{suffix}: {rows!r:.600}")
        for ex in result:
            check_example(kind, ex)
    assert counts["ok"] > 5 and counts["error"] > 5, counts
    assert counts["unwritable"] < 0.7 * N_FILE_CASES // 3, counts
