"""The Global Value Model: a value head on every token, trained once on offline returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dvpo_lightning.modules.value_base import ValueHeadModule
from dvpo_lightning.ops.losses import value_regression_loss
from dvpo_lightning.ops.returns import (
    GVM_TARGET_MODES,
    GVM_TARGET_POSITIONS,
    gvm_value_targets,
)
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE
from dvpo_lightning.runtime.log_steps import logs_this_step


@dataclass(frozen=True)
class ReturnTargets:
    """What the GVM's values regress on (paper §4.1; docs/algorithm.md#return-targets), the
    bootstrap always under stop-gradient and the reward ``r`` on the last token.

    Args:
        target: ``td0``: the paper's Eq. 1, ``y_k = r_k + γ·u_{k+1}``; ``td_lambda``: the
            authors' code, TD(λ) returns from the model's own detached values; ``mc``: Monte
            Carlo, every trained position regresses on the (discounted) return.
        gamma: discount γ (paper: 1).
        lam: λ of ``td_lambda`` (authors' code: 0.95).
        positions: trained positions: ``all`` (``u_0 … u_T``, the paper's Q-view, the final
            value's target is ``r``) or ``before_token`` (``u_0 … u_{T-1}``, the authors' code).
    """

    target: Literal["td0", "td_lambda", "mc"] = "td_lambda"
    gamma: float = 1.0
    lam: float = 0.95
    positions: Literal["all", "before_token"] = "all"

    def __post_init__(self) -> None:
        rules = [(self.target in GVM_TARGET_MODES, f"target must be one of {GVM_TARGET_MODES}"),
                 (self.positions in GVM_TARGET_POSITIONS,
                  f"positions must be one of {GVM_TARGET_POSITIONS}"),
                 (0 <= self.gamma <= 1, "gamma must be in [0, 1]"),
                 (0 <= self.lam <= 1, "lam must be in [0, 1]")]
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"model.init_args.returns: {'; '.join(broken)} (got {self}). Fix the "
                             "model.init_args.returns.* keys named")


def trained_returns(gvm_dir: str | None) -> ReturnTargets:
    """The return targets a GVM directory was trained on (its ``dvpo_artifact.json``); the
    defaults when it records none (a directory from elsewhere)."""
    path = Path(gvm_dir or "") / ARTIFACT_FILE
    if not gvm_dir or not path.is_file():
        return ReturnTargets()
    meta = json.loads(path.read_text())
    saved = meta.get("returns") or meta.get("hparams", {}).get("returns")
    return ReturnTargets(**saved) if isinstance(saved, dict) else ReturnTargets()


# The GVM keeps its targets in its hyper-parameters, saved in every checkpoint: let
# `torch.load(weights_only=True)` (what resume uses) rebuild them.
torch.serialization.add_safe_globals([ReturnTargets])


class GVMModule(ValueHeadModule):
    """Regress ``u_0 … u_T`` on returns (paper §4.1), validated by held-out pair accuracy.

    Args:
        returns: the regression target (TD(0), TD(λ) or Monte Carlo), γ, λ and the trained
            positions.
        **kwargs: the backbone, tokenizer, optimizer, model options, head initialisation and
            export directory of :class:`~dvpo_lightning.modules.value_base.ValueHeadModule`.
    """

    kind = "gvm"
    table_title = "GVM"

    def __init__(self, returns: ReturnTargets = ReturnTargets(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.returns = returns

    @property
    def main_aggregation(self) -> str:
        return "mean"

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self.response_values(batch)  # (B, T+1): u_0 … u_T
        r = self.returns
        targets, train_mask = gvm_value_targets(values, batch["response_mask"], batch["returns"],
                                                r.target, r.gamma, r.lam, r.positions)
        loss = value_regression_loss(values, targets, train_mask)
        b = values.shape[0]
        self.log("train/value_loss", loss, prog_bar=True, batch_size=b)
        if logs_this_step(self.trainer):
            self.log("train/value_mean", values.detach()[train_mask].mean(), batch_size=b)
        return loss

    def export_manifest(self, summary: dict) -> dict:
        return {**super().export_manifest(summary), "returns": asdict(self.returns)}
