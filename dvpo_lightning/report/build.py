"""The study report: every table, plot and token-value picture of one pipeline run.

``build_report`` reads the RL runs' summaries and the stage-1 artifacts and writes, into
``out``: ``report.md`` and ``report.json`` (the tables, every run's raw numbers, and the
environment that made them: packages, torch's CPU kernels, threads, commit),
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
from dvpo_lightning.report import gvm_quality, plots, tables
from dvpo_lightning.report.explain import write_token_values
from dvpo_lightning.report.runs import by_method, load_runs
from dvpo_lightning.report.value_accuracy import cached_pair_accuracies
from dvpo_lightning.runtime.environment import describe_environment, environment_markdown

CONVENTION = ("Every ± in this report, and every band in its plots, is the half-width of the "
              "95 % Student-t interval over seeds, t_{0.975, n−1} · sd / √n (a paired "
              "difference's: over the per-seed differences). Every p-value is a two-sided "
              "paired t-test, shown raw and Holm-adjusted over all the report's comparisons.")


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} " \
           "torch threads)"


EXPORTED_VALUE_MODELS = {"critic": "critic of {} (A/C)", "gvm": "GVM refreshed by {}",
                         "reward_model": "ScalarRM refreshed by {}"}
"""Value models an RL run may export beside its policy (sub-directory: row label by method)."""

CACHE = "cache/pair_accuracy"
"""Where, under a report's ``out``, the value models' pair accuracies are kept
(:func:`~dvpo_lightning.report.value_accuracy.cached_pair_accuracies`)."""


def value_model_dirs(runs: dict[str, dict[int, str]], gvm=None, reward_model=None) -> list[str]:
    """Every directory whose pair accuracy :func:`build_report` would measure with these
    arguments, once it exists: the stage-1 GVMs and reward models, and whatever value models
    the runs export (:data:`EXPORTED_VALUE_MODELS`). What the pipeline measures early."""
    return [*_by_seed(gvm).values(), *_by_seed(reward_model).values(),
            *(str(Path(a) / sub) for by_seed in runs.values() for a in by_seed.values()
              for sub in EXPORTED_VALUE_MODELS)]


def _by_seed(artifact: str | dict | None) -> dict:
    """A stage-1 artifact as ``{seed: path}``: one path (trained once) is ``{None: path}``."""
    if artifact is None:
        return {}
    return dict(artifact) if isinstance(artifact, dict) else {None: artifact}


def build_report(runs: dict[str, dict[int, str]], out: str = "runs/report",
                 gvm: str | dict[int, str] | None = None,
                 reward_model: str | dict[int, str] | None = None,
                 eval_pairs: str | None = None, shifted_pairs: str | None = None,
                 compare: str | None = "dvpo", baseline: str | None = "ppo",
                 gvm_sweep: dict[str, str | dict[int, str]] | None = None,
                 examples: int = 4, color_by: str = "delta", wandb: bool = True,
                 group: str | None = None, reference: str = "SFT",
                 fair: dict | None = None, variants: dict[str, dict] | None = None,
                 tuning_runs: dict[str, dict[int, str]] | None = None,
                 tuning_choice: dict | None = None,
                 refresh_against: dict[str, str] | None = None) -> list[Path]:
    """Write the tables, plots and pictures of a study; returns the files written.

    Args:
        runs: ``{method: {seed: RL artifact directory}}``.
        out: output directory.
        gvm: the GVM artifact (pair accuracy; the token-value picture), or ``{seed: artifact}``
            when stage 1 was trained per seed.
        reward_model: the scalar reward model artifact (pair accuracy), likewise.
        eval_pairs: held-out pairs for the pair accuracies and the picture's examples.
        shifted_pairs: held-out pairs from a behaviour policy no training data came from
            (the value models' accuracy under distribution shift); None: not measured.
        compare: the method compared seed by seed with every other (the paired table).
        baseline: the method the cost ratios divide by, and whose gain the GVM-quality
            table and plot put beside DVPO's.
        gvm_sweep: ``{method: GVM artifact (or {seed: artifact})}``: DVPO runs that used
            GVMs of different quality; their gain is plotted against the GVM's pair accuracy
            (:mod:`~dvpo_lightning.report.gvm_quality`). None: no such plot.
        examples: held-out pairs shown in the token-value picture.
        color_by: colour tokens by ``delta`` (u_t − u_{t−1}) or ``value`` (u_t).
        wandb: also log everything to a W&B run (job type ``report``).
        group: the W&B run group (the pipeline passes its name).
        reference: what the runs started from, in labels (``SFT``; ``instruct model``).
        fair: the fair study's sections (:func:`~dvpo_lightning.report.fair.fair_sections`):
            ``{"reference": method, "cells": {value_scores, value_pairs, reward_scores,
            reward_pairs: method}, "long": [method, …], "against": {method: counterpart}}``;
            with ``variants`` only.
        variants: ``{run name: {"method", "point"}}`` of a gridded study (the pipeline
            passes it).
        tuning_runs: ``{tuning point: {seed: artifact}}`` (the pipeline passes it).
        tuning_choice: ``{"points", "chosen"}`` of the tuning (the pipeline passes it).
        refresh_against: ``{method that refreshed a frozen model: the same method frozen}``:
            the refresh table's paired gold difference (:func:`~dvpo_lightning.report.tables.
            refresh_table`).
    """
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    gvms, rms = _by_seed(gvm), _by_seed(reward_model)
    # method → the critics and the refreshed GVMs / reward models its runs exported
    exported: dict[str, dict[str, list[str]]] = {}
    for m, rs in by_method(loaded).items():
        for sub, label in EXPORTED_VALUE_MODELS.items():
            if dirs := [str(d) for r in rs if (d := Path(r.artifact) / sub).exists()]:
                exported.setdefault(sub, {})[label.format(m)] = dirs
    value_models = {"GVM": list(gvms.values()), "ScalarRM": list(rms.values()),
                    **{label: dirs for part in exported.values()
                       for label, dirs in part.items()}}
    files = {name: pairs for name, pairs in (("in_distribution", eval_pairs),
                                             ("shifted", shifted_pairs)) if pairs}
    # each model loaded once for both files: {label: [{pairs file: result} per model]}
    per_model = {label: [cached_pair_accuracies(d, list(files.values()), out_dir / CACHE)
                         for d in dirs]
                 for label, dirs in value_models.items() if dirs and files}
    accs: dict[str, dict[str, list[dict]]] = {
        name: {label: [r[pairs] for r in results] for label, results in per_model.items()}
        for name, pairs in files.items()}
    result = {
        "quality": tables.quality_table(loaded, reference),
        "paired": tables.paired_table(loaded, compare) if compare else None,
        "eval_noise": tables.eval_noise_table(loaded),
        "value_models": tables.value_model_table(accs.get("in_distribution", {}),
                                                 accs.get("shifted")),
        "cost": tables.cost_table(loaded, baseline),
        "convergence": tables.convergence_table(loaded, reference=reference),
        "refresh": tables.refresh_table(loaded, refresh_against),
    }
    sweep = None
    if gvm_sweep and eval_pairs:
        sweep = gvm_quality.sweep_points(loaded, {m: _by_seed(a) for m, a in gvm_sweep.items()},
                                         eval_pairs, baseline)
        result["gvm_quality"] = gvm_quality.sweep_table(sweep, baseline)
    fair_files: list[Path] = []
    fair_notes: dict[str, str] = {}
    if variants and fair is not None:
        from dvpo_lightning.report.fair import fair_sections

        fair_tables, fair_notes, fair_files = fair_sections(
            loaded, variants, out_dir, fair.get("reference", compare or "dvpo"),
            fair.get("cells"), fair.get("long"), tuning_runs, tuning_choice,
            against=fair.get("against"))
        result.update(fair_tables)
    result = {k: v for k, v in result.items() if v is not None}
    family = tables.adjust_p_values(result)  # Holm over every paired comparison above
    seeds = sorted({r.seed for r in loaded})
    machine = _machine()
    stage1 = ("retrained per seed (the pipeline's seed_scope: pipeline), so every spread "
              "includes the stage-1 draw" if len(gvms) > 1 or len(rms) > 1 else
              "trained once")
    n_pairs = {k: next(iter(v.values()))[0]["pairs"] for k, v in accs.items() if v}
    on_test = [r.on_test for r in loaded]
    if all(on_test):
        prompts = ("the test prompts (data.init_args.test_path), read once at each run's end; "
                   "curves and tuning use the validation prompts")
    elif any(on_test):
        prompts = ("held-out prompts: the test prompts where a run has them, else its last "
                   "validation")
    else:
        prompts = "held-out prompts"
    notes = {
        "quality": (f"Seeds {seeds} (sample std in report.json); stage 1 {stage1}. Final "
                    f"numbers on {prompts}; the gold scorer judges. Win rate: fraction of "
                    f"prompts where the policy's response beats the {reference} policy's "
                    f"(ties count ½). The {reference} row: every run of a seed starts from "
                    f"and evaluates that seed's {reference} policy, so its runs are averaged "
                    "first, one value per seed."),
        "paired": f"Each row pairs {compare}'s run at a seed with the other method's run at the "
                  "same seed (same data, same stage-1 models when stage 1 is per seed); mean "
                  "difference ± the 95 % paired-t interval's half-width. p: two-sided paired-t "
                  "p-value of that one comparison; p (Holm): adjusted by Holm's step-down "
                  f"method over the report's whole family of {len(family)} paired comparisons "
                  "(every p in this report), the one to read when asking whether any of them "
                  "differ. An interval that contains 0 means these seeds cannot tell the two "
                  "apart; with n seeds, 'ahead on n of n' has a chance of 1/2ⁿ under a coin flip "
                  "and is not itself a test.",
        "eval_noise": "A final evaluation is a mean over N held-out prompts; its standard error "
                      "(sd over the prompts / √N, averaged over seeds) is the noise of one "
                      "evaluation of one policy, which every seed's number and every paired "
                      "difference also carry. Against the sd between seeds it says how much of "
                      "that spread the evaluation alone would make. 'not available': the runs' "
                      "summaries predate per-prompt values (final_eval_items).",
        "value_models": (f"GVM and ScalarRM: stage 1, {stage1}, on the same data; a critic "
                         "row is each PPO run's critic at its last step, a refreshed row "
                         "each run's refreshed GVM or reward model at its last step. In "
                         "distribution: "
                         f"{n_pairs.get('in_distribution', '?')} held-out pairs of the "
                         "training behaviour policies"
                         + (f"; shifted: {n_pairs['shifted']} pairs of a behaviour policy "
                            "whose flaw no training data had" if "shifted" in n_pairs else "")
                         + "." if accs else
                         "No eval_pairs given."),
        "cost": f"Measured on {machine}, in this study. Step times exclude each run's first "
                "step (warm-up); the whole run's time includes it. An RL step is a rollout and "
                "its PPO updates, a DPO step one optimizer update on a batch of pairs (DPO "
                "generates nothing while training: its rollout columns are —); the whole-run "
                "column compares them at their policy-update budgets. On CPU, memory is the "
                "process's peak RSS, which includes the Python runtime: compare differences, "
                "not absolute values.",
        "refresh": "Per run, averaged over its refreshes, then mean ± 95 % CI over seeds. "
                   "Accuracy: the refreshed model's pair accuracy (the GVM by its token mean, "
                   "a reward model by its final score) on the pairs of each refresh's newly "
                   "labelled samples (two responses of the current policy "
                   "per fresh prompt, the better-labelled one chosen; labels carry the "
                   "annotator's noise): before the refresh, the drift it corrects; after, "
                   "what it bought on those same samples (a training-set accuracy: the "
                   "value-model table's held-out rows are the test). s / refresh: sampling, "
                   "labelling and fine-tuning together. Online DPO (a round per 'refresh'): "
                   "before is the policy's implicit-reward accuracy (log π − log π_ref, ties "
                   "½) on the round's pairs of two different answers, before it trains on "
                   "them; nothing is refreshed, so no after, and its s / round is sampling, "
                   "labelling and that measurement (the bought pairs' extra compute in each "
                   "training batch is in the cost table's training time). 'With − without': "
                   "the paired gold difference against the same method without new labels, "
                   "Holm-adjusted with the report's family.",
        "convergence": "Held-out evaluations happen every trainer.val_check_interval steps, "
                       "so a count here is a multiple of that interval; policy updates are "
                       "optimizer steps (an RL step makes several, a DPO step one).",
    }
    if sweep:
        notes["gvm_quality"] = gvm_quality.NOTE.format(baseline=baseline)
    notes.update(fair_notes)
    environment = describe_environment()  # what the numbers depend on besides code and seed
    md = [f"# Study report\n\nMethods {list(runs)}, seeds {seeds}, machine: {machine}.\n\n"
          f"{CONVENTION}\n"]
    md += [tables.to_markdown(result[k], notes[k]) for k in result]
    md.append(environment_markdown(environment))
    written = [out_dir / "report.md", out_dir / "report.json"]
    written[0].write_text("\n".join(md))
    raw = [{"method": r.method, "seed": r.seed, "artifact": r.artifact,
            "final_eval": r.final, "cost": r.summary["cost"], "rl_steps": r.summary["rl_steps"]}
           for r in loaded]
    written[1].write_text(json.dumps({"tables": result, "notes": notes, "machine": machine,
                                      "convention": CONVENTION, "comparisons": family,
                                      "environment": environment,
                                      "value_model_accuracy": accs, "gvm_sweep": sweep,
                                      "runs": raw}, indent=2))
    written += [plots.plot_learning_curves(loaded, out_dir / "learning_curves.png", reference),
                plots.plot_train_curves(loaded, out_dir / "train_curves.png"),
                plots.plot_reward_vs_kl(loaded, out_dir / "reward_vs_kl.png")]
    if sweep:
        written.append(gvm_quality.plot_sweep(sweep, out_dir / "gvm_quality.png", baseline))
    written += fair_files
    if gvms and eval_pairs and examples > 0:
        pictures = write_token_values(next(iter(gvms.values())),
                                      file_examples(eval_pairs, examples), out_dir,
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
                     job_type="report", name="report", group=group,
                     dir=str(out_dir.resolve()),  # absolute: see AutoWandbLogger.use_save_dir
                     mode=mode, reinit="finish_previous")
    payload = {}
    for f in files:
        if f.suffix == ".png":
            payload[f"report/{f.stem}"] = wandb.Image(str(f))
        elif f.suffix == ".html":
            payload[f"report/{f.stem}_html"] = wandb.Html(f.read_text())
    for key, table in result.items():
        cols = [label for _, label in table["columns"]]
        rows = [[name, *[tables.format_cell(row.get(k), tables.DIGITS.get(k, 3),
                                            table.get("interval", "ci95"))
                         for k, _ in table["columns"]]]
                for name, row in table["rows"].items()]
        payload[f"report/table_{key}"] = wandb.Table(columns=["", *cols], data=rows)
    run.log(payload)
    run.finish()
