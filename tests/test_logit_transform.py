"""The sampler's transform in the log-prob ops: known answers, the kept set of Hugging Face's and
vLLM's samplers, chunking, the fused head, gradients, and the untransformed path to the bit."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dvpo_lightning.ops.sampling import LogitTransform, transform_logits
from dvpo_lightning.ops.token_logps import head_token_logps, token_logps


def _case(b=3, length=9, t=5, v=40, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, length, v, generator=g)
    if ties:  # coarse values: many ties, at the top-k and top-p boundaries too
        logits = logits.round()
    return logits, torch.randint(0, v, (b, t), generator=g)


def _masked_plain(logits, targets, offset, tr: LogitTransform):
    """The definition, by autograd-able ops: ``log_softmax(f(z))[y]`` with ``f`` from
    :func:`transform_logits` applied to a detached copy (only its kept set is used)."""
    cols = logits[:, offset:offset + targets.shape[1]].float()
    keep = transform_logits(cols.detach().clone(), tr, targets).isfinite()
    z = (cols / tr.temperature).masked_fill(~keep, float("-inf"))
    return z.log_softmax(-1).gather(2, targets[..., None]).squeeze(-1)


def test_temperature_is_the_log_softmax_of_the_scaled_logits():
    logits, targets = _case()
    got, ent = token_logps(logits, targets, 2, sampling=LogitTransform(0.5), with_entropy=True)
    z = logits[:, 2:7] / 0.5
    want = z.log_softmax(-1).gather(2, targets[..., None]).squeeze(-1)
    assert_close(got, want)
    p = z.softmax(-1)
    assert_close(ent, -(p * p.log()).sum(-1))


def _hf_kept(scores: torch.Tensor, tr: LogitTransform, position: int = 0) -> torch.Tensor:
    """Hugging Face ``generate``'s processors and warpers, in its order, on ``(rows, V)``."""
    ids = torch.zeros(scores.shape[0], position + 1, dtype=torch.long)  # prompt of 1 token
    procs = []
    if tr.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(1, tr.min_new_tokens,
                                                       list(tr.end_ids)))
    procs.append(TemperatureLogitsWarper(tr.temperature))
    if tr.top_k:
        procs.append(TopKLogitsWarper(tr.top_k))
    if tr.top_p < 1:
        procs.append(TopPLogitsWarper(tr.top_p))
    for proc in procs:
        scores = proc(ids, scores)
    return scores.isfinite()


def _loop_kept(z: torch.Tensor, tr: LogitTransform) -> torch.Tensor:
    """The definition row by row, in plain Python: top-k keeps values ≥ the k-th largest; top-p
    keeps a token while the probability of those sorted above it is < p."""
    kept = torch.zeros(z.shape, dtype=torch.bool)
    for r, row in enumerate((z / tr.temperature).tolist()):
        order = sorted(range(len(row)), key=lambda i: row[i], reverse=True)
        kth = row[order[tr.top_k - 1]] if tr.top_k else float("-inf")
        live = [i for i in order if row[i] >= kth]
        m = max(row[i] for i in live)
        mass = [torch.tensor(row[i] - m).exp().item() for i in live]
        total, above = sum(mass), 0.0
        for i, w in zip(live, mass):
            if above < tr.top_p or i == live[0]:
                kept[r, i] = True
            above += w / total
    return kept


@pytest.mark.parametrize("tr", [LogitTransform(0.7, top_k=5), LogitTransform(1.0, top_p=0.8),
                                LogitTransform(0.5, top_k=20, top_p=0.9),
                                LogitTransform(1.3, top_k=3, top_p=0.5),
                                LogitTransform(1.0, top_p=0.01)])
@pytest.mark.parametrize("ties", [False, True])
def test_kept_set_is_transformers_and_vllms(tr, ties):
    logits, _ = _case(b=4, length=6, ties=ties)
    rows = logits.flatten(0, 1)
    got = transform_logits(rows.clone(), tr).isfinite()
    vllm_ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    k = torch.full((rows.shape[0],), tr.top_k, dtype=torch.int32) if tr.top_k else None
    p = torch.full((rows.shape[0],), tr.top_p) if tr.top_p < 1 else None
    theirs = vllm_ops.apply_top_k_top_p_pytorch((rows / tr.temperature).clone(), k, p,
                                                allow_cpu_sync=True)
    for other in (_hf_kept(rows.clone(), tr), theirs.isfinite()):
        if ties and tr.top_p < 1:  # a top-p boundary tie falls in sort order (unspecified in
            # every engine): as many tokens kept, of the same values
            assert torch.equal(got.sum(-1), other.sum(-1))
            assert torch.equal(rows.masked_fill(~got, -99).sort(-1).values,
                               rows.masked_fill(~other, -99).sort(-1).values)
        else:
            assert torch.equal(got, other)
    if not ties:
        assert torch.equal(got, _loop_kept(rows, tr))
        assert_close(transform_logits(rows.clone(), tr), theirs)  # the kept logits are z / T


