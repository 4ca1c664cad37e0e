"""Label rounds: fresh prompts, two responses of the current policy to each, labelled by the
run's labeller — what a refresh of a frozen scorer (:mod:`~dvpo_lightning.refresh.refresher`)
and online DPO (:mod:`~dvpo_lightning.modules.dpo`) buy their labels with
(docs/semi-online.md).

Over several processes every rank labels its own share of a round's prompts, drawn from one
shared stream, and the rows are gathered in draw order: every rank holds what one process
would have bought.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dvpo_lightning.data.collate import collate_prompt_response, pad_left
from dvpo_lightning.refresh.buffer import LabelledBuffer, LabelledRow
from dvpo_lightning.refresh.labellers import Labeller
from dvpo_lightning.refresh.settings import LabelSettings
from dvpo_lightning.rollout.generation import Samples
from dvpo_lightning.rollout.gold import decoded
from dvpo_lightning.runtime.distributed import rank_and_world
from dvpo_lightning.runtime.timing import phase_clock

Prompt = tuple[list[int], object]
"""A fresh prompt: its token ids and its raw form (what the labeller reads)."""

Sampler = Callable[[Tensor, Tensor, Sequence[int]], Samples]
"""``(prompt_ids, prompt_mask, seeds) ↦ samples`` of the current policy (the rollout's engine
and sampling settings; row ``r`` drawn from ``seeds[r]`` alone)."""


@dataclass
class Round:
    """What one label round bought, every rank's rows in draw order.

    Attributes:
        rows: the labelled rows, two per prompt (:meth:`LabelRounds.targets` set the targets).
        batch: the rows collated (the shared prompt/response layout) on the run's device.
        pairs: ``(chosen, rejected)`` row indices of the prompts whose two labels differ.
        labels: the labels the round spent.
        generate_s: seconds sampling the responses.
        label_s: seconds labelling them.
    """

    rows: list[LabelledRow]
    batch: dict[str, Tensor]
    pairs: list[tuple[int, int]]
    labels: int
    generate_s: float
    label_s: float

    def log(self, prefix: str, labels_used: int) -> dict[str, float]:
        """The round's own entries of a log: ``{prefix}/{pairs,labels,labels_used,
        label_mean,generate_s,label_s}``."""
        return {f"{prefix}/pairs": float(len(self.pairs)), f"{prefix}/labels": float(self.labels),
                f"{prefix}/labels_used": float(labels_used),
                f"{prefix}/label_mean": sum(r.label for r in self.rows) / len(self.rows),
                f"{prefix}/generate_s": self.generate_s, f"{prefix}/label_s": self.label_s}


class LabelRounds:
    """A run's label rounds: its settings, labeller, random stream, the rows bought so far and
    the rounds' history; what a refresh (:class:`Refresher`) and online DPO share.

    Args:
        settings: when, how many and which labels to buy.
        labeller: who labels.
    """

    def __init__(self, settings: LabelSettings, labeller: Labeller) -> None:
        self.settings, self.labeller = settings, labeller
        self.rng = random.Random(settings.seed)
        self.buffer = LabelledBuffer()
        self.labels_used = 0
        self.history: list[dict[str, float]] = []
        self.prompts: list[Prompt] = []

    def attach_prompts(self, prompts: list[Prompt]) -> None:
        """The fresh prompts, tokenised as the run's data (at set-up)."""
        if not prompts:
            raise ValueError(f"{self.settings.KEY}: no fresh prompt to sample from. Fix: set "
                             f"{self.settings.KEY}.prompts_path to a file with prompts")
        self.prompts = prompts

    def due(self, step: int) -> bool:
        """A round follows training step ``step`` (counted from 1)."""
        s = self.settings
        return (s.every > 0 and step > 0 and step % s.every == 0
                and s.labels_next(self.labels_used) > 0)

    def buy(self, sample: Sampler, tokenizer, end_ids: Sequence[int], step: int,
            device: torch.device) -> Round:
        """One round after training step ``step``: draw fresh prompts, sample two responses to
        each from the current policy, have them labelled; every rank's rows gathered in draw
        order. Adds nothing to the buffer and spends nothing (the caller does both)."""
        s = self.settings
        rank, world = rank_and_world()
        labels = s.labels_next(self.labels_used)
        n_prompts = s.prompts_for(labels)
        if n_prompts < world:
            raise ValueError(f"{s.KEY}.labels={labels} gives {n_prompts} prompts for {world} "
                             "processes. Fix: at least one prompt per process")
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
        batch = collate_prompt_response([r.prompt_ids for r in rows],
                                        [r.response_ids for r in rows], tokenizer.pad_token_id)
        return Round(rows, {k: v.to(device) for k, v in batch.items()},
                     _pairs([r.label for r in rows]), labels, t1 - t0, t2 - t1)

    def targets(self, a: float, b: float) -> tuple[float, float]:
        """The targets of two responses to one prompt labelled ``a`` and ``b``: the labels."""
        return a, b

    def _rows(self, step: int, prompts: list[Prompt], texts: list[str],
              responses: list[list[int]], scores: list[float]) -> list[LabelledRow]:
        """The labelled rows of this rank's responses (two per prompt, in order)."""
        out = []
        for i in range(0, len(texts), 2):
            targets = self.targets(scores[i], scores[i + 1])
            for j in (i, i + 1):
                out.append(LabelledRow(step, prompts[j][1], texts[j], list(prompts[j][0]),
                                       responses[j], scores[j], targets[j - i]))
        return out

    def state_dict(self) -> dict:
        """The labels so far, the stream, the bought rows, the history."""
        return {"labels_used": self.labels_used, "rng": self.rng.getstate(),
                "buffer": self.buffer.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.labels_used = state["labels_used"]
        self.rng.setstate(_as_state(state["rng"]))
        self.buffer.load_state_dict(state["buffer"])
        self.history = list(state["history"])

    def summary(self) -> dict:
        """The run's rounds: settings, labels used, and each round's log."""
        s = self.settings
        return {"every": s.every, "labels_per_refresh": s.labels, "budget": s.budget,
                "kind": s.kind, "labeller": self.labeller.name, "noise": self.labeller.noise,
                "labels_used": self.labels_used, "refreshes": len(self.history),
                "history": self.history}


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


def _as_state(state) -> tuple:
    """``random.Random.getstate()`` back from a checkpoint (lists where it had tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
