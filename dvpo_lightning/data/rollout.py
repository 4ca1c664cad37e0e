"""RL prompts: their order and position (what a resumed run continues from), held-out prompts."""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import DataLoader, Dataset

from dvpo_lightning.data.base import TokenizedDataModule
from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.sampler import EpochShuffleSampler
from dvpo_lightning.data.tokenize import check_prompt_ids, encode_prompt
from dvpo_lightning.runtime.distributed import rank_and_world


def encode_prompts(dm: TokenizedDataModule, rows: list[dict], path: str, report,
                   max_length: int) -> list[tuple[list[int], object]]:
    """``(ids, raw prompt)`` of each row of ``path`` (tokenised by ``dm``, chat template as it
    says); a prompt longer than ``max_length`` keeps its last tokens, counted in ``report``."""
    out = []
    for i, r in enumerate(rows):
        ids = encode_prompt(dm.tokenizer, r["prompt"], dm.chat_template)
        check_prompt_ids(ids, path, i)
        report.total += 1
        if len(ids) > max_length:
            report.truncated += 1
            ids = ids[-max_length:]
        out.append((ids, r["prompt"]))
    dm.check_vocabulary(path, (ids for ids, _ in out))
    return out


def collate_prompts(items: list[tuple[list[int], object]], pad_token_id: int) -> dict:
    """Left-padded ``prompt_ids`` / ``prompt_mask`` ``(n, P)`` and the raw ``prompts``."""
    prompt_ids, prompt_mask = pad_left([p for p, _ in items], pad_token_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "prompts": [raw for _, raw in items]}


class Numbered(Dataset):
    """``(i, item)`` for item ``i`` of ``items``: held-out prompts carry their index so an
    evaluation over several processes can merge the processes' rows and drop the repeats
    Lightning's ``DistributedSampler`` adds to even out the shards."""

    def __init__(self, items: Dataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, object]:
        return i, self.items[i]


