"""The fair study's tables and figures (configs/pipeline_fair.yaml; docs/study.md): the β
frontier, gold at matched KL, the information 2 × 2, the tuning on validation, and the long
runs. :func:`fair_sections` is called by ``build_report`` when the pipeline passes grid
``variants``; each part is left out when its runs are not there.
"""

from __future__ import annotations

from pathlib import Path

from dvpo_lightning.report import frontier, overoptimisation, tuning
from dvpo_lightning.report.factorial import CELLS, two_by_two
from dvpo_lightning.report.runs import Run, load_runs
from dvpo_lightning.report.stats import paired_difference

KL_AXES = ("kl", "beta")  # the grid axes that are a method's KL knob
TWO_BY_TWO_NOTE = ("V: DVPO's gold with the GVM fit to the scores (s) or the pairs (p); R: the "
                   "reward-model method's with the reward model fit to the scores or the "
                   "pairs; per seed at the middle KL level matched across these four, so "
                   "neither side buys reward with KL.")


def pairwise_matched_kl(points: list, reference: str, n_levels: int = 3) -> dict | None:
    """Each method against ``reference`` alone, at ``n_levels`` KL levels inside the range
    both cover on every seed (for when no level is shared by every method): a report table
    with the levels, the paired difference and its Holm-adjusted p at each."""
    methods = list(dict.fromkeys(p.method for p in points))
    if reference not in methods:
        return None
    names = ("low", "middle", "high") if n_levels == 3 else tuple(map(str, range(n_levels)))
    columns = [("levels", "KL levels")]
    for i, name in enumerate(names):
        columns += [(f"diff_{i}", f"{reference} − method, {name}"),
                    (f"diff_{i}_p_holm", "p (Holm)")]
    rows = {}
    for m in methods:
        if m == reference:
            continue
        pair = [p for p in points if p.method in (m, reference)]
        span = frontier.common_kl_range(pair)
        if span is None:
            rows[m] = {"levels": {"text": "—"}}
            continue
        levels = frontier.kl_levels(*span, n_levels)
        result = frontier.matched_kl(pair, levels, reference)
        rows[m] = {"levels": {"text": ", ".join(f"{lv:.2f}" for lv in levels)},
                   **{f"diff_{i}": d for i, d in enumerate(result["paired"][m])}}
    return {"title": f"Gold reward at matched KL, each method against {reference} alone",
            "columns": columns, "rows": rows, "interval": "ci95"}


def against_at_matched_kl(points: list, against: dict[str, str], n_levels: int = 3
                          ) -> dict | None:
    """Each method of ``against`` (``{method: the same method with one thing changed, e.g.
    without new labels}``) against its counterpart alone, at ``n_levels`` KL levels inside the
    range both cover on every seed: ``method − counterpart`` paired by seed, a report table
    (None when no pair has runs)."""
    names = ("low", "middle", "high") if n_levels == 3 else tuple(map(str, range(n_levels)))
    columns = [("against", "against"), ("levels", "KL levels")]
    for i, name in enumerate(names):
        columns += [(f"diff_{i}", f"method − against, {name}"), (f"diff_{i}_p_holm", "p (Holm)")]
    rows = {}
    have = {p.method for p in points}
    for m, other in against.items():
        if m not in have or other not in have:
            continue
        pair = [p for p in points if p.method in (m, other)]
        row = {"against": {"text": other}}
        span = frontier.common_kl_range(pair)
        if span is None:
            rows[m] = {**row, "levels": {"text": "—"}}
            continue
        levels = frontier.kl_levels(*span, n_levels)
        result = frontier.matched_kl(pair, levels, reference=m)  # (paired: m − other)
        rows[m] = {**row, "levels": {"text": ", ".join(f"{lv:.2f}" for lv in levels)},
                   **{f"diff_{i}": d for i, d in enumerate(result["paired"][other])}}
    if not rows:
        return None
    return {"title": "Gold reward at matched KL, each method against its counterpart",
            "columns": columns, "rows": rows, "interval": "ci95"}


