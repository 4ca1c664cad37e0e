"""Write a trained model as a directory every stage and ``transformers`` load."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dvpo_lightning.models.lora import merged_copy, save_adapter
from dvpo_lightning.models.value_model import ValueModel


def save_model(model: nn.Module, out_dir: str | Path) -> None:
    """``model`` in ``out_dir``: a value model writes its backbone (adapters merged) and its
    head; a causal LM its weights with any LoRA adapters merged, plus the adapter alone in
    ``out_dir/adapter`` (``peft.PeftModel.from_pretrained``)."""
    out = Path(out_dir)
    if isinstance(model, ValueModel):
        model.save_pretrained(out)
        return
    merged_copy(model).save_pretrained(str(out))
    save_adapter(model, str(out / "adapter"))
