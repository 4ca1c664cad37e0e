"""``python -m dvpo_lightning pipeline``: the whole study on one config.

data → stage-1 stages (SFT, reward model, GVM) → every method (RL, and DPO) × every seed from
the SFT policy → the report (tables, plots, token-value pictures). ``seed_scope`` says what a
seed covers: ``methods`` (stage 1 trained once, as in the paper) or ``pipeline`` (stage 1
retrained per seed, so every method's spread includes the stage-1 draw). Each stage is an
ordinary ``fit`` run with its own config, so any stage can be run or changed alone. A stage whose
artifact exists and was made from the same config text, arguments and upstream artifacts is
reused; a stage that was interrupted (crash, kill, preemption) resumes from its ``last.ckpt``
on the next run; ``--force true`` recomputes everything. A method may run over a grid of
overrides, each point its own run (:mod:`~dvpo_lightning.commands.pipeline_grid`); the file is
checked before anything runs (:mod:`~dvpo_lightning.commands.pipeline_spec`), and
``--dry_run true`` prints every job and stops (:mod:`~dvpo_lightning.commands.pipeline_plan`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from dvpo_lightning.commands.pipeline_grid import Variant, expand
from dvpo_lightning.commands.pipeline_prefetch import Prefetch
from dvpo_lightning.commands.pipeline_spec import (
    SEED_SCOPES,
    STAMP,
    PipelineSpec,
    PipelineSpecError,
    parse_spec,
)
from dvpo_lightning.commands.pipeline_tune import (
    UNCHOSEN,
    choose,
    tuning_seeds,
    tuning_spec,
    tuning_variants,
    with_choice,
    write_choice,
)

__all__ = ["SEED_SCOPES", "run_pipeline", "run_pipeline_file", "run_spec"]


@dataclass
class Stage:
    """One pipeline stage.

    Args:
        name: short name printed in the progress line (``dvpo/seed0`` for a method run).
        config: the stage's LightningCLI config.
        artifact: the directory the stage writes (its ``export_dir``).
        args: extra command-line overrides.
        env: extra environment variables (W&B run name and group).
    """

    name: str
    config: str
    artifact: str
    args: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    """One stage to run or reuse: its hash, the stages it reads (by name), whether ``only``
    selects it, and whether it is a method run (stage-1 jobs start first); its seed (None: a
    stage-1 stage trained once, at its config's seed), kind (``stage1``, ``rl`` or ``dpo``)
    and, for a method run, the grid point it runs."""

    stage: Stage
    hash: str
    deps: list[str]
    selected: bool = True
    method: bool = False
    seed: int | None = None
    kind: str = "stage1"
    variant: Variant | None = None


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


def _stage_hash(stage: Stage, upstream: str) -> str:
    # (a second config given as an argument, `--config=<file>`, counts with its contents)
    overlays = [Path(a.split("=", 1)[1]).read_text() for a in stage.args or []
                if a.startswith("--config=")]
    return _digest(Path(stage.config).read_text(), json.dumps(stage.args or []), upstream,
                   *overlays)


def seeded_stage(name: str, config: str, seed: int, runs_dir: str, args: list[str],
                 group: str, job_type: str) -> Stage:
    """The run of ``config`` at ``seed``: run directory ``<runs_dir>/<name>/seed<s>``, artifact
    ``…/model``; W&B run ``<name>-seed<s>`` in ``group``."""
    root = f"{runs_dir}/{name}/seed{seed}"
    return Stage(name=f"{name}/seed{seed}", config=config, artifact=f"{root}/model",
                 args=[f"--seed_everything={seed}", f"--trainer.default_root_dir={root}",
                       f"--model.init_args.export_dir={root}/model", *args],
                 env={"WANDB_NAME": f"{name}-seed{seed}", "WANDB_RUN_GROUP": group,
                      "WANDB_JOB_TYPE": job_type})


def method_stages(variants: list[Variant], seeds: list[int], runs_dir: str,
                  common_args: list[str], group: str) -> list[tuple[Variant, int, Stage]]:
    """One stage per (method grid point, seed), in that order: its own run directory
    ``<runs_dir>/<run name>/seed<s>``, artifact ``…/model`` and seed; W&B runs named
    ``<run name>-seed<s>`` in one group. Its arguments: the study's ``common_args`` (when the
    method's ``common``), the method's ``args``, then the point's overrides."""
    return [(v, s, seeded_stage(v.name, v.method.config, s, runs_dir,
                                [*(common_args if v.method.common else []),
                                 *(v.method.args or []), *v.args], group, "rl"))
            for v in variants for s in seeds]


def _model_paths(tree: dict, prefix: str = "model") -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every string under a config's ``model`` section (through
    ``init_args`` and nested class specs), e.g. ``("model.init_args.policy", "runs/…")``."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _model_paths(v, f"{prefix}.{k}")
        elif isinstance(v, str):
            out.append((f"{prefix}.{k}", v))
    return out


