"""Supervised fine-tuning: next-token loss on the response tokens only."""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer
from dvpo_lightning.models.options import LoadOptions
from dvpo_lightning.modules.optim import OptimSettings
from dvpo_lightning.modules.stage import SingleModelStage
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.runtime.log_steps import logs_this_step


class SFTModule(SingleModelStage):
    """Next-token cross-entropy on response tokens (prompt tokens are context only).

    Args:
        backbone: a local model directory or a tiny config name (``tiny-llama``: random init).
        tokenizer: tokenizer directory; defaults to ``backbone``'s.
        optim: the optimizer and its warm-up / cosine schedule.
        models: how the model loads and runs (LoRA, dtype, attention kernel, gradient
            checkpointing); the RL runs' key.
        export_dir: where to write the trained policy (``save_pretrained`` + tokenizer) at the
            end of ``fit``; None writes nothing.
    """

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 optim: OptimSettings = OptimSettings(lr=1e-3, warmup_steps=100),
                 models: LoadOptions = LoadOptions(), export_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim, self.export_dir = optim, export_dir
        self.tokenizer = load_tokenizer(tokenizer or backbone)
        self.model = load_causal_lm(backbone, self.tokenizer, models.dtype,
                                    models.attn_implementation, models.gradient_checkpointing,
                                    models.lora)

    def setup(self, stage: str) -> None:
        self.check_context(self.model.config)

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
        if logs_this_step(self.trainer):
            self.log("train/tokens", n.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n))

    def summary(self) -> dict:
        return {"stage": "sft", "global_step": self.global_step}

    def export_manifest(self, summary: dict) -> dict:
        return {"kind": "policy", "stage": "sft", "hparams": dict(self.hparams),
                "global_step": self.global_step}
