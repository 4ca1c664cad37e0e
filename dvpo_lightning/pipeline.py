"""``python -m dvpo_lightning pipeline``: chain the stages of the embedded task.

Each stage is an ordinary ``fit`` run with its own config, so any stage can be run or changed
alone. A stage whose artifact exists and was made from the same config text (and the same
upstream artifacts) is reused; ``--force`` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

STAMP = "pipeline_stage.json"


@dataclass
class Stage:
    """One pipeline stage.

    Args:
        name: short name printed in the progress line.
        config: the stage's LightningCLI config.
        artifact: the directory the stage writes (its ``export_dir``).
        args: extra command-line overrides.
    """

    name: str
    config: str
    artifact: str
    args: list[str] | None = None


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


def _stage_hash(stage: Stage, upstream: str) -> str:
    return _digest(Path(stage.config).read_text(), json.dumps(stage.args or []), upstream)


def run_pipeline(config: str = "configs/pipeline.yaml", force: bool = False,
                 only: list[str] | None = None) -> dict:
    """Run (or reuse) the data step and every stage of ``config`` in order.

    Args:
        config: pipeline YAML with ``data`` (the data config) and ``stages`` (a list of
            ``{name, config, artifact, args}``).
        force: recompute every stage even when its artifact matches.
        only: run just these stage names (the others must already exist).

    Returns:
        ``{stage name: {"status": "ran" | "reused", "seconds": float}}``.
    """
    spec = yaml.safe_load(Path(config).read_text())
    report: dict[str, dict] = {}
    upstream = ""
    data_cfg = spec.get("data")
    if data_cfg:
        data_out = yaml.safe_load(Path(data_cfg).read_text())["out"]
        stamp = Path(data_out) / STAMP
        h = _digest(Path(data_cfg).read_text())
        t0 = time.time()
        if force or not stamp.exists() or json.loads(stamp.read_text())["hash"] != h:
            print(f"[pipeline] data: generating {data_out}", flush=True)
            subprocess.run([sys.executable, "-m", "dvpo_lightning", "data", "--config",
                            data_cfg], check=True)
            stamp.write_text(json.dumps({"hash": h}))
            report["data"] = {"status": "ran", "seconds": round(time.time() - t0, 1)}
        else:
            report["data"] = {"status": "reused", "seconds": 0.0}
            print(f"[pipeline] data: reusing {data_out}", flush=True)
        upstream = h
    for raw in spec["stages"]:
        stage = Stage(**raw)
        h = _stage_hash(stage, upstream)
        upstream = _digest(upstream, h)
        if only and stage.name not in only:
            continue
        stamp = Path(stage.artifact) / STAMP
        fresh = stamp.exists() and json.loads(stamp.read_text()).get("hash") == h
        t0 = time.time()
        if fresh and not force:
            report[stage.name] = {"status": "reused", "seconds": 0.0}
            print(f"[pipeline] {stage.name}: reusing {stage.artifact}", flush=True)
            continue
        print(f"[pipeline] {stage.name}: fit --config {stage.config}", flush=True)
        cmd = [sys.executable, "-m", "dvpo_lightning", "fit", "--config", stage.config,
               *(stage.args or [])]
        subprocess.run(cmd, check=True)
        if not Path(stage.artifact).exists():
            raise RuntimeError(f"stage {stage.name!r} finished but wrote no {stage.artifact}; "
                               "its config's export_dir must match the pipeline's artifact")
        stamp.write_text(json.dumps({"hash": h, "config": stage.config}))
        report[stage.name] = {"status": "ran", "seconds": round(time.time() - t0, 1)}
        print(f"[pipeline] {stage.name}: done in {report[stage.name]['seconds']} s", flush=True)
    return report


def pipeline_main(args: list[str]) -> None:
    from jsonargparse import CLI

    report = CLI(run_pipeline, args=args, as_positional=False)
    print("[pipeline] " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)"
                                    for k, v in report.items()))
