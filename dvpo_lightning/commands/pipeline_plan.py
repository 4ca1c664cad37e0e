"""The planner: every job a pipeline will run, before any starts (``--dry_run true``).

:func:`plan` lists the data step, each stage-1 stage and each method run (grid point × seed)
in run order, with what the pipeline would do with it — ``run``, ``resume`` (an interrupted
run of the same stage left a checkpoint), ``reuse`` (its artifact was made from the same
config, arguments and inputs) or ``skip`` (``only`` leaves it out) — using the same hashes and
checks as a real run. It reads configs and stamps only: no data is generated, no model loaded,
no file written. :func:`print_plan` prints it with totals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dvpo_lightning.commands.pipeline_grid import Variant
from dvpo_lightning.commands.pipeline_spec import STAMP, PipelineSpec

# arguments the pipeline adds to every run to place it (shown as the seed and artifact)
PLACING = ("--seed_everything", "--trainer.default_root_dir", "--model.init_args.export_dir")
KINDS = {"data": "data", "stage1": "stage 1", "rl": "RL", "dpo": "DPO"}


@dataclass
class PlannedJob:
    """One job of the plan.

    Args:
        name: the job's name (``data``, ``gvm/seed0``, ``dvpo@kl=0.03/seed1``).
        kind: ``data``, ``stage1``, ``rl`` or ``dpo``.
        status: ``run``, ``resume``, ``reuse`` or ``skip``.
        config: the config it runs.
        artifact: the directory it writes.
        seed: its seed; None: the config's own (stage 1 trained once; the data step).
        overrides: its command-line overrides whose value differs from the config's (the
            last of a repeated key), less the ones that place it (seed, directories).
        method: the method of a method run (its grid point in ``point``); None otherwise.
        point: ``{axis: value}`` of a grid point; empty otherwise.
        steps: its ``trainer.max_steps`` (override, else config); None when unset.
        seconds: the wall time its artifact's stamp recorded (an earlier run of this stage),
            None when none did.
    """

    name: str
    kind: str
    status: str
    config: str
    artifact: str
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    method: str | None = None
    point: dict = field(default_factory=dict)
    steps: int | None = None
    seconds: float | None = None


def _lookup(tree, key: str):
    """The value at dotted ``key`` of a config mapping, or None."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(text: str, value) -> bool:
    """Whether the command-line text ``text`` sets what the config's ``value`` already is."""
    if value is None:
        return False
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(parsed) == float(value)
        except (TypeError, ValueError):
            return False
    return parsed == value


def effective(args: list[str]) -> dict[str, str]:
    """``{key: value}`` of ``--key=value`` arguments, the last of a repeated key winning (as on
    the command line), in the order of each key's last setting."""
    out: dict[str, str] = {}
    for a in args:
        key, eq, value = a.partition("=")
        if eq:
            out.pop(key, None)
            out[key] = value
    return out


def _planned(job, spec: PipelineSpec, configs: dict[str, dict],
             resumable: Callable) -> PlannedJob:
    stage = job.stage
    cfg = configs.setdefault(stage.config,
                             yaml.safe_load(Path(stage.config).read_text()) or {})
    args = effective(stage.args or [])
    overrides = [f"{k}={v}" for k, v in args.items()
                 if k not in PLACING and not _same(v, _lookup(cfg, k.removeprefix("--")))]
    steps = args.get("--trainer.max_steps", _lookup(cfg, "trainer.max_steps"))
    stamp = Path(stage.artifact) / STAMP
    recorded = json.loads(stamp.read_text()) if stamp.exists() else {}
    if not job.selected:
        status = "skip"
    elif recorded.get("hash") == job.hash and not spec.force:
        status = "reuse"
    elif not spec.force and resumable(stage, job.hash) is not None:
        status = "resume"
    else:
        status = "run"
    v: Variant | None = job.variant
    return PlannedJob(stage.name, job.kind, status, stage.config, stage.artifact, job.seed,
                      overrides, v.method.name if v else None, dict(v.point) if v else {},
                      int(steps) if steps is not None else None, recorded.get("seconds"))


def plan(spec: PipelineSpec, jobs: list, data_fresh: bool,
         resumable: Callable) -> list[PlannedJob]:
    """Every job of ``spec`` in run order (the data step first), each with its status.

    Args:
        spec: the study.
        jobs: its stage-1 and method jobs (``pipeline.build_jobs``).
        data_fresh: whether the data step's output was made from this data config.
        resumable: ``(stage, hash) ↦ checkpoint or None`` (``pipeline._resumable``).

    ``pipeline.plan_jobs`` calls it with the pipeline's own; this module imports nothing of
    the pipeline's, so the two do not import each other.
    """
    out = []
    if spec.data:
        forced = spec.force and (not spec.only or "data" in spec.only)
        out.append(PlannedJob("data", "data", "run" if forced or not data_fresh
                              else "reuse", spec.data,
                              str(yaml.safe_load(Path(spec.data).read_text())["out"])))
    configs: dict[str, dict] = {}
    out += [_planned(job, spec, configs, resumable) for job in jobs]
    return out


