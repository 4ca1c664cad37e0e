"""The typed specification of a pipeline file, checked before anything runs.

:func:`parse_spec` turns a pipeline YAML (or the arguments of
:func:`~dvpo_lightning.commands.pipeline.run_pipeline`) into a :class:`PipelineSpec`, raising
one :class:`PipelineSpecError` per mistake: the file, the key path (``methods[2].grid.kl``),
the rule, the value and the fix. Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SEED_SCOPES = ("methods", "pipeline")
STAMP = "pipeline_stage.json"  # what a stage's artifact records of the run that made it
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # stage, method, axis names and labels: path-safe
BUILD = Path(__file__).resolve().parents[1] / "report" / "build.py"


class PipelineSpecError(ValueError):
    """A mistake in a pipeline file: printed as one ``error:`` line (exit status 2)."""


@dataclass
class GridAxis:
    """One axis of a grid: a command-line key and the values it takes.

    Args:
        name: the axis's short name in run names (``kl`` in ``dvpo@kl=0.03``).
        arg: the dotted config key it overrides (``model.init_args.kl.coef``, no ``--``).
        values: the values, in order (numbers, booleans or strings).
        labels: how each value is spelled in run names; None: the value itself
            (:func:`~dvpo_lightning.commands.pipeline_grid.spell`).
    """

    name: str
    arg: str
    values: list
    labels: list[str] | None = None


@dataclass
class StageSpec:
    """One stage-1 stage (SFT, reward model, GVM or a variant of one).

    Args:
        name: the stage's name (its run directory and ``--only`` key).
        config: its LightningCLI config.
        artifact: the directory it writes (its ``export_dir``).
        args: extra command-line overrides (``--key=value``).
    """

    name: str
    config: str
    artifact: str
    args: list[str] | None = None


@dataclass
class MethodSpec:
    """One method of the comparison (an RL method, or DPO), run once per grid point and seed.

    Args:
        name: the method's name in tables, plots and run directories.
        config: its LightningCLI config (``configs/dvpo.yaml`` …).
        args: extra command-line overrides for every run.
        common: take the study's ``common_args`` and ``grid`` (the RL runs'); false for a
            method whose module is not the RL module (DPO).
        grid: its own grid axes, crossed with the study's (:class:`GridAxis`).
        tune: axes chosen on the validation prompts before the main runs: every point runs at
            the ``tuning_seeds`` first, and the main runs take the point with the best mean
            validation gold reward (:mod:`~dvpo_lightning.commands.pipeline_tune`).
        tune_from: take another method's tuned choice instead of tuning its own (a longer run
            of the same method, say); that method must have ``tune`` axes.
    """

    name: str
    config: str
    args: list[str] | None = None
    common: bool = True
    grid: list[GridAxis] = field(default_factory=list)
    tune: list[GridAxis] = field(default_factory=list)
    tune_from: str | None = None


@dataclass
class PipelineSpec:
    """A whole study: the arguments of :func:`~dvpo_lightning.commands.pipeline.run_pipeline`.

    Args:
        data: the data config; None: no data step.
        stages: the stage-1 stages, in order.
        methods: the methods, each run per grid point and seed.
        seeds: the seeds of every method.
        runs_dir: runs go to ``<runs_dir>/<run name>/seed<s>``.
        common_args: overrides for every method whose ``common`` is true.
        grid: study-level axes, crossed into every method whose ``common`` is true.
        tuning_seeds: the seeds of the tuning runs of methods with ``tune`` axes (None: the
            first two of ``seeds``); each must be one of ``seeds``.
        report: the arguments of ``build_report``; None: no report.
        group: the W&B group.
        force: recompute every (selected) stage.
        only: run just these stage, method or run names (``data``: the data step).
        in_process: run the stages in this process.
        skip_report: do not build the report.
        seed_scope: ``methods`` or ``pipeline`` (what a seed covers).
        workers: stages run at once.
        dry_run: print the plan and stop; nothing runs, nothing is written.
    """

    data: str | None = None
    stages: list[StageSpec] = field(default_factory=list)
    methods: list[MethodSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    runs_dir: str = "runs"
    common_args: list[str] = field(default_factory=list)
    grid: list[GridAxis] = field(default_factory=list)
    tuning_seeds: list[int] | None = None
    report: dict | None = None
    group: str = "pipeline"
    force: bool = False
    only: list[str] | None = None
    in_process: bool = False
    skip_report: bool = False
    seed_scope: str = "methods"
    workers: int = 1
    dry_run: bool = False


class _Checker:
    """Type checks that name the source and the key path of what they check."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, rule: str, value: Any, fix: str) -> PipelineSpecError:
        return PipelineSpecError(f"{self.source}: {path}: {rule}, got {value!r}. {fix}")

    def keys(self, raw: Any, path: str, known: list[str], required: tuple[str, ...] = ()):
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping", raw, f"write it as {{{', '.join(known)}}}")
        for k in raw:
            if k not in known:
                raise self.fail(f"{path}.{k}" if path else str(k), "unknown key", k,
                                f"known keys: {', '.join(known)}")
        for k in required:
            if raw.get(k) is None:
                raise self.fail(f"{path}.{k}", "is required", None, f"set {k}")

    def string(self, value: Any, path: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(path, "must be a non-empty string", value, "quote it")
        return value

    def name(self, value: Any, path: str) -> str:
        self.string(value, path)
        if not NAME.fullmatch(value):
            raise self.fail(path, "must use only letters, digits, '_', '.' and '-' (it names "
                            "run directories and W&B runs)", value, "rename it")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "must be true or false", value, "write true or false")
        return value

    def file(self, value: Any, path: str, optional: bool = False) -> str | None:
        if self.string(value, path, optional) is not None and not Path(value).is_file():
            raise self.fail(path, f"names no file (from {Path.cwd()})", value,
                            "fix the path; pipeline paths are relative to where it runs")
        return value

    def args(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of --key=value strings", value,
                            "write [--key=value, ...]")
        for i, a in enumerate(value):
            if not isinstance(a, str) or not a.startswith("--"):
                raise self.fail(f"{path}[{i}]", "must be a --key=value string", a,
                                "start it with --")
        return list(value)

    def names(self, value: Any, path: str) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "must be a list of names", value, "write [name, ...]")
        return list(value)

    def grid(self, raw: Any, path: str) -> list[GridAxis]:
        if raw is None:
            return []
        if not isinstance(raw, dict) or not raw:
            raise self.fail(path, "must be a mapping of axis name to {arg, values}", raw,
                            "write grid: {kl: {arg: model.init_args.kl.coef, values: [0.01, 0.1]}}")
        axes = []
        for name, spec in raw.items():
            at = f"{path}.{name}"
            self.name(name, at)
            self.keys(spec, at, ["arg", "values", "labels"], required=("arg", "values"))
            arg = self.string(spec["arg"], f"{at}.arg").removeprefix("--")
            if "=" in arg or not arg:
                raise self.fail(f"{at}.arg", "must be a dotted config key", spec["arg"],
                                "write the key alone (model.init_args.optim.lr); values go in "
                                "values")
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise self.fail(f"{at}.values", "must be a non-empty list", values,
                                "write values: [a, b, ...]")
            for i, v in enumerate(values):
                if not isinstance(v, (bool, int, float, str)):
                    raise self.fail(f"{at}.values[{i}]", "must be a number, boolean or string",
                                    v, "one scalar per grid point")
            if len({repr(v) for v in values}) < len(values):
                raise self.fail(f"{at}.values", "has a repeated value", values,
                                "list each value once")
            labels = spec.get("labels")
            if labels is not None:
                if not isinstance(labels, list) or len(labels) != len(values):
                    raise self.fail(f"{at}.labels", f"must be a list of {len(values)} names, "
                                    "one per value", labels, "give one label per value")
                for i, lab in enumerate(labels):
                    self.name(lab, f"{at}.labels[{i}]")
                if len(set(labels)) < len(labels):
                    raise self.fail(f"{at}.labels", "has a repeated label", labels,
                                    "label each value differently")
            axes.append(GridAxis(name, arg, list(values), labels and list(labels)))
        return axes


