"""Model loading (local directory or tiny config), value / score heads."""

from dvpo_lightning.models.loading import (
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
)
from dvpo_lightning.models.tiny import TINY_CONFIGS
from dvpo_lightning.models.value_model import ValueModel, freeze

__all__ = ["TINY_CONFIGS", "ValueModel", "freeze", "load_backbone", "load_causal_lm",
           "load_tokenizer", "position_ids_from_mask"]
