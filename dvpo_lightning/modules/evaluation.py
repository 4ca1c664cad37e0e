"""The held-out evaluation of a training stage, one component the RL module and DPO both hold
and delegate to: the validation loop (the policy's rows, the reference's step-0 evaluation,
every process's rows merged, the :class:`~dvpo_lightning.rollout.evaluation.EvalHistory`,
the logged ``eval/...`` metrics), its checkpoint state (with the global RNGs the sampling
draws from), the final test evaluation, and the summary's pieces. A module keeps only what
differs: how its reference is reached and what else it validates (DPO's held-out pairs)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from dvpo_lightning.rollout.evaluation import EvalHistory, EvalRows, HeldOutEvaluator, per_item
from dvpo_lightning.rollout.zero3 import gathered_for_generation
from dvpo_lightning.runtime.checkpointing import rng_states, set_rng_states

Reference = Callable[[], contextlib.AbstractContextManager[nn.Module]]
BATCH_TENSORS = ("prompt_ids", "prompt_mask", "prompt_index")


class HeldOutEvaluation:
    """One stage's held-out evaluation (see the module docstring).

    A module calls :meth:`start` / :meth:`step` / :meth:`end` from its validation hooks,
    :meth:`test` once at the end of ``fit`` (with the datamodule's ``test_path``), puts
    :meth:`state_dict` in its checkpoint state and :meth:`restore_rng` in ``on_train_start``,
    and builds its summary from :meth:`summary`, :meth:`tables` and :meth:`line`.
    """

    def __init__(self) -> None:
        self.history = EvalHistory()
        self.test_result: dict = {}
        self._rng_to_restore: dict | None = None
        self.start()

    # ------------------------------------------------------------------ validation
    def start(self) -> None:
        """A validation begins: no rows yet."""
        self._rows, self._ref_rows = EvalRows(), EvalRows()

    def step(self, evaluator: HeldOutEvaluator, policy: nn.Module, reference: Reference,
             batch: dict, weights_version: int | None = None) -> None:
        """The policy answers ``batch``'s held-out prompts; the reference too until its
        evaluation (the curves' step 0) is recorded, judge or not."""
        answer(evaluator, policy, reference, batch, self._rows,
               self._ref_rows if self.history.reference is None else None, weights_version)

    def end(self, module: L.LightningModule, step: int) -> None:
        """Merge every process's rows (each prompt once: the means and the win rate are over
        the whole held-out set, the same on every rank), log ``eval/...`` and, outside the
        sanity check, record the validation at ``step``. Collective: every rank calls it."""
        if not self._rows:
            return
        final = not module.trainer.sanity_checking
        if self._ref_rows:
            ref_rows = self._ref_rows.gathered()  # (collective: every rank, sanity check too)
            if final and self.history.reference is None:
                self.history.set_reference(ref_rows)
        rows = self._rows.gathered()
        metrics = self.history.metrics(rows)
        for k, v in metrics.items():
            module.log(k, v, prog_bar=k == "eval/gold_reward", add_dataloader_idx=False)
        if final:
            self.history.append(step, metrics, rows)

    # ------------------------------------------------------------------ the test prompts
    def test(self, evaluator: HeldOutEvaluator, policy: nn.Module, reference: Reference,
             loader: DataLoader, device: torch.device, step: int,
             weights_version: int | None = None, samples: int | None = None) -> None:
        """The policy and the reference answer the test prompts once (``loader``: this
        process's share, numbered by test-file row), with the validation's evaluator (common
        random numbers when ``rollout.eval_seed`` is set) at ``samples`` answers per prompt
        (``rollout.test_samples``; None: the evaluator's own); the result goes into the
        summary. Collective: every rank calls it, with as many batches."""
        if samples is not None and samples != evaluator.samples:
            evaluator = copy.copy(evaluator)
            evaluator.samples = samples
        rows, ref_rows = EvalRows(), EvalRows()
        for batch in loader:
            batch = {k: v.to(device) if k in BATCH_TENSORS else v for k, v in batch.items()}
            answer(evaluator, policy, reference, batch, rows, ref_rows, weights_version)
        ref, got = ref_rows.gathered(), rows.gathered()
        history = EvalHistory()
        history.set_reference(ref)
        metrics = history.metrics(got)
        self.test_result = {
            "test_eval": {"rl_step": step, **{k: float(v) for k, v in metrics.items()}},
            "reference_test_eval": history.reference,
            "test_eval_items": per_item(got), "reference_test_eval_items": per_item(ref)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``evals`` (the history) and ``rng``: Lightning does not save the global RNGs, and
        rollouts and held-out answers without ``eval_seed`` are sampled from them."""
        return {"evals": self.history.state_dict(), "rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        """The history now; the RNGs at :meth:`restore_rng`."""
        self.history.load_state_dict(state.get("evals", {}))
        self._rng_to_restore = state.get("rng")

    def restore_rng(self) -> None:
        """Set the checkpoint's RNGs (call in ``on_train_start``: nothing may draw from them
        between there and the next sample, in the resumed run as in the uninterrupted one)."""
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        """``reference_eval``, ``final_eval``, ``history``, the per-prompt values of the last
        validation and of the reference (``final_eval_items``, ``reference_eval_items``) and,
        after :meth:`test`, ``test_eval``, ``reference_test_eval``, ``test_eval_items`` and
        ``reference_test_eval_items``."""
        h = self.history
        return {"reference_eval": h.reference, "final_eval": h.rows[-1] if h.rows else None,
                "history": h.rows, "final_eval_items": h.final_items,
                "reference_eval_items": h.reference_items, **self.test_result}

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """``eval/history``: the learning curve as a table."""
        rows = self.history.rows
        if not rows:
            return {}
        columns = list(rows[-1])
        return {"eval/history": (columns, [[r.get(c) for c in columns] for r in rows])}

    @staticmethod
    def line(summary: dict) -> str:
        """The final held-out (and test) evaluation in one printed line each."""
        ref = summary["reference_eval"]
        parts = []
        for key, what, reference in (
                ("final_eval", "final held-out evaluation", ref),
                ("test_eval", "test evaluation", summary.get("reference_test_eval"))):
            final = summary.get(key)
            if final:
                parts.append(f"{what}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in final.items() if k != "rl_step")
                    + (f" (reference gold {reference['gold_reward']:.4f})"
                       if reference and "gold_reward" in reference else ""))
        return "\n".join(parts)


def test_loader(trainer: L.Trainer) -> DataLoader | None:
    """The datamodule's test prompts (``data.test_path``: its ``heldout_test_dataloader``,
    this process's share), read now; None without them."""
    dm = trainer.datamodule
    return dm.heldout_test_dataloader() if hasattr(dm, "heldout_test_dataloader") else None


def answer(evaluator: HeldOutEvaluator, policy: nn.Module, reference: Reference, batch: dict,
           rows: EvalRows, ref_rows: EvalRows | None,
           weights_version: int | None = None) -> None:
    """``policy``'s measures of ``batch`` into ``rows``; the reference's into ``ref_rows``
    (None: not asked). Each prompt's row index keys its noise stream under ``eval_seed``."""
    prompts = (batch["prompt_ids"], batch["prompt_mask"], batch["prompts"])
    index = rows.index_of(batch, len(batch["prompts"]))
    with gathered_for_generation(policy):
        rows.add(evaluator.evaluate(policy, *prompts, weights_version=weights_version,
                                    index=index), batch)
    if ref_rows is not None:
        with reference() as ref, gathered_for_generation(ref):
            ref_rows.add(evaluator.evaluate(ref, *prompts, is_reference=True, index=index),
                         batch)