def _add_two_by_two(tables_: dict, notes: dict, result: dict, cells: dict[str, str],
                    levels: list[float]) -> None:
    """The 2 × 2 at the middle of ``levels`` (``result``: :func:`frontier.matched_kl` at
    them) into the report's tables and notes, when its four methods have runs."""
    mid = len(levels) // 2
    table = two_by_two_table({m: rows[mid] for m, rows in result["per_seed"].items()}, cells,
                             levels[mid])
    if table:
        tables_["two_by_two"] = table
        notes["two_by_two"] = TWO_BY_TWO_NOTE


def regularised_runs(runs: list[Run], variants: dict[str, dict]) -> list[Run]:
    """The runs that are points of a method's β grid (an axis named ``kl`` or ``beta``)."""
    return [r for r in runs if r.method in variants
            and any(a in variants[r.method]["point"] for a in KL_AXES)]


def two_by_two_table(per_seed: dict[str, dict[int, float]], cells: dict[str, str],
                     level: float) -> dict | None:
    """The 2 × 2 contrasts at one matched KL level as a report table (None without all four
    methods). ``cells``: ``{"value_scores", "value_pairs", "reward_scores", "reward_pairs"}``
    → method name."""
    keyed = {}
    for model, info in CELLS:
        method = cells.get(f"{model}_{info}")
        if method not in per_seed:
            return None
        keyed[(model, info)] = per_seed[method]
    out = two_by_two(keyed)
    if out is None:
        return None
    rows = {}
    labels = {"value": "value effect: ½[(V_s − R_s) + (V_p − R_p)]",
              "scores": "scores effect: ½[(V_s − V_p) + (R_s − R_p)]",
              "interaction": "interaction: (V_s − R_s) − (V_p − R_p)"}
    for key, label in labels.items():
        seeds = out[key]["seeds"]
        # a contrast is a paired difference against 0: its p is the one-sample t-test's
        cell = paired_difference(dict(zip(seeds, out[key]["values"])), dict.fromkeys(seeds, 0.0))
        rows[label] = {"effect": cell, "ahead": {"text": f"{cell['wins']}/{cell['n']}"}}
    names = ", ".join(f"{model} model on the {info}: {cells[f'{model}_{info}']}"
                      for model, info in CELLS)
    return {"title": f"The information 2 × 2 at matched KL {level:.3g} ({names})",
            "columns": [("effect", "gold reward"), ("effect_p_holm", "p (Holm)"),
                        ("ahead", "seeds > 0")], "rows": rows, "interval": "ci95"}


