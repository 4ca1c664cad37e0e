"""RL prompts: their order and position, groups of n for group estimators, held-out prompts."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from dvpo_lightning.data.base import ListDataset, TokenizedDataModule
from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.tokenize import encode_prompt


class EpochShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch that remembers where it is.

    The order of epoch ``e`` depends only on ``(seed, e)``; ``state_dict`` holds the epoch and
    the number of indices already handed out, so a resumed run continues with the next prompt.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self._order()
        while self.position < self.n:
            i = order[self.position]
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


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
            report.total += 1
            if len(ids) > self.max_length:
                report.truncated += 1
                ids = ids[-self.max_length:]
            out.append((ids, r["prompt"]))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = ListDataset(self._encode(self.train_path))
        self.val_set = ListDataset(self._encode(self.eval_path, self.max_eval_prompts))
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"{self.train_path} has {len(self.train_set)} prompts, fewer than "
                f"data.batch_size={self.batch_size}; lower data.batch_size or add prompts")
        self.sampler = EpochShuffleSampler(len(self.train_set), self.seed, self.shuffle)
        self.log_reports()

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
