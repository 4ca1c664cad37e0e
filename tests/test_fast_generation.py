"""StaticCacheGenerator against HFGenerator (``model.generate``) on the same weights, on a CPU.

The comparisons are exact, token for token, also for seeded sampling. The static-cache loop
applies ``generate``'s logits processors in the same order with the same arithmetic and calls
``torch.multinomial`` on a ``(B, V)`` tensor of the same shape with the same seed, so it draws
the same random numbers. Its logits are not bit-identical to ``generate``'s (attention also
runs over the static cache's masked, not yet written slots: float32 differences of ~1e-6), so a
draw could in principle flip when two tokens' ``p / Exp(1)`` scores tie to within that; with
the fixed seeds below none does (nor did any in tens of thousands of draws tried while writing
this), so the tests assert equality rather than a chi-square agreement of distributions.

Models are random ``test-llama`` / ``tiny-llama`` (seeded init, ``initializer_range=0.2`` so
that greedy decoding does not collapse onto one token) with a 64-token vocabulary and an
inflated EOS row of the (tied) LM head, so that some responses end early and others run to the
length limit.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models.loading import position_ids_from_mask
from dvpo_lightning.models.tiny import tiny_config
from dvpo_lightning.rollout.engines import make_generator
from dvpo_lightning.rollout.fast_generation import (
    StaticCacheGenerator,
    filter_top_k,
    filter_top_p,
)
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig

torch.set_num_threads(1)

V, PAD, BOS, EOS = 64, 0, 1, 2
LENGTHS = [3, 5, 7, 4, 6, 2, 5, 3]


def _model(name: str, eos_scale: float = 3.0) -> torch.nn.Module:
    config = tiny_config(name, V, PAD, BOS, EOS)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= eos_scale  # tied with the embedding: EOS becomes likely
    return model


@pytest.fixture(scope="module")
def test_llama():
    return _model("test-llama")


@pytest.fixture(scope="module")
def tiny_llama():
    return _model("tiny-llama")


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]
    return pad_left(seqs, PAD)


def _both(model, ids, mask, cfg, seed=1, **options):
    """``(HFGenerator result, StaticCacheGenerator result, the static generator)``."""
    static = StaticCacheGenerator(EOS, PAD, **options)
    torch.manual_seed(seed)
    ref = HFGenerator(EOS, PAD).generate(model, ids, mask, cfg)
    torch.manual_seed(seed)
    got = static.generate(model, ids, mask, cfg)
    return ref, got, static


def _assert_same(ref, got):
    assert got[0].shape == ref[0].shape, (got[0].shape, ref[0].shape)
    assert got[0].dtype == torch.long and got[1].dtype == torch.bool
    assert torch.equal(got[0], ref[0]), (got[0], ref[0])
    assert torch.equal(got[1], ref[1]), (got[1], ref[1])


# ------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("name", ["test-llama", "tiny-llama"])
@pytest.mark.parametrize("min_new", [0, 4])
def test_greedy_is_identical_to_hf_generate(name, min_new, test_llama, tiny_llama):
    model = test_llama if name == "test-llama" else tiny_llama
    ids, mask = _prompts()
    assert not mask.all(), "the prompts must be left-padded"
    cfg = SamplingConfig(12, greedy=True, min_new_tokens=min_new)
    ref, got, static = _both(model, ids, mask, cfg)
    _assert_same(ref, got)
    assert static.cached_shapes(model), "the static path must have run (no fallback)"
    lengths = got[1].sum(1)
    if min_new == 0:
        # the interesting cases: rows that end early (post-EOS padding) and rows that do not
        assert (lengths < 12).any() and (lengths == 12).any(), lengths
        ended = lengths < 12
        assert (got[0][ended, lengths[ended] - 1] == EOS).all()
    else:
        assert (lengths >= min_new).all(), lengths
        assert not (got[0][:, :min_new] == EOS).any()


def _greedy_gaps(model, ids, mask, response, response_mask, min_new):
    """How far below the best logit each chosen token is under one full forward of prompt +
    response in the current autocast (0 where the token is the arg-max), at the real tokens."""
    full = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask.long(), response_mask.long()], 1)
    logits = model(input_ids=full, attention_mask=full_mask,
                   position_ids=position_ids_from_mask(full_mask)).logits.float()
    step = logits[:, ids.shape[1] - 1:-1].clone()
    step[:, :min_new, EOS] = -float("inf")
    chosen = step.gather(-1, response[..., None]).squeeze(-1)
    return (step.max(-1).values - chosen)[response_mask]


@pytest.mark.parametrize("min_new", [0, 4])
def test_bf16_autocast_over_float32_weights_decodes_greedily(min_new, tiny_llama):
    """Lightning's ``bf16-mixed``: float32 weights under bf16 autocast. The attention layers
    then make float32 keys (rotary promotion) and bf16 values; a plain ``StaticCache`` takes the
    keys' dtype for both and fails on the values, so the cache stores both in bf16 (attention
    casts its inputs to bf16 under autocast anyway).

    bf16 logits tie and round differently with the attended length, so neither loop is
    token-for-token ``generate``'s here; instead each greedy token must be the arg-max of the
    teacher-forced bf16 forward to within 4 bf16 steps at the logits' scale (0.0625), for ours
    and for ``generate``'s (sampled tokens miss by ~5)."""
    assert next(tiny_llama.parameters()).dtype == torch.float32
    ids, mask = _prompts()
    cfg = SamplingConfig(12, greedy=True, min_new_tokens=min_new)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got, static = _both(tiny_llama, ids, mask, cfg)
        for out in (got, ref):
            gaps = _greedy_gaps(tiny_llama, ids, mask, *out, min_new)
            assert gaps.max() <= 0.0625, gaps.max()
    assert got[0].shape == ref[0].shape and (got[1].sum(1) >= min_new).all()
    (cache_key,) = static._states[id(tiny_llama)].shapes
    assert cache_key[-1] == torch.bfloat16, "the bucket must be keyed by the autocast dtype"
    cache = static.cache_for(tiny_llama, *static.cached_shapes(tiny_llama)[0])
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
    assert {layer.values.dtype for layer in cache.layers} == {torch.bfloat16}


