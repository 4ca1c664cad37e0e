"""The validation prompts: a held-out split disjoint from the test prompts, drawn last, so
adding it changes no other file (a study tunes on it and reads the test prompts only for its
final numbers)."""

from __future__ import annotations

import filecmp

import pytest

from dvpo_lightning.commands.data.sorting import make_task_data
from tests.test_shift_split import OTHER_FILES, SMALL, read_jsonl


def test_val_split_is_disjoint_from_every_split_and_changes_nothing(tmp_path):
    with_val, without = tmp_path / "with", tmp_path / "without"
    manifest = make_task_data(out=str(with_val), n_shifted_pair_prompts=20, n_val_prompts=40,
                              **SMALL)
    val = [r["prompt"] for r in read_jsonl(with_val / "val_prompts.jsonl")]
    assert len(val) == len(set(val)) == 40 == manifest["val_prompts"]
    assert manifest["args"]["n_val_prompts"] == 40
    for name in ("sft", "trajectories", "rl_prompts", "eval_prompts", "eval_pairs",
                 "eval_pairs_shifted"):
        other = {r["prompt"] for r in read_jsonl(with_val / f"{name}.jsonl")}
        assert not set(val) & other, name

    make_task_data(out=str(without), n_shifted_pair_prompts=20, n_val_prompts=0, **SMALL)
    assert not (without / "val_prompts.jsonl").exists()
    for name in (*OTHER_FILES, "eval_pairs_shifted.jsonl"):
        assert filecmp.cmp(with_val / name, without / name, shallow=False), name
    # a rerun with 0 into the first directory leaves no stale validation file behind
    make_task_data(out=str(with_val), n_shifted_pair_prompts=20, n_val_prompts=0, **SMALL)
    assert not (with_val / "val_prompts.jsonl").exists()


def test_val_split_refuses_a_negative_count(tmp_path):
    with pytest.raises(ValueError, match="n_val_prompts=-1 must be >= 0"):
        make_task_data(out=str(tmp_path), n_val_prompts=-1, **SMALL)
