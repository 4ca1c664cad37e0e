"""Load causal LMs, backbones and tokenizers: a local directory, a GGUF file, a named model
(:mod:`dvpo_lightning.models.named`), a tiny config name, or a hub id where a network exists."""

from __future__ import annotations

import inspect
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

from dvpo_lightning.models.lora import LoraOptions, apply_lora
from dvpo_lightning.models.named import resolve_model
from dvpo_lightning.models.tiny import is_tiny, tiny_config

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path`` (or of a named model / GGUF file), with a pad token (EOS
    when it had none)."""
    path = resolve_model(path)
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
            f"model {name_or_path!r} is neither a local directory, a .gguf file, a named model "
            "nor a tiny config name, and HF_HUB_OFFLINE=1 forbids a download; train the stage "
            "that writes it first, or use a named model (smollm2-135m-instruct) or a tiny "
            "config (tiny-llama, small-llama, test-llama)"
        )


def _check_attn(attn_implementation: str | None) -> None:
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not one of "
                         f"{ATTN_IMPLEMENTATIONS}; fix the model's `attn_implementation` key "
                         "(None lets transformers choose)")


def _finish(model: PreTrainedModel, gradient_checkpointing: bool,
            lora: LoraOptions | None) -> PreTrainedModel:
    if gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and without use_cache juggling
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return apply_lora(model, lora) if lora is not None else model


def _load(auto_cls, name_or_path: str, tokenizer: PreTrainedTokenizerBase, dtype: str | None,
          attn_implementation: str | None) -> PreTrainedModel:
    _check_attn(attn_implementation)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if is_tiny(name_or_path):
        cfg = tiny_config(name_or_path, len(tokenizer), tokenizer.pad_token_id,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
        model = auto_cls.from_config(cfg, **extra)
        torch_dtype = resolve_dtype(dtype)  # (random weights: cast after they are drawn)
        return model.to(torch_dtype) if torch_dtype is not None else model
    path = resolve_model(name_or_path)
    _check_path(path)
    config = AutoConfig.from_pretrained(path)
    return auto_cls.from_pretrained(path, config=config, dtype=resolve_dtype(dtype), **extra)


def load_causal_lm(name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                   dtype: str | None = None, attn_implementation: str | None = None,
                   gradient_checkpointing: bool = False,
                   lora: LoraOptions | None = None) -> PreTrainedModel:
    """A causal LM: a tiny config name builds random weights; anything else loads
    ``from_pretrained`` (see the module docstring).

    Args:
        name_or_path: directory, ``.gguf`` file, named model, tiny config name or hub id.
        tokenizer: the run's tokenizer (sizes a tiny model's vocabulary).
        dtype: ``float32``, ``bfloat16``, ``float16``, or None / ``auto`` (as saved).
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2`` …; None: the default.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        lora: wrap with fresh LoRA adapters (only they train); None trains every weight.
    """
    model = _load(AutoModelForCausalLM, name_or_path, tokenizer, dtype, attn_implementation)
    return _finish(model, gradient_checkpointing, lora)


def load_backbone(name_or_path: str, tokenizer: PreTrainedTokenizerBase,
                  dtype: str | None = None, attn_implementation: str | None = None,
                  gradient_checkpointing: bool = False,
                  lora: LoraOptions | None = None) -> PreTrainedModel:
    """A transformer without its LM head (what a value or score head reads); a causal-LM
    checkpoint loads its body. Arguments as :func:`load_causal_lm`."""
    model = _load(AutoModel, name_or_path, tokenizer, dtype, attn_implementation)
    return _finish(model, gradient_checkpointing, lora)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L) long`` positions counting real tokens only, so left padding does not shift them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the ``forward`` of ``model`` (of the model under a peft wrapper) names ``name``."""
    try:
        return name in inspect.signature(unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return False
