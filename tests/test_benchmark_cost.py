"""The cost benchmark's CPU smoke run: every method, every field, forced lengths, ratios; and TRL's
GRPOTrainer beside them under the same protocol (when trl is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.cost import FIELDS, METHODS, derive, main  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None
PROMPTS, GROUP, LENGTH, PROMPT_LEN, RL_STEPS = 2, 2, 4, 6, 2
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory):
    """One CPU smoke run of every method, DVPO also with a separate old-log-prob pass and with
    bfloat16 frozen models (and TRL when installed), two children at a time: (cost.json,
    cost.md)."""
    out = tmp_path_factory.mktemp("cost")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(Path(__file__).resolve().parents[1])
        main(["--mode", "cpu", "--methods", *METHODS, "dvpo_rescore", "dvpo_bf16",
              "--rl_steps", str(RL_STEPS), "--length", str(LENGTH),
              "--prompts", str(PROMPTS), "--group", str(GROUP), "--prompt_len", str(PROMPT_LEN),
              "--trl", "on" if HAS_TRL else "off", "--jobs", "2", "--out", str(out)])
    return json.loads((out / "cost.json").read_text()), (out / "cost.md").read_text()


def test_cpu_cost_benchmark_writes_every_field_for_every_method(cost_run):
    doc, md = cost_run
    n_tokens = float(PROMPTS * GROUP * LENGTH)
    assert doc["meta"]["responses_per_step"] == PROMPTS * GROUP
    assert doc["meta"]["length"] == LENGTH
    records = {r["method"]: r for r in doc["methods"]}
    assert set(records) == {*METHODS, "dvpo_rescore", "dvpo_bf16"}
    for m, r in records.items():
        for f in FIELDS:
            assert isinstance(r[f], float) and r[f] >= 0, (m, f)
        # the same batch for every method: 4 responses of exactly 4 tokens (EOS suppressed)
        assert r["gen_tokens_per_step"] == n_tokens, m
        assert r["rl_steps"] == RL_STEPS
    assert records["ppo"]["time_ratio_to_ppo"] == 1.0
    # per prompt: GRPO / RLOO sample GROUP responses for each of PROMPTS prompts, the others one
    # response for each of PROMPTS × GROUP prompts
    for m, r in records.items():
        assert r["prompts_per_step"] == (PROMPTS if m in ("grpo", "rloo") else PROMPTS * GROUP)
        assert r["s_per_prompt"] == pytest.approx(r["step_s"] / r["prompts_per_step"])
        assert r["per_prompt_ratio_to_grpo"] == pytest.approx(
            r["s_per_prompt"] / records["grpo"]["s_per_prompt"])
    assert "Time per prompt ÷ GRPO" in md
    assert doc["meta"]["jobs"] == 2 and "2 children at once" in md  # (a smoke run)
    # PPO trains a critic as large as the policy; the others train the policy only
    assert records["ppo"]["params_trained_m"] == pytest.approx(
        2 * records["dvpo"]["params_trained_m"], rel=0.01)
    assert all(f"| {m} |" in md for m in METHODS)
    assert len(md) > 200
    # each phase's FLOPs and share of the matmul peak; on-policy, DVPO scores the reference
    # and the GVM, dvpo_rescore the policy too: exactly one policy-shaped forward more
    for m, r in records.items():
        assert r["matmul_peak_tflops"] > 0 and all(r["phase_tflop"][k] > 0 for k in
                                                   ("generate", "score", "update")), m
        assert all(s is not None and s > 0 for s in r["share_of_peak"].values()), m
    fwd = records["dvpo_rescore"]["phase_tflop"]["score"] - records["dvpo"]["phase_tflop"]["score"]
    assert fwd == pytest.approx(records["dvpo"]["phase_tflop"]["generate"])
    assert "share of a matmul's rate" in md
    # the frozen reference and GVM: float32 in dvpo, half the bytes in dvpo_bf16; the trained
    # policy is the same
    frozen = {m: records[m]["frozen_weights_gb"] for m in ("dvpo", "dvpo_bf16")}
    assert frozen["dvpo"] > 0 and frozen["dvpo_bf16"] == pytest.approx(frozen["dvpo"] / 2)
    assert records["dvpo_bf16"]["params_trained_m"] == records["dvpo"]["params_trained_m"]
    if not HAS_TRL:
        assert "trl" not in doc and doc["meta"]["trl_version"] is None


def test_phase_flops_by_hand():
    """Hidden 64, 4 layers, 4 heads, MLP 256, vocabulary 512; 2 rows of 3 + 2 tokens. A layer:
    64·(64 + 2·64) + 64·64 + 3·64·256 = 65536 weights. A policy-shaped forward: 2·2·4·65536·5
    (the body) + 4·4·64·5²·2/2 (causal attention) + 2·2·64·512·2 (the head on the 2 response
    positions) = 5530624; a value model's (no head): 5268480; forward + backward: three times."""
    from transformers import LlamaConfig

    from benchmarks.cost import SHAPES
    from benchmarks.phase_flops import phase_flops, rescored_share, shares_of_peak

    config = LlamaConfig(**SHAPES["tiny"])
    lm, body = 5530624.0, 5268480.0
    dvpo = phase_flops(config, 2, 3, 2, value_forwards=1, policy_rescored=False,
                       generations=1, epochs=2, critic=False)
    assert dvpo == {"generate": lm, "score": lm + body, "update": 2 * 3 * lm}
    ppo = phase_flops(config, 2, 3, 2, value_forwards=2, policy_rescored=True,
                      generations=1, epochs=1, critic=True)
    assert ppo == {"generate": lm, "score": 2 * lm + 2 * body, "update": 3 * lm + 3 * body}
    assert shares_of_peak({"a": 10.0, "b": 1.0}, {"a": 2.0, "b": 0.0}, 5.0) == {"a": 1.0,
                                                                               "b": None}
    # logp_old from the engine: the policy scores ceil(rows / 8) of the rows (the gap's watch)
    assert [rescored_share("engine", False, n) for n in (2, 16, 17)] == [0.5, 2 / 16, 3 / 17]
    assert rescored_share("auto", True, 16) == 0.0
    assert rescored_share("auto", False, 16) == rescored_share("rescore", True, 16) == 1.0
    engine = phase_flops(config, 2, 3, 2, value_forwards=1, policy_rescored=0.5,
                         generations=1, epochs=2, critic=False)
    assert engine["score"] == 1.5 * lm + body


