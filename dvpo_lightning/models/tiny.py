"""Tiny model configurations for the embedded tasks and for tests.

A name here can stand wherever a model path is accepted (``backbone: tiny-llama``); the model is
then built from the config with random weights and the tokenizer's vocabulary.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig

TINY_CONFIGS: dict[str, dict] = {
    # ~0.26M parameters with the sorting vocabulary: learns the SFT task in 1–2 min on 2 cores.
    "tiny-llama": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=256),
    # ~0.8M parameters: the larger embedded-task model.
    "small-llama": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=512),
    # For unit tests: as small as a transformer gets.
    "test-llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64),
    # The smallest that vLLM's CPU attention serves (a head dimension of at least 32): tests
    # of the vLLM rollout engine.
    "test-llama-32": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=128),
}


def is_tiny(name: str) -> bool:
    return name in TINY_CONFIGS


def tiny_config(name: str, vocab_size: int, pad_token_id: int | None, bos_token_id: int | None,
                eos_token_id: int | None, max_position_embeddings: int = 512) -> PretrainedConfig:
    """The Llama config called ``name`` sized for a tokenizer of ``vocab_size`` tokens."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_CONFIGS)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        **TINY_CONFIGS[name],
    )