def fair_sections(runs: list[Run], variants: dict[str, dict], out_dir: Path,
                  reference: str = "dvpo", cells: dict[str, str] | None = None,
                  long: list[str] | None = None, tuning_runs: dict | None = None,
                  tuning_choice: dict | None = None, n_levels: int = 3,
                  against: dict[str, str] | None = None) -> tuple[
                      dict[str, dict], dict[str, str], list[Path]]:
    """``(tables, notes, files)`` of the fair study.

    Args:
        runs: every main run of the study (run names as methods).
        variants: ``{run name: {"method", "point"}}`` (the pipeline's grid expansion).
        out_dir: where the figures go.
        reference: the method every other is compared with at matched KL.
        cells: the 2 × 2's methods (see :func:`two_by_two_table`); None: no 2 × 2.
        long: the long runs' method names (the horizon); None: no horizon section.
        tuning_runs: ``{point name: {seed: artifact}}`` of the tuning runs.
        tuning_choice: ``{"points": variants, "chosen": …}`` of the tuning.
        n_levels: matched KL levels.
        against: ``{method: its counterpart}``: each also compared with its counterpart alone
            at matched KL (:func:`against_at_matched_kl`); None: no such table.
    """
    tables_, notes, files = {}, {}, []
    if tuning_runs and tuning_choice:
        truns = load_runs(tuning_runs)
        tables_["tuning"] = tuning.tuning_table(truns, tuning_choice["points"],
                                                tuning_choice["chosen"])
        notes["tuning"] = ("Each method's tune grid (the same number of points for every "
                           "method) at the tuning seeds, at the config's β; the chosen point "
                           "has the best mean gold at the runs' last validation, on the "
                           "validation prompts. The test prompts were not read.")
    points = frontier.points_from_runs(regularised_runs(runs, variants),
                                       lambda name: variants[name]["method"])
    if points:
        tables_["frontier"] = frontier.frontier_table(points)
        notes["frontier"] = ("Each method's runs over its β grid (DPO: its own β), final "
                             "evaluation on the test prompts; KL in nats per response.")
        files.append(frontier.plot_frontier(points, out_dir / "frontier.png"))
        on_validation = frontier.points_from_runs(
            regularised_runs(runs, variants), lambda name: variants[name]["method"],
            split="validation")
        tables_["validation_beta"] = frontier.validation_beta_table(on_validation)
        notes["validation_beta"] = (
            "The same runs at their last validation (the validation prompts, never the test "
            "prompts): per method the β with the best mean validation gold over the seeds is "
            "marked, the rule the default study's configs took their β by.")
        if against:
            table = against_at_matched_kl(points, against, n_levels)
            if table:
                tables_["matched_kl_against"] = table
                notes["matched_kl_against"] = (
                    f"Per pair, {n_levels} KL levels inside the range every seed of both "
                    "covers (low, middle, high; log-spaced), gold read off each curve over β, "
                    "linear in log KL, never extrapolated; method − against paired by seed. "
                    "— : the two share no KL range.")
        span = frontier.common_kl_range(points)
        if span is None:
            notes["frontier"] += (" The methods' KL ranges share no interval: no KL level can "
                                  "be matched across all of them; each method is matched with "
                                  f"{reference} alone below.")
            pairwise = pairwise_matched_kl(points, reference, n_levels)
            if pairwise:
                tables_["matched_kl_pairs"] = pairwise
                notes["matched_kl_pairs"] = (
                    f"Per method, {n_levels} KL levels inside the range every seed of both it "
                    f"and {reference} covers (low, middle, high; log-spaced), gold read off "
                    "each curve over β, linear in log KL, never extrapolated; "
                    f"{reference} − method paired by seed. — : the two share no KL range.")
            if cells:
                four = [p for p in points if p.method in cells.values()]
                span4 = frontier.common_kl_range(four)
                if span4 is not None:
                    levels = frontier.kl_levels(*span4, n_levels)
                    _add_two_by_two(tables_, notes, frontier.matched_kl(four, levels, reference),
                                    cells, levels)
        else:
            levels = frontier.kl_levels(*span, n_levels)
            result = frontier.matched_kl(points, levels, reference)
            tables_["matched_kl"] = frontier.matched_kl_table(result, reference)
            notes["matched_kl"] = (
                f"Gold reward read off each (method, seed) curve over β at KL levels inside "
                f"every curve's range ({span[0]:.3g} to {span[1]:.3g}), linear in log KL "
                f"between the two bracketing runs, never extrapolated; {reference} − method "
                "paired by seed.")
            if cells:
                _add_two_by_two(tables_, notes, result, cells, levels)
    if long:
        long_runs = [r for r in runs if r.method in long]
        if long_runs:
            tables_["over_optimisation"] = overoptimisation.over_optimisation_table(long_runs)
            notes["over_optimisation"] = overoptimisation.__doc__.split("\n\n")[1].replace(
                "\n", " ") + (" A run without a frozen scorer (DPO) has no proxy: its gold "
                              "curve is in the figure only.")
            files.append(overoptimisation.plot_over_optimisation(
                long_runs, out_dir / "over_optimisation.png"))
    return tables_, notes, files
