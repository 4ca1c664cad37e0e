"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (through a test-only strategy) against the plain
strategy: one DVPO update from the same greedy rollout must give the same weights.

Under ZeRO-3 the policy's parameters are partitioned (asserted), so generation, log-probs and
the update all run on sharded weights. (Generation would also work without the explicit
gather of ``rollout/zero3.py`` — DeepSpeed's hooks gather per layer — so this does not test
that optimisation, only that it gives the same result.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvpo_lightning.models import load_causal_lm, load_tokenizer

WORKER = Path(__file__).with_name("deepspeed_worker.py")


def _run(tmp_path: Path, strategy: str, task_data: str, art, devices: int = 1,
         engine: str = "hf", name: str | None = None, **options) -> dict:
    out = tmp_path / (name or f"{strategy}-{devices}-{engine}-{len(list(tmp_path.iterdir()))}")
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    proc = subprocess.run([sys.executable, str(WORKER), str(out), strategy, task_data,
                           art.policy, art.gvm, str(devices), engine, json.dumps(options)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out / "result.pt")


def _run_together(tmp_path: Path, task_data: str, art, runs: dict[str, tuple]) -> dict:
    """``{name: (strategy, options)}`` → ``{name: result}``: one-process runs, two at a time
    (each worker is single-threaded; the machine the suite runs on has two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        name, (strategy, options) = item
        return name, _run(tmp_path, strategy, task_data, art, name=name, **options)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, runs.items()))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, task_data, artifacts) -> dict:
    """One process each: the plain strategy, ZeRO-2 and ZeRO-3 (``{"plain", "2", "3"}``)."""
    return _run_together(tmp_path_factory.mktemp("one_process"), task_data, artifacts,
                         {name: (name, {}) for name in ("plain", "2", "3")})


@pytest.fixture(scope="module")
def plain(one_process) -> dict:
    return one_process["plain"]


def test_zero_matches_plain_strategy(one_process, artifacts):
    plain = one_process["plain"]
    policy = load_causal_lm(artifacts.policy, load_tokenizer(artifacts.policy))
    start = policy.state_dict()
    moved = [k for k in plain["state"] if not torch.equal(plain["state"][k],
                                                          start[k.removeprefix("policy.")])]
    assert len(moved) == len(start), "the plain run must change every policy tensor"
    for stage in ("2", "3"):
        zero = one_process[stage]
        assert plain["steps"] == zero["steps"] == 1
        assert zero["partitioned"] == (stage == "3")
        for k, v in plain["state"].items():
            torch.testing.assert_close(zero["state"][k], v, rtol=1e-4, atol=1e-6,
                                       msg=f"ZeRO-{stage} {k}")


@pytest.mark.parametrize("stage", ["2", "3"])
def test_two_process_zero_matches_one_plain_process(stage, plain, tmp_path, task_data,
                                                   artifacts):
    """Two ranks of 2 prompts each under ZeRO (gloo) make the same update as one plain process
    on the 4 prompts: the loss is normalised by the global token count, so DeepSpeed's
    gradient average equals the single-process gradient."""
    zero = _run(tmp_path, stage, task_data, artifacts, devices=2)
    assert zero["steps"] == 1 and zero["partitioned"] == (stage == "3")
    assert zero["world_size"] == 2 and plain["world_size"] == 1
    for k, v in plain["state"].items():
        torch.testing.assert_close(zero["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_two_process_zero3_with_vllm_equals_generate(tmp_path, task_data, artifacts32):
    """Under ZeRO-3 each of two ranks drives its own vLLM engine, fed the gathered (full)
    weights of its partitioned policy: greedy rollouts in float32 equal ``generate``'s, so the
    update is bit for bit the one the same two ranks make with ``generate`` (which the tests
    above hold to one plain process's)."""
    hf = _run(tmp_path, "3", task_data, artifacts32, devices=2, engine="hf")
    vllm = _run(tmp_path, "3", task_data, artifacts32, devices=2, engine="vllm")
    assert vllm["steps"] == 1 and vllm["partitioned"] and vllm["world_size"] == 2
    for k, v in hf["state"].items():
        assert torch.equal(vllm["state"][k], v), k


# ---------------------------------------------------------------- clipping and the guard
# Clipping to a norm far below Adam's eps (1e-8) puts the first Adam step in its linear regime
# (update = lr·g/(√v + eps) ≈ lr·g/eps): the update then depends on the clipped gradient itself,
# not on its signs, so a missing clip shows (the unclipped step is about ±lr per weight) and
# two strategies that clip alike agree to float32 rounding.
CLIP = {"max_grad_norm": 1e-9, "lr": 1.0}


def _deltas(result: dict, start: dict) -> dict:
    return {k: v - start[k.removeprefix("policy.")] for k, v in result["state"].items()}


@pytest.fixture(scope="module")
def start_weights(artifacts) -> dict:
    return load_causal_lm(artifacts.policy, load_tokenizer(artifacts.policy)).state_dict()


def test_zero_clips_and_accumulates_as_the_plain_strategy_does(start_weights, tmp_path,
                                                               task_data, artifacts):
    """``model.ppo.max_grad_norm`` reaches DeepSpeed's engine (Lightning's ``clip_gradients`` is
    a no-op under DeepSpeed), and two mini-batches accumulated into one step (two backward
    passes, one ``engine.step``; the loss is normalised by the whole rollout's tokens) add up:
    the ZeRO-1/2/3 update equals the plain strategy's clipped one-mini-batch update, which is
    far from an unclipped one."""
    runs = _run_together(tmp_path, task_data, artifacts, {
        "plain": ("plain", CLIP), "unclipped": ("plain", {"lr": CLIP["lr"]}),
        **{f"zero{z}": (z, {"grad_accum": 2, **CLIP}) for z in ("1", "2", "3")}})
    want = _deltas(runs["plain"], start_weights)
    unclipped = _deltas(runs["unclipped"], start_weights)
    for k, v in want.items():
        assert v.abs().max() < 0.1 * unclipped[k].abs().max(), k  # the clip decided the step
    for z in ("1", "2", "3"):
        zero = runs[f"zero{z}"]
        assert zero["error"] is None and zero["steps"] == 1, (z, zero["error"])
        got = _deltas(zero, start_weights)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-6, msg=f"ZeRO-{z} {k}")


def test_zero_gradient_guard_sees_a_nonfinite_gradient(start_weights, tmp_path, task_data,
                                                       artifacts):
    """Under ZeRO the gradients are partitioned (``p.grad`` is None): the guard reads DeepSpeed's
    global norm, so a NaN gradient stops the run with the step untaken (ZeRO-2 and 3); with
    ``on_nonfinite=skip`` the step is skipped, counted, and the weights stay the start's."""
    runs = _run_together(tmp_path, task_data, artifacts, {
        "stop2": ("2", {"nan_grad": True}), "stop3": ("3", {"nan_grad": True}),
        "skip2": ("2", {"nan_grad": True, "on_nonfinite": "skip"})})
    for name in ("stop2", "stop3"):
        error = runs[name]["error"]
        assert error and error.startswith("NonFiniteError") and "grad_norm" in error, error
    skip = runs["skip2"]
    assert skip["error"] is None and skip["skips"] == 1 and skip["steps"] == 1
    for k, v in skip["state"].items():
        assert torch.equal(v, start_weights[k.removeprefix("policy.")]), k


def test_zero_frozen_models_dtype_is_a_choice(tmp_path, task_data, artifacts):
    """Under bf16-mixed DeepSpeed casts every parameter of the module: unset, the frozen
    reference and GVM follow the policy into bfloat16 (and the start-up log says so); with
    ``frozen_dtype=float32`` they hold their loaded float32 weights, exactly. (``auto`` leaves
    them to the strategy: ``test_frozen_dtype.py``.)"""
    from dvpo_lightning.models import ValueModel

    runs = _run_together(tmp_path, task_data, artifacts, {
        str(d): ("2", {"precision": "bf16-mixed", "frozen_dtype": d}) for d in (None, "float32")})
    tok = load_tokenizer(artifacts.policy)
    loaded = {"reference": load_causal_lm(artifacts.policy, tok),
              "gvm": ValueModel.from_pretrained(artifacts.gvm, tok)}
    for frozen_dtype, got in runs.items():
        assert got["error"] is None, got["error"]
        assert got["policy_dtype"] == "torch.bfloat16"
        want = "torch.float32" if frozen_dtype == "float32" else "torch.bfloat16"
        assert got["frozen_dtypes"] == {"reference": want, "gvm": want}
        for name, model in loaded.items():
            total = sum(float(p.double().sum()) for p in model.parameters())
            if frozen_dtype == "float32":
                assert got["frozen_sums"][name] == total, name
            else:
                assert got["frozen_sums"][name] != total, name  # rounded to bfloat16


REPO = Path(__file__).resolve().parents[1]
DEEPSPEED_CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.yaml"))
CPU_STRATEGY = ["--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.strategy.class_path=cpu_deepspeed.CPUDeepSpeedStrategy",
                "--trainer.strategy.init_args.process_group_backend=gloo"]


def _fit(tmp_path: Path, *args: str) -> str:
    """``python -m dvpo_lightning fit ARGS`` with the CPU DeepSpeed strategy importable; its
    output (the test fails with its stderr when the run does)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvpo_lightning", "fit", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_every_shipped_deepspeed_config_takes_an_rl_step(tmp_path, task_data, artifacts):
    """Each ``configs/deepspeed/*.yaml`` as shipped (its ZeRO stage, offload, bf16-mixed),
    after ``configs/dvpo.yaml``, through the real CLI: one RL step, clipped at
    ``ppo.max_grad_norm``. Only the strategy class is swapped for the CPU test one (Lightning's
    refuses to start without CUDA); ``zero3_offload`` needs DeepSpeed's CPU Adam, which the
    module picks (its kernel compiles on first use). Two runs at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(config: Path) -> tuple[Path, str]:
        root = tmp_path / config.stem
        root.mkdir()
        return root, _fit(
            root, "--config", str(REPO / "configs" / "dvpo.yaml"), "--config", str(config),
            *CPU_STRATEGY, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
            f"--model.init_args.policy={artifacts.policy}",
            f"--model.init_args.value_model={artifacts.gvm}",
            "--model.init_args.rollout.max_new_tokens=6",
            "--model.init_args.ppo.mini_batch_size=4", "--model.init_args.ppo.epochs=1",
            f"--model.init_args.export_dir={root / 'policy'}",
            f"--data.init_args.train_path={task_data}/rl_prompts.jsonl",
            f"--data.init_args.eval_path={task_data}/eval_prompts.jsonl",
            "--data.init_args.test_path=null",
            f"--data.init_args.tokenizer={task_data}/tokenizer", "--data.init_args.batch_size=4")

    assert [p.stem for p in DEEPSPEED_CONFIGS] == ["zero1", "zero2", "zero3", "zero3_offload"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for root, log in pool.map(one, DEEPSPEED_CONFIGS):
            assert ("DeepSpeed: gradient clipping at norm 1 "
                    "(model.init_args.ppo.max_grad_norm)") in log, \
                (root.name, log[-3000:])
            assert "frozen models (reference, gvm) in bfloat16" in log, root.name
            assert json.loads((root / "summary.json").read_text())["rl_steps"] == 1, root.name
            assert (root / "policy" / "config.json").exists(), root.name


def test_dpo_under_zero2_logs_deepspeeds_gradient_norm(tmp_path, task_data, artifacts):
    """A stage Lightning optimises (DPO) under ZeRO-2, through the CLI: ``train/grad_norm`` is
    DeepSpeed's global norm (``p.grad`` is None there, so a norm of it would be missing)."""
    import csv

    _fit(tmp_path, "--config", str(REPO / "configs" / "dpo.yaml"),
         "--config", str(REPO / "configs" / "deepspeed" / "zero2.yaml"), *CPU_STRATEGY,
         "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
         "--trainer.log_every_n_steps=1", "--trainer.enable_checkpointing=false",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
         f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=csv",
         "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
         f"--model.init_args.policy={artifacts.policy}", "--model.init_args.export_dir=null",
         f"--data.init_args.train_path={task_data}/pairs.jsonl",
         f"--data.init_args.val_path={task_data}/eval_pairs.jsonl",
         f"--data.init_args.eval_path={task_data}/eval_prompts.jsonl",
         "--data.init_args.test_path=null",
         f"--data.init_args.tokenizer={task_data}/tokenizer", "--data.init_args.batch_size=4")
    rows = list(csv.DictReader(next(tmp_path.glob("csv/*/metrics.csv")).open()))
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(norms) == 2 and all(n > 0 for n in norms), rows
