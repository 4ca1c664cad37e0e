"""A transformer backbone with a scalar head on every position.

One class serves the Global Value Model (values on every token), the scalar reward model (the
score at the last token) and the PPO critic. The artifact is a directory that ``transformers``
loads as the backbone (``AutoModel.from_pretrained``) plus ``value_head.safetensors`` and
``value_head.json`` for the head.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dvpo_lightning.models.loading import load_backbone, position_ids_from_mask
from dvpo_lightning.models.lora import LoraOptions, merged_copy
from dvpo_lightning.models.named import resolve_model

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


class ValueModel(nn.Module):
    """``backbone`` + ``Linear(hidden, 1)``; ``forward`` gives one float per position.

    Args:
        backbone: a transformer without LM head (``AutoModel``).
        kind: what the head means: ``"gvm"``, ``"reward"`` or ``"critic"`` (saved with it).
        zero_init_head: start the head at zero (the authors' GVM does) instead of a small
            random init.
    """

    def __init__(self, backbone: PreTrainedModel, kind: str = "gvm",
                 zero_init_head: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L) long``, ``(B, L)`` → ``(B, L) float32`` head outputs at every position."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_pretrained(cls, name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                        kind: str = "gvm", zero_init_head: bool = True,
                        dtype: str | None = None, attn_implementation: str | None = None,
                        gradient_checkpointing: bool = False,
                        lora: LoraOptions | None = None) -> ValueModel:
        """Backbone from ``name_or_path`` (any causal LM or backbone checkpoint: a fresh head
        goes on its body); the head too when the directory has one. ``lora`` wraps the
        backbone with adapters (the head always trains fully); other arguments as
        :func:`~dvpo_lightning.models.loading.load_causal_lm`."""
        backbone = load_backbone(name_or_path, tokenizer, dtype, attn_implementation,
                                 gradient_checkpointing, lora)
        model = cls(backbone, kind, zero_init_head)
        root = Path(resolve_model(name_or_path))
        head_file = root / HEAD_WEIGHTS
        if head_file.exists():
            model.head.load_state_dict(load_file(str(head_file)))
            meta = json.loads((root / HEAD_CONFIG).read_text())
            model.kind = meta.get("kind", kind)
        return model

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merged_copy(self.backbone).save_pretrained(str(out))  # adapters merged: a plain model
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps(
            {"kind": self.kind, "hidden_size": self.head.in_features}, indent=2))


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module