def test_rows_after_eos_are_padded_and_the_width_trimmed():
    """All rows end before the limit: the width stops at the last EOS, as in ``generate``,
    also when the all-ended check runs only every few steps (the CUDA default)."""
    model = _model("tiny-llama", eos_scale=8.0)
    ids, mask = _prompts()
    cfg = SamplingConfig(16)
    for check_every in (1, 4, 5):
        ref, got, _ = _both(model, ids, mask, cfg, seed=0, check_every=check_every)
        _assert_same(ref, got)
    assert got[0].shape[1] < 16, "the seed must make every row end early"
    assert (got[0][~got[1]] == PAD).all()


# ------------------------------------------------------------------------------------ sampling
SAMPLING = {
    "plain": SamplingConfig(12),
    "temperature": SamplingConfig(12, temperature=0.7),
    "top_k": SamplingConfig(12, top_k=5),
    "top_p": SamplingConfig(12, top_p=0.8),
    "all": SamplingConfig(12, temperature=1.3, top_k=20, top_p=0.9),
    "min_new": SamplingConfig(12, min_new_tokens=6),
    "forced": SamplingConfig(8, min_new_tokens=8, temperature=0.9, top_p=0.95),
}


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_seeded_sampling_is_identical_to_hf_generate_token_for_token(name, tiny_llama):
    """Token-for-token equality with ``generate`` under the same seed (not a statistical test:
    see the module docstring for why this holds and its one theoretical caveat)."""
    cfg = SAMPLING[name]
    ids, mask = _prompts()
    for seed in range(3):
        ref, got, _ = _both(tiny_llama, ids, mask, cfg, seed=seed)
        _assert_same(ref, got)
    if cfg.min_new_tokens:
        assert not (got[0][:, :cfg.min_new_tokens] == EOS).any()
    if cfg.min_new_tokens == cfg.max_new_tokens:
        assert got[1].all() and got[0].shape == (len(LENGTHS), cfg.max_new_tokens)


