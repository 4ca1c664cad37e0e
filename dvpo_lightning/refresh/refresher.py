"""Refresh a frozen scorer from new labels between RL steps: semi-online DVPO, and the same for
the reward model of PPO and the other reward-model methods (docs/semi-online.md).

After every ``refresh.every``-th RL step: draw fresh prompts, sample two responses to each from
the current policy, have them labelled, measure the scorer's pair accuracy on them (the drift
the refresh is about to correct), fine-tune it for ``refresh.steps`` AdamW steps on the
labelled buffer mixed with a replay of its stage-1 data (:mod:`~dvpo_lightning.refresh.
objectives`: the GVM's regression, the reward model's Bradley–Terry loss), measure again (what
the refresh bought), and freeze it again. Between refreshes the RL step is unchanged; with the
refresh off nothing here runs and no random stream is touched.

Over several processes every rank labels its own share of the prompts, the rows are gathered
so every rank holds the one-process buffer, and rank 0's fine-tuned weights are broadcast, so
every rank's scorer stays the same.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dvpo_lightning.data.collate import collate_prompt_response, pad_left
from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.value_model import freeze
from dvpo_lightning.refresh.buffer import LabelledBuffer, LabelledRow
from dvpo_lightning.refresh.labellers import Labeller
from dvpo_lightning.refresh.objectives import GVMObjective, RewardObjective
from dvpo_lightning.refresh.settings import RefreshSettings
from dvpo_lightning.rollout.generation import Samples
from dvpo_lightning.rollout.gold import decoded
from dvpo_lightning.rollout.scoring import response_values
from dvpo_lightning.runtime.distributed import rank_and_world
from dvpo_lightning.runtime.timing import phase_clock

Prompt = tuple[list[int], object]
"""A fresh prompt: its token ids and its raw form (what the labeller reads)."""

Sampler = Callable[[Tensor, Tensor, Sequence[int]], Samples]
"""``(prompt_ids, prompt_mask, seeds) ↦ samples`` of the current policy (the rollout's engine
and sampling settings; row ``r`` drawn from ``seeds[r]`` alone)."""

class Refresher:
    """The refresh: its settings, labeller, objective, random stream, labelled buffer and
    optimizer.

    Args:
        settings: when, from how many labels and how hard to refresh.
        labeller: who labels.
        objective: what is trained and how (:class:`GVMObjective` for DVPO's GVM,
            :class:`RewardObjective` for a reward model); its ``role`` names the frozen model.
    """

    def __init__(self, settings: RefreshSettings, labeller: Labeller,
                 objective: GVMObjective | RewardObjective) -> None:
        self.settings, self.labeller, self.objective = settings, labeller, objective
        self.rng = random.Random(settings.seed)
        self.buffer = LabelledBuffer()
        self.labels_used = 0
        self.history: list[dict[str, float]] = []
        self.prompts: list[Prompt] = []
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
        if not prompts:
            raise ValueError("model.init_args.refresh: no fresh prompt to sample from. Fix: set "
                             "model.init_args.refresh.prompts_path to a file with prompts")
        if self.settings.replay and not replay:
            raise ValueError("model.init_args.refresh.replay_path: no row fits the run's length "
                             "(data.init_args.max_prompt_length + rollout.max_new_tokens). Fix: "
                             "give rows that fit, or set model.init_args.refresh.replay=0")
        self.prompts, self.replay = prompts, replay

    def due(self, step: int) -> bool:
        """A refresh follows RL step ``step``."""
        s = self.settings
        return s.every > 0 and step % s.every == 0 and s.labels_next(self.labels_used) > 0

    # ------------------------------------------------------------------ one refresh
    def __call__(self, model: nn.Module, sample: Sampler, tokenizer, end_ids: Sequence[int],
                 step: int, device: torch.device) -> dict[str, float]:
        """Refresh ``model`` (the frozen ``role``) in place after RL step ``step``; returns the
        refresh's log."""
        s = self.settings
        rank, world = rank_and_world()
        labels = s.labels_next(self.labels_used)
        n_prompts = s.prompts_for(labels)
        if n_prompts < world:
            raise ValueError(f"model.init_args.refresh.labels={labels} gives {n_prompts} prompts "
                             f"for {world} processes. Fix: at least one prompt per process")
        # one shared stream: every rank draws the same numbers and takes its own share, so
        # each prompt's responses and labels are what one process would have drawn
        picks = [self.rng.randrange(len(self.prompts)) for _ in range(n_prompts)]
        seeds = [self.rng.getrandbits(31) for _ in range(2 * n_prompts)]
        z = [self.rng.gauss(0.0, 1.0) for _ in range(2 * n_prompts)]
        mine = list(range(rank, n_prompts, world))
        t0 = phase_clock(device)
        prompts = [self.prompts[picks[i]] for i in mine for _ in range(2)]
        prompt_ids, prompt_mask = pad_left([ids for ids, _ in prompts], tokenizer.pad_token_id)
        samples = sample(prompt_ids.to(device), prompt_mask.to(device),
                         [seeds[2 * i + j] for i in mine for j in range(2)])
        t1 = phase_clock(device)
        responses, texts, finished = decoded(tokenizer, samples.response_ids,
                                             samples.response_mask, end_ids)
        scores = self.labeller.label([raw for _, raw in prompts], texts, finished, step,
                                     [z[2 * i + j] for i in mine for j in range(2)])
        t2 = phase_clock(device)
        rows = _gather(self._rows(step, prompts, texts, responses, scores), mine)
        fresh = collate_prompt_response([r.prompt_ids for r in rows],
                                        [r.response_ids for r in rows], tokenizer.pad_token_id)
        fresh = {k: v.to(device) for k, v in fresh.items()}
        pairs = _pairs([r.label for r in rows])
        how = self.objective.aggregation
        before = pair_accuracy(model, fresh, pairs, how)
        self.buffer.add([r for r in rows if not math.isnan(r.target)])  # (a tied pair)
        loss = self.train(model, tokenizer.pad_token_id, device)
        after = pair_accuracy(model, fresh, pairs, how)
        t3 = phase_clock(device)
        self.labels_used += labels
        log = {"refresh/pair_acc_before": before, "refresh/pair_acc_after": after,
               "refresh/pairs": float(len(pairs)), "refresh/labels": float(labels),
               "refresh/labels_used": float(self.labels_used),
               "refresh/label_mean": sum(r.label for r in rows) / len(rows),
               "refresh/loss": loss, "refresh/generate_s": t1 - t0, "refresh/label_s": t2 - t1,
               "refresh/train_s": t3 - t2, "refresh/seconds": t3 - t0}
        self.history.append({"step": float(step), **log})
        return log

    def _rows(self, step: int, prompts: list[Prompt], texts: list[str],
              responses: list[list[int]], scores: list[float]) -> list[LabelledRow]:
        """The labelled rows of this rank's responses (two per prompt, in order): the label as
        the return (``kind: scores``), or the pair's returns (``kind: pairs``; a tie: NaN,
        not trained on)."""
        s = self.settings
        out = []
        for i in range(0, len(texts), 2):
            a, b = scores[i], scores[i + 1]
            if s.kind == "scores":
                targets = (a, b)
            elif a == b:
                targets = (float("nan"), float("nan"))
            else:
                hi, lo = s.chosen_return, s.rejected_return
                targets = (hi, lo) if a > b else (lo, hi)
            for j in (i, i + 1):
                out.append(LabelledRow(step, prompts[j][1], texts[j], list(prompts[j][0]),
                                       responses[j], scores[j], targets[j - i]))
        return out

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
        dict holds those): the labels so far, the stream, the optimizer, the history."""
        opt = (self._optimizer.state_dict() if self._optimizer is not None
               else self._optimizer_state)
        return {"labels_used": self.labels_used, "rng": self.rng.getstate(),
                "buffer": self.buffer.state_dict(), "optimizer": opt,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.labels_used = state["labels_used"]
        self.rng.setstate(_as_state(state["rng"]))
        self.buffer.load_state_dict(state["buffer"])
        self._optimizer, self._optimizer_state = None, state["optimizer"]
        self.history = list(state["history"])

    def summary(self) -> dict:
        """The run's refreshes: settings, labels used, and each refresh's log."""
        s = self.settings
        return {"model": self.role, "every": s.every, "labels_per_refresh": s.labels,
                "budget": s.budget,
                "kind": s.kind, "labeller": self.labeller.name, "noise": self.labeller.noise,
                "labels_used": self.labels_used, "refreshes": len(self.history),
                "history": self.history}


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


def _pairs(labels: list[float]) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` row indices of the two responses to each prompt (rows ``2i``,
    ``2i + 1``), the larger label chosen; ties dropped."""
    out = []
    for i in range(0, len(labels), 2):
        a, b = labels[i], labels[i + 1]
        if a != b:
            out.append((i, i + 1) if a > b else (i + 1, i))
    return out


def _gather(rows: list[LabelledRow], mine: list[int]) -> list[LabelledRow]:
    """Every rank's rows (two per prompt; ``mine``: this rank's prompts' positions in the
    refresh's draw) in draw order, as one process would have them (one process: ``rows``)."""
    _, world = rank_and_world()
    if world == 1:
        return rows
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (mine, rows))
    placed = {}
    for positions, part in gathered:
        for k, i in enumerate(positions):
            placed[i] = part[2 * k:2 * k + 2]
    return [r for i in sorted(placed) for r in placed[i]]


def _broadcast(params: list[nn.Parameter]) -> None:
    """Rank 0's values of ``params`` on every rank (one process: nothing)."""
    if rank_and_world()[1] > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def _as_state(state) -> tuple:
    """``random.Random.getstate()`` back from a checkpoint (lists where it had tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
