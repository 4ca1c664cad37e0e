"""Pairwise preferences ``{prompt, chosen, rejected}`` for the reward model and for evaluation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dvpo_lightning.data.base import TokenizedDataModule
from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.data.tokenize import (
    LengthReport,
    encode_prompt,
    encode_response,
    fit_length,
)


def encode_pairs(rows: list[dict], tokenizer, chat_template: bool, max_length: int, policy: str,
                 report: LengthReport, contexts: list[list[int]] | None = None) -> list[tuple]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per pair; ``contexts`` are prepended to the
    prompts (τ-conditioning). A pair is dropped when either side is."""
    out = []
    for i, ex in enumerate(rows):
        prompt = encode_prompt(tokenizer, ex["prompt"], chat_template)
        if contexts is not None:
            prompt = contexts[i] + prompt
        c = fit_length(prompt, encode_response(tokenizer, ex["chosen"]), max_length, policy,
                       report, i)
        r = fit_length(prompt, encode_response(tokenizer, ex["rejected"]), max_length, policy,
                       report, i)
        if c is not None and r is not None:
            out.append((c[0], c[1], r[0], r[1]))
    return out


def collate_pairs(items: list[tuple], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows: ``2N`` rows of the shared layout, ``n_pairs = N``."""
    prompts = [it[0] for it in items] + [it[2] for it in items]
    responses = [it[1] for it in items] + [it[3] for it in items]
    batch = collate_prompt_response(prompts, responses, pad_id)
    batch["n_pairs"] = torch.tensor(len(items))
    return batch


class PairwiseDataModule(TokenizedDataModule):
    """Preference pairs: the scalar reward model trains on them; every value model is judged
    on the held-out ones.

    Args:
        train_path: pairwise file (``{prompt, chosen, rejected}``, binarized UltraFeedback
            message lists, or HH-RLHF transcripts).
        val_path: held-out pairs for pair accuracy.
        **kwargs: the tokenizer, batching (``batch_size`` counts pairs), length, format and
            seed settings of :class:`~dvpo_lightning.data.base.TokenizedDataModule`.
    """

    def __init__(self, train_path: str, val_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_path, self.val_path = train_path, val_path

    def _encode(self, path: str) -> list[tuple]:
        rows = self.load(path, "pairwise", self.format, self.split)
        pairs = encode_pairs(rows, self.tokenizer, self.chat_template, self.max_length,
                             self.length_policy, self.new_report(path))
        self.check_vocabulary(path, (ids for pair in pairs for ids in pair))
        return pairs

    def read_files(self) -> tuple[list, list]:
        return self._encode(self.train_path), self._encode(self.val_path)

    def collate(self, items: list[tuple]) -> dict:
        return collate_pairs(items, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, False, self.collate)