@pytest.mark.parametrize("k", [1, 3, 64, 100])
def test_top_k_filter_matches_transformers(k):
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(k))
    logits[0, :4] = logits[0, 4]  # ties at the boundary
    expect = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(filter_top_k(logits, k), expect)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.99])
def test_top_p_filter_matches_transformers(p):
    logits = 3 * torch.randn(6, V, generator=torch.Generator().manual_seed(7))
    expect = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = filter_top_p(logits, p)
    assert torch.equal(got, expect)
    assert (got.isfinite().sum(1) >= 1).all()
    if p < 0.9:
        assert (got.isinf().sum(1) > 0).all(), "the filter must remove something here"


# ------------------------------------------------------------------------------------ buckets
def test_bucketed_prompt_width_gives_the_same_tokens(test_llama):
    """Widths 5 and 7 padded on the left to 8: the same tokens as with no bucketing."""
    for width in (5, 7):
        lengths = [width, width - 2, 1, width - 1]
        ids, mask = _prompts(lengths, seed=width)
        assert ids.shape[1] == width
        for cfg in (SamplingConfig(10, greedy=True), SamplingConfig(10, top_k=8)):
            outs = []
            for bucket in (1, 8):
                static = StaticCacheGenerator(EOS, PAD, prompt_bucket=bucket, batch_bucket=1)
                torch.manual_seed(5)
                outs.append(static.generate(test_llama, ids, mask, cfg))
                rows, padded, length = static.bucketed_shape(4, width, 10)
                assert static.cached_shapes(test_llama) == [(rows, length)]
                assert padded == (8 if bucket == 8 else width)
            _assert_same(outs[0], outs[1])


def test_padded_batch_rows_change_nothing(test_llama):
    ids, mask = _prompts([3, 6, 2])
    cfg = SamplingConfig(10, temperature=0.8)
    ref, got, static = _both(test_llama, ids, mask, cfg, batch_bucket=4, prompt_bucket=8)
    _assert_same(ref, got)
    assert got[0].shape[0] == 3
    assert static.cached_shapes(test_llama) == [(4, 24)]  # 3 rows → 4; 8 + 10 → 24


def test_the_cache_is_reused_between_calls_with_the_same_shapes(test_llama):
    static = StaticCacheGenerator(EOS, PAD, prompt_bucket=8, batch_bucket=4, max_cached=2)
    cfg = SamplingConfig(6, greedy=True)
    ids, mask = _prompts([3, 5, 7, 4])
    first = static.generate(test_llama, ids, mask, cfg)
    cache = static.cache_for(test_llama, 4, 16)
    assert cache is not None
    # other prompts of another width in the same bucket: the same cache object, same result as
    # a fresh generator (the reset leaves nothing of the previous call behind)
    ids2, mask2 = _prompts([2, 6, 3], seed=9)
    second = static.generate(test_llama, ids2, mask2, cfg)
    assert static.cache_for(test_llama, 4, 16) is cache
    assert static.cached_shapes(test_llama) == [(4, 16)]
    _assert_same(StaticCacheGenerator(EOS, PAD, prompt_bucket=8).generate(
        test_llama, ids2, mask2, cfg), second)
    _assert_same(static.generate(test_llama, ids, mask, cfg), first)
    # new shapes add buckets; the least recently used is dropped beyond max_cached
    static.generate(test_llama, *_prompts([3, 5, 7, 4, 2]), cfg)  # 8 rows
    static.generate(test_llama, *_prompts([12, 3]), cfg)  # width 16
    assert static.cached_shapes(test_llama) == [(8, 16), (4, 24)]
    static.clear()
    assert static.cached_shapes(test_llama) == []


