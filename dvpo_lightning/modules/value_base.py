"""What the reward model and the GVM share: a value head model, pair-accuracy validation and
the run summary (an accuracy table, the token-value picture)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.loading import load_tokenizer
from dvpo_lightning.models.options import LoadOptions
from dvpo_lightning.models.value_model import ValueModel
from dvpo_lightning.modules.optim import OptimSettings
from dvpo_lightning.modules.stage import SingleModelStage
from dvpo_lightning.rollout.scoring import response_values


def format_accuracy_table(title: str, acc: dict[str, float], n_pairs: int) -> str:
    """A markdown table of pair accuracy per aggregation."""
    lines = [f"{title} — held-out pair accuracy ({n_pairs} pairs)", "",
             "| aggregation | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in acc.items()]
    return "\n".join(lines)


class ValueHeadModule(SingleModelStage):
    """Base of :class:`RewardModelModule`, :class:`ScoreRewardModelModule` and
    :class:`GVMModule`: a value head on a causal LM's body (not used on its own). Its
    arguments are theirs; a subclass adds its own as keywords and passes these on.

    Args:
        backbone: a local model directory (the SFT policy, as in the paper) or a tiny config.
        tokenizer: tokenizer directory; defaults to ``backbone``'s.
        optim: the optimizer and its warm-up / cosine schedule.
        models: how the model loads and runs (LoRA on the backbone, the head always training
            fully; dtype, attention kernel, gradient checkpointing); the RL runs' key.
        zero_init_head: start the head at zero (the authors' code).
        export_dir: where to write the model (backbone + head, LoRA merged) at the end of
            ``fit``; None writes nothing.
    """

    kind = "value"
    table_title = "Value model"
    main_aggregation = "final"

    def __init__(self, backbone: str = "tiny-llama", tokenizer: str | None = None,
                 optim: OptimSettings = OptimSettings(lr=3e-4),
                 models: LoadOptions = LoadOptions(), zero_init_head: bool = True,
                 export_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim, self.export_dir = optim, export_dir
        self.tokenizer = load_tokenizer(tokenizer or backbone)
        self.model = ValueModel.from_pretrained(backbone, self.tokenizer, self.kind,
                                                zero_init_head, models.dtype,
                                                models.attn_implementation,
                                                models.gradient_checkpointing, models.lora)
        self.val_acc = PairAccuracy()
        self.last_accuracy: dict[str, float] = {}
        self.last_val_pairs = 0

    def setup(self, stage: str) -> None:
        self.check_context(self.model.backbone.config)

    def response_values(self, batch: dict) -> Tensor:
        """``u_0 … u_T``: ``(B, T + 1)`` head outputs from the last prompt token on."""
        return response_values(self.model, batch["prompt_ids"], batch["prompt_mask"],
                               batch["response_ids"], batch["response_mask"])

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

    # ------------------------------------------------------------------ summary and export
    def summary(self) -> dict:
        return {"model": self.kind, "pairs": self.last_val_pairs, "accuracy": self.last_accuracy,
                "global_step": self.global_step}

    def summary_tables(self) -> dict[str, tuple[list[str], list[list]]]:
        if not self.last_accuracy:
            return {}
        return {"eval/pair_accuracy": (["aggregation", "accuracy"],
                                       [[k, v] for k, v in self.last_accuracy.items()])}

    def summary_line(self, summary: dict) -> str:
        if not self.last_accuracy:
            return ""
        return "\n" + format_accuracy_table(self.table_title, self.last_accuracy,
                                            self.last_val_pairs) + "\n"

    def summary_pictures(self, log_dir: Path, summary: dict, n_pairs: int = 4) -> dict[str, Path]:
        """The token-value picture of the first held-out pairs (Figure 3 analog)."""
        from dvpo_lightning.data.examples import file_examples
        from dvpo_lightning.report import token_values as tv

        dm = self.trainer.datamodule
        val_path = getattr(dm, "val_path", None)
        if not val_path or getattr(self.trainer.strategy, "zero_stage_3", False):
            return {}  # (ZeRO-3 weights are partitioned outside the engine's forward)
        examples = tv.token_values(self.model, self.tokenizer, file_examples(val_path, n_pairs),
                                   getattr(dm, "chat_template", True))
        out = log_dir / "token_values"
        out.mkdir(parents=True, exist_ok=True)
        return {"eval/token_values": tv.render_png(examples, out / "token_values.png"),
                "eval/token_values_html": tv.render_html(
                    examples, out / "token_values.html",
                    title=f"{self.table_title}: token values")}

    def export_manifest(self, summary: dict) -> dict:
        return {"kind": self.kind, "hparams": dict(self.hparams), "global_step": self.global_step,
                "pair_accuracy": self.last_accuracy}
