"""The distribution-shifted held-out pairs: the swap flaw and ``eval_pairs_shifted.jsonl``.

The swap flaw (``SortingTask.noisy_response(swap_rate=...)``) is one no training split has;
the shifted split is drawn after every other split, so adding it changes no other file.
"""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import pytest

from dvpo_lightning.commands.data import main as data_main
from dvpo_lightning.commands.data.sorting import (
    DEFAULT_BEHAVIOUR,
    DEFAULT_SHIFTED_BEHAVIOUR,
    make_task_data,
)
from dvpo_lightning.tasks import SortingTask
from dvpo_lightning.tasks.sorting import DIGITS

TASK = SortingTask()
OTHER_FILES = ("sft.jsonl", "trajectories.jsonl", "pairs.jsonl", "rl_prompts.jsonl",
               "eval_prompts.jsonl", "eval_pairs.jsonl", "tokenizer/tokenizer.json",
               "tokenizer/tokenizer_config.json")
# tiny, so a run takes about a second
SMALL = dict(n_sft=50, n_trajectory_prompts=30, n_rl_prompts=10, n_eval_prompts=5,
             n_eval_pair_prompts=20, seed=0)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def old_noisy_response(prompt: str, error_rate: float, rng: random.Random,
                       dedup_rate: float = 0.0, stutter_rate: float = 0.0) -> str:
    """``SortingTask.noisy_response`` as it was before the swap flaw (copied verbatim)."""
    ref = TASK.reference(prompt)
    out = []
    for i, ch in enumerate(ref):
        if i and ch == ref[i - 1] and rng.random() < dedup_rate:
            continue
        if rng.random() < error_rate:
            kind = rng.random()
            if kind < 1 / 3:
                out.append(rng.choice(DIGITS.replace(ch, "")))
            elif kind < 2 / 3:
                out += [ch, rng.choice(DIGITS)]
            continue
        out.append(ch)
        if rng.random() < stutter_rate:
            out.append(ch)
    return "".join(out)


# --- the swap flaw --------------------------------------------------------------------------


@pytest.mark.parametrize("rates", [(0.0, 0.0, 0.0), (0.05, 0.6, 0.0), (0.2, 0.4, 0.05),
                                   (0.05, 0.1, 0.3), (1.0, 1.0, 1.0)])
def test_swap_rate_zero_draws_nothing_and_changes_nothing(rates):
    prompts = [TASK.sample_prompt(random.Random(i)) for i in range(300)]
    old, new, omitted = random.Random(7), random.Random(7), random.Random(7)
    for p in prompts:
        want = old_noisy_response(p, rates[0], old, *rates[1:])
        assert TASK.noisy_response(p, rates[0], new, *rates[1:], 0.0) == want, p
        assert TASK.noisy_response(p, rates[0], omitted, *rates[1:]) == want, p
        assert new.getstate() == old.getstate() == omitted.getstate(), p


def test_swap_rate_one_swaps_every_adjacent_pair_of_distinct_digits():
    assert TASK.noisy_response("3172=", 0.0, random.Random(0), swap_rate=1.0) == "2173"
    assert TASK.noisy_response("94051=", 0.0, random.Random(0), swap_rate=1.0) == "10549"
    rng = random.Random(1)
    for _ in range(100):
        digits = rng.sample(DIGITS, rng.randint(4, 8))
        p = "".join(digits) + "="
        ref = TASK.reference(p)
        got = TASK.noisy_response(p, 0.0, rng, swap_rate=1.0)
        swapped = "".join(ref[i + 1] + ref[i] for i in range(0, len(ref) - 1, 2))
        assert got == swapped + ref[len(swapped):], p  # pairs (0, 1), (2, 3), ... swapped
        assert sorted(got) == sorted(ref) and TASK.gold_score(p, got) == 0.0


def test_swap_never_swaps_equal_digits_and_lowers_gold():
    unswapped, rng = random.Random(0), random.Random(0)
    TASK.noisy_response("5555=", 0.0, unswapped)
    assert TASK.noisy_response("5555=", 0.0, rng, swap_rate=1.0) == "5555"
    assert rng.getstate() == unswapped.getstate()  # nothing to swap: no number drawn for it
    assert TASK.noisy_response("2211=", 0.0, random.Random(0), swap_rate=1.0) == "1212"
    rng = random.Random(2)
    outs = [TASK.noisy_response("48423165=", 0.0, rng, swap_rate=0.3) for _ in range(200)]
    ref = TASK.reference("48423165=")
    assert all(sorted(o) == sorted(ref) for o in outs)  # a swap keeps the digits
    swapped = [o for o in outs if o != ref]
    assert 100 < len(swapped) < 200  # 1 - 0.7**7 ≈ 0.92 have at least one swap
    assert all(TASK.gold_score("48423165=", o) < 1.0 for o in swapped)


