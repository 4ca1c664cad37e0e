"""Held-out pair accuracy of any value-head directory (GVM, scalar RM, PPO critic) on one file.

One function for all three models, so the Table-3/4 analog compares them on the same pairs
with the same tokenisation and the same reductions (:mod:`dvpo_lightning.metrics.pair_accuracy`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.pairwise import collate_pairs, encode_pairs
from dvpo_lightning.data.tokenize import LengthReport
from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.loading import load_tokenizer
from dvpo_lightning.models.value_model import HEAD_WEIGHTS, ValueModel, freeze
from dvpo_lightning.rollout.scoring import response_values


@torch.no_grad()
def pair_accuracy(model_dir: str, pairs_path: str, tokenizer: str | None = None,
                  batch_size: int = 64, max_length: int = 512,
                  chat_template: bool = True) -> dict:
    """Accuracy of ``model_dir``'s token values on the pairs of ``pairs_path``.

    Args:
        model_dir: a value-head artifact (``value_head.safetensors`` beside the backbone).
        pairs_path: held-out pairwise file (``{prompt, chosen, rejected}`` or another
            pairwise format).
        tokenizer: tokenizer directory (default: the model's own).
        batch_size: pairs per forward pass.
        max_length: longest prompt + response; longer pairs are truncated (counted).
        chat_template: wrap prompts in the tokenizer's chat template, as training did.

    Returns:
        ``{"pairs": N, "accuracy": {aggregation: fraction}}`` over ``u_1 … u_T`` (the values
        after each response token), the protocol of the GVM and RM validation.
    """
    if not (Path(model_dir) / HEAD_WEIGHTS).exists():
        raise FileNotFoundError(
            f"{model_dir} has no {HEAD_WEIGHTS}: pair accuracy needs a value-head artifact "
            "(a GVM, a reward model or a PPO critic export); check the path")
    tok = load_tokenizer(tokenizer or model_dir)
    model = freeze(ValueModel.from_pretrained(model_dir, tok))
    rows = load_examples(pairs_path, "pairwise")
    items = encode_pairs(rows, tok, chat_template, max_length, "truncate",
                         LengthReport(pairs_path, max_length, "truncate"))
    metric = PairAccuracy()
    for i in range(0, len(items), batch_size):
        batch = collate_pairs(items[i:i + batch_size], tok.pad_token_id)
        n = int(batch["n_pairs"])
        values = response_values(model, batch["prompt_ids"], batch["prompt_mask"],
                                 batch["response_ids"], batch["response_mask"])[:, 1:]
        mask = batch["response_mask"]
        metric.update(values[:n], mask[:n], values[n:], mask[n:])
    return {"pairs": len(items), "accuracy": {k: float(v) for k, v in metric.compute().items()}}
