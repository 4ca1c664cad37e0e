"""The study report: every table, plot and token-value picture of one pipeline run.

``build_report`` reads the RL runs' summaries and the stage-1 artifacts and writes, into
``out``: ``report.md`` and ``report.json`` (the four tables, and every run's raw numbers),
``learning_curves.png``, ``train_curves.png``, ``reward_vs_kl.png`` and the token-value
picture ``token_values.{html,png,csv,json}``. With ``wandb`` on, the same files go to a W&B
run (offline without an API key).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from dvpo_lightning.data.examples import file_examples
from dvpo_lightning.report import plots, tables
from dvpo_lightning.report.explain import write_token_values
from dvpo_lightning.report.runs import load_runs
from dvpo_lightning.report.value_accuracy import pair_accuracy


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} " \
           "torch threads)"


def build_report(runs: dict[str, dict[int, str]], out: str = "runs/report",
                 gvm: str | None = None, reward_model: str | None = None,
                 eval_pairs: str | None = None, critic_method: str | None = "ppo",
                 baseline: str | None = "ppo", examples: int = 4, color_by: str = "delta",
                 wandb: bool = True, group: str | None = None,
                 reference: str = "SFT") -> list[Path]:
    """Write the tables, plots and pictures of a study; returns the files written.

    Args:
        runs: ``{method: {seed: RL artifact directory}}``.
        out: output directory.
        gvm: the GVM artifact (pair accuracy; the token-value picture).
        reward_model: the scalar reward model artifact (pair accuracy).
        eval_pairs: held-out pairs for the pair accuracies and the picture's examples.
        critic_method: the method whose runs exported a trained critic (``<artifact>/critic``).
        baseline: the method the cost ratios divide by.
        examples: held-out pairs shown in the token-value picture.
        color_by: colour tokens by ``delta`` (u_t − u_{t−1}) or ``value`` (u_t).
        wandb: also log everything to a W&B run (job type ``report``).
        group: the W&B run group (the pipeline passes its name).
        reference: what the runs started from, in labels (``SFT``; ``instruct model``).
    """
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    accs = {}
    if eval_pairs:
        if gvm:
            accs["gvm"] = pair_accuracy(gvm, eval_pairs)
        if reward_model:
            accs["reward_model"] = pair_accuracy(reward_model, eval_pairs)
        critic_dirs = [Path(r.artifact) / "critic" for r in loaded if r.method == critic_method]
        accs["critics"] = [pair_accuracy(str(d), eval_pairs) for d in critic_dirs if d.exists()]
    result = {
        "quality": tables.quality_table(loaded, reference),
        "value_models": tables.value_model_table(accs.get("gvm"), accs.get("reward_model"),
                                                 accs.get("critics", [])),
        "cost": tables.cost_table(loaded, baseline),
        "convergence": tables.convergence_table(loaded, reference=reference),
    }
    seeds = sorted({r.seed for r in loaded})
    machine = _machine()
    notes = {
        "quality": f"Mean ± sample std over seeds {seeds}; held-out prompts, the gold scorer "
                   "judges. Win rate: fraction of prompts where the policy's response beats the "
                   f"{reference} policy's (ties count ½).",
        "value_models": "GVM and ScalarRM are trained once on the same data; the critic row "
                        f"is each {critic_method} run's critic at its last step. "
                        f"{accs['gvm']['pairs'] if accs.get('gvm') else '?'} held-out pairs."
                        if accs else "No eval_pairs given.",
        "cost": f"Measured on {machine}, in this study. Step times exclude each run's first "
                "step (warm-up); the whole run's time includes it. An RL step is a rollout and "
                "its PPO updates, a DPO step one optimizer update on a batch of pairs (DPO "
                "generates nothing while training: its rollout columns are —); the whole-run "
                "column compares them at their policy-update budgets. On CPU, memory is the "
                "process's peak RSS, which includes the Python runtime: compare differences, "
                "not absolute values.",
        "convergence": "Held-out evaluations happen every trainer.val_check_interval steps, "
                       "so a count here is a multiple of that interval; policy updates are "
                       "optimizer steps (an RL step makes several, a DPO step one).",
    }
    md = [f"# Study report\n\nMethods {list(runs)}, seeds {seeds}, machine: {machine}.\n"]
    md += [tables.to_markdown(result[k], notes[k]) for k in result]
    written = [out_dir / "report.md", out_dir / "report.json"]
    written[0].write_text("\n".join(md))
    raw = [{"method": r.method, "seed": r.seed, "artifact": r.artifact,
            "final_eval": r.final, "cost": r.summary["cost"], "rl_steps": r.summary["rl_steps"]}
           for r in loaded]
    written[1].write_text(json.dumps({"tables": result, "notes": notes, "machine": machine,
                                      "value_model_accuracy": accs, "runs": raw}, indent=2))
    written += [plots.plot_learning_curves(loaded, out_dir / "learning_curves.png", reference),
                plots.plot_train_curves(loaded, out_dir / "train_curves.png"),
                plots.plot_reward_vs_kl(loaded, out_dir / "reward_vs_kl.png")]
    if gvm and eval_pairs and examples > 0:
        pictures = write_token_values(gvm, file_examples(eval_pairs, examples), out_dir,
                                      color_by=color_by)
        written += [Path(p) for p in pictures.values()]
    if wandb:
        _log_to_wandb(out_dir, written, result, group)
    print(f"[report] {len(written)} files in {out_dir} ({time.time() - t0:.1f} s)")
    print("\n".join(md[1:]))
    return written


def _log_to_wandb(out_dir: Path, files: list[Path], result: dict, group: str | None) -> None:
    """One W&B run (job type ``report``) holding every picture, the HTML and the tables."""
    import wandb

    from dvpo_lightning.runtime.loggers import auto_mode

    mode, _ = auto_mode()
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dvpo_lightning"),
                     job_type="report", name="report", group=group, dir=str(out_dir),
                     mode=mode, reinit="finish_previous")
    payload = {}
    for f in files:
        if f.suffix == ".png":
            payload[f"report/{f.stem}"] = wandb.Image(str(f))
        elif f.suffix == ".html":
            payload[f"report/{f.stem}_html"] = wandb.Html(f.read_text())
    for key, table in result.items():
        cols = [label for _, label in table["columns"]]
        rows = [[name, *[tables.format_cell(row.get(k), tables.DIGITS.get(k, 3))
                         for k, _ in table["columns"]]]
                for name, row in table["rows"].items()]
        payload[f"report/table_{key}"] = wandb.Table(columns=["", *cols], data=rows)
    run.log(payload)
    run.finish()
