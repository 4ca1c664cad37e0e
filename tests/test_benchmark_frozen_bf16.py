"""``benchmarks/frozen_bf16.py`` on the session's tiny models, laid out as a study's runs: every
part runs and its figures are consistent (the same weights in both dtypes, half the bytes)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from benchmarks.frozen_bf16 import DTYPES, main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_frozen_bf16_benchmark_measures_every_part(artifacts, task_data, tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    for kind, path in (("sft", artifacts.policy), ("gvm", artifacts.gvm),
                       ("reward_model", artifacts.reward_model)):
        (runs / kind / "seed0").mkdir(parents=True)
        os.symlink(path, runs / kind / "seed0" / "model")
    shutil.copytree(task_data, data)
    if not (data / "eval_pairs_shifted.jsonl").exists():  # (the session's data may omit it)
        shutil.copy(data / "eval_pairs.jsonl", data / "eval_pairs_shifted.jsonl")
    if not (data / "val_prompts.jsonl").exists():
        shutil.copy(data / "eval_prompts.jsonl", data / "val_prompts.jsonl")
    out = tmp_path / "out"
    result = main(["--runs", str(runs), "--data", str(data), "--seeds", "0", "--rl_steps", "2",
                   "--shape", "tiny32", "--repeats", "1", "--out", str(out)])
    assert json.loads((out / "frozen_bf16.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "frozen_bf16.md").read_text()
    for section in ("Pair accuracy", "The reference's log-probs", "DVPO, 2 RL steps",
                    "The score phase's frozen work"):
        assert section in md, section
    acc = result["accuracy"]
    assert {(r["model"], r["pairs"], r["dtype"]) for r in acc} == {
        (m, p, d) for m in ("gvm", "reward_model") for p in ("held_out", "shifted")
        for d in DTYPES}
    assert all(0.0 <= r["mean"] <= 1.0 and 0.0 <= r["final"] <= 1.0 for r in acc)
    (ref,) = result["reference"]
    assert ref["tokens"] > 0 and 0.0 < ref["mean_abs_dlogp"] <= ref["max_abs_dlogp"] < 1.0
    rl = {r["dtype"]: r for r in result["rl"]}
    assert set(rl) == set(DTYPES) and all(r["rl_steps"] == 2 for r in rl.values())
    assert rl["bfloat16"]["frozen_weights_gb"] == pytest.approx(
        rl["float32"]["frozen_weights_gb"] / 2)
    score = result["score_phase"]
    assert score["bfloat16"]["weights_gb"] == pytest.approx(score["float32"]["weights_gb"] / 2)
    assert all(len(score[d]["times_s"]) == 1 for d in DTYPES)