def _inputs(config: str) -> list[tuple[str, str]]:
    """The model-section strings of ``config`` a stage may read (its own ``export_dir``, which
    it writes, left out)."""
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
    return [(k, v) for k, v in _model_paths(model) if not k.endswith(".export_dir")]


def relink(stage: Stage, artifacts: dict[str, str]) -> Stage:
    """``stage`` reading the artifacts ``artifacts`` maps to (declared path → this seed's).

    Every model-section value of the stage's config that names a declared stage-1 artifact
    gets a command-line override to the seed's copy (put before the stage's own arguments),
    and every ``--key=<declared artifact>`` argument is rewritten — so any config that reads
    ``runs/sorting/sft/model`` reads ``runs/sorting/sft/seed<s>/model`` instead, with no
    per-seed config files.
    """
    links = [f"--{key}={artifacts[v]}" for key, v in _inputs(stage.config) if v in artifacts]
    args = []
    for a in stage.args or []:
        key, eq, value = a.partition("=")
        args.append(f"{key}={artifacts[value]}" if eq and value in artifacts else a)
    head = [a for a in args if a.startswith("--seed_everything=")]
    rest = [a for a in args if not a.startswith("--seed_everything=")]
    return Stage(stage.name, stage.config, stage.artifact, [*head, *links, *rest], stage.env)


def reads(stage: Stage, artifacts) -> list[str]:
    """The declared stage-1 artifacts (keys of ``artifacts``) that ``stage`` reads: values of
    its config's model section (its own ``export_dir`` aside) and of its ``--key=value``
    arguments, in first-seen order. A stage is rerun when one of them changes."""
    values = [v for _, v in _inputs(stage.config)]
    values += [a.partition("=")[2] for a in stage.args or []
               if not a.split("=", 1)[0].endswith(".export_dir")]
    return list(dict.fromkeys(v for v in values if v in artifacts and v != stage.artifact))


def own_dirs(stage: Stage) -> Stage:
    """``stage`` writing where its ``artifact`` says: ``--model.init_args.export_dir`` is the
    artifact and ``--trainer.default_root_dir`` its parent (checkpoints, logs), put before
    the stage's own arguments — so two stages of one config never share a directory."""
    root = Path(stage.artifact).parent.as_posix()
    return Stage(stage.name, stage.config, stage.artifact,
                 [f"--trainer.default_root_dir={root}",
                  f"--model.init_args.export_dir={stage.artifact}", *(stage.args or [])],
                 stage.env)


def per_seed(value, artifacts: dict[int, dict[str, str]]):
    """A report argument with every declared artifact path replaced by ``{seed: that seed's
    copy}`` (recursively through dicts); other values unchanged."""
    if isinstance(value, str) and value in next(iter(artifacts.values()), {}):
        return {s: m[value] for s, m in artifacts.items()}
    if isinstance(value, dict):
        return {k: per_seed(v, artifacts) for k, v in value.items()}
    return value


def _checkpoint_dir(stage: Stage) -> Path:
    """``<default_root_dir>/checkpoints`` of the stage's run (where the CLI's checkpoint
    defaults put them): the last ``--trainer.default_root_dir`` override, else the config's,
    else the working directory."""
    root = (yaml.safe_load(Path(stage.config).read_text()) or {}).get("trainer", {}).get(
        "default_root_dir") or "."
    for arg in stage.args or []:
        if arg.startswith("--trainer.default_root_dir="):
            root = arg.split("=", 1)[1]
    return Path(root) / "checkpoints"