@pytest.mark.parametrize("key", ["trl_rm", "trl"])
def test_cpu_cost_benchmark_runs_trl_grpo_trainer_under_the_same_protocol(cost_run, key):
    """TRL twice: with a reward model of the policy's shape (the headline) and with a constant
    reward function (its lower bound)."""
    trl = pytest.importorskip("trl", reason="trl is not installed: no TRL GRPOTrainer "
                              "comparison (pip install trl)")
    doc, md = cost_run
    assert doc["meta"]["trl_version"] == trl.__version__
    t = doc[key]
    records = {r["method"]: r for r in doc["methods"]}
    for f in FIELDS:  # all of them are measured on CPU
        assert isinstance(t[f], float) and t[f] >= 0, f
    assert t["rl_steps"] == RL_STEPS and t["responses_per_step"] == PROMPTS * GROUP
    # the forced length really held: every completion exactly LENGTH tokens, as ours
    assert t["response_len_min"] == t["response_len_max"] == LENGTH
    assert t["gen_tokens_per_step"] == records["grpo"]["gen_tokens_per_step"] \
        == float(PROMPTS * GROUP * LENGTH)
    assert t["prompt_tokens_per_step"] == float(PROMPTS * GROUP * PROMPT_LEN)
    assert t["same_prompts_as_ours"] is True
    # KL on: a reference model loaded beside the policy; the policy alone trained, as ours
    assert t["reference_model_loaded"] and t["config"]["beta"] > 0
    # the policy, its reference and (trl_rm) a reward model of the same shape
    models = 3 if key == "trl_rm" else 2
    assert t["reward"] == ("model" if key == "trl_rm" else "constant")
    assert t["params_loaded_m"] == pytest.approx(models * t["params_trained_m"], rel=0.01)
    assert t["params_trained_m"] == pytest.approx(records["grpo"]["params_trained_m"], rel=0.01)
    assert t["config"]["num_generations"] == GROUP and t["config"]["num_iterations"] == 1
    assert t["config"]["generation_batch_size"] == PROMPTS * GROUP
    assert not t["config"]["use_vllm"] and not t["activation_checkpointing"]
    assert isinstance(t["notes"], list) and t["notes"]
    for m, r in records.items():
        assert r[f"throughput_ratio_to_{key}"] > 0, m
        assert r[f"throughput_ratio_to_{key}"] == pytest.approx(
            r["e2e_tokens_per_s"] / t["e2e_tokens_per_s"])
    reward = "reward model" if key == "trl_rm" else "constant reward"
    assert f"| TRL GRPOTrainer {trl.__version__} ({reward}) |" in md
    assert f"throughput ÷ TRL ({reward})" in md


