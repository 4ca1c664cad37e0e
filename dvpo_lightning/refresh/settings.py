"""The settings of semi-online DVPO and online DPO: when labels are bought, how many, from whom,
and how the frozen GVM (or the DPO policy) learns from them (docs/semi-online.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch


@dataclass(frozen=True)
class LabelSettings:
    """When labels are bought during a run, how many, of which kind and from whom: what a
    refresh of a frozen scorer and online DPO share (:class:`RefreshSettings`,
    :class:`OnlineSettings`).

    Args:
        every: training steps between label rounds (a round follows steps ``every``,
            ``2·every``, …); 0: never.
        labels: labels bought per round: scored responses (``kind: scores``) or pairs
            (``kind: pairs``).
        budget: labels for the whole run: the last round buys what is left of it, then the
            rounds stop (None: no cap besides ``labels`` per round).
        kind: ``scores``: every response gets a score; ``pairs``: two responses per prompt, one
            label says which is better.
        labeller: who labels: a registered labeller (``sorting``, ``instruct``: the embedded
            tasks' gold judges) or ``package.module:function`` taking ``(prompt, response)``
            and returning a number, higher is better (:mod:`~dvpo_lightning.refresh.labellers`).
        noise: the annotator's noise, the standard deviation of Gaussian noise added to every
            score; None: the labeller's own (``sorting``: 0.1, as in the embedded data).
        prompts_path: where the fresh prompts come from; None: the RL prompt file
            (``data.init_args.train_path``; online DPO needs it set).
        seed: the rounds' own random streams (prompts, responses, annotation noise, draws from
            what was bought), apart from the run's.
    """

    KEY: ClassVar[str] = "model.init_args.refresh"

    every: int = 0
    labels: int = 32
    budget: int | None = None
    kind: Literal["scores", "pairs"] = "scores"
    labeller: str = "sorting"
    noise: float | None = None
    prompts_path: str | None = None
    seed: int = 0

    def rules(self) -> list[tuple[bool, str]]:
        """``(holds, what the rule says)`` for every rule of the settings."""
        k = self.KEY
        return [
            (self.every >= 0, f"{k}.every={self.every} must be >= 0 (0: off)"),
            (self.labels >= 1, f"{k}.labels={self.labels} must be >= 1"),
            (self.budget is None or self.budget >= 0,
             f"{k}.budget={self.budget} must be >= 0 or null"),
            (self.kind in ("scores", "pairs"),
             f"{k}.kind={self.kind!r} must be 'scores' or 'pairs'"),
            (self.kind != "scores" or self.labels % 2 == 0,
             f"{k}.labels={self.labels} must be even with kind scores (two responses per "
             "prompt, so that every round gives pairs)"),
            (self.noise is None or self.noise >= 0, f"{k}.noise={self.noise} must be >= 0"),
        ]

    def __post_init__(self) -> None:
        broken = [rule for ok, rule in self.rules() if not ok]
        if broken:
            raise ValueError("; ".join(broken) + ". Fix the keys named")

    @property
    def on(self) -> bool:
        """A round can happen in this run."""
        return self.every > 0 and self.labels_next(0) > 0

    def labels_next(self, used: int) -> int:
        """The labels the next round buys when ``used`` are spent: ``labels``, or what is
        left of ``budget`` (even with ``kind: scores``); 0: the budget is spent."""
        left = self.labels if self.budget is None else min(self.labels, self.budget - used)
        return max(0, left - left % 2 if self.kind == "scores" else left)

    def prompts_for(self, labels: int) -> int:
        """Fresh prompts (two responses each) that buy ``labels``."""
        return labels // 2 if self.kind == "scores" else labels


@dataclass(frozen=True)
class RefreshSettings(LabelSettings):
    """Refresh the GVM (or a reward model) from newly labelled samples of the current policy
    during RL (the paper's future work, §7). Off by default: ``every: 0`` leaves DVPO exactly
    as the paper's. The label settings (``every`` in RL steps, ``labels``, ``budget``,
    ``kind``, ``labeller``, ``noise``, ``prompts_path``, ``seed``) are
    :class:`LabelSettings`'; with ``kind: scores`` a label is the response's return
    (stage 1's ``train_kind: scored``), with ``kind: pairs`` the better-labelled response gets
    ``chosen_return`` and the other ``rejected_return`` (stage 1's ``pairwise``).

    Args:
        steps: GVM optimizer steps per refresh.
        lr: the GVM's learning rate during a refresh (AdamW; its state is kept across refreshes).
        batch_size: rows per GVM step.
        replay: the share of every GVM batch drawn from ``replay_path`` (the GVM's stage-1
            rows), against forgetting; 0: labelled rows only.
        replay_path: the GVM's stage-1 training rows (scored ``{prompt, response, score}``);
            needed when ``replay > 0``.
        replay_fraction: replay the rows of the first ``⌈fraction · P⌉`` of the file's ``P``
            prompts: the GVM's stage-1 ``data.init_args.train_fraction``, so a GVM trained on
            part of the file replays only that part.
        chosen_return: the return of a chosen response (``kind: pairs``).
        rejected_return: the return of a rejected response (``kind: pairs``).
        max_grad_norm: clip the GVM's gradient norm to this (None: no clipping).
    """

    steps: int = 8
    lr: float = 1e-4
    batch_size: int = 16
    replay: float = 0.5
    replay_path: str | None = None
    replay_fraction: float = 1.0
    chosen_return: float = 1.0
    rejected_return: float = -1.0
    max_grad_norm: float | None = 1.0

    def rules(self) -> list[tuple[bool, str]]:
        k = self.KEY
        return [*super().rules(),
                (self.steps >= 1, f"{k}.steps={self.steps} must be >= 1"),
                (self.lr > 0, f"{k}.lr={self.lr} must be > 0"),
                (self.batch_size >= 1, f"{k}.batch_size={self.batch_size} must be >= 1"),
                (0 <= self.replay < 1, f"{k}.replay={self.replay} must be in [0, 1)"),
                (self.replay == 0 or self.replay_path is not None or not self.every,
                 f"{k}.replay={self.replay} needs {k}.replay_path (the GVM's stage-1 rows); "
                 "set it, or set replay to 0"),
                (0 < self.replay_fraction <= 1,
                 f"{k}.replay_fraction={self.replay_fraction} must be in (0, 1]"),
                (self.chosen_return > self.rejected_return,
                 f"{k}.chosen_return must be above {k}.rejected_return"),
                (self.max_grad_norm is None or self.max_grad_norm > 0,
                 f"{k}.max_grad_norm={self.max_grad_norm} must be > 0 or null")]


@dataclass(frozen=True)
class OnlineSettings(LabelSettings):
    """Online (iterative) DPO: every ``every`` optimizer steps, two responses of the current
    policy to each of fresh prompts are labelled, and each pair with different labels (the
    better one chosen) joins the pairs the policy trains on (docs/semi-online.md). Off by
    default: ``every: 0`` is offline DPO. The label settings are :class:`LabelSettings`';
    ``prompts_path`` is needed (the DPO data has no prompt file of its own).

    Args:
        batch_pairs: bought pairs added to every training batch once a round has bought some
            (drawn with replacement from every pair bought so far; the batch's pairs from the
            data file stay as they are).
    """

    KEY: ClassVar[str] = "model.init_args.online"

    batch_pairs: int = 16

    def rules(self) -> list[tuple[bool, str]]:
        k = self.KEY
        return [*super().rules(),
                (self.batch_pairs >= 1, f"{k}.batch_pairs={self.batch_pairs} must be >= 1"),
                (not self.every or self.prompts_path is not None,
                 f"{k}.every={self.every} needs {k}.prompts_path (the prompts the policy "
                 "answers for new labels, e.g. data/sorting/rl_prompts.jsonl); set it")]


# The settings sit in the RL module's hyper-parameters, saved in every checkpoint.
torch.serialization.add_safe_globals([RefreshSettings, OnlineSettings])
