"""The report's statistics against hand-computed answers and published t tables."""

from __future__ import annotations

import math

import pytest

from dvpo_lightning.report.stats import (
    T975,
    betainc,
    cluster_bootstrap_pearson,
    holm,
    paired_difference,
    paired_t_p,
    pearson,
    percentile,
    summarize,
    t975,
    t_cdf,
    t_sf2,
)


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
    # t = 0.06 / (std / √3) = 1.5 on 2 df: p = 1 − t / √(2 + t²) (the df = 2 closed form)
    t = 0.06 / (std / math.sqrt(3))
    assert t == pytest.approx(1.5) and d["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert paired_difference({0: 1.0}, {0: 0.5})["p"] is None  # one seed: nothing to test
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


def test_incomplete_beta_against_closed_forms():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1, b) = 1 − (1 − x)^b; I_x(a, b) = 1 − I_{1−x}(b, a)
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert betainc(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-12)
        assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)
        assert betainc(2.0, 7.0, x) == pytest.approx(1 - betainc(7.0, 2.0, 1 - x), abs=1e-12)
    # I_{1/2}(a, a) = 1/2; I_x(2, 2) = 3x² − 2x³ (by hand)
    assert betainc(13.0, 13.0, 0.5) == pytest.approx(0.5, abs=1e-12)
    assert betainc(2, 2, 0.3) == pytest.approx(3 * 0.09 - 2 * 0.027, abs=1e-12)
    with pytest.raises(ValueError, match="outside"):
        betainc(1, 1, 1.5)


@pytest.mark.parametrize("df", range(1, 31))
def test_p_at_the_tabled_quantile_is_five_percent(df):
    """The tabled t_{0.975} (three decimals) has a two-sided tail of 0.05."""
    assert t_sf2(T975[df - 1], df) == pytest.approx(0.05, abs=1e-4)


def test_t_distribution_known_values_and_symmetry():
    # df = 1 is Cauchy: P(|T| ≥ t) = 1 − (2/π) atan t; df = 2: 1 − t / √(2 + t²)
    for t in (0.0, 0.3, 1.0, 2.5, 10.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
        for df in (1, 2, 4, 29):
            assert t_sf2(-t, df) == t_sf2(t, df)
            assert t_cdf(t, df) + t_cdf(-t, df) == pytest.approx(1.0, abs=1e-12)
    assert t_cdf(0.0, 5) == pytest.approx(0.5) and t_sf2(math.inf, 3) == 0.0
    # tabled one-sided quantiles: t_{0.95, 10} = 1.812, t_{0.995, 4} = 4.604
    assert t_cdf(1.812, 10) == pytest.approx(0.95, abs=1e-4)
    assert t_cdf(4.604, 4) == pytest.approx(0.995, abs=1e-5)
    # large df: the normal, P(|Z| ≥ 1.959964) = 0.05
    assert t_sf2(1.959964, 1e7) == pytest.approx(0.05, abs=1e-6)


def test_paired_t_p_edge_cases():
    assert paired_t_p([0.1]) is None
    assert paired_t_p([0.25, 0.25, 0.25]) == 0.0 and paired_t_p([0.0, 0.0]) == 1.0
    assert paired_t_p([0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-12)  # rounding spread
    assert paired_t_p([1.0, -1.0]) == pytest.approx(1.0)  # mean 0


def test_three_of_three_seeds_ahead_can_miss_five_percent():
    """The issue's point: ahead on 3/3 seeds is not p < 0.05 when the seeds disagree on how
    much."""
    assert paired_t_p([0.02, 0.05, 0.30]) > 0.05


def test_holm_hand_worked():
    # sorted: 0.005 (×4 = 0.02), 0.01 (×3 = 0.03), 0.03 (×2 = 0.06), 0.04 (×1 = 0.04 → 0.06,
    # the running maximum keeps the order)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1; None is not a test and does not count in m
    assert holm([0.5, None, 0.4]) == pytest.approx([0.8, None, 0.8])
    assert holm([0.9, 0.6]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]


def test_holm_is_monotone_and_never_below_raw():
    ps = [0.001, 0.2, 0.013, 0.04, 0.04, 0.7, 0.0301, 0.5]
    adj = holm(ps)
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    assert all(adj[a] <= adj[b] for a, b in zip(order, order[1:]))
    assert all(p <= q <= 1.0 for p, q in zip(ps, adj))


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0
    assert percentile([7.0], 0.975) == 7.0


def _sweep_like():
    """5 variants × 3 seeds: y rises with x, plus a per-seed offset."""
    x, y, seed = [], [], []
    for s, offset in enumerate((0.0, 0.08, -0.05)):
        for v in range(5):
            x.append(0.5 + 0.1 * v + 0.01 * s)
            y.append(0.2 * v + offset + 0.03 * ((v * 7 + s * 3) % 5 - 2))
            seed.append(s)
    return x, y, seed


def test_cluster_bootstrap_is_deterministic_and_contains_r():
    x, y, seed = _sweep_like()
    a = cluster_bootstrap_pearson(x, y, seed, resamples=500, seed=0)
    assert a == cluster_bootstrap_pearson(x, y, seed, resamples=500, seed=0)
    assert a["r"] == pytest.approx(pearson(x, y))
    assert a["lo"] <= a["r"] <= a["hi"] <= 1.0
    assert a["clusters"] == 3 and a["resamples"] + a["skipped"] == 500


def test_cluster_bootstrap_resamples_whole_clusters():
    """Each cluster's points are a perfect line through its own offset: any resample of whole
    clusters is one of a few point sets, so r takes few distinct values; resampling points
    one by one would not."""
    x, y, c = [], [], []
    for s, offset in enumerate((0.0, 1.0)):
        for v in range(4):
            x.append(float(v))
            y.append(v + offset)
            c.append(s)
    b = cluster_bootstrap_pearson(x, y, c, resamples=200, seed=0)
    within = pearson(x[:4], y[:4])  # a resample of one cluster twice: r = 1
    both = pearson(x, y)
    assert within == pytest.approx(1.0)
    assert b["lo"] == pytest.approx(both) and b["hi"] == pytest.approx(1.0)


def test_cluster_bootstrap_degenerate_inputs():
    x, y, _ = _sweep_like()
    one = cluster_bootstrap_pearson(x, y, [0] * len(x))  # one seed: no interval
    assert one["r"] is not None and one["lo"] is None and one["hi"] is None
    flat = cluster_bootstrap_pearson([1.0] * 6, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2])
    assert flat["r"] is None and flat["lo"] is None
    # one point per seed, few seeds: some resamples draw one seed thrice (no spread)
    few = cluster_bootstrap_pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], [0, 1, 2],
                                    resamples=300, seed=0)
    assert few["skipped"] > 0 and few["resamples"] + few["skipped"] == 300
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_bootstrap_pearson([1.0], [1.0, 2.0], [0])
