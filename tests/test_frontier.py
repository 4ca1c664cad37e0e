"""The reward–KL frontier and gold reward at matched KL (report/frontier.py): interpolation by
hand, the common range, levels inside it, and an exact paired difference for a frontier that is
another's shifted up."""

from __future__ import annotations

import math

import pytest

from dvpo_lightning.report.frontier import (
    Point,
    common_kl_range,
    frontier_table,
    gold_at_kl,
    kl_levels,
    matched_kl,
    matched_kl_table,
    plot_frontier,
)
from dvpo_lightning.report.tables import to_markdown

BETAS = (0.01, 0.03, 0.1, 0.3)


def test_gold_at_kl_interpolates_in_log_kl_and_never_extrapolates():
    curve = [(0.1, 0.5), (1.0, 0.7), (10.0, 0.6)]
    assert gold_at_kl(curve, 1.0) == 0.7  # a grid point: the run's own value
    # halfway in log KL between 0.1 and 1.0 is √0.1: halfway in gold
    assert gold_at_kl(curve, math.sqrt(0.1)) == pytest.approx(0.6)
    assert gold_at_kl(curve, 10 ** 0.25) == pytest.approx(0.7 - 0.25 * 0.1)
    assert gold_at_kl(curve, 0.09) is None and gold_at_kl(curve, 11.0) is None
    assert gold_at_kl(curve, 0.0) is None
    assert gold_at_kl([(0.5, 0.4)], 0.5) == 0.4


def synthetic(shift: float = 0.1) -> list[Point]:
    """``ppo`` on ``gold = 0.5 + 0.05·log(KL)``-ish curves; ``dvpo`` the same curve shifted up
    by ``shift`` at every KL, each with its own KL range (β → KL differs by method)."""
    points = []
    for seed in range(5):
        for b in BETAS:
            for method, kl_scale, up in (("dvpo", 0.5, shift), ("ppo", 2.0, 0.0)):
                kl = kl_scale * (1 + 0.1 * seed) / b ** 0.8
                points.append(Point(method, b, seed, kl, 0.5 + 0.05 * math.log(kl) + up
                                    + 0.01 * seed))
    return points


def test_matched_kl_recovers_a_frontier_shifted_up():
    points = synthetic(0.1)
    lo, hi = common_kl_range(points)
    ppo = [p.kl for p in points if p.method == "ppo"]
    dvpo = [p.kl for p in points if p.method == "dvpo"]
    assert min(ppo) <= lo < hi <= max(dvpo)
    levels = kl_levels(lo, hi, 3)
    assert lo < levels[0] < levels[1] < levels[2] < hi
    assert levels[1] == pytest.approx(math.sqrt(lo * hi))
    result = matched_kl(points, levels, reference="dvpo")
    for diff in result["paired"]["ppo"]:
        # linear in log KL on both curves: the difference is exact at every level and seed
        assert diff["mean"] == pytest.approx(0.1) and diff["std"] == pytest.approx(0, abs=1e-9)
        assert diff["wins"] == diff["n"] == 5
    assert [g["n"] for g in result["gold"]["ppo"]] == [5, 5, 5]
    md = to_markdown(matched_kl_table(result), "")
    assert "gold @ KL" in md and "dvpo − method" in md and "0.100 ± 0.000" in md


def test_no_common_range_when_the_frontiers_do_not_overlap():
    points = [Point("a", b, 0, kl, 0.5) for b, kl in ((0.1, 0.1), (0.01, 0.5))]
    points += [Point("b", b, 0, kl, 0.5) for b, kl in ((0.1, 1.0), (0.01, 5.0))]
    assert common_kl_range(points) is None
    with pytest.raises(ValueError, match="0 < lo < hi"):
        kl_levels(1.0, 0.5)


def test_frontier_table_and_plot(tmp_path):
    points = synthetic()
    table = frontier_table(points)
    assert len(table["rows"]) == 2 * len(BETAS)
    row = table["rows"]["dvpo (β 0.1)"]
    assert row["kl"]["n"] == 5 and row["gold"]["ci95"] > 0
    out = plot_frontier(points, tmp_path / "frontier.png")
    assert out.exists() and out.stat().st_size > 1000
