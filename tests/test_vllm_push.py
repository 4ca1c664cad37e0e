"""A stale vLLM engine stops the run; a loaded checkpoint is pushed; prefix caching and sleep.

Real CPU vLLM engine and real Lightning runs on the tiny test models. A stale engine is made
the realistic way: exactly one push, at a realistic learning rate, is read by the engine and
not loaded (as when the pushed names match nothing, or a worker misses the call).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import vllm
from test_rl_training import fit, make_cli

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.tolerance import resolve_logp_tolerance
from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions
from dvpo_lightning.runtime.guards import SamplerMismatchError

pytestmark = pytest.mark.filterwarnings("ignore")
VLLM = ["--model.init_args.rollout.engine=vllm"]
CPU = torch.device("cpu")


def skip_one_push(monkeypatch, version: int, read: bool = True) -> list[int]:
    """The engine drops the push at ``weights_version == version``: it reads the tensors and
    loads nothing (``read``), or never reads them. Returns the versions dropped."""
    dropped, current = [], {}
    ready, rpc = VLLMEngine._ready, vllm.LLM.collective_rpc

    def _ready(self, model, weights_version):
        current["version"] = weights_version
        return ready(self, model, weights_version)

    def collective_rpc(self, method, *args, **kwargs):
        if method == "reload_weights" and current.get("version") == version and not dropped:
            dropped.append(version)
            if read:
                for _ in kwargs["kwargs"]["weights_iterator"]:
                    pass
            return [None]
        return rpc(self, method, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "_ready", _ready)
    monkeypatch.setattr(vllm.LLM, "collective_rpc", collective_rpc)
    return dropped


def realistic_cli(tmp_path, artifacts32, task_data, lora: bool, *extra: str):
    """Four RL steps of one optimizer update each at a realistic learning rate (5e-5 full,
    1e-4 LoRA): the push before RL step 3 carries exactly one update."""
    args = [*VLLM, "--model.init_args.optim.lr=" + ("1e-4" if lora else "5e-5"), *extra]
    if lora:
        args.append("--model.init_args.models.lora.r=8")
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *args, rl_steps=4,
                      ppo_epochs=1, n_minibatches=1)
    return cli


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_skipped_push_stops_the_run_at_that_step(lora, artifacts32, task_data, tmp_path,
                                                     monkeypatch):
    cli = realistic_cli(tmp_path, artifacts32, task_data, lora)
    dropped = skip_one_push(monkeypatch, version=2)
    with pytest.raises(SamplerMismatchError, match=r"did not take the weights pushed.*"
                                                   r"bit-identical.*Fix: check the weight sync"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert dropped == [2] and cli.trainer.global_step == 2  # stopped in RL step 3's rollout


def test_a_push_the_engine_never_reads_stops_the_run(artifacts32, task_data, tmp_path,
                                                     monkeypatch):
    cli = realistic_cli(tmp_path, artifacts32, task_data, False)
    skip_one_push(monkeypatch, version=2, read=False)
    with pytest.raises(SamplerMismatchError, match=r"did not read the weights pushed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


def test_in_float32_the_auto_tolerance_alone_catches_one_skipped_push(artifacts32, task_data,
                                                                      tmp_path, monkeypatch):
    """The second line of defence: with the push check off, float32 on both sides on a CPU
    (healthy gap ~1e-7) stops at the stale step by the calibrated tolerance."""
    cli = realistic_cli(tmp_path, artifacts32, task_data, False,
                        "--model.init_args.rollout.vllm.push_check=false")
    skip_one_push(monkeypatch, version=2)
    with pytest.raises(SamplerMismatchError, match=r"at RL step 3.*logp_tolerance=0.0002 \(auto"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_the_tolerance_is_calibrated_by_precision_dtype_and_device_and_a_number_is_kept():
    assert resolve_logp_tolerance("auto", "32-true", "auto", CPU) == 2e-4
    assert resolve_logp_tolerance("auto", "32-true", "float32", CPU) == 2e-4
    assert resolve_logp_tolerance("auto", "bf16-mixed", "auto", CPU) == 0.15  # SmolLM2: ≤ 0.043
    assert resolve_logp_tolerance("auto", "32-true", "bfloat16", CPU) == 0.15
    assert resolve_logp_tolerance("auto", "bf16-mixed", "auto", torch.device("cuda")) == 0.15
    assert resolve_logp_tolerance("auto", "32-true", "float32", torch.device("cuda")) == 2e-3
    assert resolve_logp_tolerance(0.05, "bf16-mixed", "auto", CPU) == 0.05
    assert resolve_logp_tolerance(None, "32-true", "auto", CPU) is None
    with pytest.raises(ValueError, match=r"logp_tolerance=-1.*positive number, `auto`"):
        resolve_logp_tolerance(-1, "32-true", "auto", CPU)


def test_a_checkpoint_loaded_into_a_live_process_is_pushed(artifacts32, task_data, tmp_path):
    """The engine holds the weights of update count n; a checkpoint with the same count and
    other weights is loaded into the same process: the next rollout pushes it."""
    cli, _ = make_cli("dvpo", tmp_path, artifacts32, task_data, *VLLM, rl_steps=1)
    module, engine = cli.model, cli.model.experience.generator
    fit(cli)  # its final evaluation pushed the last weights
    assert engine.version == module.weights_version > 0
    cli.trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():  # other weights, the same update count
        if k.startswith("trained.policy.") and v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=g) * 0.02)
    torch.save(ckpt, tmp_path / "b.ckpt")
    cli.trainer.fit_loop.epoch_loop.max_steps = 2
    cli.trainer.fit(module, datamodule=cli.datamodule, ckpt_path=tmp_path / "b.ckpt")
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.global_step == 2
    assert metrics["rollout/sampler_logp_diff_mean"] < 1e-4  # sampled from the loaded weights


# ---------------------------------------------------------------------- engine level


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def model32(tok, seed: int = 0):
    torch.manual_seed(seed)
    return load_causal_lm("test-llama-32", tok).eval()


def group_prompts(tok, length: int = 200, groups: int = 2, size: int = 4):
    """``groups`` random prompts of ``length`` tokens (past vLLM's CPU block of 128, so the
    prefix cache can hold them), each repeated ``size`` times as in a GRPO group."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, len(tok), (length,), generator=g).tolist() for _ in range(groups)]
    return pad_left([r for r in rows for _ in range(size)], tok.pad_token_id)