def test_compiled_step_is_not_recompiled_for_repeated_shapes(test_llama):
    """The compiled-step path on a CPU (dynamo with a counting backend, no inductor): one graph
    for the decode step, the same tokens as eager, and no recompilation on the second call."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    static = StaticCacheGenerator(EOS, PAD, compile=True, prompt_bucket=8,
                                  compile_options={"backend": counter})
    cfg = SamplingConfig(6, top_k=10)
    ids, mask = _prompts([3, 5, 7, 4])
    ref, got, _ = _both(test_llama, ids, mask, cfg)
    torch.manual_seed(1)
    _assert_same(ref, static.generate(test_llama, ids, mask, cfg))
    frames = counter.frame_count
    assert frames >= 1
    ids2, mask2 = _prompts([6, 2, 8, 1], seed=4)  # width 8: the same bucket
    static.generate(test_llama, ids2, mask2, cfg)
    assert counter.frame_count == frames, "a repeated shape must not recompile"
    torch._dynamo.reset()


def test_many_buckets_are_all_compiled(test_llama):
    """More buckets than dynamo's default 8 graphs per function (prompt widths of a run, train
    and evaluation batches, the reference model): each still gets a compiled graph, none is
    silently run eagerly; a bucket dropped from the cache and made again reuses its graph,
    also the bf16-autocast cache's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    static = StaticCacheGenerator(EOS, PAD, compile=True, prompt_bucket=8, batch_bucket=4,
                                  compile_options={"backend": counter, "dynamic": False})
    cfg = SamplingConfig(4, greedy=True)
    widths = [3, 12, 20, 30, 40, 50, 60, 70, 80, 90]  # 10 cache lengths
    for width in widths:
        static.generate(test_llama, *_prompts([width, 2]), cfg)
    assert counter.frame_count == len(widths)
    static.generate(test_llama, *_prompts([3, 2]), cfg)  # evicted (max_cached 2), made again
    assert counter.frame_count == len(widths)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast cache too
        for width in (3, 12, 20, 3):  # the last is evicted and made again
            static.generate(test_llama, *_prompts([width, 2]), cfg)
    assert counter.frame_count == len(widths) + 3
    torch._dynamo.reset()


def test_inductor_compiled_step_on_cpu():
    """The real compiled path (inductor, the default ``mode="reduce-overhead"`` options; on a CPU
    there are no CUDA graphs, the rest is the same code: static addresses, step marks, the
    clone of the step's output): greedy tokens are ``generate``'s in float32; after an
    in-place weight update (what the optimizer does between rollouts) the compiled step uses
    the new weights; greedy under bf16 autocast (a second compiled bucket, keyed by the
    autocast dtype)."""
    torch._dynamo.reset()
    model = _model("tiny-llama")  # its own: the weights are changed below
    ids, mask = _prompts()
    cfg = SamplingConfig(12, greedy=True, min_new_tokens=2)
    ref, got, static = _both(model, ids, mask, cfg, compile=True)
    assert static._states[id(model)].compiled
    _assert_same(ref, got)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(4.0)
    moved = HFGenerator(EOS, PAD).generate(model, ids, mask, cfg)
    got = static.generate(model, ids, mask, cfg)
    assert not torch.equal(moved[0], ref[0]), "the weight change must change the tokens"
    _assert_same(moved, got)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = static.generate(model, ids, mask, cfg)
        gaps = _greedy_gaps(model, ids, mask, *out, cfg.min_new_tokens)
    assert gaps.max() <= 0.0625, gaps.max()
    assert len(static.cached_shapes(model)) == 2
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ wrappers
def test_lora_wrapped_model_is_identical_to_hf_generate():
    peft = pytest.importorskip("peft")
    base = _model("test-llama")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, lora).eval()
    assert type(model).__name__ == "PeftModelForCausalLM"
    ids, mask = _prompts()
    cfg = SamplingConfig(10, greedy=True)
    ref, got, static = _both(model, ids, mask, cfg)
    _assert_same(ref, got)
    assert static.cached_shapes(model), "the LoRA model must take the static path"
    with model.disable_adapter():
        plain = HFGenerator(EOS, PAD).generate(model, ids, mask, cfg)
    assert not torch.equal(plain[0], got[0]), "the adapter must change the tokens"


