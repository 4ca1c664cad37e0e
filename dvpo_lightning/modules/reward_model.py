"""The scalar reward model (the paper's ScalarRM): Bradley–Terry loss on the last token's score
for preference pairs, or a regression on annotated scores (the information 2 × 2)."""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.models.lora import LoraOptions
from dvpo_lightning.modules.value_base import ValueHeadModule
from dvpo_lightning.ops.losses import bradley_terry_loss, score_regression_loss
from dvpo_lightning.rollout.scoring import final_scores
from dvpo_lightning.runtime.log_steps import logs_this_step


class RewardModelModule(ValueHeadModule):
    """Scalar reward model trained on preference pairs.

    Loss: ``−log σ(r(x, y_c) − r(x, y_r))`` with ``r`` the head output at the last response
    token. Validation: held-out pair accuracy with every aggregation (``final`` is the RM's own).

    Args:
        backbone: a local model directory (the SFT policy, as in the paper) or a tiny config.
        tokenizer: tokenizer directory; defaults to ``backbone``'s.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        margin: optional margin in the Bradley–Terry loss.
        export_dir: where to write the reward model (backbone + head) at the end of ``fit``.
        zero_init_head: start the score head at zero.
        dtype: dtype to load ``backbone`` in.
        attn_implementation: attention kernel (``eager``, ``sdpa``, ``flash_attention_2``);
            None lets transformers choose.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        lora: train LoRA adapters on the backbone (and the head fully) instead of every weight;
            the export merges them.
    """

    kind = "reward"
    table_title = "ScalarRM"

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 50,
                 min_lr_ratio: float = 0.1, margin: float | None = None,
                 export_dir: str | None = None, zero_init_head: bool = True,
                 dtype: str | None = None, attn_implementation: str | None = None,
                 gradient_checkpointing: bool = False, lora: LoraOptions | None = None) -> None:
        super().__init__(backbone, tokenizer, lr, weight_decay, warmup_steps, min_lr_ratio,
                         export_dir, zero_init_head, dtype, attn_implementation,
                         gradient_checkpointing, lora)
        self.save_hyperparameters()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        n = int(batch["n_pairs"])
        scores = final_scores(self.response_values(batch), batch["response_mask"])
        loss = bradley_terry_loss(scores[:n], scores[n:], self.hparams.margin)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if logs_this_step(self.trainer):
            self.log("train/reward_acc", (scores[:n] > scores[n:]).float().mean(), batch_size=n)
            self.log("train/reward_margin", (scores[:n] - scores[n:]).mean(), batch_size=n)
        return loss


class ScoreRewardModelModule(RewardModelModule):
    """Scalar reward model regressed on annotated scores: the reward-model side of the study's
    information 2 × 2 ({value model, reward model} × {scores, pairs}; docs/study.md).

    Loss: ``mean ½·(r(x, y) − s)²`` with ``r`` the head output at the last response token and
    ``s`` the row's score — the GVM's data (``ValueDataModule``, ``train_kind: scored``) with
    the reward model's shape: one number per finished response, no per-token values. It
    exports a reward model like :class:`RewardModelModule` (``kind: reward``), so every RL
    method that reads ``model.init_args.reward_model`` can use it unchanged.

    Args: as :class:`RewardModelModule` (``margin`` does not apply and must stay None).
    """

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 50,
                 min_lr_ratio: float = 0.1, margin: float | None = None,
                 export_dir: str | None = None, zero_init_head: bool = True,
                 dtype: str | None = None, attn_implementation: str | None = None,
                 gradient_checkpointing: bool = False, lora: LoraOptions | None = None) -> None:
        if margin is not None:
            raise ValueError(f"model.margin={margin}: a margin belongs to the Bradley–Terry "
                             "loss on pairs; a reward model regressed on scores has none. "
                             "Fix: remove model.init_args.margin")
        super().__init__(backbone, tokenizer, lr, weight_decay, warmup_steps, min_lr_ratio,
                         None, export_dir, zero_init_head, dtype, attn_implementation,
                         gradient_checkpointing, lora)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "returns" not in batch:
            raise ValueError(
                "ScoreRewardModelModule trains on scored rows (a batch with 'returns'), got a "
                "batch without them. Fix: use data.class_path "
                "dvpo_lightning.data.value.ValueDataModule with data.train_kind: scored, or "
                "RewardModelModule for preference pairs")
        scores = final_scores(self.response_values(batch), batch["response_mask"])
        loss = score_regression_loss(scores, batch["returns"])
        b = scores.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if logs_this_step(self.trainer):
            self.log("train/score_mean", scores.detach().mean(), batch_size=b)
        return loss