def _resumable(stage: Stage, h: str) -> Path | None:
    """The checkpoint an interrupted run of this very stage left, or None.

    A run that starts writes ``<artifact>.started.json`` (the stage hash and the start time)
    and removes it when it finishes. A rerun resumes from the newest ``last*.ckpt`` (Lightning
    writes ``last-v1.ckpt`` beside an older ``last.ckpt``) only when that marker has the same
    hash and the checkpoint was written after the marker's start: never from a checkpoint of
    another config, nor from one older than the interrupted attempt.
    """
    marker = _started_marker(stage)
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    if info.get("hash") != h:
        return None
    started = info.get("started", float("inf"))
    fresh = [c for c in _checkpoint_dir(stage).glob("last*.ckpt") if c.stat().st_mtime >= started]
    return max(fresh, key=lambda c: c.stat().st_mtime) if fresh else None


def _started_marker(stage: Stage) -> Path:
    art = Path(stage.artifact)
    return art.parent / f"{art.name}.started.json"


def _run_fit(stage: Stage, in_process: bool, ckpt: Path | None = None) -> None:
    args = ["fit", "--config", stage.config, *(stage.args or [])]
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    if not in_process:
        subprocess.run([sys.executable, "-m", "dvpo_lightning", *args], check=True,
                       env={**os.environ, **stage.env})
        return
    from dvpo_lightning.commands.fit import cli_main

    saved = {k: os.environ.get(k) for k in stage.env}
    os.environ.update(stage.env)
    try:
        cli_main(args)
    finally:
        # a process that ends finishes its W&B run; in one process the next stage would log
        # into this one (Lightning's logger reuses a live run), so finish it here
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_or_reuse(stage: Stage, h: str, force: bool, in_process: bool,
                  report: dict[str, dict]) -> None:
    stamp = Path(stage.artifact) / STAMP
    fresh = stamp.exists() and json.loads(stamp.read_text()).get("hash") == h
    if fresh and not force:
        report[stage.name] = {"status": "reused", "seconds": 0.0}
        print(f"[pipeline] {stage.name}: reusing {stage.artifact}", flush=True)
        return
    print(f"[pipeline] {stage.name}: fit --config {stage.config} {' '.join(stage.args or [])}",
          flush=True)
    t0 = time.time()
    ckpt = None if force else _resumable(stage, h)
    marker = _started_marker(stage)
    if ckpt is not None:
        print(f"[pipeline] {stage.name}: resuming the interrupted run from {ckpt}", flush=True)
    else:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"hash": h, "started": time.time()}))
    _run_fit(stage, in_process, ckpt)
    if not Path(stage.artifact).exists():
        raise RuntimeError(f"stage {stage.name!r} finished but wrote no {stage.artifact}; "
                           "its config's export_dir must match the pipeline's artifact")
    seconds = round(time.time() - t0, 1)
    # the wall time lets a later --dry_run estimate what a rerun costs (the hash alone decides)
    stamp.write_text(json.dumps({"hash": h, "config": stage.config, "args": stage.args,
                                 "seconds": seconds}))
    marker.unlink(missing_ok=True)
    report[stage.name] = {"status": "resumed" if ckpt else "ran", "seconds": seconds}
    print(f"[pipeline] {stage.name}: done in {report[stage.name]['seconds']} s", flush=True)