def cached_blocks(engine: VLLMEngine) -> int:
    """KV blocks in the engine's prefix cache (vLLM 0.32's in-process engine core)."""
    core = engine.llm.llm_engine.engine_core.engine_core
    return len(core.scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block)


def test_prefix_caching_gives_the_same_samples_as_without(tok):
    model, prompts = model32(tok), group_prompts(tok)
    cfg = SamplingConfig(8, min_new_tokens=8)
    runs = []
    for caching in (True, False):
        engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id,
                            VLLMOptions(prefix_caching=caching))
        torch.manual_seed(5)
        runs.append(engine.generate(model, *prompts, cfg, weights_version=0))
        assert (cached_blocks(engine) > 0) is caching  # the groups' prompts are cached
        del engine
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    torch.testing.assert_close(runs[0].logps, runs[1].logps, atol=1e-5, rtol=0)


def test_a_push_resets_the_prefix_cache(tok):
    """Prompts cached under the old weights are recomputed after a push: the engine's log-probs
    equal a teacher-forced forward of the new weights."""
    model, prompts = model32(tok), group_prompts(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    cfg = SamplingConfig(6, greedy=True)
    engine.generate(model, *prompts, cfg, weights_version=0)  # caches the prompts' KV
    assert cached_blocks(engine) > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    got = engine.generate(model, *prompts, cfg, weights_version=1)
    want = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, *prompts, cfg)
    assert torch.equal(got.response_ids, want.response_ids)
    forced, _ = policy_logps(model, *prompts, got.response_ids, got.response_mask)
    torch.testing.assert_close(got.logps, forced, atol=1e-4, rtol=0)
    engine.push(model)
    assert cached_blocks(engine) == 0


def test_after_a_level_2_sleep_the_weights_are_pushed_before_the_kv_cache_wakes(tok,
                                                                                 monkeypatch):
    """vLLM's sleep mode needs a GPU; here its two calls are recorded (the rest is the real CPU
    engine): sleep at level 2, then wake the weights, push, wake the KV cache, reset the prefix
    cache, and check the push."""
    model, prompts = model32(tok), group_prompts(tok, length=8, groups=1, size=2)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    engine.generate(model, *prompts, SamplingConfig(4, greedy=True), weights_version=0)
    engine.options = dataclasses.replace(engine.options, sleep=True)
    calls = []
    llm = engine.llm
    monkeypatch.setattr(llm, "sleep", lambda level: calls.append(f"sleep {level}"))
    monkeypatch.setattr(llm, "wake_up", lambda tags=None: calls.append(f"wake {tags}"))
    for name in ("collective_rpc", "reset_prefix_cache"):
        real = getattr(llm, name)
        monkeypatch.setattr(llm, name, lambda *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(*a, **k))[1])
    engine.sleep()
    engine.generate(model, *prompts, SamplingConfig(4, greedy=True), weights_version=0)
    assert calls == ["sleep 2", "wake ['weights']", "collective_rpc", "wake ['kv_cache']",
                     "reset_prefix_cache"]
    assert engine.version == 0 and not engine.asleep and engine.last_push_s > 0


def test_the_same_weights_pushed_again_must_give_the_same_engine(tok, monkeypatch):
    """After ``forget_weights`` the next rollout pushes the weights the engine already holds;
    an engine left with other weights by that push (here: loaded scaled) stops the run."""
    model, prompts = model32(tok), group_prompts(tok, length=8, groups=1, size=2)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    engine.generate(model, *prompts, SamplingConfig(4, greedy=True), weights_version=0)
    engine.forget_weights()
    engine.generate(model, *prompts, SamplingConfig(4, greedy=True), weights_version=0)
    assert engine.last_push_s > 0  # pushed again, and passed the check
    rpc = vllm.LLM.collective_rpc

    def scaled(self, method, *args, **kwargs):
        if method == "reload_weights":
            weights = kwargs["kwargs"]["weights_iterator"]
            kwargs["kwargs"]["weights_iterator"] = ((n, t * 1.5) for n, t in weights)
        return rpc(self, method, *args, **kwargs)

    monkeypatch.setattr(vllm.LLM, "collective_rpc", scaled)
    engine.forget_weights()
    with pytest.raises(SamplerMismatchError, match=r"pushed the weights it held before.*moved"):
        engine.generate(model, *prompts, SamplingConfig(4, greedy=True), weights_version=0)
