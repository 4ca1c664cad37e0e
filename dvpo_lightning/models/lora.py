"""LoRA adapters (``peft``) for the policy and for value-model backbones.

With LoRA only the adapter matrices train (the authors' code trains both the policy and the
GVM this way). Two consequences the modules use:

- the frozen reference policy is the policy with its adapters switched off
  (:func:`adapters_disabled`), so no second copy of the weights is held;
- an export merges the adapters into a copy of the weights (:func:`merged_copy`), so what is
  written is an ordinary model directory every stage and tool loads.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraOptions:
    """LoRA settings (``peft.LoraConfig``).

    Args:
        r: adapter rank.
        alpha: scaling numerator: the update is ``alpha / r · B A``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"`` (every linear layer but the
            output head).
        modules_to_save: extra modules trained fully and saved with the adapter.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"LoRA options r={self.r}, alpha={self.alpha}, dropout={self.dropout}: need "
                "r >= 1, alpha > 0 and 0 <= dropout < 1; fix the `lora` config")


# Modules keep their LoraOptions in their hyper-parameters, which Lightning saves in every
# checkpoint: let `torch.load(weights_only=True)` (what resume uses) rebuild them.
torch.serialization.add_safe_globals([LoraOptions])


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """``model`` wrapped by ``peft`` with fresh adapters; only adapters (and
    ``modules_to_save``) require gradients afterwards."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                     target_modules=options.target_modules,
                     modules_to_save=list(options.modules_to_save) or None)
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    """True for a ``peft`` model."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapters_disabled(model: nn.Module):
    """A context in which ``model`` runs without its adapters: the base weights, i.e. the
    reference policy. A no-op context for a model without adapters."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain ``transformers`` model with the adapters merged into the weights; ``model``
    itself is left as it is (still training its adapters)."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def save_adapter(model: nn.Module, out_dir: str) -> None:
    """The adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``), loadable
    with ``peft.PeftModel.from_pretrained(base, out_dir)``."""
    if is_lora(model):
        model.save_pretrained(out_dir)