def _worker_init(threads: int) -> None:
    """A worker process's start: its thread count, set before torch is imported."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def _work(stage: Stage, h: str, force: bool) -> dict:
    """Run or reuse one stage in this worker (in its process); its status entry."""
    out: dict[str, dict] = {}
    _run_or_reuse(stage, h, force, True, out)
    return out[stage.name]


def run_parallel(jobs: list[Job], workers: int, force: bool, done: dict[str, dict],
                 prefetch: Prefetch | None = None) -> None:
    """Run ``jobs`` on ``workers`` worker processes, each job once the jobs it reads are done.

    Tiny models use two CPU threads poorly (a DVPO run: 14.5 s on one thread, 12.3 s on two),
    so two one-thread workers finish a study's independent stages (the seeds' chains, the
    methods of a seed) in about 60 % of the time. Every stage seeds itself and reads only its
    inputs, so the order in which they run changes no number. Among the ready jobs, stage 1
    goes first (it gates the methods), then file order; a worker that no ready stage needs
    measures a finished value model for the report (``prefetch``,
    :mod:`~dvpo_lightning.commands.pipeline_prefetch`). A failed stage stops the pipeline
    after the running ones finish. Workers are spawned fresh (no state from this process);
    each has ``OMP_NUM_THREADS`` threads when that is set, else cores ÷ workers.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from dvpo_lightning.commands.pipeline_prefetch import measure

    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // workers))
    finished = {j.stage.name for j in jobs if not j.selected}  # --only: assumed to exist
    made = {j.stage.artifact for j in jobs if not j.selected}
    pending = [j for j in jobs if j.selected]
    running: dict = {}
    measuring: dict = {}  # future → value-model directory
    queue: list[str] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        while pending or running or queue or measuring:
            ready = sorted((j for j in pending if set(j.deps) <= finished),
                           key=lambda j: (j.method, pending.index(j)))
            for job in ready[:workers - len(running) - len(measuring)]:
                pending.remove(job)
                running[pool.submit(_work, job.stage, job.hash, force)] = job
            if prefetch is not None:
                queue += prefetch.ready(made)
                while queue and len(running) + len(measuring) < workers:
                    d = queue.pop(0)
                    measuring[pool.submit(measure, d, prefetch.pairs, prefetch.cache_dir)] = d
            if not running and not measuring:
                raise RuntimeError("pipeline: stages wait on stages that never run: "
                                   + ", ".join(f"{j.stage.name} (needs {j.deps})"
                                               for j in pending))
            complete, _ = wait([*running, *measuring], return_when=FIRST_COMPLETED)
            for future in complete:
                if future in measuring:
                    d = measuring.pop(future)
                    if (error := future.result()) is not None:
                        print(f"[pipeline] measuring {d} for the report failed ({error}); "
                              "the report measures it again", flush=True)
                    continue
                job = running.pop(future)
                done[job.stage.name] = future.result()  # re-raises the stage's error
                finished.add(job.stage.name)
                made.add(job.stage.artifact)


def run_pipeline(data: str | None = None, stages: list[dict] | None = None,
                 methods: list[dict] | None = None, seeds: list[int] | None = None,
                 runs_dir: str = "runs", common_args: list[str] | None = None,
                 grid: dict | None = None, tuning_seeds: list[int] | None = None,
                 report: dict | None = None,
                 group: str = "pipeline", force: bool = False, only: list[str] | None = None,
                 in_process: bool = False, skip_report: bool = False,
                 seed_scope: str = "methods", workers: int = 1, dry_run: bool = False) -> dict:
    """Run (or reuse) the data step, the stages, every method × grid point × seed, then the
    report.

    A pipeline file (``--config configs/pipeline.yaml``) holds these arguments; any of them
    can be overridden on the command line (``--seeds '[0]'``, ``--only '[dvpo]'``). They are
    checked as a whole (:func:`~dvpo_lightning.commands.pipeline_spec.parse_spec`) before
    anything runs.

    Args:
        data: the data config (``python -m dvpo_lightning data --config …``); None: no data step.
        stages: the stage-1 stages in order, each ``{name, config, artifact, args}``; a stage
            depends on the earlier stages whose artifacts it reads.
        methods: the methods, each ``{name, config, args, common, grid}``, run once per grid
            point and seed from the stage-1 artifacts (not depending on each other).
        seeds: the seeds of every method (default ``[0]``).
        runs_dir: method runs go to ``<runs_dir>/<run name>/seed<s>``.
        common_args: command-line overrides for every method run whose ``common`` is true.
        grid: ``{axis: {arg, values, labels}}`` crossed into every method whose ``common`` is
            true, before the method's own ``grid`` (:mod:`~dvpo_lightning.commands.pipeline_grid`:
            run names ``<method>@<axis>=<value>,…``).
        tuning_seeds: the seeds of the tuning runs of methods with ``tune`` axes (None: the
            first two seeds; :mod:`~dvpo_lightning.commands.pipeline_tune`).
        report: arguments of :func:`~dvpo_lightning.report.build.build_report` (``out``,
            ``gvm``, ``reward_model``, ``eval_pairs`` …); None: no report.
        group: the W&B group of the method runs and the report.
        force: recompute every stage even when its artifact matches (with ``only``: the
            stages named there).
        only: run just these stage, method or run names (the others must already exist);
            ``data`` names the data step; a method's name selects all its grid points.
        in_process: run the stages in this process instead of one subprocess each: saves each
            run's start-up (≈ 9 s of imports on 2 CPU cores) and gives the same numbers (every
            run seeds itself; checked against subprocesses); a crash stops the pipeline as a
            failed subprocess does.
        skip_report: do not build the report.
        seed_scope: ``methods``: the stages run once (seed 0, their configs' seed) and every
            method once per seed from them; ``pipeline``: the stages too run once per seed,
            into ``<runs_dir>/<stage>/seed<s>``, and each seed's methods (and the report's
            value models) read that seed's artifacts (:func:`relink`).
        workers: run up to this many stages at once, each in a worker process of its own
            with ``OMP_NUM_THREADS`` cores ÷ workers threads (:func:`run_parallel`); a stage
            starts when the stages it reads are done. 1: one after another.
        dry_run: print every job in order (run, resumed or reused), then totals, and stop:
            no data generated, no model loaded, no file written
            (:mod:`~dvpo_lightning.commands.pipeline_plan`).

    Returns:
        ``{stage name: {"status": "ran" | "resumed" | "reused", "seconds": float}}``; empty
        for a dry run.
    """
    spec = parse_spec({k: v for k, v in locals().items()})
    return run_spec(spec)


