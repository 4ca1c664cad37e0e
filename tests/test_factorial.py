"""The information 2 × 2 contrasts, by hand."""

from __future__ import annotations

import pytest

from dvpo_lightning.report.factorial import two_by_two


def test_contrasts_by_hand():
    # seed 0: V_s .8, V_p .7, R_s .6, R_p .4 → value ½(.2 + .3) = .25, scores ½(.1 + .2) = .15,
    # interaction .2 − .3 = −.1; seed 1 adds .1 to every cell (no contrast changes); seed 2
    # lacks a cell and is left out
    cells = {("value", "scores"): {0: 0.8, 1: 0.9, 2: 0.5}, ("value", "pairs"): {0: 0.7, 1: 0.8},
             ("reward", "scores"): {0: 0.6, 1: 0.7, 2: 0.5}, ("reward", "pairs"): {0: 0.4, 1: 0.5}}
    out = two_by_two(cells)
    assert out["value"]["mean"] == pytest.approx(0.25) and out["value"]["wins"] == 2
    assert out["scores"]["mean"] == pytest.approx(0.15)
    assert out["interaction"]["mean"] == pytest.approx(-0.1) and out["interaction"]["wins"] == 0
    assert out["value"]["seeds"] == [0, 1] and out["value"]["std"] == pytest.approx(0, abs=1e-12)


def test_missing_cells_and_no_shared_seed():
    with pytest.raises(ValueError, match="missing"):
        two_by_two({("value", "scores"): {0: 1.0}})
    cells = {("value", "scores"): {0: 1.0}, ("value", "pairs"): {1: 1.0},
             ("reward", "scores"): {0: 1.0}, ("reward", "pairs"): {0: 1.0}}
    assert two_by_two(cells) is None
