"""SFT demonstrations: ``{prompt, response}`` or chat ``messages``."""

from __future__ import annotations

import random

from torch.utils.data import DataLoader

from dvpo_lightning.data.base import TokenizedDataModule
from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.data.tokenize import encode_prompt, encode_response, fit_length


class SFTDataModule(TokenizedDataModule):
    """Prompt/response pairs for next-token training on the response tokens.

    Args:
        train_path: SFT file (jsonl / json / parquet / datasets directory).
        val_path: held-out SFT file; None holds out ``val_fraction`` of ``train_path``.
        val_fraction: fraction of the training rows held out when ``val_path`` is None.
        **kwargs: the tokenizer, batching, length, format and seed settings of
            :class:`~dvpo_lightning.data.base.TokenizedDataModule`.
    """

    def __init__(self, train_path: str, val_path: str | None = None,
                 val_fraction: float = 0.02, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}. "
                             "Fix: set it to a fraction below 1, or give data.init_args.val_path")
        self.train_path, self.val_path, self.val_fraction = train_path, val_path, val_fraction

    def _encode(self, path: str) -> list[tuple[list[int], list[int]]]:
        report = self.new_report(path)
        out = []
        for i, ex in enumerate(self.load(path, "sft", self.format, self.split)):
            fitted = fit_length(encode_prompt(self.tokenizer, ex["prompt"], self.chat_template),
                                encode_response(self.tokenizer, ex["response"]),
                                self.max_length, self.length_policy, report, i)
            if fitted is not None:
                out.append(fitted)
        self.check_vocabulary(path, (ids for pair in out for ids in pair))
        return out

    def read_files(self) -> tuple[list, list]:
        train = self._encode(self.train_path)
        if self.val_path:
            val = self._encode(self.val_path)
        else:
            random.Random(self.seed).shuffle(train)
            n_val = max(1, int(len(train) * self.val_fraction)) if self.val_fraction else 0
            val, train = train[:n_val], train[n_val:]
        return train, val

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict:
        prompts, responses = zip(*items)
        return collate_prompt_response(list(prompts), list(responses), self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, False, self.collate)
