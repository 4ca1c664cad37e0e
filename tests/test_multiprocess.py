"""Two CPU processes (DDP over gloo) against one, on the same prompts.

Where the math says so the results must agree: with advantages whitened over *all* processes
and the loss normalised by the global token count, the per-prompt advantages and the
all-reduced gradient of the first update equal the single-process ones; the logged policy loss
averaged over ranks equals the single-process loss. Group estimators must never see a group
split across processes. Each rank samples from its own stream while the global RNGs stay in
step; the reward scale is fitted on every rank's first rollout; adaptive KL moves β by one
all-reduced observation; the held-out evaluations (RL, DPO,
GoldEval) are over every prompt once, on every rank.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dvpo_lightning.runtime.distributed import gather_by_index

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(out: Path, devices: int, kind: str, task_data: str, art,
         engine: str = "hf", reference: str | None = None) -> list[dict]:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), kind, task_data,
         art.policy, art.gvm, art.reward_model, engine, *([reference] if reference else [])],
        env=env, capture_output=True, text=True, timeout=300)
    rank1_log = "\n".join(x for x in proc.stderr.splitlines() if "rank0" not in x)
    assert proc.returncode == 0, rank1_log[-6000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


def _by_prompt(records: list[dict]) -> dict:
    rows = {}
    for rec in records:
        for i, p in enumerate(rec["prompts"]):
            m = rec["mask"][i]
            rows.setdefault(p, []).append(rec["advantages"][i][m])
    return rows


def test_a_refresh_over_two_processes_is_the_one_process_refresh(tmp_path, task_data,
                                                                  artifacts):
    """Semi-online DVPO over two processes: each rank samples and labels its share of the
    fresh prompts; after the refresh both ranks hold the one-process buffer (the same prompts,
    responses and noisy labels, in the same order) and the same GVM, which is the one-process
    GVM up to the summation order of the policy's all-reduced first update."""
    one = _run(tmp_path / "one", 1, "refresh", task_data, artifacts)
    two = _run(tmp_path / "two", 2, "refresh", task_data, artifacts)
    fields = ("prompt", "response", "label", "target")
    rows = [[tuple(r[f] for f in fields) for r in rec["buffer"]] for rec in (*one, *two)]
    assert len(rows[0]) == 8 and rows[1] == rows[0] and rows[2] == rows[0]
    assert len({r[2] for r in rows[0]}) > 1  # the annotation noise is in the labels
    for k, v in two[0]["gvm"].items():
        assert torch.equal(v, two[1]["gvm"][k]), k  # one GVM on every rank
        assert torch.allclose(v, one[0]["gvm"][k], atol=1e-5), k


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ddp_matches_single_process_dvpo(engine, tmp_path, task_data, artifacts, artifacts32):
    """With ``vllm`` each process drives its own colocated engine on its share of the prompts
    (built after the process group, its weights pushed from that rank's policy)."""
    art = artifacts32 if engine == "vllm" else artifacts
    one = _run(tmp_path / "one", 1, "gvm", task_data, art, engine)
    two = _run(tmp_path / "two", 2, "gvm", task_data, art, engine)
    assert two[0]["world_size"] == 2 and len(two) == 2
    a1, a2 = _by_prompt(one), _by_prompt(two)
    assert set(a1) == set(a2) and len(a1) == 8, "both runs must see the same 8 prompts"
    assert not set(two[0]["prompts"]) & set(two[1]["prompts"]), "ranks must split the prompts"
    for p in a1:
        torch.testing.assert_close(a2[p][0], a1[p][0], rtol=1e-5, atol=1e-5)
    # whitened over all processes: zero mean, unit variance over the union of the ranks
    allv = torch.cat([v[0] for v in a2.values()])
    assert abs(float(allv.mean())) < 1e-5 and abs(float(allv.std()) - 1) < 1e-2
    # each rank's own advantages are NOT whitened on their own (else this test proves nothing)
    local = torch.cat([r["advantages"][r["mask"]] for r in two[:1]])
    assert abs(float(local.mean())) > 1e-4
    # the GVM's scale: the mean and std of the first rollout over every rank's responses, the
    # same on both ranks and as in one process (a rank's own half would give other numbers)
    scale = one[0]["reward_scale"]
    assert scale["std"] > 0
    for rec in two:
        assert rec["reward_scale"]["mean"] == pytest.approx(scale["mean"], rel=1e-5, abs=1e-6)
        assert rec["reward_scale"]["std"] == pytest.approx(scale["std"], rel=1e-5)
    torch.testing.assert_close(two[0]["grad"], one[0]["grad"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(two[1]["grad"], two[0]["grad"])
    loss_two = sum(r["policy_loss"] for r in two) / 2
    assert loss_two == pytest.approx(one[0]["policy_loss"], rel=1e-4, abs=1e-7)


def test_ddp_never_splits_groups(tmp_path, task_data, artifacts):
    two = _run(tmp_path / "grpo", 2, "grpo", task_data, artifacts)
    for rec in two:
        by_group: dict[int, set] = {}
        for g, p in zip(rec["group_ids"], rec["prompts"]):
            by_group.setdefault(g, set()).add(p)
        assert all(len(ps) == 1 for ps in by_group.values())
        assert sorted(rec["group_ids"]) == [g for g in range(len(by_group)) for _ in range(2)]
    assert not set(two[0]["prompts"]) & set(two[1]["prompts"])


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ranks_sample_from_their_own_streams(engine, tmp_path, task_data, artifacts, artifacts32):
    """Both ranks are given the same prompt: each must sample from its own random stream (not
    the same responses), while the global RNGs stay in step on every rank — a checkpoint holds
    rank 0's, which must be every rank's for a resume to be exact."""
    art = artifacts32 if engine == "vllm" else artifacts
    data = tmp_path / "data"
    data.mkdir()
    first = open(f"{task_data}/rl_prompts.jsonl").readline()
    (data / "rl_prompts.jsonl").write_text(first * 8)
    shutil.copy(f"{task_data}/eval_prompts.jsonl", data)
    (data / "tokenizer").symlink_to(f"{task_data}/tokenizer")
    two = _run(tmp_path / "two", 2, "grpo", str(data), art, engine)
    assert len(set(two[0]["prompts"] + two[1]["prompts"])) == 1, "one prompt, on both ranks"
    assert two[0]["responses"] != two[1]["responses"], "both ranks sampled the same responses"
    assert torch.equal(two[0]["rng"], two[1]["rng"]), "the ranks' global RNGs drifted apart"


@pytest.fixture(scope="module")
def kl_eval_runs(tmp_path_factory, task_data, sft_model_dir, artifacts):
    """One RL step of the SFT policy with adaptive KL to a random policy (a KL far from 0),
    then the held-out evaluation of 5 prompts (some answered partly right): in one process
    and in two."""
    root = tmp_path_factory.mktemp("kl_eval")
    art = SimpleNamespace(policy=sft_model_dir, gvm=artifacts.gvm,
                          reward_model=artifacts.reward_model)
    return [_run(root / name, devices, "kl_eval", task_data, art, "hf", artifacts.policy)
            for name, devices in (("one", 1), ("two", 2))]


def test_adaptive_kl_is_one_controller(kl_eval_runs):
    """β moves by the KL of every rank's responses: the same on both ranks, and the one
    process's (the ranks' own KLs differ: they answered different prompts)."""
    one, two = kl_eval_runs
    assert one[0]["kl_coef"] != 0.05, "β must have moved (else this test proves nothing)"
    assert float(two[0]["seq_kl"].mean()) != pytest.approx(float(two[1]["seq_kl"].mean()))
    assert two[0]["kl_coef"] == two[1]["kl_coef"]
    assert two[0]["kl_coef"] == pytest.approx(one[0]["kl_coef"], rel=1e-6)


def test_gathered_rows_keep_each_prompt_once_in_order():
    """The merge of the processes' rows (here one process's, shuffled, with repeats): one row
    per prompt, the first met, in the held-out set's order; dtypes kept."""
    index = torch.tensor([3, 1, 4, 0, 2, 3, 0])
    rows = {"gold": torch.tensor([3.0, 1.0, 4.0, 0.0, 2.0, -1.0, -1.0], dtype=torch.float64),
            "len": torch.tensor([30, 10, 40, 0, 20, -1, -1])}
    got = gather_by_index(rows, index)
    assert got["gold"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and got["gold"].dtype == torch.float64
    assert got["len"].tolist() == [0, 10, 20, 30, 40]


def test_held_out_evaluation_covers_every_prompt(kl_eval_runs):
    """Every eval/* measure (and the reference's, and the win rate against it) over all 5
    held-out prompts, each once, on every rank: as in one process."""
    one, two = kl_eval_runs
    for rank in two:
        assert rank["reference_eval"] == pytest.approx(one[0]["reference_eval"], rel=1e-5)
        assert len(rank["evals"]) == len(one[0]["evals"]) == 2  # the reference's, step 1
        for got, want in zip(rank["evals"], one[0]["evals"]):
            assert set(got) == set(want) and "eval/win_rate_vs_ref" in got
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gold_eval_is_one_evaluation_over_the_ranks(tmp_path, task_data, sft_model_dir,
                                                    artifacts):
    """The SFT stage's GoldEval samples its answers (each rank from its own stream): every rank
    answers its share of the prompts and logs the same numbers, at the validation and at the
    end of ``fit``."""
    art = SimpleNamespace(policy=sft_model_dir, gvm=artifacts.gvm,
                          reward_model=artifacts.reward_model)
    two = _run(tmp_path / "two", 2, "sft_gold", task_data, art)
    assert two[0]["world_size"] == 2
    assert set(two[0]["logged"]) == {f"eval/{k}" for k in two[0]["final"]}
    assert two[0]["logged"] == two[1]["logged"] and two[0]["final"] == two[1]["final"]
    assert 0 < two[0]["final"]["gold_reward"] < 1, "some answers partly right, none all"


def test_dpo_held_out_evaluation_covers_every_pair_and_prompt(tmp_path, task_data,
                                                              sft_model_dir, artifacts):
    """DPO's held-out pair metrics (7 pairs), held-out evaluation (5 prompts) and final test
    evaluation (5 prompts): over every item once, on every rank, as in one process (odd
    counts: the sampler repeats one). Sampled with ``eval_seed``: each prompt's answers are
    the one process's, whichever rank answered it."""
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("pairs.jsonl", 8), ("eval_pairs.jsonl", 7)):
        lines = open(f"{task_data}/{name}").readlines()[:rows]
        (data / name).write_text("".join(lines))
    (data / "eval_prompts.jsonl").symlink_to(f"{task_data}/eval_prompts.jsonl")
    (data / "tokenizer").symlink_to(f"{task_data}/tokenizer")
    art = SimpleNamespace(policy=sft_model_dir, gvm=artifacts.gvm,
                          reward_model=artifacts.reward_model)
    one, two = (_run(tmp_path / name, n, "dpo_eval", str(data), art)
                for name, n in (("one", 1), ("two", 2)))
    assert two[0]["world_size"] == 2 and len(one[0]["pair_history"]) == 1
    for rank in two:
        assert rank["reference_eval"] == pytest.approx(one[0]["reference_eval"], rel=1e-5)
        for key in ("evals", "pair_history"):
            assert len(rank[key]) == len(one[0][key])
            for got, want in zip(rank[key], one[0][key]):
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6), key
        got, want = rank["heldout"], one[0]["heldout"]
        assert got["test_eval"] == pytest.approx(want["test_eval"], rel=1e-4, abs=1e-6)
        for key in ("final_eval_items", "reference_eval_items", "test_eval_items",
                    "reference_test_eval_items"):
            assert len(got[key]["gold_reward"]) == 5
            for measure in ("gold_reward", "response_len", "eos_frac"):  # the same answers
                assert got[key][measure] == want[key][measure], (key, measure)
