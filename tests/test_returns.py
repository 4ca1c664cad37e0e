import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.ops.returns import (
    gae,
    gvm_value_targets,
    lambda_returns,
    sequence_rewards,
    token_rewards,
)


def ragged(seed: int, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t  # one full row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return g, mask, lengths.tolist()


def loop_lambda_returns(r, v, lengths, gamma, lam):
    out = torch.zeros_like(r)
    for i, n in enumerate(lengths):
        g_next, v_next = 0.0, 0.0
        for k in reversed(range(n)):
            g = r[i, k].item() + gamma * ((1 - lam) * v_next + lam * g_next)
            out[i, k] = g
            g_next, v_next = g, v[i, k].item()
    return out


def loop_gae(r, u, lengths, gamma, lam):
    adv = torch.zeros_like(r)
    for i, n in enumerate(lengths):
        a_next = 0.0
        for k in reversed(range(n)):  # token t = k + 1, V(s_t) = u[k]
            v_next = u[i, k + 1].item() if k + 1 < n else 0.0
            delta = r[i, k].item() + gamma * v_next - u[i, k].item()
            a_next = delta + gamma * lam * a_next
            adv[i, k] = a_next
    return adv


def test_lambda_returns_known_answers():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[10.0, 20.0, 30.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert_close(lambda_returns(r, v, m, 0.5, 0.0), torch.tensor([[11.0, 17.0, 3.0]]))
    assert_close(lambda_returns(r, v, m, 0.5, 1.0), torch.tensor([[2.75, 3.5, 3.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.7, 1.0)])
def test_lambda_returns_matches_loop(gamma, lam):
    g, mask, lengths = ragged(1)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = loop_lambda_returns(r, v, lengths, gamma, lam)
    assert_close(lambda_returns(r, v, mask, gamma, lam), expected)


def test_gae_nemo_aligner_known_answer():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0]])  # u_4 must not be bootstrapped
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert_close(adv, torch.tensor([[0.5, 0.0, 0.5, -3.0]]))
    assert_close(ret, adv + values[:, :4])


def test_gae_padded_row_known_answer():
    # L = 2 of T = 3; γ = 1, λ = 1: A_t = r_{t..L} − V(s_t) with the terminal after token 2
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.25, 0.5, 7.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv, torch.tensor([[0.75, 0.5, 0.0]]))
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.5, 0.0), (0.99, 1.0)])
def test_gae_matches_loop_and_lambda_returns(gamma, lam):
    g, mask, lengths = ragged(2)
    r, u = torch.randn(5, 7, generator=g), torch.randn(5, 8, generator=g)
    adv, ret = gae(r, u, mask, gamma, lam)
    assert_close(adv, loop_gae(r, u, lengths, gamma, lam))
    # returns = A + V are the λ-returns bootstrapped on V(s_t) = u_{t−1}
    assert_close(ret, lambda_returns(r, u[:, :7], mask, gamma, lam))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_lambda_one_is_mc_return_minus_value():
    g, mask, lengths = ragged(3)
    r, u = torch.randn(5, 7, generator=g), torch.randn(5, 8, generator=g)
    adv, _ = gae(r, u, mask, 0.9, 1.0)
    mc = lambda_returns(r, torch.zeros_like(r), mask, 0.9, 1.0)
    assert_close(adv, torch.where(mask, mc - u[:, :7], 0.0))


def test_masked_garbage_changes_nothing():
    g, mask, _ = ragged(4)
    r, u = torch.randn(5, 7, generator=g), torch.randn(5, 8, generator=g)
    r2 = torch.where(mask, r, 1e9)
    u2 = u.clone()
    u2[:, :7] = torch.where(mask, u[:, :7], -1e9)
    u2[:, 7] = 1e9  # u_T is never a bootstrap
    for a, b in zip(gae(r, u, mask, 1.0, 0.95), gae(r2, u2, mask, 1.0, 0.95)):
        assert_close(a, b)
    assert_close(lambda_returns(r, u[:, :7], mask, 1.0, 0.5),
                 lambda_returns(r2, u2[:, :7], mask, 1.0, 0.5))


def test_non_prefix_mask_rejected():
    with pytest.raises(ValueError, match="contiguous prefix"):
        holed = torch.tensor([[True, False, True]])
        lambda_returns(torch.zeros(1, 3), torch.zeros(1, 3), holed)


def test_token_and_sequence_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([1.0, 2.0])
    expected = torch.tensor([[-0.1, -0.2, 0.7], [-0.4, 1.5, 0.0]])
    assert_close(token_rewards(scores, kl, mask), expected)
    assert_close(sequence_rewards(scores, kl, mask), torch.tensor([0.4, 1.1]))


# GVM targets: row 0 has L = 3 (u_0 … u_3), row 1 has L = 2 (u_3 is padding).
U = torch.tensor([[0.1, 0.2, 0.4, 0.8], [0.5, 0.6, 0.7, 1e9]])
RMASK = torch.tensor([[True, True, True], [True, True, False]])
R = torch.tensor([1.0, -1.0])

CASES = {  # (mode, positions, gamma, lam): (targets, train_mask)
    ("td0", "all", 1.0, 0.95): ([[0.2, 0.4, 0.8, 1.0], [0.6, 0.7, -1.0, 0.0]], [4, 3]),
    ("mc", "all", 1.0, 0.95): ([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 0.0]], [4, 3]),
    ("mc", "all", 0.5, 0.95): ([[0.125, 0.25, 0.5, 1.0], [-0.25, -0.5, -1.0, 0.0]], [4, 3]),
    ("td_lambda", "all", 1.0, 0.5): ([[0.425, 0.65, 0.9, 1.0], [0.225, -0.15, -1.0, 0.0]], [4, 3]),
    ("td0", "before_token", 1.0, 0.95): ([[0.2, 0.4, 1.0, 0.0], [0.6, -1.0, 0.0, 0.0]], [3, 2]),
    ("mc", "before_token", 1.0, 0.95): ([[1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]], [3, 2]),
    ("mc", "before_token", 0.5, 0.95): ([[0.25, 0.5, 1.0, 0.0], [-0.5, -1.0, 0.0, 0.0]], [3, 2]),
    ("td_lambda", "before_token", 1.0, 0.5): (
        [[0.45, 0.7, 1.0, 0.0], [-0.2, -1.0, 0.0, 0.0]], [3, 2]
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gvm_targets_known_answers(case):
    mode, positions, gamma, lam = case
    expected, n_trained = CASES[case]
    values = U.clone().requires_grad_(True)
    targets, train_mask = gvm_value_targets(values, RMASK, R, mode, gamma, lam, positions)
    assert not targets.requires_grad  # stop-gradient on the bootstrap
    assert_close(targets, torch.tensor(expected))
    assert train_mask.sum(1).tolist() == n_trained
    assert train_mask[:, 0].all() and (train_mask[:, 1:] <= train_mask[:, :-1]).all()


def test_gvm_targets_ignore_untrained_values():
    a, m = gvm_value_targets(U, RMASK, R, "td_lambda", positions="before_token")
    u2 = U.clone()
    u2[0, 3], u2[1, 2] = -1e9, 1e9  # untrained in the "before_token" view
    b, _ = gvm_value_targets(u2, RMASK, R, "td_lambda", positions="before_token")
    assert_close(a, b)


def test_gvm_targets_reject_unknown_names():
    with pytest.raises(ValueError, match="td_lambda"):
        gvm_value_targets(U, RMASK, R, "td1")
    with pytest.raises(ValueError, match="before_token"):
        gvm_value_targets(U, RMASK, R, "td0", positions="after")
