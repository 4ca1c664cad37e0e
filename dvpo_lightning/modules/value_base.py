"""What the reward model and the GVM share: a value head model, pair-accuracy validation,
a printed accuracy table and the export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dvpo_lightning.data.collate import join, response_slice
from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.compat import check_fits_context
from dvpo_lightning.models.loading import load_tokenizer
from dvpo_lightning.models.lora import LoraOptions
from dvpo_lightning.models.value_model import ValueModel
from dvpo_lightning.modules.optim import adamw, warmup_cosine
from dvpo_lightning.runtime.artifacts import export_atomic
from dvpo_lightning.runtime.checkpointing import ReloadsFrozenBase
from dvpo_lightning.runtime.loggers import has_wandb, log_files, log_table


def format_accuracy_table(title: str, acc: dict[str, float], n_pairs: int) -> str:
    """A markdown table of pair accuracy per aggregation."""
    lines = [f"{title} — held-out pair accuracy ({n_pairs} pairs)", "",
             "| aggregation | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in acc.items()]
    return "\n".join(lines)


class ValueHeadModule(ReloadsFrozenBase, L.LightningModule):
    """Base of :class:`RewardModelModule` and :class:`GVMModule` (not used on its own)."""

    kind = "value"
    table_title = "Value model"

    def __init__(self, backbone: str, tokenizer: str | None, lr: float, weight_decay: float,
                 warmup_steps: int, min_lr_ratio: float, export_dir: str | None,
                 zero_init_head: bool, dtype: str | None,
                 attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                 lora: LoraOptions | None = None) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer or backbone)
        self.model = ValueModel.from_pretrained(backbone, self.tokenizer, self.kind,
                                                zero_init_head, dtype, attn_implementation,
                                                gradient_checkpointing, lora)
        self.val_acc = PairAccuracy()
        self.last_accuracy: dict[str, float] = {}
        self.last_val_pairs = 0

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "max_length"):
            check_fits_context(dm.max_length, self.model.backbone.config, "data.max_length")

    def response_values(self, batch: dict) -> Tensor:
        """``u_0 … u_T``: ``(B, T + 1)`` head outputs from the last prompt token on."""
        ids, mask = join(batch)
        return response_slice(self.model(ids, mask), batch["prompt_ids"].shape[1])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = int(batch["n_pairs"])
        token_values = self.response_values(batch)[:, 1:]  # u_1 … u_T
        mask = batch["response_mask"]
        self.val_acc.update(token_values[:n], mask[:n], token_values[n:], mask[n:])
        self.last_val_pairs += n

    def on_validation_epoch_start(self) -> None:
        self.last_val_pairs = 0

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.last_accuracy = {k: float(v) for k, v in acc.items()}
        for k, v in acc.items():
            self.log(f"val/pair_acc/{k}", v, prog_bar=k == self.main_aggregation)

    def _log_token_values(self, log_dir: Path, n_pairs: int = 4) -> None:
        """The token-value picture of the first held-out pairs (Figure 3 analog) to W&B."""
        from dvpo_lightning.data.examples import file_examples
        from dvpo_lightning.report import token_values as tv

        val_path = getattr(self.trainer.datamodule, "val_path", None)
        if not val_path or getattr(self.trainer.strategy, "zero_stage_3", False):
            return  # (ZeRO-3 weights are partitioned outside the engine's forward)
        examples = tv.token_values(self.model, self.tokenizer, file_examples(val_path, n_pairs),
                                   getattr(self.trainer.datamodule, "chat_template", True))
        out = log_dir / "token_values"
        out.mkdir(parents=True, exist_ok=True)
        log_files(self.trainer, {
            "eval/token_values": tv.render_png(examples, out / "token_values.png"),
            "eval/token_values_html": tv.render_html(examples, out / "token_values.html",
                                                     title=f"{self.table_title}: token values")})

    @property
    def main_aggregation(self) -> str:
        return "final"

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: adapters
        opt = adamw(trainable, self.hparams.lr, self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective
        if not self.trainer.is_global_zero:
            return
        if self.last_accuracy:
            table = format_accuracy_table(self.table_title, self.last_accuracy,
                                          self.last_val_pairs)
            print("\n" + table + "\n", flush=True)
            log_dir.mkdir(parents=True, exist_ok=True)
            log_table(self.trainer, "eval/pair_accuracy", ["aggregation", "accuracy"],
                      [[k, v] for k, v in self.last_accuracy.items()])
            (log_dir / "pair_accuracy.json").write_text(json.dumps(
                {"model": self.kind, "pairs": self.last_val_pairs,
                 "accuracy": self.last_accuracy, "global_step": self.global_step}, indent=2))
            if has_wandb(self.trainer):
                self._log_token_values(log_dir)
        if self.hparams.export_dir:
            def write(d):
                self.model.save_pretrained(d)
                self.tokenizer.save_pretrained(str(d))

            out = export_atomic(self.hparams.export_dir, write,
                                {"kind": self.kind, "hparams": dict(self.hparams),
                                 "global_step": self.global_step,
                                 "pair_accuracy": self.last_accuracy})
            rank_zero_info(f"{self.table_title} written to {out}")