def test_falls_back_to_hf_generate_and_says_why_once(caplog):
    model = _model("test-llama")
    next(model.parameters()).ds_id = 0  # looks ZeRO-3 partitioned
    ids, mask = _prompts()
    cfg = SamplingConfig(8)
    with caplog.at_level(logging.WARNING, logger="dvpo_lightning.rollout.fast_generation"):
        ref, got, static = _both(model, ids, mask, cfg)
        torch.manual_seed(1)
        static.generate(model, ids, mask, cfg)
        static.generate(model, ids, mask, cfg)
    _assert_same(ref, got)
    assert static.cached_shapes(model) == []
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(messages) == 1 and "ZeRO-3" in messages[0], messages


def test_a_generation_config_processor_it_lacks_means_fallback():
    model = _model("test-llama")
    model.generation_config.repetition_penalty = 1.3
    reason = StaticCacheGenerator.unsupported_reason(model)
    assert reason is not None and "repetition_penalty" in reason
    ids, mask = _prompts()
    ref, got, static = _both(model, ids, mask, SamplingConfig(8, greedy=True))
    _assert_same(ref, got)
    assert static.cached_shapes(model) == []
    assert StaticCacheGenerator.unsupported_reason(_model("test-llama")) is None


# ------------------------------------------------------------------------------------ factory
def test_make_generator_kinds(monkeypatch):
    assert type(make_generator("hf", EOS, PAD)) is HFGenerator
    static = make_generator("static", EOS, PAD, prompt_bucket=16, compile=False)
    assert isinstance(static, StaticCacheGenerator) and static.prompt_bucket == 16
    assert (static.eos_token_id, static.pad_token_id) == (EOS, PAD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(make_generator("auto", EOS, PAD, prompt_bucket=16)) is HFGenerator
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(make_generator("auto", EOS, PAD), StaticCacheGenerator)


def test_make_generator_rejects_unknown_kinds_and_stray_options():
    with pytest.raises(ValueError) as err:
        make_generator("vllm", EOS, PAD)
    msg = str(err.value)
    assert "model.init_args.rollout.engine" in msg and "'vllm'" in msg
    assert all(f"'{k}'" in msg for k in ("hf", "static", "auto")), msg
    with pytest.raises(ValueError, match="takes no options"):
        make_generator("hf", EOS, PAD, prompt_bucket=8)
    with pytest.raises(ValueError, match="compile"):
        StaticCacheGenerator(EOS, PAD, compile="always")
    with pytest.raises(ValueError, match="prompt_bucket"):
        StaticCacheGenerator(EOS, PAD, prompt_bucket=0)


@pytest.mark.filterwarnings("ignore")
def test_dvpo_trains_identically_with_the_static_generator(artifacts, task_data, tmp_path):
    """``model.init_args.rollout.engine=static`` through the real CLI and Trainer: on CPU the static
    loop samples the same tokens as ``generate`` from the same RNG state, so two RL steps give
    bit-identical weights and the same rollout curve."""
    from test_rl_training import make_cli

    from dvpo_lightning.callbacks import CostMeter

    weights, curves = [], []
    for kind in ("hf", "static"):
        cli, _ = make_cli("dvpo", tmp_path / kind, artifacts, task_data,
                          f"--model.init_args.rollout.engine={kind}")
        assert type(cli.model.experience.generator).__name__ == {"hf": "HFGenerator",
                                                      "static": "StaticCacheGenerator"}[kind]
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        weights.append({k: v.clone() for k, v in cli.model.trained.state_dict().items()})
        meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CostMeter))
        curves.append([(r["gold"], r["gen_tokens"], r["kl"]) for r in meter.records])
    assert curves[0] == curves[1]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
