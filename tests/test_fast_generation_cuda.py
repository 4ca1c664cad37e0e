"""The static-cache generator's compiled CUDA path (``torch.compile`` reduce-overhead: the
decode step in CUDA graphs) against ``generate`` on the same weights. Needs a CUDA device;
skipped elsewhere (the CPU file ``test_fast_generation.py`` covers the uncompiled loop)."""

from __future__ import annotations

import pytest
import torch
from test_fast_generation import EOS, PAD, _greedy_gaps, _model, _prompts

from dvpo_lightning.rollout.fast_generation import StaticCacheGenerator
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model():
    return _model("tiny-llama").cuda()  # float32: greedy ties are not decided by bf16 rounding


@pytest.mark.parametrize("min_new", [0, 4])
def test_compiled_greedy_is_identical_to_hf_generate(cuda_model, min_new):
    ids, mask = (t.cuda() for t in _prompts())
    cfg = SamplingConfig(12, greedy=True, min_new_tokens=min_new)
    ref = HFGenerator(EOS, PAD).generate(cuda_model, ids, mask, cfg)
    static = StaticCacheGenerator(EOS, PAD)  # compile "auto": compiled on CUDA
    got = static.generate(cuda_model, ids, mask, cfg)
    assert any(s.compiled for s in static._states.values()), "the compiled path must have run"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (got, ref)


@pytest.mark.parametrize("min_new", [0, 4])
def test_compiled_greedy_under_bf16_autocast_is_greedy(cuda_model, min_new):
    """The Trainer's ``bf16-mixed``: float32 weights, bf16 autocast (see the CPU test
    ``test_bf16_autocast_over_float32_weights_decodes_greedily`` for why greedy is checked
    against a teacher-forced forward, not token for token)."""
    ids, mask = (t.cuda() for t in _prompts())
    cfg = SamplingConfig(12, greedy=True, min_new_tokens=min_new)
    static = StaticCacheGenerator(EOS, PAD)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = static.generate(cuda_model, ids, mask, cfg)
        gaps = _greedy_gaps(cuda_model, ids, mask, *got, min_new)
    assert any(s.compiled for s in static._states.values())
    assert gaps.max() <= 0.0625, gaps.max()


def test_compiled_sampling_matches_generate_in_distribution(cuda_model):
    """Seeded sampling draws the same random numbers; compiled kernels may move logits by
    float32 rounding, so nearly every token (not provably all) agrees."""
    ids, mask = (t.cuda() for t in _prompts())
    cfg = SamplingConfig(12, temperature=0.9, top_k=20, top_p=0.95)
    static = StaticCacheGenerator(EOS, PAD)
    same = total = 0
    for seed in range(4):
        torch.manual_seed(seed)
        ref = HFGenerator(EOS, PAD).generate(cuda_model, ids, mask, cfg)
        torch.manual_seed(seed)
        got = static.generate(cuda_model, ids, mask, cfg)
        width = min(ref[0].shape[1], got[0].shape[1])
        both = ref[1][:, :width] & got[1][:, :width]
        same += int(((ref[0][:, :width] == got[0][:, :width]) & both).sum())
        total += int(both.sum())
    assert total > 0 and same / total > 0.9, (same, total)


def test_compiled_step_is_not_recompiled_for_a_repeated_bucket(cuda_model):
    from torch._dynamo.utils import counters

    static = StaticCacheGenerator(EOS, PAD, prompt_bucket=8)
    cfg = SamplingConfig(6, greedy=True)
    ids, mask = (t.cuda() for t in _prompts([3, 5, 7, 4]))
    static.generate(cuda_model, ids, mask, cfg)
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs >= 1
    ids2, mask2 = (t.cuda() for t in _prompts([6, 2, 8, 1], seed=4))  # the same width bucket
    static.generate(cuda_model, ids2, mask2, cfg)
    assert int(counters["stats"]["unique_graphs"]) == graphs, "a repeated shape recompiled"
