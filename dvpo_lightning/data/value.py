"""Returns for the Global Value Model: ``{prompt, response, return}`` rows, optionally with a
trajectory τ of the same behaviour policy prepended as context (the paper's policy
conditioning, §4.1)."""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from torch.utils.data import DataLoader

from dvpo_lightning.data.base import TokenizedDataModule
from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.data.formats import pairs_to_scored
from dvpo_lightning.data.pairwise import collate_pairs, encode_pairs
from dvpo_lightning.data.tokenize import encode_prompt, encode_response, fit_length

TRAIN_KINDS = ("scored", "pairwise")
# What loads a file of another kind given as train_path / val_path (see formats.KIND_FIELDS).
_TRAIN_KIND_FIXES = {
    "pairwise": "set data.init_args.train_kind=pairwise to train on the pairs (chosen → "
                "chosen_return, rejected → rejected_return; configs/gvm_pairs.yaml)",
    "scored": "set data.init_args.train_kind=scored to train on the scores (configs/gvm.yaml)",
}
_VAL_KIND_FIXES = {
    "scored": "data.init_args.val_path takes held-out pairs ({prompt, chosen, rejected}); scored "
              "rows go in data.init_args.train_path with train_kind=scored",
}


class ValueDataModule(TokenizedDataModule):
    """GVM training rows from scalar scores or from ±1 preferences, judged on held-out pairs.

    Args:
        train_path: scored responses (``{prompt, response, score}`` or UltraFeedback nesting) or
            pairwise preferences, by ``train_kind``.
        val_path: held-out pairs for pair accuracy.
        train_kind: ``scored`` (return = score) or ``pairwise`` (chosen → ``chosen_return``,
            rejected → ``rejected_return``, as independent rows;
            docs/algorithm.md#from-data-to-rows).
        chosen_return: return of a chosen response.
        rejected_return: return of a rejected response.
        tau_conditioning: prepend another trajectory (prompt + response) of the same behaviour
            policy (the row's ``policy`` field) as context. The paper describes it; the
            authors' code never implemented it. τ is drawn once, seeded, from the training
            rows with another prompt.
        train_fraction: train on the rows of the first ``⌈fraction · P⌉`` of the ``P``
            distinct prompts of ``train_path`` (file order, all of a prompt's responses
            kept): the GVM-quality sweep's less-data variants. 1.0: every row.
        **kwargs: the tokenizer, batching, length, format (of ``train_path``) and seed
            settings of :class:`~dvpo_lightning.data.base.TokenizedDataModule`.
    """

    def __init__(self, train_path: str, val_path: str,
                 train_kind: Literal["scored", "pairwise"] = "scored",
                 chosen_return: float = 1.0, rejected_return: float = -1.0,
                 tau_conditioning: bool = False, train_fraction: float = 1.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if train_kind not in TRAIN_KINDS:
            raise ValueError(f"data.init_args.train_kind={train_kind!r} is not one of "
                             f"{TRAIN_KINDS}. Fix: set it to one of those")
        self.train_path, self.val_path, self.train_kind = train_path, val_path, train_kind
        self.chosen_return, self.rejected_return = chosen_return, rejected_return
        self.tau_conditioning = tau_conditioning
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"data.init_args.train_fraction={train_fraction}: must be in (0, 1], "
                             "the share of the training prompts to keep (1.0: all)")
        self.train_fraction = train_fraction

    def _train_rows(self) -> list[dict]:
        rows = self.load(self.train_path, self.train_kind, self.format, self.split,
                         other_kinds=_TRAIN_KIND_FIXES)
        if self.train_fraction < 1.0:
            prompts = list(dict.fromkeys(r["prompt"] for r in rows))
            keep = set(prompts[:math.ceil(self.train_fraction * len(prompts))])
            rows = [r for r in rows if r["prompt"] in keep]
        if self.train_kind == "pairwise":
            rows = pairs_to_scored(rows, self.chosen_return, self.rejected_return)
        return rows

    def _tau_pool(self, rows: list[dict]) -> dict[str, list[dict]]:
        pool: dict[str, list[dict]] = {}
        for i, r in enumerate(rows):
            if r.get("policy") is None:
                raise ValueError(
                    f"{self.train_path}, row {i}: field 'policy' is missing; "
                    "data.init_args.tau_conditioning=true needs the behaviour policy of every "
                    "row. Fix: add a 'policy' field, or set data.init_args.tau_conditioning=false")
            pool.setdefault(r["policy"], []).append(r)
        return pool

    def _context(self, pool: dict[str, list[dict]], policy: str | None, prompt, rng) -> list[int]:
        """Token ids of one τ: another trajectory of ``policy`` (another prompt if possible)."""
        if policy not in pool:
            raise ValueError(
                f"{self.val_path}: policy {policy!r} has no training trajectory to condition on "
                f"(training policies: {sorted(pool)}). Fix: evaluate on pairs of the training "
                "policies, or set data.init_args.tau_conditioning=false")
        cands = pool[policy]
        for _ in range(8):
            tau = rng.choice(cands)
            if tau["prompt"] != prompt:
                break
        return (encode_prompt(self.tokenizer, tau["prompt"], self.chat_template)
                + encode_response(self.tokenizer, tau["response"]))

    def read_files(self) -> tuple[list, list]:
        rows = self._train_rows()
        rng = random.Random(self.seed)
        pool = self._tau_pool(rows) if self.tau_conditioning else {}
        report = self.new_report(self.train_path)
        train = []
        for i, r in enumerate(rows):
            prompt = encode_prompt(self.tokenizer, r["prompt"], self.chat_template)
            if self.tau_conditioning:
                prompt = self._context(pool, r["policy"], r["prompt"], rng) + prompt
            fitted = fit_length(prompt, encode_response(self.tokenizer, r["response"]),
                                self.max_length, self.length_policy, report, i)
            if fitted is not None:
                train.append((*fitted, float(r["score"])))
        self.check_vocabulary(self.train_path, (ids for p, r, _ in train for ids in (p, r)))
        pairs = self.load(self.val_path, "pairwise", split=self.split,
                          other_kinds=_VAL_KIND_FIXES)
        contexts = None
        if self.tau_conditioning:
            contexts = [self._context(pool, p.get("policy"), p["prompt"], rng) for p in pairs]
        val = encode_pairs(pairs, self.tokenizer, self.chat_template, self.max_length,
                           self.length_policy, self.new_report(self.val_path), contexts)
        self.check_vocabulary(self.val_path, (ids for pair in val for ids in pair))
        return train, val

    def collate_train(self, items: list[tuple]) -> dict:
        prompts, responses, returns = zip(*items)
        batch = collate_prompt_response(list(prompts), list(responses),
                                        self.tokenizer.pad_token_id)
        batch["returns"] = torch.tensor(returns, dtype=torch.float32)
        return batch

    def collate_val(self, items: list[tuple]) -> dict:
        return collate_pairs(items, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, self.collate_train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, False, self.collate_val)
