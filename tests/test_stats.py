"""The report's statistics against hand-computed answers and published t tables."""

from __future__ import annotations

import math

import pytest

from dvpo_lightning.report.stats import paired_difference, pearson, summarize, t975


def test_summary_of_three_values():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3))  # t_{0.975, 2} = 4.303


def test_one_value_has_no_interval():
    s = summarize([0.7])
    assert s["std"] == 0.0 and s["ci95"] is None


@pytest.mark.parametrize("df,want", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                     (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)])
def test_t_quantiles_match_published_tables(df, want):
    assert t975(df) == pytest.approx(want, abs=1e-3)


def test_t_quantiles_fall_towards_the_normal():
    values = [t975(df) for df in range(1, 500)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1.96, abs=0.01)
    with pytest.raises(ValueError, match="degree of freedom"):
        t975(0)


def test_paired_difference_pairs_by_seed():
    a = {0: 0.70, 1: 0.60, 2: 0.65, 3: 0.9}
    b = {0: 0.60, 1: 0.62, 2: 0.55}           # seed 3 has no partner: left out
    d = paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["wins"] == 2
    assert d["values"] == pytest.approx([0.10, -0.02, 0.10])
    assert d["mean"] == pytest.approx(0.06)
    # sample std of (0.1, −0.02, 0.1): sqrt(((0.04)² + (0.08)² + (0.04)²) / 2)
    std = math.sqrt((0.04 ** 2 + 0.08 ** 2 + 0.04 ** 2) / 2)
    assert d["std"] == pytest.approx(std)
    assert d["ci95"] == pytest.approx(4.303 * std / math.sqrt(3))
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_pairing_removes_a_shared_seed_effect():
    """Two methods that differ by a constant, on seeds that move both: the paired interval is
    zero-width where the unpaired spreads are wide."""
    shared = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.8}
    a = {s: v + 0.05 for s, v in shared.items()}
    d = paired_difference(a, shared)
    assert d["mean"] == pytest.approx(0.05) and d["std"] == pytest.approx(0.0, abs=1e-12)
    assert summarize(list(shared.values()))["std"] > 0.25


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # hand-computed: x = (1, 2, 3, 4), y = (1, 3, 2, 4): sxy = 4, sxx = syy = 5 → 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
