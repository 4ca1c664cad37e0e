"""DPO's data: preference pairs to train on, and for validation the held-out pairs and the
held-out prompts the RL runs are evaluated on."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dvpo_lightning.data.base import ListDataset
from dvpo_lightning.data.pairwise import PairwiseDataModule
from dvpo_lightning.data.rollout import (
    Numbered,
    check_test_path,
    collate_numbered_prompts,
    encode_prompts,
    held_out_test_loader,
)
from dvpo_lightning.data.tokenize import LengthReport


class DPODataModule(PairwiseDataModule):
    """Preference pairs for :class:`~dvpo_lightning.modules.DPOModule`, and held-out prompts.

    Training batches are :class:`PairwiseDataModule`'s: ``2N`` rows of the shared layout, the
    ``N`` chosen rows first, then the ``N`` rejected ones, and ``n_pairs = N``. Validation has
    two loaders: ``[0]`` the held-out pairs (the DPO metrics; each pair's ``pair_index`` too),
    ``[1]`` the held-out prompts (``prompt_ids`` / ``prompt_mask`` left-padded, the raw
    ``prompts`` and each one's ``prompt_index``, the batches of
    :class:`~dvpo_lightning.data.rollout.RolloutDataModule`'s evaluation), which the policy
    answers for the gold evaluation; without ``eval_path`` only the first. The indices let
    several processes merge their rows, each item once.

    Args:
        train_path: pairwise file (``{prompt, chosen, rejected}``, binarized UltraFeedback
            message lists, or HH-RLHF transcripts).
        val_path: held-out pairs (the DPO metrics on pairs not trained on).
        eval_path: held-out prompts (the RL configs' ``data.eval_path``), or a scored or pairwise
            file whose distinct prompts are taken; None: no policy evaluation.
        max_eval_prompts: evaluate on the first this-many held-out prompts.
        max_prompt_length: held-out prompts longer than this keep their last tokens.
        eval_batch_size: held-out prompts per batch; None: ``val_batch_size``.
        test_path: held-out test prompts, disjoint from ``eval_path`` (then the validation
            split): read only at the end of ``fit``, when the policy and the reference answer
            them once for the run's final numbers (the summary's ``test_eval``; the first
            ``max_eval_prompts``); None: no test evaluation.
        **kwargs: the tokenizer, batching (``batch_size`` counts pairs), length, format (of the
            pair files) and seed settings of
            :class:`~dvpo_lightning.data.base.TokenizedDataModule`.
    """

    def __init__(self, train_path: str, val_path: str, eval_path: str | None = None,
                 max_eval_prompts: int = 256, max_prompt_length: int = 256,
                 eval_batch_size: int | None = None, test_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(train_path=train_path, val_path=val_path, **kwargs)
        if max_eval_prompts < 1 or max_prompt_length < 1:
            raise ValueError(f"data.init_args.max_eval_prompts ({max_eval_prompts}) and "
                             f"data.init_args.max_prompt_length ({max_prompt_length}) must be >= "
                             "1. Fix: set them to positive integers")
        self.eval_path, self.max_eval_prompts = eval_path, max_eval_prompts
        self.test_path = test_path
        self.max_prompt_length = max_prompt_length
        self.eval_batch_size = eval_batch_size or self.val_batch_size
        self.prompt_set: ListDataset | None = None

    def _encode_prompts(self, path: str) -> list[tuple[list[int], object]]:
        """``(ids, raw prompt)`` of the first ``max_eval_prompts`` rows; a longer prompt keeps
        its last ``max_prompt_length`` tokens (counted in the length report), as in RL."""
        rows = self.load_prompts(path)[:self.max_eval_prompts]
        report = LengthReport(path, self.max_prompt_length, "truncate")
        self.length_reports.append(report)
        return encode_prompts(self, rows, path, report, self.max_prompt_length)

    def read_files(self) -> tuple[list, list]:
        """The training and held-out pairs; the held-out prompts are kept in ``prompt_set``."""
        check_test_path(self.test_path)  # (a name only: its rows are read at the end of fit)
        train, val = super().read_files()
        if self.eval_path:
            self.prompt_set = ListDataset(self._encode_prompts(self.eval_path))
        return train, val

    def collate_prompts(self, items: list[tuple[int, tuple[list[int], object]]]) -> dict:
        """Left-padded ``prompt_ids`` / ``prompt_mask`` ``(n, P)``, the raw ``prompts`` and
        each one's ``prompt_index`` in the held-out file."""
        return collate_numbered_prompts(items, self.tokenizer.pad_token_id)

    def collate_numbered_pairs(self, items: list[tuple[int, tuple]]) -> dict:
        """:meth:`collate` of :class:`Numbered` pairs, plus ``pair_index (N,) long``: each
        pair's row in the held-out file (several processes' rows are merged by it)."""
        batch = self.collate([item for _, item in items])
        batch["pair_index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        pairs = DataLoader(Numbered(self.val_set), batch_size=self.val_batch_size,
                           shuffle=False, num_workers=self.num_workers,
                           collate_fn=self.collate_numbered_pairs)
        if self.prompt_set is None:
            return pairs
        return [pairs, DataLoader(Numbered(self.prompt_set), batch_size=self.eval_batch_size,
                                  shuffle=False, num_workers=self.num_workers,
                                  collate_fn=self.collate_prompts)]

    def heldout_test_dataloader(self) -> DataLoader | None:
        """The test prompts (``test_path``, read now: at the end of ``fit``), this process's
        share, numbered; None without ``test_path``."""
        if not self.test_path:
            return None
        return held_out_test_loader(self._encode_prompts(self.test_path), self.eval_batch_size,
                                   self.tokenizer.pad_token_id, self.num_workers)
