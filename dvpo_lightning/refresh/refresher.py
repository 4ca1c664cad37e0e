"""Refresh a frozen scorer from new labels between RL steps: semi-online DVPO, and the same for
the reward model of PPO and the other reward-model methods (docs/semi-online.md).

After every ``refresh.every``-th RL step: draw fresh prompts, sample two responses to each from
the current policy, have them labelled, measure the scorer's pair accuracy on them (the drift
the refresh is about to correct), fine-tune it for ``refresh.steps`` AdamW steps on the
labelled buffer mixed with a replay of its stage-1 data (:mod:`~dvpo_lightning.refresh.
objectives`: the GVM's regression, the reward model's Bradley–Terry loss), measure again (what
the refresh bought), and freeze it again. Between refreshes the RL step is unchanged; with the
refresh off nothing here runs and no random stream is touched.

Over several processes every rank holds the one-process buffer (:mod:`~dvpo_lightning.refresh.
rounds`) and rank 0's fine-tuned weights are broadcast, so every rank's scorer stays the
same.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.value_model import freeze
from dvpo_lightning.refresh.labellers import Labeller
from dvpo_lightning.refresh.objectives import GVMObjective, RewardObjective
from dvpo_lightning.refresh.rounds import LabelRounds, Prompt, Sampler
from dvpo_lightning.refresh.settings import RefreshSettings
from dvpo_lightning.rollout.scoring import response_values
from dvpo_lightning.runtime.distributed import rank_and_world
from dvpo_lightning.runtime.timing import phase_clock


class Refresher(LabelRounds):
    """The refresh: the label rounds (:class:`LabelRounds`), the objective, the replay items
    and the refreshed model's optimizer.

    Args:
        settings: when, from how many labels and how hard to refresh.
        labeller: who labels.
        objective: what is trained and how (:class:`GVMObjective` for DVPO's GVM,
            :class:`RewardObjective` for a reward model); its ``role`` names the frozen model.
    """

    settings: RefreshSettings

    def __init__(self, settings: RefreshSettings, labeller: Labeller,
                 objective: GVMObjective | RewardObjective) -> None:
        super().__init__(settings, labeller)
        self.objective = objective
        self.replay: list[tuple] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict | None = None

    @property
    def role(self) -> str:
        """The frozen model refreshed: ``gvm`` or ``reward_model``."""
        return self.objective.role

    def attach(self, prompts: list[Prompt], replay: list[tuple]) -> None:
        """The fresh prompts and the replay items (the objective's, from its stage-1 data),
        tokenised as the run's data (at set-up)."""
        self.attach_prompts(prompts)
        if self.settings.replay and not replay:
            raise ValueError("model.init_args.refresh.replay_path: no row fits the run's length "
                             "(data.init_args.max_prompt_length + rollout.max_new_tokens). Fix: "
                             "give rows that fit, or set model.init_args.refresh.replay=0")
        self.replay = replay

    def targets(self, a: float, b: float) -> tuple[float, float]:
        """The label as the return (``kind: scores``), or the pair's returns (``kind: pairs``;
        a tie: NaN, not trained on)."""
        s = self.settings
        if s.kind == "scores":
            return a, b
        if a == b:
            return float("nan"), float("nan")
        hi, lo = s.chosen_return, s.rejected_return
        return (hi, lo) if a > b else (lo, hi)

    # ------------------------------------------------------------------ one refresh
    def __call__(self, model: nn.Module, sample: Sampler, tokenizer, end_ids: Sequence[int],
                 step: int, device: torch.device) -> dict[str, float]:
        """Refresh ``model`` (the frozen ``role``) in place after RL step ``step``; returns the
        refresh's log."""
        t0 = phase_clock(device)
        bought = self.buy(sample, tokenizer, end_ids, step, device)
        t2 = phase_clock(device)
        how = self.objective.aggregation
        before = pair_accuracy(model, bought.batch, bought.pairs, how)
        self.buffer.add([r for r in bought.rows if not math.isnan(r.target)])  # (a tied pair)
        loss = self.train(model, tokenizer.pad_token_id, device)
        after = pair_accuracy(model, bought.batch, bought.pairs, how)
        t3 = phase_clock(device)
        self.labels_used += bought.labels
        log = {"refresh/pair_acc_before": before, "refresh/pair_acc_after": after,
               **bought.log("refresh", self.labels_used), "refresh/loss": loss,
               "refresh/train_s": t3 - t2,
               "refresh/seconds": t3 - t0}
        self.history.append({"step": float(step), **log})
        return log

    def train(self, model: nn.Module, pad_id: int, device: torch.device) -> float:
        """``refresh.steps`` AdamW steps of the objective on batches of the buffer mixed with
        replay (a share ``refresh.replay``); the model is frozen again after. Returns the
        mean loss (NaN when there was nothing to train on: every pair tied, no replay)."""
        s = self.settings
        n_replay = round(s.replay * s.batch_size) if self.replay else 0
        if not self.objective.from_buffer(self.buffer.rows, random.Random(0), 1):
            n_replay = s.batch_size if self.replay else 0  # (nothing usable bought yet)
            if not n_replay:
                return float("nan")
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        model.train()
        optimizer = self._optimizer_for(params)
        losses = []
        try:
            for _ in range(s.steps):
                items = (self.objective.from_buffer(self.buffer.rows, self.rng,
                                                    s.batch_size - n_replay)
                         + self.rng.choices(self.replay, k=n_replay))
                loss = self.objective.loss(model, items, pad_id, device)
                loss.backward()
                if s.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        finally:
            freeze(model)
        _broadcast(params)
        return sum(losses) / len(losses)

    def _optimizer_for(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=0.0)
            if self._optimizer_state is not None:
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        return self._optimizer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the GVM's weights (the module's state
        dict holds those): the rounds' state and the optimizer."""
        opt = (self._optimizer.state_dict() if self._optimizer is not None
               else self._optimizer_state)
        return {**super().state_dict(), "optimizer": opt}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._optimizer, self._optimizer_state = None, state["optimizer"]

    def summary(self) -> dict:
        """The run's refreshes: the model refreshed, settings, labels used, each refresh's
        log."""
        return {"model": self.role, **super().summary()}


def pair_accuracy(model: nn.Module, batch: dict[str, Tensor], pairs: list[tuple[int, int]],
                  aggregation: str = "mean") -> float:
    """The share of ``pairs`` ``(chosen row, rejected row)`` of ``batch`` whose chosen row gets
    the larger value of ``u_1 … u_T`` reduced by ``aggregation`` (``mean``: the GVM's,
    ``final``: a reward model's score; a tie counts one half; NaN without pairs)."""
    if not pairs:
        return float("nan")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        values = response_values(model, batch["prompt_ids"], batch["prompt_mask"],
                                 batch["response_ids"], batch["response_mask"])[:, 1:]
    model.train(was_training)
    c, r = [c for c, _ in pairs], [r for _, r in pairs]
    mask = batch["response_mask"]
    metric = PairAccuracy((aggregation,))
    metric.update(values[c], mask[c], values[r], mask[r])
    return float(metric.compute()[aggregation])


def _broadcast(params: list[nn.Parameter]) -> None:
    """Rank 0's values of ``params`` on every rank (one process: nothing)."""
    if rank_and_world()[1] > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