def estimate(jobs: list[PlannedJob]) -> tuple[float, int]:
    """Seconds the jobs to run (``run``, ``resume``) took when they last ran, summed; a job
    whose stamp recorded no time takes the mean of the recorded jobs of its config and kind.
    Returns the sum and how many jobs had no estimate (the data step not counted)."""
    by_config: dict[tuple[str, str], list[float]] = {}
    for j in jobs:
        if j.seconds is not None:
            by_config.setdefault((j.kind, j.config), []).append(j.seconds)
    total, unknown = 0.0, 0
    for j in jobs:
        if j.status not in ("run", "resume") or j.kind == "data":
            continue
        known = by_config.get((j.kind, j.config))
        if j.seconds is not None:
            total += j.seconds
        elif known:
            total += sum(known) / len(known)
        else:
            unknown += 1
    return total, unknown


def totals(jobs: list[PlannedJob]) -> dict:
    """Counts per kind and per status, and the trainer steps of the jobs to run per kind."""
    count = {k: sum(j.kind == k for j in jobs) for k in KINDS}
    status = {s: sum(j.status == s for j in jobs) for s in ("run", "resume", "reuse", "skip")}
    steps = {k: sum(j.steps or 0 for j in jobs if j.kind == k and j.status in ("run", "resume"))
             for k in KINDS if k != "data"}
    return {"jobs": count, "status": status, "steps": steps}


def print_plan(jobs: list[PlannedJob], spec: PipelineSpec, source: str) -> None:
    """Print the plan: one line per job (status, kind, seed, name, config, artifact), its
    overrides indented below it, then the totals and the time estimate."""
    print(f"[plan] {source}: group {spec.group}, seed_scope {spec.seed_scope}, seeds "
          f"{spec.seeds}, workers {spec.workers}{', force' if spec.force else ''}"
          f"{f', only {spec.only}' if spec.only else ''}")
    width = max((len(j.name) for j in jobs), default=4)
    cwidth = max((len(j.config) for j in jobs), default=6)
    print(f"{'#':>4}  {'status':<6}  {'kind':<6}  {'seed':>4}  {'job':<{width}}  "
          f"{'config':<{cwidth}}  artifact")
    for i, j in enumerate(jobs, 1):
        seed = "-" if j.seed is None else str(j.seed)
        print(f"{i:>4}  {j.status:<6}  {j.kind:<6}  {seed:>4}  {j.name:<{width}}  "
              f"{j.config:<{cwidth}}  {j.artifact}")
        for o in j.overrides:
            print(f"{'':>10}{o}")
    t = totals(jobs)
    kinds = ", ".join(f"{n} {KINDS[k]}" for k, n in t["jobs"].items() if n)
    s = t["status"]
    print(f"[plan] {len(jobs)} jobs ({kinds or 'none'}): {s['run'] + s['resume']} to run "
          f"({s['resume']} of them resumed), {s['reuse']} reused, {s['skip']} skipped (--only)")
    steps = ", ".join(f"{KINDS[k]} {n}" for k, n in t["steps"].items() if n)
    print(f"[plan] trainer steps to run: {steps or 'none'}")
    seconds, unknown = estimate(jobs)
    todo = sum(j.status in ("run", "resume") and j.kind != "data" for j in jobs)
    if todo == 0:
        print("[plan] time to run: nothing to run")
    elif unknown == todo:
        print("[plan] time to run: unknown (no earlier run of these stages recorded its time)")
    else:
        par = f"; {spec.workers} workers run stages at once" if spec.workers > 1 else ""
        rest = f", plus {unknown} job(s) with no recorded time" if unknown else ""
        print(f"[plan] time to run: about {seconds / 60:.1f} min of stage time, one after "
              f"another, from earlier runs' stamps{rest}{par}")
    if spec.report and not spec.skip_report:
        runs = [j for j in jobs if j.method is not None]
        names = {j.name.split("/")[0] for j in runs}
        print(f"[plan] report: {spec.report.get('out', 'runs/report')} ({len(names)} methods "
              f"and grid points, {len(runs)} runs)")
    else:
        print("[plan] report: none")
