import math

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.ops.losses import (
    aggregate,
    bradley_terry_loss,
    clipped_value_loss,
    entropy_from_logits,
    ppo_clip_loss,
    value_regression_loss,
)

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_aggregation_modes_known_answers():
    assert_close(aggregate(LOSS, MASK, "token_mean"), torch.tensor(2.5))  # 10 / 4
    assert_close(aggregate(LOSS, MASK, "seq_mean_token_mean"), torch.tensor(3.0))  # (2 + 4) / 2
    assert_close(aggregate(LOSS, MASK, "seq_mean_token_sum"), torch.tensor(5.0))  # (6 + 4) / 2
    with pytest.raises(ValueError, match="seq_mean_token_sum"):
        aggregate(LOSS, MASK, "mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_split_batch_with_global_counts_reproduces_full_loss(mode):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 9
    mask = torch.arange(t)[None, :] < torch.tensor([9, 2, 5, 1, 7, 4])[:, None]
    logp_old = -torch.rand(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    logp = (logp_old + 0.3 * torch.randn(b, t, generator=g)).requires_grad_(True)
    full, _ = ppo_clip_loss(logp, logp_old, adv, mask, aggregation=mode)
    (grad_full,) = torch.autograd.grad(full, logp)
    n_tok, n_seq = float(mask.sum()), float(b)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # two "ranks" of unequal size
        part, _ = ppo_clip_loss(logp[rows], logp_old[rows], adv[rows], mask[rows],
                                aggregation=mode, num_tokens=n_tok, num_seqs=n_seq)
        total = total + part
    (grad_split,) = torch.autograd.grad(total, logp)
    assert_close(total, full)
    assert_close(grad_split, grad_full)


def test_bradley_terry_known_answer():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # s_c − s_r = 2 → log(1 + e^−2); a tie → log 2
    expected = (math.log1p(math.exp(-2)) + math.log(2)) / 2
    assert_close(bradley_terry_loss(c, r), torch.tensor(expected))
    m = torch.tensor([1.0, 0.0])
    expected = (math.log1p(math.exp(-1)) + math.log(2)) / 2
    assert_close(bradley_terry_loss(c, r, m), torch.tensor(expected))


def test_ppo_clip_known_answer():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = ppo_clip_loss(logp, logp_old, adv, mask, clip_eps=0.2)
    # token 1: ρ = 1.5 > 1.2 with A > 0 → clipped, −1.2; token 2: −0.9; token 3: +1.1
    assert_close(loss, torch.tensor((-1.2 - 0.9 + 1.1) / 3))
    assert_close(stats["clipfrac"], torch.tensor(1 / 3))
    assert_close(stats["ratio_mean"], torch.tensor(3.5 / 3))
    assert_close(stats["ratio_max"], torch.tensor(1.5))
    kl = sum((x - 1) - math.log(x) for x in (1.5, 0.9, 1.1)) / 3
    assert_close(stats["approx_kl"], torch.tensor(kl))
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0  # no gradient through the clip
    loss_high, _ = ppo_clip_loss(logp, logp_old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert_close(loss_high, torch.tensor((-1.5 - 0.9 + 1.1) / 3))


def test_ppo_clip_token_weights_scale_each_tokens_loss():
    """Truncated importance weights: the same three tokens as above, weighted 2, 0.5 and 1 —
    (−1.2·2 − 0.9·0.5 + 1.1·1) / 3; the weights carry no gradient."""
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([[2.0, 0.5, 1.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, logp_old, adv, mask, clip_eps=0.2, token_weights=w)
    assert_close(loss, torch.tensor((-1.2 * 2 - 0.9 * 0.5 + 1.1) / 3))
    assert not loss.requires_grad


def test_ppo_clip_ignores_masked_garbage():
    logp_old = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    a, sa = ppo_clip_loss(torch.tensor([[-0.1, 0.1, 0.0]]), logp_old, torch.ones(1, 3), mask)
    garbage_logp = torch.tensor([[-0.1, 0.1, 1e4]])  # exp(1e4) would be inf
    b, sb = ppo_clip_loss(garbage_logp, logp_old, torch.tensor([[1.0, 1.0, 1e9]]), mask)
    assert_close(a, b)
    for k in sa:
        assert_close(sa[k], sb[k])


def test_value_regression_loss_known_answer_and_stop_gradient():
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 7.0]], requires_grad=True)
    loss = value_regression_loss(pred, target, torch.tensor([[True, False]]))
    assert_close(loss, torch.tensor(0.5))
    loss.backward()
    assert target.grad is None and pred.grad[0, 0] == 1.0 and pred.grad[0, 1] == 0


def test_clipped_value_loss_known_answer():
    values = torch.tensor([[1.5, 0.9]])
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 1: max(0.25, (1.2 − 2)² = 0.64) → 0.32; token 2: both 0.81 → 0.405
    assert_close(clipped_value_loss(values, old, returns, mask, 0.2), torch.tensor(0.3625))
    unclipped = clipped_value_loss(values, old, returns, mask, None)
    assert_close(unclipped, torch.tensor((0.25 + 0.81) / 4))


def test_entropy_from_logits():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), expected)
    assert_close(entropy_from_logits(torch.zeros(4)), torch.tensor(math.log(4)))
