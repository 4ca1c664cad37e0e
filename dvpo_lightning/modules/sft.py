"""Supervised fine-tuning: next-token loss on the response tokens only."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dvpo_lightning.models.compat import check_fits_context
from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, merged_copy, save_adapter
from dvpo_lightning.modules.optim import adamw, warmup_cosine
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.runtime.artifacts import export_atomic
from dvpo_lightning.runtime.checkpointing import ReloadsFrozenBase


class SFTModule(ReloadsFrozenBase, L.LightningModule):
    """Next-token cross-entropy on response tokens (prompt tokens are context only).

    Args:
        backbone: a local model directory or a tiny config name (``tiny-llama``: random init).
        tokenizer: tokenizer directory; defaults to ``backbone``'s.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        export_dir: where to write the trained policy (``save_pretrained`` + tokenizer) at the
            end of ``fit``; None writes nothing.
        dtype: dtype to load ``backbone`` in (``auto``, ``float32``, ``bfloat16``).
        attn_implementation: attention kernel (``eager``, ``sdpa``, ``flash_attention_2``);
            None lets transformers choose.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        lora: train LoRA adapters instead of every weight; the export merges them (and
            writes the adapter alone to ``<export_dir>/adapter``).
    """

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, export_dir: str | None = None,
                 dtype: str | None = None, attn_implementation: str | None = None,
                 gradient_checkpointing: bool = False, lora: LoraOptions | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or backbone)
        self.model = load_causal_lm(backbone, self.tokenizer, dtype, attn_implementation,
                                    gradient_checkpointing, lora)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "max_length"):
            check_fits_context(dm.max_length, self.model.config, "data.max_length")

    def forward(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Mean response-token NLL and the number of response tokens."""
        rmask = batch["response_mask"]
        logp, _ = policy_logps(self.model, batch["prompt_ids"], batch["prompt_mask"],
                               batch["response_ids"], rmask)
        n = rmask.sum()
        return -logp.sum() / n.clamp(min=1), n

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, n = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["response_ids"].shape[0])
        self.log("train/tokens", n.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n))

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: adapters
        opt = adamw(trainable, self.hparams.lr, self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            def write(d):
                merged_copy(self.model).save_pretrained(str(d))
                save_adapter(self.model, str(d / "adapter"))
                self.tokenizer.save_pretrained(str(d))

            out = export_atomic(self.hparams.export_dir, write,
                                {"kind": "policy", "stage": "sft", "hparams": dict(self.hparams),
                                 "global_step": self.global_step})
            rank_zero_info(f"SFT policy written to {out}")
