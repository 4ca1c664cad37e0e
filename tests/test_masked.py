import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.ops.masked import (
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_to_mean_var,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1e9, float("nan")]])
M = torch.tensor([[True, True, True], [True, False, False]])


def test_known_answers_ignore_masked_garbage():
    assert_close(masked_sum(X, M), torch.tensor(10.0))
    assert_close(masked_mean(X, M), torch.tensor(2.5))
    assert_close(masked_mean(X, M, dim=1), torch.tensor([2.0, 4.0]))
    # values 1, 2, 3, 4: Σ(x − 2.5)² = 5
    assert_close(masked_var(X, M), torch.tensor(5.0 / 3))
    assert_close(masked_var(X, M, unbiased=False), torch.tensor(5.0 / 4))


def test_whiten_known_answer_and_zero_where_masked():
    w = masked_whiten(X, M)
    std = (5.0 / 3) ** 0.5
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std
    assert_close(w, expected)
    assert_close(masked_mean(w, M), torch.tensor(0.0), atol=1e-6, rtol=0)
    # shift_mean=False keeps the mean
    assert_close(masked_mean(masked_whiten(X, M, shift_mean=False), M), torch.tensor(2.5))


def test_empty_mask_raises_with_function_name():
    empty = torch.zeros_like(M)
    for fn in (masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError, match=fn.__name__):
            fn(X, empty)
    with pytest.raises(ValueError, match="slice"):
        masked_mean(X, torch.tensor([[True, False, False], [False, False, False]]), dim=1)
    with pytest.raises(ValueError, match="unbiased=False"):
        masked_var(X, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="count is 0"):
        moments_to_mean_var(*masked_moments(X, empty))
    assert masked_sum(X, empty) == 0  # an empty shard is a valid zero contribution


def test_whiten_from_moments_of_two_halves_equals_full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g) * 3 + 5
    mask = torch.arange(7)[None, :] < torch.tensor([7, 1, 4, 5, 2, 6])[:, None]
    halves = [masked_moments(x[:3], mask[:3]), masked_moments(x[3:], mask[3:])]
    summed = [a + b for a, b in zip(*halves)]  # what an all-reduce would produce
    stats = moments_to_mean_var(*summed)
    assert_close(stats[0].float(), masked_mean(x, mask))
    assert_close(stats[1].float(), masked_var(x, mask))
    full = masked_whiten(x, mask)
    split = torch.cat([masked_whiten(x[:3], mask[:3], stats=stats),
                       masked_whiten(x[3:], mask[3:], stats=stats)])
    assert_close(split, full)


def test_inputs_not_modified():
    x = X.clone()
    masked_whiten(x, M)
    masked_moments(x, M)
    assert torch.equal(x.nan_to_num(0.0), X.nan_to_num(0.0))