def data_hash(spec: PipelineSpec) -> str:
    """The hash of the data step (its config's text); "" without one. Every stage's hash
    includes it."""
    return _digest(Path(spec.data).read_text()) if spec.data else ""


def _data_fresh(spec: PipelineSpec) -> bool:
    """Whether the data step's output was made from this data config (its stamp's hash)."""
    stamp = Path(yaml.safe_load(Path(spec.data).read_text())["out"]) / STAMP
    return stamp.exists() and json.loads(stamp.read_text())["hash"] == data_hash(spec)


def selects(spec: PipelineSpec, name: str, variant: Variant | None = None) -> bool:
    """Whether ``only`` selects the stage or run ``name`` (``dvpo/seed0``): by its full name,
    its name before ``/``, or (a grid point) its method's name."""
    only = spec.only
    return (not only or name in only or name.split("/")[0] in only
            or (variant is not None and variant.method.name in only))


def _kind(config: str) -> str:
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
    return "dpo" if str(model.get("class_path", "")).endswith("DPOModule") else "rl"


def build_jobs(spec: PipelineSpec, variants: list[Variant]) -> list[Job]:
    """Every stage-1 and method job of ``spec`` in run order, with its hash (what decides
    reuse: config text, arguments, data and the hashes of the stage-1 artifacts it reads) and
    dependencies. Reads configs only; writes nothing."""
    upstream = data_hash(spec)
    runs_dir, group = spec.runs_dir, spec.group
    declared = [Stage(s.name, s.config, s.artifact, s.args) for s in spec.stages]
    # seed → (declared artifact → this seed's copy); one entry, the identity, when stage 1 is
    # trained once
    scopes = {s: {st.artifact: f"{runs_dir}/{st.name}/seed{s}/model" for st in declared}
              for s in spec.seeds} if spec.seed_scope == "pipeline" else {None: {}}
    kinds = {m.config: _kind(m.config) for m in spec.methods}
    jobs: list[Job] = []
    for seed, artifacts in scopes.items():
        hashes: dict[str, str] = {}  # declared artifact → the hash of the stage that makes it
        makers: dict[str, str] = {}  # declared artifact → the name of the stage that makes it
        for raw in declared:
            stage = (own_dirs(raw) if seed is None else
                     relink(seeded_stage(raw.name, raw.config, seed, runs_dir,
                                         list(raw.args or []), group, "stage1"), artifacts))
            read = reads(raw, hashes)
            h = _stage_hash(stage, _digest(upstream, *(hashes[a] for a in read)))
            hashes[raw.artifact], makers[raw.artifact] = h, stage.name
            jobs.append(Job(stage, h, [makers[a] for a in read], selects(spec, stage.name),
                            seed=seed))
        for variant, s, raw in method_stages(variants, spec.seeds if seed is None else [seed],
                                             runs_dir, spec.common_args, group):
            # a method depends on the stage-1 artifacts it reads, not on the others'
            read = reads(raw, hashes)
            stage = raw if seed is None else relink(raw, artifacts)
            h = _stage_hash(stage, _digest(upstream, *(hashes[a] for a in read)))
            jobs.append(Job(stage, h, [makers[a] for a in read],
                            selects(spec, stage.name, variant), method=True, seed=s,
                            kind=kinds[variant.method.config], variant=variant))
    return jobs


