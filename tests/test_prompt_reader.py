"""The RL prompt reader takes a preference file as it is: each distinct prompt once, in order
(docs/your-data.md: the GVM, the reward model and the RL run point at the same file)."""

from __future__ import annotations

import json

import pytest

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.prompts import load_prompts
from dvpo_lightning.data.rollout import RolloutDataModule

USER = [{"role": "user", "content": "Name a colour."}]
# One file per preference format (docs/data.md), two rows with the same prompt, then another.
PREFERENCE_FILES = {
    "ultrafeedback": [
        {"instruction": "Name a colour.", "completions": [
            {"response": "Blue.", "overall_score": 8.0, "model": "a"},
            {"response": "No.", "overall_score": 2.0, "model": "b"}]},
        {"instruction": "Name a colour.", "completions": [
            {"response": "Red.", "overall_score": 7.0}]},
        {"instruction": "Name a fruit.", "completions": [
            {"response": "A pear.", "overall_score": 9.0}]},
    ],
    "scored": [
        {"prompt": "Name a colour.", "response": "Blue.", "score": 1.0},
        {"prompt": "Name a colour.", "response": "No.", "score": 0.0},
        {"prompt": "Name a fruit.", "response": "A pear.", "score": 1.0},
    ],
    "pairs": [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "No."},
        {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "No."},
    ],
    "binarized": [
        {"prompt": "Name a colour.",
         "chosen": USER + [{"role": "assistant", "content": "Blue."}],
         "rejected": USER + [{"role": "assistant", "content": "No."}]},
        {"prompt": "Name a colour.",
         "chosen": USER + [{"role": "assistant", "content": "Red."}],
         "rejected": USER + [{"role": "assistant", "content": "No."}]},
        {"prompt": "Name a fruit.",
         "chosen": [{"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "A pear."}],
         "rejected": [{"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "No."}]},
    ],
    "hh": [
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Red.",
         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
         "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: No."},
    ],
}
AS_MESSAGES = {"binarized", "hh"}  # their prompts are the conversation before the answer


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name", sorted(PREFERENCE_FILES))
def test_a_preference_file_gives_its_distinct_prompts_in_order(tmp_path, name):
    path = write_jsonl(tmp_path / f"{name}.jsonl", PREFERENCE_FILES[name])
    prompts = [r["prompt"] for r in load_prompts(path)]
    if name in AS_MESSAGES:
        prompts = [p[-1]["content"] for p in prompts]
    assert prompts == ["Name a colour.", "Name a fruit."]


def test_a_prompt_file_is_read_row_by_row_as_before(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "a"}, {"messages": None, "prompt": "b"}]
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", rows)) == [
        {"prompt": "a"}, {"prompt": "a"}, {"prompt": "b"}]


def test_a_bad_row_of_a_preference_file_names_the_row(tmp_path):
    rows = PREFERENCE_FILES["pairs"] + [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"row 3 \(line 4\): field 'rejected' is "
                                              "identical to 'chosen'"):
        load_prompts(path)


def test_rl_data_takes_the_preference_files_a_gvm_trains_on(tmp_path, tokenizer_dir):
    # the sorting tokenizer knows digits only: prompts of digits, answers of digits
    train = write_jsonl(tmp_path / "scored.jsonl", [
        {"instruction": "31", "completions": [{"response": "13", "overall_score": 1.0},
                                              {"response": "31", "overall_score": 0.0}]},
        {"instruction": "52", "completions": [{"response": "25", "overall_score": 1.0}]}])
    held_out = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "74", "chosen": "47", "rejected": "7"},
        {"prompt": "74", "chosen": "47", "rejected": "4"}])
    dm = RolloutDataModule(train, held_out, tokenizer_dir, batch_size=2, chat_template=False)
    dm.check_files()
    assert [raw for _, raw in dm.train_set] == ["31", "52"]
    assert [raw for _, raw in dm.val_set] == ["74"]


def test_explain_takes_a_scored_file_each_prompts_responses_with_their_scores(tmp_path):
    from dvpo_lightning.data.examples import file_examples

    path = write_jsonl(tmp_path / "uf.jsonl", PREFERENCE_FILES["ultrafeedback"])
    assert file_examples(path, 8) == [
        {"prompt": "Name a colour.", "responses": {"response 1 (score 8)": "Blue.",
                                                   "response 2 (score 2)": "No.",
                                                   "response 3 (score 7)": "Red."}},
        {"prompt": "Name a fruit.", "responses": {"response 1 (score 9)": "A pear."}}]
    assert [e["prompt"] for e in file_examples(path, 1)] == ["Name a colour."]
