"""The information 2 × 2: {value model, reward model} × {trained on scores, trained on pairs}
(docs/study.md#the-information-2--2), split into what the *value* buys and what the *scores*
buy, seed by seed.

With ``V_s, V_p`` the gold reward of DVPO on the GVM fit to the scores / to the pairs and
``R_s, R_p`` that of the reward-model method on the reward model fit to the scores / to the
pairs, per seed (all four share the seed's SFT policy and data):

- value effect ``½[(V_s − R_s) + (V_p − R_p)]`` — a value model instead of a reward model, on
  the same information;
- scores effect ``½[(V_s − V_p) + (R_s − R_p)]`` — cardinal scores instead of the pairs
  binarised from them, with the same kind of model;
- interaction ``(V_s − R_s) − (V_p − R_p)`` — does the value's advantage depend on the
  information.

Each is summarised over the seeds that have all four cells (mean, 95 % t-interval, how many
seeds it is positive on), as any paired difference in the report.
"""

from __future__ import annotations

from dvpo_lightning.report.stats import summarize

CELLS = (("value", "scores"), ("value", "pairs"), ("reward", "scores"), ("reward", "pairs"))


def two_by_two(cells: dict[tuple[str, str], dict[int, float]]) -> dict[str, dict] | None:
    """``{"value", "scores", "interaction"}`` contrasts (see the module docstring), each a
    :func:`~dvpo_lightning.report.stats.summarize` dict plus ``wins`` (seeds > 0) and
    ``seeds``; None when no seed has all four cells.

    Args:
        cells: ``{(model, information): {seed: gold}}`` for the four :data:`CELLS`.
    """
    missing = [c for c in CELLS if c not in cells]
    if missing:
        raise ValueError(f"two_by_two: cells {missing} are missing; need all of {CELLS}")
    seeds = sorted(set.intersection(*(set(cells[c]) for c in CELLS)))
    if not seeds:
        return None
    vs, vp, rs, rp = ([cells[c][s] for s in seeds] for c in CELLS)
    contrasts = {
        "value": [((a - c) + (b - d)) / 2 for a, b, c, d in zip(vs, vp, rs, rp)],
        "scores": [((a - b) + (c - d)) / 2 for a, b, c, d in zip(vs, vp, rs, rp)],
        "interaction": [(a - c) - (b - d) for a, b, c, d in zip(vs, vp, rs, rp)],
    }
    return {k: {**summarize(v), "wins": sum(x > 0 for x in v), "seeds": seeds}
            for k, v in contrasts.items()}