def test_min_new_tokens_suppresses_the_end_tokens_before_it_only():
    logits, targets = _case(t=5)
    tr = LogitTransform(min_new_tokens=3, end_ids=(4, 9))
    z = transform_logits(logits[:, 1:6].clone(), tr)
    assert z[:, :3, [4, 9]].isneginf().all() and z[:, 3:].isfinite().all()
    assert z[:, :3].isfinite().sum() == 3 * 3 * 38
    for pos in range(5):
        assert torch.equal(z[:, pos].isfinite(), _hf_kept(logits[:, 1 + pos].clone(), tr, pos))


def test_the_scored_token_is_kept_whatever_its_rank():
    """A target outside the kept set gets ``z_y/T − log(Σ_kept e^{z/T} + e^{z_y/T})`` (finite);
    inside it, the exact log-prob of the truncated distribution."""
    logits, targets = _case()
    tr = LogitTransform(0.5, top_k=2)
    got = token_logps(logits, targets, 0, sampling=tr)[0]
    z = logits[:, :5] / 0.5
    kept = z >= z.topk(2, -1).values[..., -1:]
    kept.scatter_(2, targets[..., None], True)
    want = z.masked_fill(~kept, float("-inf")).log_softmax(-1).gather(
        2, targets[..., None]).squeeze(-1)
    assert got.isfinite().all()
    assert_close(got, want)
    exact = token_logps(logits, targets, 0, sampling=LogitTransform(0.5, top_k=2,
                                                                    keep_target=False))[0]
    inside = torch.gather(z >= z.topk(2, -1).values[..., -1:], 2, targets[..., None])[..., 0]
    assert exact[~inside].isneginf().all() and torch.equal(exact[inside], got[inside])


TRANSFORMS = [LogitTransform(0.5), LogitTransform(0.5, top_k=20, top_p=0.9),
              LogitTransform(1.0, top_p=0.7, min_new_tokens=2, end_ids=(3,))]


@pytest.mark.parametrize("tr", TRANSFORMS)
def test_chunking_does_not_change_a_bit(tr):
    logits, targets = _case(b=6)
    ref = token_logps(logits, targets, 1, chunk_tokens=10_000, with_entropy=True, sampling=tr)
    assert ref[0].isfinite().all() and ref[1].isfinite().all()
    for chunk in (1, 5, 13):
        got = token_logps(logits, targets, 1, chunk_tokens=chunk, with_entropy=True, sampling=tr)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("tr", TRANSFORMS)
def test_values_entropy_and_gradient_match_autograd_of_the_definition(tr):
    logits, targets = _case()
    weights = torch.randn(targets.shape)
    a = logits.clone().requires_grad_()
    logp, ent = token_logps(a, targets, 3, chunk_tokens=4, with_entropy=True, sampling=tr)
    (logp * weights).sum().backward()
    b = logits.clone().requires_grad_()
    want = _masked_plain(b, targets, 3, tr)
    (want * weights).sum().backward()
    assert_close(logp, want)
    assert_close(a.grad, b.grad)
    cols = logits[:, 3:8]
    keep = transform_logits(cols.clone(), tr, targets).isfinite()
    p = (cols / tr.temperature).masked_fill(~keep, float("-inf")).softmax(-1)
    assert_close(ent, -(p * p.clamp(min=1e-30).log()).sum(-1))


@pytest.mark.parametrize("tr", TRANSFORMS)
def test_fused_head_equals_logits_then_transform(tr):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 6, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 40, (3, 5), generator=g)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused, ent_f = head_token_logps(h1, w1, targets, 2, chunk_tokens=7, with_entropy=True,
                                    sampling=tr)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain, ent_p = token_logps(h2 @ w2.T, targets, 2, chunk_tokens=7, with_entropy=True,
                               sampling=tr)
    assert_close(fused, plain)
    assert_close(ent_f, ent_p)
    fused.sum().backward()
    plain.sum().backward()
    assert_close(h1.grad, h2.grad)
    assert_close(w1.grad, w2.grad)


def test_gradcheck_float64():
    logits, targets = _case(b=2, length=4, t=3, v=12)
    tr = LogitTransform(0.6, top_k=6, top_p=0.8)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: token_logps(z, targets, 1, chunk_tokens=3, sampling=tr)[0], (x,))


@pytest.mark.parametrize("tr", [None, LogitTransform(), LogitTransform(min_new_tokens=3)])
def test_a_transform_that_changes_nothing_runs_the_untransformed_code_to_the_bit(tr):
    """T = 1, top-k 0, top-p 1 (and min-tokens without end ids): the study's path, unchanged."""
    logits, targets = _case()
    a = logits.clone().requires_grad_()
    base = token_logps(a, targets, 2, chunk_tokens=4, with_entropy=True)
    base[0].sum().backward()
    b = logits.clone().requires_grad_()
    got = token_logps(b, targets, 2, chunk_tokens=4, with_entropy=True, sampling=tr)
    got[0].sum().backward()
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert torch.equal(a.grad, b.grad)


def test_a_transform_that_changes_nothing_leaves_the_fused_head_to_the_bit():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(3, 9, 6, generator=g), torch.randn(40, 6, generator=g)
    targets = torch.randint(0, 40, (3, 5), generator=g)
    runs = []
    for tr in (None, LogitTransform()):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = head_token_logps(h, w, targets, 2, chunk_tokens=7, with_entropy=True,
                                     sampling=tr)
        logp.sum().backward()
        runs.append((logp, ent, h.grad, w.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