def collate_numbered_prompts(items: list[tuple[int, tuple[list[int], object]]],
                             pad_token_id: int) -> dict:
    """:func:`collate_prompts` of :class:`Numbered` prompts, plus ``prompt_index (n,) long``:
    each prompt's row in the held-out file."""
    batch = collate_prompts([item for _, item in items], pad_token_id)
    batch["prompt_index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
    return batch


class Shard(Dataset):
    """This process's share of ``items`` for a held-out pass outside Lightning's loops (the
    final test evaluation): rank ``r`` of ``world`` takes every ``world``-th item from the
    ``r``-th, the first few repeated so every rank has as many (as Lightning's
    ``DistributedSampler`` does; :class:`~dvpo_lightning.rollout.evaluation.EvalRows` drops the
    repeats by index). One process: every item, in order."""

    def __init__(self, items: Dataset, rank: int, world: int) -> None:
        n = len(items)
        self.items, self.order = items, [i % n for i in range(n + -n % world)][rank::world]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> object:
        return self.items[self.order[i]]


def check_test_path(path: str | None) -> None:
    """Refuse, before training, a ``test_path`` that does not exist (its rows are read only at
    the end of ``fit``)."""
    if path and not os.path.exists(path):
        raise FileNotFoundError(
            f"data.init_args.test_path={path!r} does not exist. The test prompts are read only at "
            "the end of fit, so a missing file is refused before training starts. Fix: set "
            "data.init_args.test_path to the test prompts file, or remove the key")


def held_out_test_loader(items: list, batch_size: int, pad_token_id: int,
                        num_workers: int = 0) -> DataLoader:
    """The final test evaluation's prompts, numbered by their row in the test file, this
    process's :class:`Shard`, in the validation batches' layout."""
    rank, world = rank_and_world()
    return DataLoader(Shard(Numbered(items), rank, world), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers,
                      collate_fn=functools.partial(collate_numbered_prompts,
                                                   pad_token_id=pad_token_id))


class RolloutDataModule(TokenizedDataModule):
    """Prompt batches for RL, ``batch_size`` distinct prompts per RL step and process (the
    experience maker samples the estimator's ``group_size`` responses to each).

    Args:
        train_path: RL prompts (``{prompt}`` or chat ``messages``), or a scored or pairwise
            file whose distinct prompts are taken (:mod:`dvpo_lightning.data.prompts`).
        eval_path: held-out prompts for evaluation during and after training (the same kinds
            of file).
        tokenizer: the policy's tokenizer directory.
        batch_size: distinct prompts per RL step (per process).
        max_eval_prompts: evaluate on the first this-many held-out prompts.
        max_prompt_length: prompts longer than this keep their last tokens (counted, reported).
        shuffle: shuffle the prompt order each epoch (seeded).
        chat_template: apply the tokenizer's chat template when it has one.
        format: prompt file format (``auto`` detects it).
        split: split of a ``datasets`` directory.
        seed: seed of the prompt order.
        test_path: held-out test prompts, disjoint from ``eval_path`` (which then serves as the
            validation split: curves, tuning): read only at the end of ``fit``, when the policy
            and the reference answer them once for the run's final numbers (the summary's
            ``test_eval``; the first ``max_eval_prompts``); None: no test evaluation.
    """

    def __init__(self, train_path: str, eval_path: str, tokenizer: str, batch_size: int = 16,
                 max_eval_prompts: int = 256, max_prompt_length: int = 256,
                 shuffle: bool = True, chat_template: bool = True, format: str = "auto",
                 split: str | None = None, num_workers: int = 0, seed: int = 0,
                 test_path: str | None = None) -> None:
        super().__init__(tokenizer=tokenizer, batch_size=batch_size, val_batch_size=batch_size,
                         max_length=max_prompt_length, length_policy="truncate",
                         chat_template=chat_template, format=format, split=split,
                         num_workers=num_workers, seed=seed)
        self.train_path, self.eval_path = train_path, eval_path
        self.max_eval_prompts, self.test_path = max_eval_prompts, test_path
        self.shuffle = shuffle
        self.sampler: EpochShuffleSampler | None = None

    def _encode(self, path: str, limit: int | None = None) -> list[tuple[list[int], object]]:
        rows = self.load_prompts(path, self.format, self.split)[:limit]
        return encode_prompts(self, rows, path, self.new_report(path), self.max_length)

    def read_files(self) -> tuple[list, list]:
        check_test_path(self.test_path)  # (a name only: its rows are read at the end of fit)
        return (self._encode(self.train_path),
                self._encode(self.eval_path, self.max_eval_prompts))

    def setup(self, stage: str | None = None) -> None:
        self.check_files()
        if self.sampler is None:
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
            self.sampler = EpochShuffleSampler(len(self.train_set), self.seed, self.shuffle,
                                               self.batch_size, world, rank)

    def collate(self, items: list[tuple[list[int], object]]) -> dict:
        return collate_prompts(items, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          drop_last=True, num_workers=self.num_workers,
                          collate_fn=self.collate)

    def collate_eval(self, items: list[tuple[int, tuple[list[int], object]]]) -> dict:
        return collate_numbered_prompts(items, self.tokenizer.pad_token_id)

    def val_dataloader(self) -> DataLoader:
        """Held-out prompts, in order, each with its ``prompt_index``."""
        return DataLoader(Numbered(self.val_set), batch_size=self.val_batch_size,
                          shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate_eval)

    def heldout_test_dataloader(self) -> DataLoader | None:
        """The test prompts (``test_path``, read now: at the end of ``fit``), this process's
        share, numbered; None without ``test_path``."""
        if not self.test_path:
            return None
        return held_out_test_loader(self._encode(self.test_path, self.max_eval_prompts),
                                   self.val_batch_size, self.tokenizer.pad_token_id,
                                   self.num_workers)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if self.sampler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is None:
            self.setup()
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