def _data_step(spec: PipelineSpec, done: dict[str, dict]) -> None:
    data_out = yaml.safe_load(Path(spec.data).read_text())["out"]
    t0 = time.time()
    forced = spec.force and (not spec.only or "data" in spec.only)  # --only limits --force too
    if forced or not _data_fresh(spec):
        print(f"[pipeline] data: generating {data_out}", flush=True)
        if spec.in_process:
            from dvpo_lightning.commands.data import main as data_main

            data_main(["--config", spec.data])
        else:
            subprocess.run([sys.executable, "-m", "dvpo_lightning", "data", "--config",
                            spec.data], check=True)
        (Path(data_out) / STAMP).write_text(json.dumps({"hash": data_hash(spec)}))
        done["data"] = {"status": "ran", "seconds": round(time.time() - t0, 1)}
    else:
        done["data"] = {"status": "reused", "seconds": 0.0}
        print(f"[pipeline] data: reusing {data_out}", flush=True)


def variant_table(variants: list[Variant]) -> dict[str, dict]:
    """``{run name: {"method": method name, "point": {axis: value}}}``: what the report's
    JSON gets as ``variants``, so a table can group the grid points of one method."""
    return {v.name: {"method": v.method.name, "point": dict(v.point)} for v in variants}


def plan_jobs(spec: PipelineSpec, variants: list[Variant]) -> list:
    """The dry run's list: :func:`~dvpo_lightning.commands.pipeline_plan.plan` of every job
    of ``spec``, with this module's reuse and resume checks; nothing runs or is written."""
    from dvpo_lightning.commands.pipeline_plan import plan

    return plan(spec, build_jobs(spec, variants), bool(spec.data) and _data_fresh(spec),
                _resumable)


def _run_jobs(jobs: list[Job], spec: PipelineSpec, done: dict[str, dict],
              prefetch: Prefetch | None = None) -> None:
    if spec.workers > 1:
        run_parallel(jobs, spec.workers, spec.force, done, prefetch)
    else:
        for job in jobs:
            if job.selected:
                _run_or_reuse(job.stage, job.hash, spec.force, spec.in_process, done)


def run_spec(spec: PipelineSpec, source: str = "pipeline arguments") -> dict:
    """:func:`run_pipeline` of a checked specification: the tuning runs first when a method
    has ``tune`` axes (:mod:`~dvpo_lightning.commands.pipeline_tune`), then every main run."""
    variants = expand(spec, source)
    tune = tuning_variants(spec, source)
    clash = {v.name for v in tune} & {v.name for v in variants}
    if clash:
        raise PipelineSpecError(f"{source}: tune: the tuning runs {sorted(clash)} have the "
                                "names of main runs. Rename a tune axis")
    tune_spec = tuning_spec(spec, tune)
    chosen = choose(spec, tune) if tune else None
    if spec.dry_run:
        from dvpo_lightning.commands.pipeline_plan import print_plan

        if tune:
            print(f"[plan] phase 1: tuning on the validation prompts, seeds "
                  f"{tuning_seeds(spec)}", flush=True)
            print_plan(plan_jobs(tune_spec, tune), replace(tune_spec, report=None), source)
            print("[plan] phase 2: the main runs, "
                  + ("with the points chosen: " + ", ".join(
                      f"{m} {c['name']}" for m, c in chosen.items()) if chosen else
                     f"each tuned key {UNCHOSEN} after phase 1; the stage-1 jobs of the "
                     "tuning seeds are phase 1's, reused"), flush=True)
        print_plan(plan_jobs(spec, with_choice(variants, chosen)), spec, source)
        return {}
    # every config is read before anything runs
    tune_jobs = build_jobs(tune_spec, tune) if tune else []
    done: dict[str, dict] = {}
    if spec.data:
        _data_step(spec, done)
    if tune:
        _run_jobs(tune_jobs, tune_spec, done)
        chosen = choose(spec, tune)
        if chosen is None:  # (--only left some out)
            raise RuntimeError(f"pipeline: tuning runs are missing under {spec.runs_dir}; run "
                               "them first (--only the tuned methods) before the main runs")
        print(f"[pipeline] tuning: {write_choice(spec, tune, chosen)}: " + ", ".join(
            f"{m} → {c['name']} (validation gold {c['gold']['mean']:.4f})"
            for m, c in chosen.items()), flush=True)
        variants = with_choice(variants, chosen)
    report = spec.report if not spec.skip_report else None
    runs = {v.name: {s: f"{spec.runs_dir}/{v.name}/seed{s}/model" for s in spec.seeds}
            for v in variants}
    if report and spec.seed_scope == "pipeline":
        report = per_seed(report, {s: {st.artifact: f"{spec.runs_dir}/{st.name}/seed{s}/model"
                                       for st in spec.stages} for s in spec.seeds})
    _run_jobs(build_jobs(spec, variants), spec, done,
              Prefetch.for_report(report, runs) if report else None)
    if report:
        from dvpo_lightning.report.build import build_report

        t0 = time.time()
        extra = {}
        if any(v.point for v in variants):
            extra["variants"] = variant_table(variants)
        if tune:
            extra["tuning_runs"] = {v.name: {s: f"{spec.runs_dir}/{v.name}/seed{s}/model"
                                             for s in tuning_seeds(spec)} for v in tune}
            extra["tuning_choice"] = {"points": variant_table(tune), "chosen": chosen}
        paths = build_report(runs=runs, **{"group": spec.group, **report, **extra})
        _add_variants(Path(report.get("out", "runs/report")) / "report.json", variants,
                      tune, chosen)
        done["report"] = {"status": "ran", "seconds": round(time.time() - t0, 1)}
        print(f"[pipeline] report: {len(paths)} files in {report.get('out')}", flush=True)
    return done


