"""``python -m dvpo_lightning sweep FILE``: run a W&B sweep file locally, without a W&B server.

    python -m dvpo_lightning sweep configs/sweeps/kl.yaml [--out runs/sweeps/kl]
        [--max_trials N] [--parallel K] [--seed S] [--extra_args --trainer.max_steps=8 ...]

The file is the one ``wandb sweep`` takes. Each trial runs the file's ``command`` with the
argument list a W&B agent builds (:func:`~dvpo_lightning.commands.sweep.spec.agent_args`), then
``--extra_args``, then the trial's own directories (``--trainer.default_root_dir`` and
``--model.init_args.export_dir`` under ``<out>/trial-NNN``, so trials never overwrite each
other or the pipeline's artifacts). Every trial is an ordinary W&B run (offline without an API
key), all in one W&B group (``WANDB_RUN_GROUP``). A failed trial is recorded and the sweep
goes on; ``<out>/sweep_state.json`` lets a rerun skip finished trials (failed or interrupted
ones run again). At the end: ``results.md``, ``results.json`` and ``reward_kl.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dvpo_lightning.commands.sweep.report import plot_frontier, trial_results, write_table
from dvpo_lightning.commands.sweep.spec import (  # noqa: F401 - agent_args: part of this module's API
    SweepConfigError,
    agent_args,
    expand_trials,
    load_sweep,
    trial_command,
)

STATE_FILE = "sweep_state.json"
# Per-process W&B state a trial must not inherit: a parent's wandb-core service (its runs
# could be cut short when the trial exits) or a parent run's id (all trials would be one run).
PARENT_WANDB_VARS = ("WANDB_SERVICE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SWEEP_ID",
                     "WANDB_SWEEP_PARAM_PATH")


class SweepState:
    """``sweep_state.json``: the sweep's group and each trial's params, status and return code.

    Written after every change (atomically), so an interrupted sweep can be resumed.
    """

    def __init__(self, path: Path, sweep_file: str, group: str, trials: list[dict]) -> None:
        self.path, self._lock = path, threading.Lock()
        old = json.loads(path.read_text()) if path.is_file() else None
        self.data = {"sweep_file": sweep_file, "group": group, "trials": {}}
        if old is not None:
            self.data["group"] = old["group"]
            for tid, t in old["trials"].items():
                self.data["trials"][tid] = t
        for i, params in enumerate(trials):
            tid = f"trial-{i:03d}"  # sorts in order up to 1000 trials
            known = self.data["trials"].get(tid)
            if known is not None and known["params"] != params:
                raise SweepConfigError(
                    f"{path}: {tid} was run with {known['params']}, the sweep now gives "
                    f"{params}; the sweep file or --seed changed. Use another --out")
            if known is None:
                self.data["trials"][tid] = {"params": params, "status": "pending",
                                            "attempts": 0}
        self.save()

    @property
    def group(self) -> str:
        return self.data["group"]

    def update(self, tid: str, **fields) -> None:
        with self._lock:
            self.data["trials"][tid].update(fields)
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def run_trial(tid: str, command: list[str], trial_dir: Path, state: SweepState,
              env: dict) -> None:
    """One trial as a subprocess, its output in ``<trial_dir>/trial.log``."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    attempts = state.data["trials"][tid]["attempts"] + 1
    state.update(tid, status="running", attempts=attempts, command=command)
    print(f"[sweep] {tid}: {' '.join(command)}", flush=True)
    start = time.time()
    with open(trial_dir / "trial.log", "w") as log:
        rc = subprocess.run(command, env={**env, "WANDB_NAME": tid}, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    status = "finished" if rc == 0 else "failed"
    state.update(tid, status=status, returncode=rc, seconds=round(time.time() - start, 1))
    tail = "" if rc == 0 else f" (exit {rc}; see {trial_dir / 'trial.log'})"
    print(f"[sweep] {tid}: {status}{tail}", flush=True)


def run_sweep(sweep_file: str, out: str | None = None, max_trials: int | None = None,
              parallel: int = 1, seed: int = 0, extra_args: list[str] | None = None,
              python: str | None = None) -> dict:
    """Run (or resume) every trial of a grid or random sweep file; returns ``results.json``'s
    content. See the module docstring."""
    spec = load_sweep(sweep_file)
    out_dir = Path(out or Path("runs") / "sweeps" / Path(sweep_file).stem).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = expand_trials(spec, max_trials=max_trials, seed=seed)
    group = f"{spec.get('name') or Path(sweep_file).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    state = SweepState(out_dir / STATE_FILE, str(sweep_file), group, trials)
    env = {k: v for k, v in os.environ.items() if k not in PARENT_WANDB_VARS}
    env.update(WANDB_RUN_GROUP=state.group, WANDB_JOB_TYPE="sweep-trial")
    if spec.get("project"):
        env["WANDB_PROJECT"] = spec["project"]
    ids = [f"trial-{i:03d}" for i in range(len(trials))]  # not those beyond --max_trials
    todo = []
    for tid in ids:
        t = state.data["trials"][tid]
        if t["status"] == "finished":
            print(f"[sweep] {tid}: finished before, not rerun", flush=True)
            continue
        trial_dir = out_dir / tid
        command = [*trial_command(spec, t["params"], python or sys.executable),
                   *(extra_args or []), f"--trainer.default_root_dir={trial_dir}",
                   f"--model.init_args.export_dir={trial_dir / 'model'}"]
        todo.append((tid, command, trial_dir))
    print(f"[sweep] {len(trials)} trials, {len(todo)} to run, group {state.group}, "
          f"out {out_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for f in [pool.submit(run_trial, *job, state, env) for job in todo]:
            f.result()

    metric, goal = spec["metric"]["name"], spec["metric"]["goal"]
    rows = []
    for tid in ids:
        t = state.data["trials"][tid]
        row = {"trial": tid, "status": t["status"], "params": t["params"],
               "returncode": t.get("returncode")}
        if t["status"] == "finished":
            row.update(trial_results(out_dir / tid, metric))
        rows.append(row)
    params = list(spec["parameters"])
    md, js = write_table(rows, params, metric, goal, out_dir)
    png = plot_frontier(rows, params, metric, goal, out_dir / "reward_kl.png")
    failed = [r["trial"] for r in rows if r["status"] != "finished"]
    print(md.read_text(), flush=True)
    print(f"[sweep] table {md} and {js}" + (f", plot {png}" if png else ", no plot (no trial "
          "with gold reward and KL)") + (f"; failed: {', '.join(failed)}" if failed else ""),
          flush=True)
    return json.loads(js.read_text())


def main(argv: list[str]) -> None:
    """``python -m dvpo_lightning sweep``: parse the arguments and :func:`run_sweep`."""
    p = argparse.ArgumentParser(
        prog="python -m dvpo_lightning sweep",
        description="Run a W&B sweep file (grid or random) locally: one `fit` per trial, "
                    "offline W&B runs in one group, a results table and a reward–KL plot.")
    p.add_argument("sweep_file", help="a W&B sweep YAML, e.g. configs/sweeps/kl.yaml")
    p.add_argument("--out", help="sweep directory (default: runs/sweeps/<file stem>)")
    p.add_argument("--max_trials", type=int, help="run at most this many trials")
    p.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    p.add_argument("--seed", type=int, default=0, help="seed of a random search's draws")
    p.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[],
                   help="everything after it is appended to each trial's command "
                        "(e.g. --trainer.max_steps=8); must come last")
    a = p.parse_args(argv)
    try:
        run_sweep(a.sweep_file, a.out, a.max_trials, a.parallel, a.seed, a.extra_args)
    except SweepConfigError as err:
        p.error(str(err))