def test_cpu_cost_benchmark_puts_hf_and_vllm_side_by_side(tmp_path):
    """``--generation hf vllm``: every method once per engine in the same run, ratios to PPO
    within an engine, each vLLM row against its method's HF row, forced lengths on both."""
    out = tmp_path / "cost"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(Path(__file__).resolve().parents[1])
        main(["--mode", "cpu", "--shape", "tiny32", "--rl_steps", str(RL_STEPS), "--length",
              str(LENGTH), "--prompts", str(PROMPTS), "--group", str(GROUP), "--prompt_len",
              str(PROMPT_LEN), "--methods", "dvpo", "ppo", "dvpo_bf16_rollout",
              "--generation", "hf", "vllm", "--trl", "off", "--jobs", "2", "--out", str(out)])
    doc = json.loads((out / "cost.json").read_text())
    records = {(r["method"], r["engine"]): r for r in doc["methods"]}
    assert [(r["method"], r["engine"]) for r in doc["methods"]] == [  # (the jobs' order; the
        # bf16 rollout row sets the vLLM engine, so it has no HF run)
        ("dvpo", "hf"), ("ppo", "hf"), ("dvpo", "vllm"), ("ppo", "vllm"),
        ("dvpo_bf16_rollout", "vllm")]
    assert [records[k]["engine_dtype"] for k in records] == [
        None, None, "float32", "float32", "bfloat16"]
    assert records[("dvpo_bf16_rollout", "vllm")]["frozen_weights_gb"] == pytest.approx(
        records[("dvpo", "vllm")]["frozen_weights_gb"] / 2)
    for (m, e), r in records.items():
        assert r["gen_tokens_per_step"] == float(PROMPTS * GROUP * LENGTH), (m, e)
        assert r["time_ratio_to_ppo"] == pytest.approx(
            r["step_s"] / records[("ppo", e)]["step_s"])
        if e == "vllm" and (m, "hf") in records:
            assert r["step_ratio_to_hf"] == pytest.approx(r["step_s"] / records[(m, "hf")]
                                                          ["step_s"])
    md = (out / "cost.md").read_text()
    assert "| dvpo | vllm (float32) |" in md and "step ÷ hf" in md and "CPU flags" in md
    assert "| dvpo_bf16_rollout | vllm (bfloat16) |" in md


