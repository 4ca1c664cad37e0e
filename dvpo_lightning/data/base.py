"""The shared part of the DataModules: tokenizer, length policy, loaders, and reading every
file once, before any model loads (:meth:`TokenizedDataModule.check_files`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.prompts import load_prompts
from dvpo_lightning.data.sampler import EpochShuffleSampler
from dvpo_lightning.data.tokenize import LengthReport, check_length_policy, check_unknown_share
from dvpo_lightning.models.loading import load_tokenizer

log = logging.getLogger(__name__)

# Where a file of each kind is loaded: the fix named when a file of one kind is given where
# another is expected (a DataModule that has an option for it names that instead).
KIND_LOADERS: dict[str, str] = {
    "prompt": "RL prompts belong to RolloutDataModule (data.init_args.train_path / eval_path of "
              "configs/dvpo.yaml)",
    "sft": "demonstrations belong to SFTDataModule (data.init_args.train_path of configs/sft.yaml)",
    "scored": "scored responses belong to ValueDataModule with data.init_args.train_kind=scored "
              "(configs/gvm.yaml)",
    "pairwise": "pairs belong to PairwiseDataModule (configs/reward_model.yaml), or to "
                "ValueDataModule with data.init_args.train_kind=pairwise (configs/gvm_pairs.yaml)",
}


class ListDataset(Dataset):
    """A map-style dataset over a list of already tokenized examples."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TokenizedDataModule(L.LightningDataModule):
    """Base class: loads the tokenizer, applies the length policy and reports what it cut.
    Its arguments are every DataModule's (a subclass adds its own and passes these on by name).

    Args:
        tokenizer: directory of a Hugging Face tokenizer (the policy's).
        batch_size: training examples per batch (pairs for pairwise data).
        val_batch_size: evaluation batch size; defaults to ``batch_size``.
        max_length: longest ``prompt + response`` in tokens.
        length_policy: what to do with longer rows: ``truncate``, ``drop`` or ``error``.
        chat_template: apply the tokenizer's chat template to prompts when it has one.
        format: row format of the files (``auto`` detects it from the first row's fields;
            the names per kind: ``dvpo_lightning.data.formats``).
        split: split of a ``datasets`` directory.
        num_workers: DataLoader workers.
        seed: seed of the training order (``EpochShuffleSampler``) and of any data sampling.
    """

    def __init__(self, tokenizer: str, batch_size: int = 32, val_batch_size: int | None = None,
                 max_length: int = 512,
                 length_policy: Literal["truncate", "drop", "error"] = "truncate",
                 chat_template: bool = True, format: str = "auto", split: str | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_length_policy(length_policy)
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.length_policy = length_policy
        self.chat_template = chat_template
        self.format, self.split = format, split
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self.length_reports: list[LengthReport] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.train_sampler: EpochShuffleSampler | None = None
        self._sampler_state: dict | None = None  # restored before the sampler exists

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def load(self, path: str, kind: str, format: str = "auto", split: str | None = None,
             other_kinds: Mapping[str, str] | None = None) -> list[dict]:
        """:func:`~dvpo_lightning.data.formats.load_examples`, naming where a file of another
        kind belongs (:data:`KIND_LOADERS`, updated by ``other_kinds``)."""
        return load_examples(path, kind, split=split, format=format,
                             other_kinds={**KIND_LOADERS, **(other_kinds or {})})

    def load_prompts(self, path: str, format: str = "auto",
                     split: str | None = None) -> list[dict]:
        """:func:`~dvpo_lightning.data.prompts.load_prompts`: a prompt file's rows, or the
        distinct prompts of a scored or pairwise file."""
        return load_prompts(path, format, split, other_kinds=KIND_LOADERS)

    def check_vocabulary(self, path: str, sequences: Iterable[Sequence[int]]) -> None:
        """Refuse ``path`` when its tokens are mostly the tokenizer's unknown token
        (:func:`~dvpo_lightning.data.tokenize.check_unknown_share`)."""
        check_unknown_share(self.tokenizer, sequences, path, self.tokenizer_path)

    def read_files(self) -> tuple[list, list]:
        """Read, validate and tokenize the files: ``(train items, validation items)``."""
        raise NotImplementedError

    def check_files(self) -> None:
        """Read, validate and tokenize every file :meth:`setup` uses, once (the result is kept
        and ``setup`` reuses it). The CLI calls this before any model loads, so a bad row, a
        file of another kind or one written for another tokenizer is reported in seconds.

        Raises:
            DataFormatError: naming the file, the row, the field and the fix.
        """
        if self.train_set is None:
            train, val = self.read_files()
            self.train_set, self.val_set = ListDataset(train), ListDataset(val)
            self.log_reports()

    def setup(self, stage: str | None = None) -> None:
        self.check_files()

    def new_report(self, source: str) -> LengthReport:
        report = LengthReport(source, self.max_length, self.length_policy)
        self.length_reports.append(report)
        return report

    def log_reports(self) -> None:
        for r in self.length_reports:
            if r.truncated or r.dropped:
                log.warning("%s (first rows: %s)", r.summary(), r.examples)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, collate: Callable) -> DataLoader:
        """Training (``shuffle``): a resumable :class:`EpochShuffleSampler` — whole batches,
        its epoch and position in the checkpoint. Evaluation: every row, in order."""
        if not shuffle:
            return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                              num_workers=self.num_workers, drop_last=False)
        if self.train_sampler is None:
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
            self.train_sampler = EpochShuffleSampler(len(ds), self.seed, True, batch_size,
                                                     world, rank)
            if self._sampler_state is not None:
                self.train_sampler.load_state_dict(self._sampler_state)
        return DataLoader(ds, batch_size=batch_size, sampler=self.train_sampler,
                          collate_fn=collate, num_workers=self.num_workers, drop_last=True)

    def state_dict(self) -> dict:
        """The training order's position (what a resumed run continues from)."""
        return {"sampler": self.train_sampler.state_dict()} if self.train_sampler else {}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self._sampler_state = state["sampler"]
            if self.train_sampler is not None:
                self.train_sampler.load_state_dict(state["sampler"])
