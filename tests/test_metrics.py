"""Pair accuracy and the token-value aggregations it uses: known answers and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.metrics import AGGREGATIONS, PairAccuracy, aggregate_token_values

T, F = True, False

# A ragged, right-padded case; the padded positions hold junk on purpose.
VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0],
                       [4.0, 5.0, -7.0, -7.0],
                       [9.0, 50.0, 50.0, 50.0]])
MASK = torch.tensor([[T, T, T, F], [T, T, F, F], [T, F, F, F]])


@pytest.mark.parametrize("how,expected", [
    ("mean", [2.0, 4.5, 9.0]),
    ("final", [3.0, 5.0, 9.0]),
    # linear interpolation between order statistics: row 0 sorts to [1, 2, 3], row 1 to [4, 5]
    ("p1", [1.02, 4.01, 9.0]),
    ("p10", [1.2, 4.1, 9.0]),
    ("p50", [2.0, 4.5, 9.0]),
    ("p90", [2.8, 4.9, 9.0]),
    ("p99", [2.98, 4.99, 9.0]),
    ("p100", [3.0, 5.0, 9.0]),
])
def test_aggregate_token_values_known_answers(how, expected):
    assert_close(aggregate_token_values(VALUES, MASK, how), torch.tensor(expected))


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregate_ignores_masked_positions(how):
    junk = VALUES.clone()
    junk[~MASK] = torch.tensor([float("nan"), float("inf"), -1e30, 1e30, float("-inf"), 7.0])
    expected = aggregate_token_values(VALUES, MASK, how)
    got = aggregate_token_values(junk, MASK, how)
    assert torch.isfinite(got).all()
    assert_close(got, expected)


@pytest.mark.parametrize("how", ["mean", "final", "p5", "p95"])
def test_aggregate_matches_per_row_loop(how):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g)
    lengths = [9, 1, 4, 7, 2, 5]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    expected = []
    for row, n in zip(values.tolist(), lengths):
        valid = np.array(row[:n])
        if how == "mean":
            expected.append(valid.mean())
        elif how == "final":
            expected.append(valid[-1])
        else:
            expected.append(np.percentile(valid, int(how[1:]), method="linear"))
    assert_close(aggregate_token_values(values, mask, how),
                 torch.tensor(expected, dtype=torch.float32))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="no valid token"):
        aggregate_token_values(VALUES, MASK & torch.tensor([[T], [F], [T]]), "mean")
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate_token_values(VALUES, MASK, "median")


# --- PairAccuracy ---------------------------------------------------------------------------
# Four pairs, by hand (mean, final of each side):
#   1: chosen [1, 2, 3] (2, 3)   rejected [0, 5]       (2.5, 5)  → mean 0,   final 0
#   2: chosen [4]       (4, 4)   rejected [1, 1, 1, 1] (1, 1)    → mean 1,   final 1
#   3: chosen [2, 2]    (2, 2)   rejected [3, 1]       (2, 1)    → mean ½,   final 1
#   4: chosen [0, 1]    (½, 1)   rejected [0, 1]       (½, 1)    → mean ½,   final ½
# accuracy: mean 2/4 = 0.5, final 2.5/4 = 0.625


def _pairs(junk: float = 0.0):
    chosen = torch.full((4, 3), junk)
    rejected = torch.full((4, 4), junk)
    cm = torch.zeros(4, 3, dtype=torch.bool)
    rm = torch.zeros(4, 4, dtype=torch.bool)
    for i, (c, r) in enumerate([([1, 2, 3], [0, 5]), ([4], [1, 1, 1, 1]),
                                ([2, 2], [3, 1]), ([0, 1], [0, 1])]):
        chosen[i, :len(c)] = torch.tensor(c, dtype=torch.float32)
        cm[i, :len(c)] = True
        rejected[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
        rm[i, :len(r)] = True
    return chosen, cm, rejected, rm


def test_pair_accuracy_known_answers_and_ties():
    metric = PairAccuracy(("mean", "final"))
    metric.update(*_pairs())
    acc = metric.compute()
    assert set(acc) == {"mean", "final"}
    assert float(acc["mean"]) == pytest.approx(0.5)
    assert float(acc["final"]) == pytest.approx(0.625)


def test_pair_accuracy_ignores_masked_positions():
    expected = PairAccuracy()
    expected.update(*_pairs(0.0))
    for junk in (1e6, -1e6, float("nan"), float("inf")):
        metric = PairAccuracy()
        metric.update(*_pairs(junk))
        got = metric.compute()
        for how, v in expected.compute().items():
            assert float(got[how]) == pytest.approx(float(v)), (junk, how)


def test_pair_accuracy_accumulates_batches_and_resets():
    c, cm, r, rm = _pairs()
    split = PairAccuracy(("mean", "final"))
    split.update(c[:1], cm[:1], r[:1], rm[:1])
    split.update(c[1:], cm[1:], r[1:], rm[1:])
    assert float(split.compute()["final"]) == pytest.approx(0.625)
    split.reset()
    split.update(c[1:2], cm[1:2], r[1:2], rm[1:2])  # pair 2 alone: right on both
    assert float(split.compute()["mean"]) == 1.0


def test_constant_model_scores_chance():
    metric = PairAccuracy()
    mask = torch.ones(5, 3, dtype=torch.bool)
    metric.update(torch.zeros(5, 3), mask, torch.zeros(5, 3), mask)
    assert all(float(v) == 0.5 for v in metric.compute().values())


def test_pair_accuracy_errors():
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        PairAccuracy(("mean", "median"))
    with pytest.raises(ValueError, match="no pair was seen"):
        PairAccuracy().compute()
