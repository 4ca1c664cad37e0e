"""Equal tuning before the main runs: a method's ``tune`` axes (its learning rate, PPO's critic
learning rate, DPO's β) are chosen on the validation prompts, with the same rule for every
method, and only then do the main runs start.

Phase 1 runs every point of each method's ``tune`` grid at the ``tuning_seeds`` (the method's
own arguments and the study's ``common_args``, no study grid: the config's β), named like grid
points (``dvpo@lr=0.001``). Then, per method, the point with the best mean gold reward at the
runs' last validation — the validation prompts; the test evaluation is not read — is chosen
(:func:`~dvpo_lightning.report.tuning.select`), and phase 2 runs the study's grid × seeds with
that point's overrides appended (their names unchanged; their hashes include the overrides, so
another choice reruns them). The choice is written to ``<runs_dir>/tuning.json`` and the
report's JSON.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dvpo_lightning.commands.pipeline_grid import Variant, variants
from dvpo_lightning.commands.pipeline_spec import PipelineSpec, PipelineSpecError

UNCHOSEN = "<chosen on validation>"


def tuning_seeds(spec: PipelineSpec) -> list[int]:
    """The tuning runs' seeds: ``spec.tuning_seeds``, else the first two seeds."""
    return spec.tuning_seeds or spec.seeds[:2]


def tuning_variants(spec: PipelineSpec, source: str = "pipeline arguments") -> list[Variant]:
    """Every point of every method's ``tune`` grid (none without ``tune`` axes)."""
    out = []
    for i, m in enumerate(spec.methods):
        if m.tune:
            try:
                out += variants(replace(m, grid=m.tune), [], f"methods[{i}].tune")
            except PipelineSpecError as e:
                raise PipelineSpecError(f"{source}: {e}") from None
    return out


def tuning_spec(spec: PipelineSpec, tune: list[Variant]) -> PipelineSpec:
    """``spec`` for phase 1: the tuning seeds and the tuned methods only."""
    methods = [m for m in spec.methods if m.tune]
    return replace(spec, seeds=tuning_seeds(spec), methods=methods)


def artifact(spec: PipelineSpec, name: str, seed: int) -> str:
    return f"{spec.runs_dir}/{name}/seed{seed}/model"


def choose(spec: PipelineSpec, tune: list[Variant]) -> dict[str, dict] | None:
    """``{method: {"name", "point", "gold"}}`` from the finished tuning runs; None while any
    of them is missing (before phase 1, e.g. in a dry run)."""
    from dvpo_lightning.report.runs import load_runs
    from dvpo_lightning.report.tuning import select

    seeds = tuning_seeds(spec)
    paths = {v.name: {s: artifact(spec, v.name, s) for s in seeds} for v in tune}
    if not all(Path(p).exists() for by_seed in paths.values() for p in by_seed.values()):
        return None
    table = {v.name: {"method": v.method.name, "point": dict(v.point)} for v in tune}
    return select(load_runs(paths), table)


def with_choice(main: list[Variant], chosen: dict[str, dict] | None) -> list[Variant]:
    """``main`` with each tuned method's chosen overrides appended — a ``tune_from`` method
    takes the named method's — (``UNCHOSEN`` values before the choice exists: what a dry run
    shows)."""
    out = []
    tuned = {v.method.name: v.method for v in main if v.method.tune}
    for v in main:
        source = tuned.get(v.method.tune_from) if v.method.tune_from else v.method
        axes = source.tune if source is not None else []
        if not axes:
            out.append(v)
            continue
        point = (chosen or {}).get(source.name, {}).get("point")
        extra = [f"--{a.arg}={_value(point[a.name]) if point else UNCHOSEN}" for a in axes]
        out.append(replace(v, args=[*v.args, *extra]))
    return out


def _value(x) -> str:
    return ("true" if x else "false") if isinstance(x, bool) else str(x)


def write_choice(spec: PipelineSpec, tune: list[Variant], chosen: dict[str, dict]) -> Path:
    """``<runs_dir>/tuning.json``: the seeds, every point and the chosen one per method."""
    out = Path(spec.runs_dir) / "tuning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "seeds": tuning_seeds(spec), "rule": "best mean gold at the last validation",
        "points": {v.name: {"method": v.method.name, "point": dict(v.point)} for v in tune},
        "chosen": chosen}, indent=2))
    return out
