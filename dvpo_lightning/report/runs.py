"""The RL runs of a study, read back from their artifacts (``dvpo_artifact.json``).

Every number in the report comes from these summaries, which ``DVPOModule`` writes at the end
of ``fit``: the evaluation history (held-out gold reward, win rate, KL, length per eval
step), the per-step training curve and the cost of a step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dvpo_lightning.report.stats import summarize
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE


@dataclass
class Run:
    """One run of a method (RL, or DPO): ``method`` at ``seed``, its artifact directory and
    its summary."""

    method: str
    seed: int
    artifact: str
    summary: dict

    @property
    def history(self) -> list[dict]:
        """Held-out evaluations in RL-step order, the SFT reference as step 0."""
        return sorted(self.summary.get("history") or [], key=lambda h: h["rl_step"])

    @property
    def on_test(self) -> bool:
        """Whether the run evaluated the test prompts (``data.test_path``) at its end."""
        return bool(self.summary.get("test_eval"))

    @property
    def final(self) -> dict:
        """The run's final numbers: its test evaluation when it has one (``test_eval``), else
        its last validation (``final_eval``). Curves (``history``) stay on validation."""
        return self.summary["test_eval"] if self.on_test else self.summary["final_eval"]

    @property
    def validation(self) -> dict:
        """The run's last evaluation on the validation prompts (``final_eval``): what tuning
        may read."""
        return self.summary["final_eval"]

    @property
    def reference(self) -> dict:
        """The starting policy's evaluation on the prompts :attr:`final` uses, keyed like it
        (``eval/…``): ``reference_test_eval`` beside a test evaluation, else step 0 of the
        history."""
        ref = self.summary.get("reference_test_eval")
        if self.on_test and ref:
            return {k if k.startswith("eval/") else f"eval/{k}": v for k, v in ref.items()}
        return self.history[0]

    @property
    def final_items(self) -> dict:
        """Per-prompt values of :attr:`final` (``{key: [value per prompt]}``; empty when the
        summary predates them)."""
        key = "test_eval_items" if self.on_test else "final_eval_items"
        return self.summary.get(key) or {}

    @property
    def updates_per_step(self) -> float | None:
        """Policy (optimizer) updates per step of ``history``: an RL step is a rollout and
        every PPO mini-batch update on it, a DPO step one update; None when the summary
        predates the count."""
        updates, steps = self.summary.get("policy_updates"), self.summary.get("rl_steps")
        return updates / steps if updates and steps else None


def update_scale(runs: list[Run]) -> dict[str, float] | None:
    """``{method: policy updates per history step}`` when every run records it (then curves
    and step counts compare methods at equal numbers of policy updates), else None."""
    scale = {r.method: r.updates_per_step for r in runs}
    return None if None in scale.values() else scale


def load_runs(runs: dict[str, dict[int, str]]) -> list[Run]:
    """``{method: {seed: artifact dir}}`` → runs, in method then seed order.

    Raises a ``FileNotFoundError`` naming the run and the command that makes it when an
    artifact or its summary is missing, and a ``ValueError`` when a run has no evaluation.
    """
    out = []
    for method, seeds in runs.items():
        for seed, artifact in seeds.items():
            meta = Path(artifact) / ARTIFACT_FILE
            if not meta.exists():
                raise FileNotFoundError(
                    f"run {method} seed {seed}: {meta} does not exist; make it with "
                    f"`python -m dvpo_lightning pipeline --config <file> --only '[{method}]'`")
            summary = json.loads(meta.read_text()).get("summary")
            if not summary or not summary.get("final_eval") or not summary.get("history"):
                raise ValueError(
                    f"run {method} seed {seed}: {meta} has no held-out evaluation; the RL config "
                    "needs a validation set (data.init_args.eval_path) and "
                    "trainer.val_check_interval")
            out.append(Run(method, int(seed), str(artifact), summary))
    return out


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "ci95", "n", "values"}`` (:func:`~dvpo_lightning.report.stats.summarize`):
    ``std`` is the sample standard deviation, ``ci95`` the 95 % t-interval's half-width."""
    return summarize(values)


def by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by method, in first-seen order."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.method, []).append(r)
    return out


def convergence_step(history: list[dict], fraction: float = 0.95,
                     metric: str = "eval/gold_reward", of_gain: bool = False) -> int | None:
    """The first RL step whose held-out ``metric`` reaches ``fraction`` of the run's best.

    ``of_gain=False``: the first step with ``g ≥ fraction · max g`` (the paper's "95 % of its
    best reward"). ``of_gain=True``: of the best gain over step 0,
    ``g − g_0 ≥ fraction · (max g − g_0)``; None when the run never beats step 0.
    """
    g = [h[metric] for h in history]
    best = max(g)
    if of_gain:
        if best <= g[0]:
            return None
        target = g[0] + fraction * (best - g[0])
    else:
        target = fraction * best
    return next(h["rl_step"] for h, v in zip(history, g) if v >= target)