def _add_variants(path: Path, variants: list[Variant], tune: list[Variant] | None = None,
                  chosen: dict | None = None) -> None:
    """Put :func:`variant_table` into the report's JSON as ``variants`` (when grids made
    several runs of a method), and the tuning points and choice as ``tuning``."""
    if path.exists() and (any(v.point for v in variants) or tune):
        doc = json.loads(path.read_text())
        if any(v.point for v in variants):
            doc["variants"] = variant_table(variants)
        if tune:
            doc["tuning"] = {"points": variant_table(tune), "chosen": chosen}
        path.write_text(json.dumps(doc, indent=2))


def load_file(path: str, **overrides) -> PipelineSpec:
    """The checked specification of the pipeline YAML ``path`` (``overrides`` win); the W&B
    group defaults to the file's name."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a pipeline file must be a mapping of run_pipeline's "
                         f"arguments, got {type(raw).__name__}. Start from configs/pipeline.yaml")
    return parse_spec({"group": Path(path).stem, **raw, **overrides}, source=path)


def run_pipeline_file(path: str, **overrides) -> dict:
    """:func:`run_pipeline` with the arguments of a pipeline YAML (``overrides`` win); the W&B
    group defaults to the file's name."""
    return run_spec(load_file(path, **overrides), source=path)


def _config_files(args: list[str]) -> list[str]:
    """The files of every ``--config FILE`` / ``--config=FILE`` in ``args``."""
    out = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    out += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    return out


def main(args: list[str]) -> None:
    """``--config FILE`` loads a pipeline file as the arguments of :func:`run_pipeline`; the
    file is checked first, so a mistake in it is reported with its name and key path, then
    the file and the command line together."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    files = _config_files(args)
    for path in files:
        if Path(path).is_file():
            expand(load_file(path), path)
    parser = ArgumentParser(prog="python -m dvpo_lightning pipeline",
                            description="run the whole study: data, stage 1, every method "
                                        "x grid point x seed, the report")
    parser.add_argument("--config", action=ActionConfigFile, help="a pipeline file")
    parser.add_function_arguments(run_pipeline, as_group=False)
    kwargs = parser.parse_args(args).as_dict()
    kwargs.pop("config", None)
    source = " + ".join([*files, "command line"]) if len(args) > 2 * len(files) else (
        " + ".join(files) or "command line")
    report = run_spec(parse_spec(kwargs, source), source)
    if report:
        print("[pipeline] " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)"
                                        for k, v in report.items()))
