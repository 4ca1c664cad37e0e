"""The report's value-model measurements, made by the pipeline's workers while the study runs.

The report measures every stage-1 GVM and reward model, and every critic a run exports, on the
held-out pairs (:func:`~dvpo_lightning.report.value_accuracy.cached_pair_accuracies`). Alone at
the end that is serial work with the other workers idle (most of the default study's 22 report
seconds on 2 cores). A :class:`Prefetch` hands each model to a free worker as soon as the stage
that writes it has finished, after every stage that is ready to run (it never delays a stage),
and the measurement lands in the report's cache; the report then reads it. The key of a
cached result includes the thread count and kernels it was computed with, so the report uses
a worker's number only where it would have computed the same digits itself (``scripts/run.sh``
gives every process one thread); elsewhere it measures again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Prefetch:
    """Value-model directories to measure once they exist, and where the results go."""

    dirs: list[str]
    """Every directory the report would measure (those that never appear are skipped)."""
    pairs: list[str]
    """The held-out pairs files (in distribution, shifted)."""
    cache_dir: str
    """The report's cache directory."""
    sent: set[str] = field(default_factory=set)

    @classmethod
    def for_report(cls, report: dict, runs: dict[str, dict[int, str]]) -> Prefetch | None:
        """The prefetch of a pipeline's ``report`` section (its per-seed paths resolved) for
        the method runs ``runs``; None when the report measures no value model."""
        from dvpo_lightning.report.build import CACHE, value_model_dirs

        pairs = [p for p in (report.get("eval_pairs"), report.get("shifted_pairs")) if p]
        if not pairs:
            return None
        dirs = value_model_dirs(runs, report.get("gvm"), report.get("reward_model"))
        return cls(dirs, pairs, str(Path(report.get("out", "runs/report")) / CACHE))

    def ready(self, made: set[str]) -> list[str]:
        """The directories, not handed out yet, that hold a value model and are (or are
        inside) an artifact in ``made``, the artifacts of the stages that have finished: a
        model a stage is about to rewrite is not measured."""
        from dvpo_lightning.models.value_model import HEAD_WEIGHTS

        made_paths = {Path(a) for a in made}
        new = [d for d in dict.fromkeys(self.dirs)  # (the file-system check last: a large
               if d not in self.sent  # study lists a thousand directories, most not made yet)
               and made_paths & {Path(d), *Path(d).parents}
               and (Path(d) / HEAD_WEIGHTS).exists()]
        self.sent.update(new)
        return new


def measure(model_dir: str, pairs: list[str], cache_dir: str) -> str | None:
    """Run in a worker: the model's pair accuracies into the cache. A failure is returned as
    its message, not raised: the report measures that model again and reports the error."""
    try:
        from dvpo_lightning.report.value_accuracy import cached_pair_accuracies

        cached_pair_accuracies(model_dir, pairs, cache_dir)
        return None
    except Exception as e:  # noqa: BLE001 (the report repeats it and shows it)
        return f"{type(e).__name__}: {e}"
