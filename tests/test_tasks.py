"""The embedded sorting task: gold scorer, noisy teacher, data generation and tokenizer."""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dvpo_lightning.commands.data.sorting import make_task_data
from dvpo_lightning.tasks import SortingTask, get_task
from dvpo_lightning.tasks.tokenizer import SPECIAL_TOKENS, build_char_tokenizer

TASK = SortingTask()
SPLIT_FILES = ("sft", "trajectories", "pairs", "rl_prompts", "eval_prompts", "eval_pairs")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data_args(task_data) -> dict:
    """The arguments the session's ``task_data`` was made with (from its manifest)."""
    return json.loads((Path(task_data) / "manifest.json").read_text())["args"]


# --- gold scorer: known answers -------------------------------------------------------------
# prompt "3172=" → reference "1237", n = 4 digits, so every credit is a multiple of 1/5.


@pytest.mark.parametrize("response,finished,expected", [
    ("1237", True, 1.0),          # exact, with EOS
    ("", True, 0.0),              # empty
    ("", False, 0.0),
    ("2137", True, 0.0),          # first token wrong: nothing after it counts
    ("7321", True, 0.0),
    ("1", True, 1 / 5),           # correct prefix of 1, stopped early
    ("1247", True, 2 / 5),        # wrong at position k = 2 → k / (n + 1)
    ("1239", True, 3 / 5),        # wrong at position k = 3
    ("1337", True, 1 / 5),        # the right digits later do not help
    ("1237", False, 4 / 5),       # correct but cut before its EOS → n / (n + 1)
    ("12377", True, 4 / 5),       # extra trailing digit: not exact
    ("123799", False, 4 / 5),
])
def test_gold_score_known_answers(response, finished, expected):
    assert TASK.gold_score("3172=", response, finished) == pytest.approx(expected)


def test_gold_score_repeated_digits():
    # "3313=" → "1333": a teacher that drops the repeated 3s scores its correct prefix only.
    assert TASK.reference("3313=") == "1333"
    assert TASK.gold_score("3313=", "13") == pytest.approx(2 / 5)
    assert TASK.gold_score("3313=", "1333") == 1.0


def test_get_task_lists_known_tasks():
    assert isinstance(get_task("sorting", min_digits=2, max_digits=3), SortingTask)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*\['instruct', 'sorting'\]"):
        get_task("nope")
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        SortingTask(min_digits=5, max_digits=3)


# --- noisy teacher --------------------------------------------------------------------------


def test_noisy_response_without_noise_is_exact():
    rng = random.Random(0)
    for _ in range(200):
        p = TASK.sample_prompt(rng)
        assert TASK.noisy_response(p, 0.0, rng, 0.0) == TASK.reference(p)
        assert TASK.gold_score(p, TASK.noisy_response(p, 0.0, rng)) == 1.0


def test_noisy_response_dedup_one_drops_every_repeat():
    rng = random.Random(0)
    assert TASK.noisy_response("3313=", 0.0, rng, dedup_rate=1.0) == "13"
    assert TASK.noisy_response("90909=", 0.0, rng, dedup_rate=1.0) == "09"
    saw_repeat = False
    for _ in range(200):
        p = TASK.sample_prompt(rng)
        ref = TASK.reference(p)
        saw_repeat |= len(set(ref)) < len(ref)
        assert TASK.noisy_response(p, 0.0, rng, dedup_rate=1.0) == "".join(dict.fromkeys(ref))
    assert saw_repeat


def test_noisy_response_slips_make_wrong_answers():
    rng = random.Random(1)
    p = "0123456789="
    outs = [TASK.noisy_response(p, 1.0, rng, 0.0) for _ in range(20)]
    assert all(TASK.gold_score(p, o) < 1.0 for o in outs)
    assert all(set(o) <= set("0123456789") for o in outs)


# --- make_task_data -------------------------------------------------------------------------


def test_task_data_splits_have_disjoint_prompts(task_data, data_args):
    prompts = {name: {r["prompt"] for r in read_jsonl(Path(task_data) / f"{name}.jsonl")}
               for name in SPLIT_FILES}
    assert prompts["pairs"] <= prompts["trajectories"]  # pairs are derived from trajectories
    groups = ["sft", "trajectories", "rl_prompts", "eval_prompts", "eval_pairs"]
    for i, a in enumerate(groups):
        assert prompts[a], a
        for b in groups[i + 1:]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share prompts"
    # every prompt of a split is distinct
    sft_rows = read_jsonl(Path(task_data) / "sft.jsonl")
    assert len({r["prompt"] for r in sft_rows}) == len(sft_rows) == data_args["n_sft"]


