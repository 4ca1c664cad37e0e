"""Chunked per-token log-probs: the same values and gradients as the plain float32 softmax."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.models import load_causal_lm, load_tokenizer, position_ids_from_mask
from dvpo_lightning.ops.losses import entropy_from_logits
from dvpo_lightning.ops.token_logps import head_token_logps, token_logps
from dvpo_lightning.rollout.scoring import FUSED_HEAD_CLASSES, fused_head_parts, policy_logps


def _plain(logits, targets, offset):
    cols = logits[:, offset:offset + targets.shape[1]].float()
    logp = cols.log_softmax(-1).gather(2, targets[..., None]).squeeze(-1)
    return logp, entropy_from_logits(cols)


def _case(dtype=torch.float32, b=3, length=9, t=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, length, v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    return logits, targets


def test_known_answer_uniform_logits():
    """Equal logits: every token has log-prob −log V and the entropy is log V."""
    logp, ent = token_logps(torch.zeros(2, 3, 8), torch.tensor([[1, 7], [0, 3]]), offset=1,
                            with_entropy=True)
    assert_close(logp, torch.full((2, 2), -torch.log(torch.tensor(8.0)).item()))
    assert_close(ent, torch.full((2, 2), torch.log(torch.tensor(8.0)).item()))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 11, 10_000])
@pytest.mark.parametrize("offset", [0, 2, 4])
def test_values_match_plain_softmax(chunk_tokens, offset):
    logits, targets = _case()
    logp, ent = token_logps(logits, targets, offset, chunk_tokens, with_entropy=True)
    want_logp, want_ent = _plain(logits, targets, offset)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, want_logp)
    assert_close(ent, want_ent)


def test_chunking_does_not_change_a_bit():
    logits, targets = _case(b=6)
    ref = token_logps(logits, targets, 1, chunk_tokens=10_000, with_entropy=True)
    for chunk in (1, 5, 13):
        got = token_logps(logits, targets, 1, chunk_tokens=chunk, with_entropy=True)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_gradient_matches_autograd_of_plain_softmax():
    logits, targets = _case()
    weights = torch.randn(targets.shape)
    a = logits.clone().requires_grad_()
    (token_logps(a, targets, 3, chunk_tokens=4)[0] * weights).sum().backward()
    b = logits.clone().requires_grad_()
    (_plain(b, targets, 3)[0] * weights).sum().backward()
    assert_close(a.grad, b.grad)
    # columns outside [offset, offset + T) get exactly zero
    assert torch.equal(a.grad[:, :3], torch.zeros_like(a.grad[:, :3]))
    assert torch.equal(a.grad[:, 8:], torch.zeros_like(a.grad[:, 8:]))


def test_gradcheck_float64():
    logits, targets = _case(dtype=torch.float64, b=2, length=4, t=3, v=5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logps(z, targets, 1, chunk_tokens=3)[0],
                                    (logits,))


def test_bfloat16_logits_give_float32_logps_and_bfloat16_gradients():
    logits, targets = _case(dtype=torch.bfloat16)
    a = logits.clone().requires_grad_()
    logp, ent = token_logps(a, targets, 2, with_entropy=True)
    assert logp.dtype == torch.float32
    assert_close(logp, _plain(logits, targets, 2)[0])  # same bf16 inputs, float32 math
    logp.sum().backward()
    assert a.grad.dtype == torch.bfloat16
    b = logits.float().requires_grad_()
    _plain(b, targets, 2)[0].sum().backward()
    assert_close(a.grad.float(), b.grad, atol=1e-2, rtol=1e-2)
    assert not ent.requires_grad  # a metric: no gradient flows through the entropy


def test_too_many_targets_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        token_logps(torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), offset=1)


@pytest.mark.parametrize("fused", [True, False])
def test_policy_logps_use_only_the_response_columns(tokenizer_dir, fused):
    """Fused: the head runs inside the chunks (its module is never called on the whole
    batch). Not fused: ``logits_to_keep`` runs it over ``T + 1`` positions, not the prompt.
    Both equal the log-probs of the full-sequence logits."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = load_causal_lm("test-llama", tok).eval()
    assert (fused_head_parts(model) is not None) and type(model).__name__ in FUSED_HEAD_CLASSES
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, len(tok), (3, 7), generator=g)
    response = torch.randint(4, len(tok), (3, 5), generator=g)
    pmask = torch.ones_like(prompt, dtype=torch.bool)
    pmask[0, :2] = False  # left padding
    rmask = torch.ones_like(response, dtype=torch.bool)
    rmask[1, 3:] = False  # right padding
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[1]))
    with torch.no_grad():
        logp, _ = policy_logps(model, prompt, pmask, response, rmask, fused_head=fused)
    hook.remove()
    assert widths == ([] if fused else [5 + 1])
    ids, mask = torch.cat([prompt, response], 1), torch.cat([pmask, rmask], 1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask.long(),
                     position_ids=position_ids_from_mask(mask)).logits
    want = _plain(full, response, 7 - 1)[0] * rmask
    assert_close(logp, want, atol=1e-5, rtol=1e-5)


def test_fused_and_plain_policy_logps_give_the_same_gradients(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = load_causal_lm("test-llama", tok)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(4, len(tok), (2, 4), generator=g)
    response = torch.randint(4, len(tok), (2, 6), generator=g)
    pmask, rmask = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(response,
                                                                              dtype=torch.bool)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        logp, _ = policy_logps(model, prompt, pmask, response, rmask, fused_head=fused)
        logp.sum().backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    for n in grads[0]:
        assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------ the head inside the chunks
def _head_case(dtype=torch.float32, b=3, length=9, t=5, v=11, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g).to(dtype)
    weight = torch.randn(v, h, generator=g).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])
def test_head_inside_chunks_matches_logits_then_softmax(chunk_tokens):
    hidden, weight, targets = _head_case()
    weights = torch.randn(targets.shape)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = head_token_logps(h1, w1, targets, 2, chunk_tokens, with_entropy=True)
    (logp * weights).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_logp, want_ent = _plain(h2 @ w2.T, targets, 2)
    (want_logp * weights).sum().backward()
    assert_close(logp, want_logp)
    assert_close(ent, want_ent)
    assert_close(h1.grad, h2.grad)
    assert_close(w1.grad, w2.grad)
    assert torch.equal(h1.grad[:, :2], torch.zeros_like(h1.grad[:, :2]))  # unused columns


def test_head_inside_chunks_gradcheck_float64():
    hidden, weight, targets = _head_case(torch.float64, b=2, length=4, t=3, v=5, h=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: head_token_logps(h, w, targets, 1, chunk_tokens=3)[0], (hidden, weight))


def test_head_inside_chunks_under_bf16_autocast_matches_a_linear_head():
    """Under autocast the head runs in bf16 as ``nn.Linear`` would; the log-probs are the
    same numbers and the gradients agree to bf16 precision."""
    hidden, weight, targets = _head_case(v=50, h=16)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_token_logps(h1, w1, targets, 3)[0]
        want = _plain(torch.nn.functional.linear(h2, w2), targets, 3)[0]
    assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert w1.grad.dtype == torch.float32
    assert_close(h1.grad, h2.grad, atol=2e-2, rtol=2e-2)
    assert_close(w1.grad, w2.grad, atol=2e-2, rtol=2e-2)
