"""Reading local data files into canonical rows, and the errors bad rows get."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest

from dvpo_lightning.data import (
    DataFormatError,
    load_examples,
    pairs_to_scored,
    read_records,
    render_messages_plain,
)
from dvpo_lightning.data.formats import detect_format, parse_rows

U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}
S = {"role": "system", "content": "Be brief."}


# --- fixture builders --------------------------------------------------------------------


def write_jsonl(path: Path, rows: list, blank_after: tuple[int, ...] = ()) -> Path:
    """One JSON value per line; an empty line after each index in ``blank_after``."""
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if i in blank_after:
                f.write("\n")
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


def write_saved(path: Path, rows: list[dict] | dict[str, list[dict]]) -> Path:
    if isinstance(rows, dict):
        splits = {k: datasets.Dataset.from_list(v) for k, v in rows.items()}
        datasets.DatasetDict(splits).save_to_disk(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def scored(**fields) -> dict:
    return {"prompt": "p", "response": "r", "score": 1, **fields}


def raises(match_all: list[str], fn, *args, **kwargs) -> DataFormatError:
    """Call ``fn``, expect a DataFormatError whose message contains every string and "Fix"."""
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in [*match_all, "Fix: "]:
        assert part in msg, f"{part!r} not in {msg!r}"
    return info.value


# --- readers -----------------------------------------------------------------------------


def test_each_container_reads_the_same_rows(tmp_path):
    rows = [scored(prompt="a", response="b", score=1.0), scored(prompt="c", score=-2.5)]
    paths = [
        write_jsonl(tmp_path / "r.jsonl", rows),
        write_json(tmp_path / "r.json", rows),
        write_jsonl(tmp_path / "lines.json", rows),  # JSON lines under a .json name
        write_parquet(tmp_path / "r.parquet", rows),
        write_saved(tmp_path / "saved", rows),
    ]
    for path in paths:
        assert read_records(path)[0] == rows, path
        assert load_examples(path, "scored") == [{**r, "policy": None} for r in rows]
    # nothing is cached beside the user's data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_dataset_dict_split(tmp_path):
    path = write_saved(tmp_path / "dd", {"train": [{"prompt": "tr"}], "test": [{"prompt": "te"}]})
    assert load_examples(path, "prompt", split="test") == [{"prompt": "te"}]
    raises([str(path), "DatasetDict", "'train'", "'test'", "split="], read_records, path)
    raises([str(path), "no split 'dev'", "'train'", "'test'"], read_records, path, split="dev")


def test_blank_lines_and_mixed_types_keep_line_numbers(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": [S, U]}, {"prompt": "  "}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_after=(0, 1))
    assert read_records(path) == (rows, [1, 3, 5])
    err = raises([f"{path}, row 2 (line 5): field 'prompt'", "empty"],
                 load_examples, path, "prompt")
    assert (err.row, err.line, err.field) == (2, 5, "prompt")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a"}\n{"prompt": "b",}\n', ["line 2", "not valid JSON"]),
        ('{"prompt": "a"}\n\n["prompt", "b"]\n', ["line 3", "JSON array, not an object"]),
    ],
)
def test_bad_json_lines(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    raises([str(path), *expected], read_records, path)


def test_bad_json_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    raises([str(broken), "line 3", "not valid JSON"], read_records, broken)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"prompt": "a"}]}, indent=1))
    raises([str(wrapped), "keys: data", "top-level JSON array"], read_records, wrapped)
    mixed = write_json(tmp_path / "mixed.json", [{"prompt": "a"}, "b"])
    raises([str(mixed), "row 1", "not an object"], read_records, mixed)


def test_missing_empty_and_unsupported_files(tmp_path):
    raises(["nope.jsonl", "no such file"], read_records, tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\na\n")
    raises(["data.csv", "'.csv'", ".jsonl", ".json", ".parquet", "save_to_disk"], read_records, csv)
    for name, text in [("e.jsonl", "\n\n"), ("e.json", "[]")]:
        (tmp_path / name).write_text(text)
        raises([name, "empty file"], read_records, tmp_path / name)
    (tmp_path / "plain_dir").mkdir()
    raises(["plain_dir", "save_to_disk"], read_records, tmp_path / "plain_dir")
    one = write_jsonl(tmp_path / "s.jsonl", [{"a": 1}])
    raises(["only the split 'train'"], read_records, one, split="test")


# --- canonical rows per kind -------------------------------------------------------------


def test_prompts(tmp_path):
    rows = [{"prompt": "a", "id": 7, "other": 1}, {"prompt": [S, U]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_examples(path, "prompt") == [{"prompt": "a", "id": 7}, {"prompt": [S, U]}]
    conv = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U, A]}, {"messages": [S, U]}])
    assert load_examples(conv, "prompt") == [{"prompt": [U]}, {"prompt": [S, U]}]


def test_sft_formats(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "response": "d"}]
    flat = write_jsonl(tmp_path / "f.jsonl", rows)
    assert load_examples(flat, "sft") == [{"prompt": "a", "response": "b"},
                                          {"prompt": "c", "response": "d"}]
    chat = write_parquet(tmp_path / "c.parquet", [{"messages": [S, U, A]}])
    assert load_examples(chat, "sft") == [{"prompt": [S, U], "response": "Hello."}]
    alpaca = write_json(tmp_path / "a.json", [
        {"instruction": "Add", "input": "1+1", "output": "2"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])
    assert load_examples(alpaca, "sft") == [{"prompt": "Add\n\n1+1", "response": "2"},
                                            {"prompt": "Say hi", "response": "hi"}]


def test_ultrafeedback_scored(tmp_path):
    row = {"instruction": "Q", "source": "x", "completions": [
        {"response": "r1", "overall_score": 4.5, "model": "m1", "annotations": {"honesty": 3}},
        {"response": "r2", "overall_score": 2, "model": "m2"},
    ]}
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    assert load_examples(path, "scored") == [
        {"prompt": "Q", "response": "r1", "score": 4.5, "policy": "m1"},
        {"prompt": "Q", "response": "r2", "score": 2.0, "policy": "m2"},
    ]


def test_scored_flat_optional_fields():
    rows = [{"prompt": "p", "response": "r", "score": 3, "policy": "sft", "group": 0, "id": "x"}]
    assert parse_rows("scored", rows, "mem") == [
        {"prompt": "p", "response": "r", "score": 3.0, "policy": "sft", "group": 0, "id": "x"}]


def test_pairwise_flat_and_binarized_ultrafeedback(tmp_path):
    pair = {"prompt": "Q", "chosen": "good", "rejected": "bad", "policy": "m"}
    flat = write_parquet(tmp_path / "p.parquet", [pair])
    assert load_examples(flat, "pairwise") == [pair]
    no = {"role": "assistant", "content": "Go away."}
    binarized = [{"prompt": "Hi?", "chosen": [U, A], "rejected": [U, no],
                  "score_chosen": 8.0, "score_rejected": 2.0}]
    path = write_saved(tmp_path / "ufb", {"train_prefs": binarized})
    expected = [{"prompt": [U], "chosen": "Hello.", "rejected": "Go away."}]
    assert load_examples(path, "pairwise", split="train_prefs") == expected
    assert load_examples(path, "pairwise", split="train_prefs", format="ultrafeedback") == expected
    bare = [{"prompt": "Hi?", "chosen": [A], "rejected": [{"role": "assistant", "content": "No."}]}]
    expected = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}]
    assert parse_rows("pairwise", bare, "mem") == expected


def test_hh_rlhf(tmp_path):
    prefix = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
    row = {"chosen": prefix + "\n\nAssistant: 6.", "rejected": prefix + "\n\nAssistant: Seven."}
    path = write_jsonl(tmp_path / "hh.jsonl", [row])
    assert load_examples(path, "pairwise") == [{
        "prompt": [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4."},
                   {"role": "user", "content": "And 3+3?"}],
        "chosen": "6.", "rejected": "Seven.",
    }]


def test_pairs_to_scored_and_plain_rendering():
    pairs = [{"prompt": "Q", "chosen": "c", "rejected": "r", "policy": "m"}]
    assert pairs_to_scored(pairs) == [
        {"prompt": "Q", "response": "c", "score": 1.0, "policy": "m"},
        {"prompt": "Q", "response": "r", "score": -1.0, "policy": "m"},
    ]
    assert render_messages_plain([S, U]) == "System: Be brief.\nUser: Hi?\nAssistant:"
    assert render_messages_plain([U, A]) == "User: Hi?\nAssistant: Hello.\n"
    assert render_messages_plain("Hi?") == "User: Hi?\nAssistant:"


def test_auto_detection_rule():
    assert detect_format("prompt", {"messages": [U], "prompt": None}) == "messages"
    assert detect_format("sft", {"instruction": "i", "input": "", "output": "o"}) == "alpaca"
    assert detect_format("sft", {"prompt": "p", "response": "r"}) == "flat"
    assert detect_format("scored", {"instruction": "i", "completions": []}) == "ultrafeedback"
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}
    assert detect_format("pairwise", hh) == "hh"
    assert detect_format("pairwise", {"prompt": "p", **hh}) == "flat"
    assert detect_format("pairwise", {"chosen": [U, A], "rejected": [U, A]}) == "messages"


# --- bad rows ----------------------------------------------------------------------------


def test_missing_field_lists_present_and_expected(tmp_path):
    rows = [scored(), {"prompt": "a", "reply": "b", "score": 1}]
    path = write_jsonl(tmp_path / "s.jsonl", rows, blank_after=(0,))
    err = raises([f"{path}, row 1 (line 3): field 'response' is missing",
                  "this row has: prompt, reply, score",
                  "expects: prompt, response, score"], load_examples, path, "scored")
    assert err.field == "response"


@pytest.mark.parametrize(
    "row, field, problem",
    [
        (scored(score="high"), "score", "must be a number, found str ('high')"),
        # read as written (datasets 5.2 would decode it to 4.5; see test_mixed_types_...)
        (scored(score="4.5"), "score", "must be a number, found str ('4.5')"),
        (scored(score=True), "score", "must be a number, found bool"),
        (scored(score=math.nan), "score", "must be finite"),
        (scored(response=" \n"), "response", "is empty or whitespace only"),
        (scored(prompt=3), "prompt", "must be a string or a list of messages, found int"),
        (scored(prompt=[A]), "prompt", "must end with a user message"),
        (scored(prompt=[{"role": "human", "content": "x"}]), "prompt[0].role", "'human'"),
        (scored(policy=5), "policy", "must be a string"),
    ],
)
def test_scored_row_errors(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "ok", "response": "ok", "score": 0}, row])
    raises([f"{path}, row 1 (line 2): field '{field}'", problem], load_examples, path, "scored")


def test_pairwise_errors(tmp_path):
    same = write_json(tmp_path / "same.json", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    raises([f"{same}, row 0: field 'rejected' is identical to 'chosen'"],
           load_examples, same, "pairwise")
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
    ])
    raises([f"{hh}, row 1 (line 2): field 'rejected' differs from 'chosen'", "character 9"],
           load_examples, hh, "pairwise")
    no_turn = write_jsonl(tmp_path / "nt.jsonl", [{"chosen": "Human: a", "rejected": "Human: b"}])
    raises(["row 0 (line 1): field 'chosen' has no '\\n\\nAssistant:' turn"],
           load_examples, no_turn, "pairwise")
    no = {"role": "assistant", "content": "No"}
    mismatch = [{"prompt": "Other?", "chosen": [U, A], "rejected": [U, no]}]
    raises(["mem, row 0: field 'prompt' does not match"], parse_rows, "pairwise", mismatch, "mem")
    ends_user = [{"chosen": [U], "rejected": [U]}]
    raises(["field 'chosen[0].role' must be 'assistant'"], parse_rows, "pairwise", ends_user, "mem")


def test_ultrafeedback_completion_without_score(tmp_path):
    row = {"instruction": "Q", "completions": [{"response": "r1", "overall_score": 4, "model": "m"},
                                               {"response": "r2", "model": "m2"}]}
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    raises([f"{path}, row 0 (line 1): field 'completions[1].overall_score' is missing",
            "this completion has: response, model"], load_examples, path, "scored")


def test_unknown_names(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    raises(["unknown format 'sharegpt' for kind 'sft'", "auto, flat, messages, alpaca"],
           load_examples, path, "sft", format="sharegpt")
    raises(["unknown kind 'dpo'", "prompt, sft, scored, pairwise"], load_examples, path, "dpo")
    raises(["has no rows"], parse_rows, "prompt", [], "mem")


def test_messages_sft_errors():
    raises(["mem, row 0: field 'messages[1].role' must be 'assistant'"],
           parse_rows, "sft", [{"messages": [S, U]}], "mem")
    empty = {"role": "assistant", "content": ""}
    raises(["field 'messages[1].content' is empty"],
           parse_rows, "sft", [{"messages": [U, empty]}], "mem")
    raises(["field 'completion' is given together with 'response'"], parse_rows, "sft",
           [{"prompt": "p", "response": "r", "completion": "c"}], "mem")
    assert re.search(r"row 0: field 'response' is missing", str(pytest.raises(
        DataFormatError, parse_rows, "sft", [{"prompt": "p"}], "mem").value))


def test_values_are_read_as_written(tmp_path):
    """Every float keeps all its digits and a string that spells JSON stays a string, even in
    a file whose fields mix types (datasets' JSON builder would change both)."""
    rows = [scored(score=0.38611822569657406, rating=5), scored(rating="N/A")]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    assert load_examples(path, "scored")[0]["score"] == 0.38611822569657406
    quoted = write_jsonl(tmp_path / "q.jsonl", [scored(score=0), scored(score="4.5")])
    assert read_records(quoted)[0][1]["score"] == "4.5"
    raises([f"{quoted}, row 1 (line 2): field 'score' must be a number, found str ('4.5')"],
           load_examples, quoted, "scored")


def test_mixed_types_in_unused_fields_are_allowed(tmp_path):
    rows = [scored(rating=5), scored(rating="5"), scored(rating="N/A")]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    assert [r["score"] for r in load_examples(path, "scored")] == [1.0, 1.0, 1.0]


# --- a file of another kind ----------------------------------------------------------------

ROWS_OF_KIND = {
    "prompt": {"prompt": "Hi?"},
    "sft": {"prompt": "Hi?", "response": "Hello."},
    "alpaca": {"instruction": "Say hi", "output": "hi"},
    "scored": {"prompt": "Hi?", "response": "Hello.", "score": 2},
    "ultrafeedback": {"instruction": "Hi?", "completions": [{"response": "Hello.",
                                                             "overall_score": 4}]},
    "pairwise": {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
    "hh": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
           "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
}
LOOKS_LIKE = {"prompt": "prompt", "sft": "sft", "alpaca": "sft", "scored": "scored",
              "ultrafeedback": "scored", "pairwise": "pairwise", "hh": "pairwise"}
NAMES = {"prompt": "a prompt file", "sft": "an SFT file", "scored": "a scored file",
         "pairwise": "a pairwise file"}
# (requested kind, row): rows that fit the requested kind load; the others name their kind
CROSS = [(kind, row) for kind in ("prompt", "sft", "scored", "pairwise") for row in ROWS_OF_KIND]
LOADS = {("prompt", "prompt"), ("prompt", "sft"), ("prompt", "scored"), ("prompt", "pairwise"),
         ("sft", "sft"), ("sft", "alpaca"), ("sft", "scored"), ("scored", "scored"),
         ("scored", "ultrafeedback"), ("pairwise", "pairwise"), ("pairwise", "hh")}


@pytest.mark.parametrize("kind,row", CROSS, ids=[f"{k}<-{r}" for k, r in CROSS])
def test_a_file_of_another_kind_names_its_kind(tmp_path, kind, row):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS_OF_KIND[row]])
    if (kind, row) in LOADS:
        assert load_examples(path, kind)
        return
    other = LOOKS_LIKE[row]
    err = raises([f"{path}, row 0 (line 1): field '",
                  f"; this looks like {NAMES[other]} (row 0 reads as '{other}' rows), not "
                  f"'{kind}' rows. Fix: load it as kind '{other}'"], load_examples, path, kind)
    assert (err.row, err.line) == (0, 1)
    fix = {other: f"the {other} fix"}
    raises([f"not '{kind}' rows. Fix: the {other} fix"], load_examples, path, kind,
           other_kinds=fix)


@pytest.mark.parametrize("kind,row", [
    ("pairwise", {"prompt": "p", "chosen": "", "rejected": "r"}),  # a pair with a bad value
    ("pairwise", {"prompt": "p", "chosen": "c"}),  # a pair without 'rejected'
    ("scored", {"prompt": "p", "response": "r", "score": "high"}),
    ("sft", {"prompt": "", "response": "r"}),
])
def test_a_bad_row_of_the_right_kind_gets_no_kind_hint(kind, row):
    err = raises(["mem, row 0"], parse_rows, kind, [row], "mem")
    assert "looks like" not in str(err)


def test_only_row_0_is_judged_for_its_kind():
    rows = [ROWS_OF_KIND["scored"], ROWS_OF_KIND["sft"]]
    err = raises(["mem, row 1: field 'score' is missing"], parse_rows, "scored", rows, "mem")
    assert "looks like" not in str(err)
