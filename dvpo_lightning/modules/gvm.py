"""The Global Value Model: a value head on every token, trained once on offline returns."""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.models.lora import LoraOptions
from dvpo_lightning.modules.value_base import ValueHeadModule
from dvpo_lightning.ops.losses import value_regression_loss
from dvpo_lightning.ops.returns import gvm_value_targets
from dvpo_lightning.runtime.log_steps import logs_this_step


class GVMModule(ValueHeadModule):
    """Regress ``u_0 … u_T`` on returns with a selectable target (paper §4.1;
    docs/algorithm.md#return-targets).

    Targets (the bootstrap always under stop-gradient, reward ``r`` on the last token):

    - ``td0``: the paper's Eq. 1, ``y_k = r_k + γ·u_{k+1}``.
    - ``td_lambda``: the authors' code, TD(λ) returns from the model's own detached values.
    - ``mc``: Monte Carlo, every trained position regresses on the (discounted) return.

    Args:
        backbone: a local model directory (the SFT policy, as in the paper) or a tiny config.
        tokenizer: tokenizer directory; defaults to ``backbone``'s.
        target: ``td0``, ``td_lambda`` or ``mc``.
        gamma: discount γ (paper: 1).
        lam: λ of ``td_lambda`` (authors' code: 0.95).
        positions: trained positions: ``all`` (``u_0 … u_T``, the paper's Q-view, the final
            value's target is ``r``) or ``before_token`` (``u_0 … u_{T-1}``, the authors' code).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        export_dir: where to write the GVM (backbone + value head) at the end of ``fit``.
        zero_init_head: start the value head at zero (authors' code).
        dtype: dtype to load ``backbone`` in.
        attn_implementation: attention kernel (``eager``, ``sdpa``, ``flash_attention_2``);
            None lets transformers choose.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        lora: train LoRA adapters on the backbone (and the head fully) instead of every weight;
            the export merges them.
    """

    kind = "gvm"
    table_title = "GVM"

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 target: str = "td_lambda", gamma: float = 1.0, lam: float = 0.95,
                 positions: str = "all", lr: float = 3e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 export_dir: str | None = None, zero_init_head: bool = True,
                 dtype: str | None = None, attn_implementation: str | None = None,
                 gradient_checkpointing: bool = False, lora: LoraOptions | None = None) -> None:
        super().__init__(backbone, tokenizer, lr, weight_decay, warmup_steps, min_lr_ratio,
                         export_dir, zero_init_head, dtype, attn_implementation,
                         gradient_checkpointing, lora)
        self.save_hyperparameters()
        if target not in ("td0", "td_lambda", "mc"):
            raise ValueError(f"model.target={target!r} is not one of ('td0', 'td_lambda', 'mc')")
        if positions not in ("all", "before_token"):
            raise ValueError(f"model.positions={positions!r} is not one of ('all', 'before_token')")

    @property
    def main_aggregation(self) -> str:
        return "mean"

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self.response_values(batch)  # (B, T+1): u_0 … u_T
        hp = self.hparams
        targets, train_mask = gvm_value_targets(values, batch["response_mask"], batch["returns"],
                                                hp.target, hp.gamma, hp.lam, hp.positions)
        loss = value_regression_loss(values, targets, train_mask)
        b = values.shape[0]
        self.log("train/value_loss", loss, prog_bar=True, batch_size=b)
        if logs_this_step(self.trainer):
            self.log("train/value_mean", values.detach()[train_mask].mean(), batch_size=b)
        return loss
