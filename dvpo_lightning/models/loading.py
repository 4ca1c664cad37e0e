"""Load causal LMs, backbones and tokenizers from a local directory or a tiny config name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dvpo_lightning.models.tiny import is_tiny, tiny_config


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path``, with a pad token (EOS when it had none)."""
    path = str(path)
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"tokenizer path {path!r} does not exist and HF_HUB_OFFLINE=1 forbids a download; "
            "point `tokenizer` at a directory saved with `save_pretrained` (for the embedded "
            "task: run `python -m dvpo_lightning data` first)"
        )
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    """``"float32" | "bfloat16" | "float16"`` → the torch dtype; None or ``"auto"`` → None."""
    if dtype in (None, "auto"):
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(table)} or 'auto'")
    return table[dtype]


def _check_path(name_or_path: str) -> None:
    if not os.path.exists(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor a tiny config name, and "
            "HF_HUB_OFFLINE=1 forbids a download; train the stage that writes it first, or use "
            "one of the tiny configs (tiny-llama, small-llama, test-llama)"
        )


def load_causal_lm(name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                   dtype: str | None = None) -> PreTrainedModel:
    """A causal LM: a tiny config name builds random weights; a path loads ``from_pretrained``."""
    if is_tiny(name_or_path):
        cfg = tiny_config(name_or_path, len(tokenizer), tokenizer.pad_token_id,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
        return AutoModelForCausalLM.from_config(cfg)
    _check_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))


def load_backbone(name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                  dtype: str | None = None) -> PreTrainedModel:
    """A transformer without its LM head (what a value or score head reads)."""
    if is_tiny(name_or_path):
        cfg = tiny_config(name_or_path, len(tokenizer), tokenizer.pad_token_id,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
        return AutoModel.from_config(cfg)
    _check_path(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    return AutoModel.from_pretrained(name_or_path, config=config, dtype=resolve_dtype(dtype))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L) long`` positions counting real tokens only, so left padding does not shift them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
