"""What a refresh trains: the GVM on its stage-1 regression, or a scalar reward model on the
Bradley–Terry loss of its stage-1 pairs (PPO, GRPO and the other reward-model methods with the
same labels as semi-online DVPO)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dvpo_lightning.data.collate import collate_prompt_response
from dvpo_lightning.ops.losses import bradley_terry_loss, value_regression_loss
from dvpo_lightning.ops.returns import gvm_value_targets
from dvpo_lightning.refresh.buffer import LabelledRow
from dvpo_lightning.rollout.scoring import final_scores, response_values

if TYPE_CHECKING:  # (a runtime import would cycle: modules/ imports the refresh)
    from dvpo_lightning.modules.gvm import ReturnTargets

Encode = Callable[[object], list[int]]
"""A prompt or a response (text) → its token ids, as the run tokenises them."""


def _batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
           device: torch.device) -> dict[str, Tensor]:
    batch = collate_prompt_response(prompts, responses, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


class GVMObjective:
    """The GVM's stage-1 regression (paper Eq. 1 / TD(λ) / Monte Carlo) on scored rows: each
    labelled response's return is its target.

    Args:
        returns: the targets the GVM was trained on (its directory's record).
    """

    role = "gvm"
    aggregation = "mean"  # (the GVM's validation aggregation: the drift is measured by it)
    replay_kind = "scored"

    def __init__(self, returns: ReturnTargets) -> None:
        self.returns = returns

    def replay_item(self, row: dict, prompt: Encode, response: Encode) -> tuple:
        """``(prompt ids, response ids, return)`` of a stage-1 scored row."""
        return prompt(row["prompt"]), response(row["response"]), float(row["score"])

    def from_buffer(self, rows: list[LabelledRow], rng: random.Random, k: int) -> list[tuple]:
        """``k`` labelled rows drawn with replacement, as replay items."""
        if not rows:
            return []
        return [(r.prompt_ids, r.response_ids, r.target) for r in rng.choices(rows, k=k)]

    def loss(self, model: nn.Module, items: list[tuple], pad_id: int,
             device: torch.device) -> Tensor:
        batch = _batch([p for p, _, _ in items], [q for _, q, _ in items], pad_id, device)
        returns = torch.tensor([t for _, _, t in items], dtype=torch.float32, device=device)
        values = response_values(model, batch["prompt_ids"], batch["prompt_mask"],
                                 batch["response_ids"], batch["response_mask"])
        r = self.returns
        targets, mask = gvm_value_targets(values, batch["response_mask"], returns, r.target,
                                          r.gamma, r.lam, r.positions)
        return value_regression_loss(values, targets, mask)


class RewardObjective:
    """The scalar reward model's Bradley–Terry loss ``−log σ(r(x, y_c) − r(x, y_r))`` on pairs:
    the two labelled responses to a prompt, the better-labelled one chosen (a tie is no pair),
    and the stage-1 pairs as replay."""

    role = "reward_model"
    aggregation = "final"  # (the reward model's own: its score is the last token's value)
    replay_kind = "pairwise"

    def replay_item(self, row: dict, prompt: Encode, response: Encode) -> tuple:
        """``(prompt ids, chosen ids, rejected ids)`` of a stage-1 pair."""
        return prompt(row["prompt"]), response(row["chosen"]), response(row["rejected"])

    def from_buffer(self, rows: list[LabelledRow], rng: random.Random, k: int) -> list[tuple]:
        """``k`` pairs drawn with replacement from the buffer (bought two rows at a time)."""
        pairs = []
        for a, b in zip(rows[0::2], rows[1::2]):
            if a.label != b.label:
                c, r = (a, b) if a.label > b.label else (b, a)
                pairs.append((c.prompt_ids, c.response_ids, r.response_ids))
        return rng.choices(pairs, k=k) if pairs else []

    def loss(self, model: nn.Module, items: list[tuple], pad_id: int,
             device: torch.device) -> Tensor:
        prompts = [p for p, _, _ in items]
        batch = _batch(prompts + prompts, [c for _, c, _ in items] + [r for _, _, r in items],
                       pad_id, device)
        scores = final_scores(response_values(model, batch["prompt_ids"], batch["prompt_mask"],
                                              batch["response_ids"], batch["response_mask"]),
                              batch["response_mask"])
        n = len(items)
        return bradley_terry_loss(scores[:n], scores[n:])