def test_a_variant_is_against_ppo_with_the_same_setting():
    """``dvpo_bf16`` ÷ ``ppo_bf16`` where PPO ran with that setting, else ÷ ``ppo``; a failed
    PPO row is no one's reference; each engine has its own."""
    def row(method, step, mem, engine="hf"):
        return {"method": method, "engine": engine, "step_s": step, "peak_mem_gb": mem,
                "gen_tokens_per_step": 64.0, "gen_tokens_per_s": 1.0, "s_per_prompt": 1.0,
                "generate_s": 1.0}

    records = [row("dvpo", 6, 3), row("ppo", 10, 5), row("dvpo_bf16", 4, 2),
               row("ppo_bf16", 8, 4), row("dvpo_rescore", 7, 3),
               row("dvpo_bf16_rollout", 3, 2, "vllm"), row("ppo", 12, 6, "vllm"),
               {"method": "ppo_bf16_rollout", "engine": "vllm", "status": "failed"}]
    derive(records, {})
    by = {(r["method"], r["engine"]): r for r in records}
    assert by[("dvpo_bf16", "hf")]["ppo_row"] == "ppo_bf16"
    assert by[("dvpo_bf16", "hf")]["time_ratio_to_ppo"] == pytest.approx(4 / 8)
    assert by[("dvpo_bf16", "hf")]["mem_ratio_to_ppo"] == pytest.approx(2 / 4)
    assert by[("ppo_bf16", "hf")]["time_ratio_to_ppo"] == pytest.approx(1.0)
    assert by[("dvpo", "hf")]["ppo_row"] == "ppo"  # (no ppo_rescore: plain PPO)
    assert by[("dvpo_rescore", "hf")]["time_ratio_to_ppo"] == pytest.approx(7 / 10)
    assert by[("dvpo_bf16_rollout", "vllm")]["ppo_row"] == "ppo"
    assert by[("dvpo_bf16_rollout", "vllm")]["time_ratio_to_ppo"] == pytest.approx(3 / 12)


def test_vllm_only_rows_need_the_vllm_engine(capsys):
    """A row that sets the vLLM engine, asked for without it, is refused before anything
    runs, with the fix."""
    with pytest.raises(SystemExit):
        main(["--mode", "cpu", "--methods", "dvpo", "dvpo_bf16_rollout", "--trl", "off"])
    err = capsys.readouterr().err
    assert "--methods dvpo_bf16_rollout" in err and "Fix: add --generation vllm" in err


def without_vllm() -> dict:
    """An environment in which vLLM is not there, as on the GPU image (tests/no_vllm)."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "no_vllm"), str(ROOT)])}


def test_cpu_cost_benchmark_keeps_the_hf_rows_when_vllm_fails(tmp_path):
    """A child that fails (here: no vLLM) becomes a row with its error; the rows
    that finished stand, with ratios among themselves; the parent writes everything, then
    exits non-zero."""
    out = tmp_path / "cost"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cost", "--mode", "cpu", "--shape", "tiny32",
         "--rl_steps", str(RL_STEPS), "--length", str(LENGTH), "--prompts", str(PROMPTS),
         "--group", str(GROUP), "--prompt_len", str(PROMPT_LEN), "--methods", "dvpo", "ppo",
         "--generation", "hf", "vllm", "--trl", "off", "--jobs", "2", "--out", str(out)],
        cwd=ROOT, env=without_vllm(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "2 row(s) failed" in proc.stderr, proc.stderr[-2000:]
    doc = json.loads((out / "cost.json").read_text())
    rows = {(r["method"], r["engine"]): r for r in doc["methods"]}
    assert set(rows) == {(m, e) for m in ("dvpo", "ppo") for e in ("hf", "vllm")}
    for m in ("dvpo", "ppo"):
        hf, vllm = rows[(m, "hf")], rows[(m, "vllm")]
        assert hf["status"] == "ok" and hf["gen_tokens_per_step"] == float(PROMPTS * GROUP
                                                                             * LENGTH)
        assert all(isinstance(hf[f], float) for f in FIELDS), m
        assert hf["time_ratio_to_ppo"] == pytest.approx(hf["step_s"]
                                                        / rows[("ppo", "hf")]["step_s"])
        assert vllm["status"] == "failed" and vllm["error"]["returncode"] != 0
        assert "vllm is not installed here" in "\n".join(vllm["error"]["stderr_tail"])
        assert "step_s" not in vllm and "time_ratio_to_ppo" not in vllm
        assert "step_ratio_to_hf" not in hf
    md = (out / "cost.md").read_text()
    assert "| dvpo | hf |" in md and "| ppo | hf |" in md and "| dvpo | vllm |" not in md
    assert "- dvpo (vllm): exit" in md and "- ppo (vllm): exit" in md