def test_task_data_manifest_counts_match_files(task_data, data_args):
    manifest = json.loads((Path(task_data) / "manifest.json").read_text())
    assert set(manifest["counts"]) == set(SPLIT_FILES)
    for name in SPLIT_FILES:
        assert manifest["counts"][name] == len(read_jsonl(Path(task_data) / f"{name}.jsonl"))
    assert data_args["n_sft"] == 400  # conftest's sizes
    assert manifest["counts"]["sft"] == data_args["n_sft"]
    per_prompt = manifest["args"]["responses_per_prompt"]
    assert manifest["counts"]["trajectories"] == per_prompt * data_args["n_trajectory_prompts"]
    assert manifest["counts"]["rl_prompts"] == data_args["n_rl_prompts"]
    assert manifest["counts"]["eval_prompts"] == data_args["n_eval_prompts"]
    max_pairs = per_prompt * (per_prompt - 1) // 2 * data_args["n_trajectory_prompts"]
    assert 0 < manifest["counts"]["pairs"] <= max_pairs
    assert 0 < manifest["counts"]["eval_pairs"] <= data_args["n_eval_pair_prompts"]


def test_task_data_scores_and_labels(task_data):
    trajectories = read_jsonl(Path(task_data) / "trajectories.jsonl")
    noise = [r["score"] - r["gold"] for r in trajectories]
    for r in trajectories:
        assert r["gold"] == TASK.gold_score(r["prompt"], r["response"])
    # the annotator's noise is there, centred, of about the configured size (0.1)
    assert abs(sum(noise) / len(noise)) < 0.02
    assert 0.07 < (sum(n * n for n in noise) / len(noise)) ** 0.5 < 0.13
    # training pairs are labelled by the annotated scores of the same prompt's responses
    # (a response can occur more than once for a prompt, each time with its own noisy score)
    scored: dict[tuple, list[float]] = {}
    for r in trajectories:
        scored.setdefault((r["prompt"], r["response"]), []).append(r["score"])
    for r in read_jsonl(Path(task_data) / "pairs.jsonl"):
        assert any(c > j for c in scored[(r["prompt"], r["chosen"])]
                   for j in scored[(r["prompt"], r["rejected"])])
    # held-out pairs have noise-free labels: the chosen response is strictly better
    for r in read_jsonl(Path(task_data) / "eval_pairs.jsonl"):
        assert TASK.gold_score(r["prompt"], r["chosen"]) > TASK.gold_score(r["prompt"],
                                                                           r["rejected"])


def test_task_data_is_deterministic_under_seed(task_data, data_args, tmp_path):
    again = tmp_path / "again"
    make_task_data(out=str(again), **data_args)
    for name in (*SPLIT_FILES, "manifest"):
        suffix = "json" if name == "manifest" else "jsonl"
        assert filecmp.cmp(Path(task_data) / f"{name}.{suffix}", again / f"{name}.{suffix}",
                           shallow=False), name
    other = tmp_path / "other_seed"
    make_task_data(out=str(other), **{**data_args, "seed": 1})
    assert (other / "sft.jsonl").read_text() != (again / "sft.jsonl").read_text()


def test_make_task_data_rejects_bad_rates(tmp_path):
    with pytest.raises(ValueError, match=r"behaviour_policies\['bad'\]"):
        make_task_data(out=str(tmp_path), n_sft=2, behaviour_policies={"bad": (0.1, 2.0)})


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_reloads(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "3172=1237"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert ids == [tok.convert_tokens_to_ids(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == SPECIAL_TOKENS
    assert len(tok) == len(SPECIAL_TOKENS) + len(TASK.alphabet)
    assert tok.padding_side == "left"

    tok.save_pretrained(str(tmp_path / "resaved"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert again.get_vocab() == tok.get_vocab()
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.padding_side == "left" and again.pad_token_id == tok.pad_token_id


def test_char_tokenizer_keeps_alphabet_order_and_maps_unknowns():
    tok = build_char_tokenizer("ba=ab")
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == SPECIAL_TOKENS + ["b", "a", "="]
    assert tok("bz", add_special_tokens=False)["input_ids"] == [4, tok.unk_token_id]