def report_keys() -> list[str]:
    """The arguments ``build_report`` takes from a pipeline file's ``report`` (all but
    ``runs``), read from its source so that checking a file imports nothing heavy."""
    tree = ast.parse(BUILD.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_report")
    return [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg != "runs"]


def _report_takes_any() -> bool:
    """Whether ``build_report`` takes ``**kwargs`` (then any key is its business)."""
    tree = ast.parse(BUILD.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_report")
    return fn.args.kwarg is not None


def parse_spec(raw: dict, source: str = "pipeline arguments") -> PipelineSpec:
    """The checked :class:`PipelineSpec` of ``raw`` (a pipeline file's mapping, or
    :func:`run_pipeline`'s arguments); ``source`` names it in errors. Configs and the data
    config must exist (relative to the working directory)."""
    c = _Checker(source)
    known = [f.name for f in fields(PipelineSpec)]
    c.keys(raw or {}, "", known)
    raw = {k: v for k, v in (raw or {}).items() if v is not None}
    spec = PipelineSpec()
    for k in ("force", "in_process", "skip_report", "dry_run"):
        if k in raw:
            setattr(spec, k, c.boolean(raw[k], k))
    for k in ("runs_dir", "group"):
        if k in raw:
            setattr(spec, k, c.string(raw[k], k))
    spec.data = c.file(raw.get("data"), "data", optional=True)
    if "seed_scope" in raw and raw["seed_scope"] not in SEED_SCOPES:
        raise c.fail("seed_scope", f"must be one of {SEED_SCOPES}", raw["seed_scope"],
                     "`methods` trains stage 1 once, `pipeline` once per seed")
    spec.seed_scope = raw.get("seed_scope", spec.seed_scope)
    workers = raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise c.fail("workers", "must be an integer >= 1", workers, "1 runs one stage at a time")
    spec.workers = workers
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise c.fail("seeds", "must be a non-empty list of integers", seeds, "write [0, 1, 2]")
    if len(set(seeds)) < len(seeds):
        raise c.fail("seeds", "has a repeated seed", seeds, "list each seed once")
    spec.seeds = list(seeds)
    tuning_seeds = raw.get("tuning_seeds")
    if tuning_seeds is not None:
        if (not isinstance(tuning_seeds, list) or not tuning_seeds
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in tuning_seeds)
                or len(set(tuning_seeds)) < len(tuning_seeds)):
            raise c.fail("tuning_seeds", "must be a non-empty list of distinct integers",
                         tuning_seeds, "write [0, 1]")
        if set(tuning_seeds) - set(spec.seeds):
            raise c.fail("tuning_seeds", f"must be among seeds {spec.seeds} (their stage-1 "
                         "models are the main runs')", tuning_seeds, "pick seeds from seeds")
        spec.tuning_seeds = list(tuning_seeds)
    spec.common_args = c.args(raw.get("common_args"), "common_args")
    spec.only = c.names(raw.get("only"), "only")
    spec.grid = c.grid(raw.get("grid"), "grid")

    stages = raw.get("stages", [])
    if not isinstance(stages, list):
        raise c.fail("stages", "must be a list", stages, "write stages: [{name, config, artifact}]")
    for i, s in enumerate(stages):
        at = f"stages[{i}]"
        c.keys(s, at, [f.name for f in fields(StageSpec)], required=("name", "config", "artifact"))
        spec.stages.append(StageSpec(c.name(s["name"], f"{at}.name"),
                                     c.file(s["config"], f"{at}.config"),
                                     c.string(s["artifact"], f"{at}.artifact"),
                                     c.args(s.get("args"), f"{at}.args") or None))
    methods = raw.get("methods", [])
    if not isinstance(methods, list):
        raise c.fail("methods", "must be a list", methods, "write methods: [{name, config}]")
    study_axes = {a.name for a in spec.grid}
    for i, m in enumerate(methods):
        at = f"methods[{i}]"
        c.keys(m, at, [f.name for f in fields(MethodSpec)], required=("name", "config"))
        method = MethodSpec(c.name(m["name"], f"{at}.name"), c.file(m["config"], f"{at}.config"),
                            c.args(m.get("args"), f"{at}.args") or None,
                            c.boolean(m.get("common", True), f"{at}.common"),
                            c.grid(m.get("grid"), f"{at}.grid"),
                            c.grid(m.get("tune"), f"{at}.tune"),
                            c.string(m.get("tune_from"), f"{at}.tune_from", optional=True))
        if method.tune and method.tune_from:
            raise c.fail(f"{at}.tune_from", "cannot go with the method's own tune axes",
                         method.tune_from, "keep one of tune and tune_from")
        for axis in method.grid:
            if method.common and axis.name in study_axes:
                raise c.fail(f"{at}.grid.{axis.name}", "repeats an axis of the study's grid",
                             axis.name, "rename the axis, or drop it from one of the two grids")
        gridded = {a.arg for a in method.grid} | ({a.arg for a in spec.grid} if method.common
                                                  else set())
        for axis in method.tune:
            if axis.arg in gridded:
                raise c.fail(f"{at}.tune.{axis.name}.arg", "is also a grid axis's key (a key is "
                             "either swept in every main run or chosen once on validation)",
                             axis.arg, "drop it from the grid or from tune")
        spec.methods.append(method)
    for kind, items in (("stages", spec.stages), ("methods", spec.methods)):
        names = [x.name for x in items]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise c.fail(f"{kind}[{i}].name", "repeats an earlier name (names are run "
                             "directories)", n, "give each a name of its own")
    tuned = {m.name for m in spec.methods if m.tune}
    for i, m in enumerate(spec.methods):
        if m.tune_from is not None and m.tune_from not in tuned:
            raise c.fail(f"methods[{i}].tune_from", "must name a method with tune axes",
                         m.tune_from, f"methods with tune axes: {sorted(tuned) or 'none'}")
    stage_names = {s.name for s in spec.stages}
    for i, m in enumerate(spec.methods):
        if m.name in stage_names:
            raise c.fail(f"methods[{i}].name", "is also a stage's name (both would write "
                         f"{spec.runs_dir}/{m.name})", m.name, "rename the method")
    arts = [s.artifact for s in spec.stages]
    for i, a in enumerate(arts):
        if a in arts[:i]:
            raise c.fail(f"stages[{i}].artifact", "is an earlier stage's artifact too", a,
                         "give each stage its own artifact directory")

    report = raw.get("report")
    if report is not None:
        c.keys(report, "report", list(report) if _report_takes_any() else report_keys())
    spec.report = report
    return spec
