"""``model.models.frozen_dtype=auto``: bfloat16 exactly where the device has bfloat16 kernels;
explicit settings and strategies that cast every parameter are left alone."""

from __future__ import annotations

import torch
from torch import nn

from dvpo_lightning.models.frozen_dtype import bf16_kernels, cast_frozen, resolve_frozen_dtype


def _frozen() -> nn.ModuleDict:
    return nn.ModuleDict({"reference": nn.Linear(4, 4), "gvm": nn.Linear(4, 1)})


def _dtypes(frozen: nn.ModuleDict) -> set[torch.dtype]:
    return {p.dtype for p in frozen.parameters()}


def test_the_cpu_answer_is_torchs_own_probes():
    cpu = torch.device("cpu")
    expected = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert (bf16_kernels(cpu) is not None) == expected
    dtype, why = resolve_frozen_dtype("auto", cpu)
    assert dtype == ("bfloat16" if expected else None)
    assert why.startswith("model.init_args.models.frozen_dtype=auto: ")


def test_a_cpu_without_bf16_kernels_keeps_the_loaded_dtype(monkeypatch):
    """(The probes are switched off: this machine's CPU may have the kernels.)"""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    frozen = _frozen()
    dtype, line = cast_frozen(frozen, "auto", torch.device("cpu"))
    assert dtype is None and _dtypes(frozen) == {torch.float32}
    assert line == ("frozen models (reference, gvm) in their loaded dtype "
                    "(model.init_args.models.frozen_dtype=auto: cpu has no bfloat16 kernels)")


def test_a_cpu_with_bf16_kernels_casts_them(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    frozen = _frozen()
    dtype, line = cast_frozen(frozen, "auto", torch.device("cpu"))
    assert dtype == "bfloat16" and _dtypes(frozen) == {torch.bfloat16}
    assert line == ("frozen models (reference, gvm) in bfloat16 "
                    "(model.init_args.models.frozen_dtype=auto: a CPU with AVX-512 BF16)")


def test_explicit_settings_and_casting_strategies_are_left_alone():
    for setting in (None, "float32", "bfloat16", "float16"):
        frozen = _frozen()
        assert cast_frozen(frozen, setting, torch.device("cpu")) == (setting, None)
        assert _dtypes(frozen) == {torch.float32}  # (explicit dtypes are cast at load)
    frozen = _frozen()  # DeepSpeed under a 16-bit precision casts the whole module itself
    assert cast_frozen(frozen, "auto", torch.device("cpu"), follows_strategy=True) == (None, None)
    assert _dtypes(frozen) == {torch.float32}
    assert cast_frozen(nn.ModuleDict(), "auto", torch.device("cpu")) == (None, None)


def test_models_dtype_loads_the_trained_models_in_it_and_leaves_the_frozen_ones(tokenizer_dir):
    # RL's `models.dtype` (shared with stage 1): the policy and the critic's body load in it; the
    # frozen reference keeps the loaded dtype, which `frozen_dtype` alone decides
    from dvpo_lightning.models import load_tokenizer
    from dvpo_lightning.models.options import ModelOptions
    from dvpo_lightning.modules.rl_models import load_rl_models
    from dvpo_lightning.rollout.experience import Need

    tok = load_tokenizer(tokenizer_dir)
    loaded = load_rl_models(frozenset({Need.CRITIC_VALUES}), "GAE", tok, "test-llama", None,
                            None, None, None, ModelOptions(dtype="bfloat16"))
    assert set(loaded.trained) == {"policy", "critic"}
    assert _dtypes(loaded.trained["policy"]) == {torch.bfloat16}
    # (a value head is made in float32 and reads the body's output cast to it: by design)
    assert _dtypes(loaded.trained["critic"].backbone) == {torch.bfloat16}
    assert _dtypes(loaded.frozen) == {torch.float32}
