"""RL prompts: their order and position, groups of n for group estimators, held-out prompts."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dvpo_lightning.data.base import ListDataset, TokenizedDataModule
from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.sampler import EpochShuffleSampler
from dvpo_lightning.data.tokenize import check_prompt_ids, encode_prompt


def check_rollout_batch(batch_size: int, group_size: int, estimator_group_size: int,
                        mini_batch_size: int | None = None) -> None:
    """Raise unless the prompt batch, the groups and the mini-batches fit together.

    One RL step samples ``group_size`` responses for each of ``batch_size`` prompts, so the
    rollout batch is ``batch_size · group_size`` responses in whole groups. The estimator
    must expect groups of that size, and PPO mini-batches must split the rollout batch evenly.

    Args:
        batch_size: ``data.batch_size`` (prompts per step and process).
        group_size: ``data.group_size`` (responses per prompt).
        estimator_group_size: the advantage estimator's ``group_size``.
        mini_batch_size: ``model.mini_batch_size`` (responses); None is the whole batch.
    """
    for name, value in (("data.batch_size", batch_size), ("data.group_size", group_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}. Fix: set {name} to a "
                             "positive integer")
    if group_size != estimator_group_size:
        raise ValueError(f"data.group_size ({group_size}) must equal the estimator's group_size "
                         f"({estimator_group_size}): each prompt's responses form one group. "
                         f"Fix: set --data.init_args.group_size={estimator_group_size}")
    rollout = batch_size * group_size
    if mini_batch_size is not None and (mini_batch_size < 1 or rollout % mini_batch_size):
        fits = [d for d in range(1, rollout + 1) if rollout % d == 0]
        raise ValueError(f"the rollout batch ({rollout} responses = data.batch_size {batch_size} "
                         f"× group_size {group_size}) must be a multiple of "
                         f"model.mini_batch_size ({mini_batch_size}). Fix: set "
                         f"model.mini_batch_size to one of {fits}, or change data.batch_size")


class RolloutDataModule(TokenizedDataModule):
    """Prompt batches for RL; each prompt is repeated ``group_size`` times with a group id.

    Args:
        train_path: RL prompts (``{prompt}`` or chat ``messages``).
        eval_path: held-out prompts for evaluation during and after training.
        tokenizer: the policy's tokenizer directory.
        batch_size: distinct prompts per RL step (per process).
        group_size: responses per prompt (GRPO / RLOO: n; others 1). Must equal the
            estimator's ``group_size``.
        max_eval_prompts: evaluate on the first this-many held-out prompts.
        max_prompt_length: prompts longer than this keep their last tokens (counted, reported).
        shuffle: shuffle the prompt order each epoch (seeded).
        chat_template: apply the tokenizer's chat template when it has one.
        format: prompt file format (``auto`` detects it).
        split: split of a ``datasets`` directory.
        seed: seed of the prompt order.
    """

    def __init__(self, train_path: str, eval_path: str, tokenizer: str, batch_size: int = 16,
                 group_size: int = 1, max_eval_prompts: int = 256, max_prompt_length: int = 256,
                 shuffle: bool = True, chat_template: bool = True, format: str = "auto",
                 split: str | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(tokenizer, batch_size, batch_size, max_prompt_length, "truncate",
                         chat_template, num_workers, seed)
        if group_size < 1:
            raise ValueError(f"data.group_size must be >= 1, got {group_size}")
        self.train_path, self.eval_path = train_path, eval_path
        self.group_size, self.max_eval_prompts = group_size, max_eval_prompts
        self.shuffle, self.format, self.split = shuffle, format, split
        self.sampler: EpochShuffleSampler | None = None

    def _encode(self, path: str, limit: int | None = None) -> list[tuple[list[int], object]]:
        rows = load_examples(path, "prompt", split=self.split, format=self.format)[:limit]
        report = self.new_report(path)
        out = []
        for i, r in enumerate(rows):
            ids = encode_prompt(self.tokenizer, r["prompt"], self.chat_template)
            check_prompt_ids(ids, path, i)
            report.total += 1
            if len(ids) > self.max_length:
                report.truncated += 1
                ids = ids[-self.max_length:]
            out.append((ids, r["prompt"]))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        trainer = getattr(self, "trainer", None)
        self._check_module(getattr(trainer, "lightning_module", None) if trainer else None)
        self.train_set = ListDataset(self._encode(self.train_path))
        self.val_set = ListDataset(self._encode(self.eval_path, self.max_eval_prompts))
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        self.sampler = EpochShuffleSampler(len(self.train_set), self.seed, self.shuffle,
                                           self.batch_size, world, rank)
        self.log_reports()

    def _check_module(self, module) -> None:
        """Check the batch against the RL module's estimator before reading any prompts
        (the module's own ``setup`` runs after this one)."""
        estimator = getattr(module, "estimator", None)
        if estimator is None:
            return
        hparams = getattr(module, "hparams", {})
        check_rollout_batch(self.batch_size, self.group_size,
                            getattr(estimator, "group_size", 1), hparams.get("mini_batch_size"))

    def collate(self, items: list[tuple[list[int], object]], group_size: int) -> dict:
        """``group_size`` copies of each prompt, adjacent, with ``group_ids``."""
        ids = [p for p, _ in items for _ in range(group_size)]
        prompts = [raw for _, raw in items for _ in range(group_size)]
        prompt_ids, prompt_mask = pad_left(ids, self.tokenizer.pad_token_id)
        group_ids = torch.arange(len(items)).repeat_interleave(group_size)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "group_ids": group_ids,
                "prompts": prompts}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          drop_last=True, num_workers=self.num_workers,
                          collate_fn=lambda items: self.collate(items, self.group_size))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          collate_fn=lambda items: self.collate(items, 1))

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if self.sampler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is None:
            self.setup()
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