# --- the shifted split ----------------------------------------------------------------------


def test_shifted_split_is_held_out_out_of_distribution_and_changes_nothing(tmp_path):
    with_shift, without = tmp_path / "with", tmp_path / "without"
    manifest = make_task_data(out=str(with_shift), n_shifted_pair_prompts=40, **SMALL)
    rows = read_jsonl(with_shift / "eval_pairs_shifted.jsonl")
    assert 30 <= len(rows) == manifest["eval_pairs_shifted"]["count"] <= 40

    # prompts disjoint from every other split (and distinct)
    shifted_prompts = {r["prompt"] for r in rows}
    assert len(shifted_prompts) == len(rows)
    for name in ("sft", "trajectories", "rl_prompts", "eval_prompts", "eval_pairs"):
        other = {r["prompt"] for r in read_jsonl(with_shift / f"{name}.jsonl")}
        assert not shifted_prompts & other, name
    # noise-free labels, policies no training split has, rejected answers mostly swapped
    for r in rows:
        assert TASK.gold_score(r["prompt"], r["chosen"]) > TASK.gold_score(r["prompt"],
                                                                           r["rejected"])
        assert r["policy"] in DEFAULT_SHIFTED_BEHAVIOUR and r["policy"] not in DEFAULT_BEHAVIOUR
    permuted = [r for r in rows if sorted(r["rejected"]) == sorted(TASK.reference(r["prompt"]))]
    assert len(permuted) > len(rows) / 3  # right digits, wrong order: the swap flaw
    info = manifest["eval_pairs_shifted"]
    assert info["flaws_not_in_training"] == ["swap"] and "swap" not in info["training_flaws"]
    assert info["mean_gold"]["chosen"] > info["mean_gold"]["rejected"]
    assert manifest["counts"]["eval_pairs"] > 0 and "eval_pairs_shifted" not in manifest["counts"]

    # 0: no shifted split, and every other file is byte-identical
    manifest0 = make_task_data(out=str(without), n_shifted_pair_prompts=0, **SMALL)
    assert manifest0["eval_pairs_shifted"] is None
    assert not (without / "eval_pairs_shifted.jsonl").exists()
    for name in OTHER_FILES:
        assert filecmp.cmp(with_shift / name, without / name, shallow=False), name
    # a rerun with 0 into the first directory leaves no stale shifted file behind
    make_task_data(out=str(with_shift), n_shifted_pair_prompts=0, **SMALL)
    assert not (with_shift / "eval_pairs_shifted.jsonl").exists()
    assert filecmp.cmp(with_shift / "manifest.json", without / "manifest.json", shallow=False)


def test_shifted_split_through_the_cli_with_four_rates(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["--out", str(out), "--behaviour_policies", '{"a": [0.1, 0.5, 0.1, 0.0]}',
            "--shifted_behaviour", '{"b": [0.0, 0.0, 0.0, 0.5]}',
            "--n_shifted_pair_prompts", "10"]
    for k, v in SMALL.items():
        args += [f"--{k}", str(v)]
    data_main(args)
    assert "task data written" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["shifted_behaviour"] == {"b": [0.0, 0.0, 0.0, 0.5]}
    assert manifest["eval_pairs_shifted"]["policies"] == {
        "b": {"slip": 0.0, "dedup": 0.0, "stutter": 0.0, "swap": 0.5}}
    assert {r["policy"] for r in read_jsonl(out / "eval_pairs_shifted.jsonl")} == {"b"}


@pytest.mark.parametrize("kwargs,match", [
    ({"shifted_behaviour": {"x": (0.1, 0.5, 0.0)}},
     r"shifted_behaviour\['x'\].*no flaw the training data lacks"),
    ({"behaviour_policies": {"a": (0.1, 0.5, 0.0, 0.2)}},
     r"shifted_behaviour\['swapper'\].*no flaw the training data lacks"),
    ({"shifted_behaviour": {"careful": (0.0, 0.0, 0.0, 0.3)}},
     r"shifted_behaviour\['careful'\]: a behaviour policy has that name"),
    ({"shifted_behaviour": {"x": (0.0, 0.0, 0.0, 0.3, 0.1)}},
     r"shifted_behaviour\['x'\].*three or four rates in \[0, 1\]"),
    ({"behaviour_policies": {"a": (0.1, 0.5)}},
     r"behaviour_policies\['a'\].*three or four rates"),
    ({"n_shifted_pair_prompts": -1}, r"n_shifted_pair_prompts=-1 must be >= 0"),
])
def test_shifted_split_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task_data(out=str(tmp_path / "data"), n_sft=2, **kwargs)
    assert not (tmp_path / "data").exists()  # checked before anything is written
