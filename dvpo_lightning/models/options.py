"""How a run's models are loaded and run: one typed group of settings, ``model.init_args.models``
in every stage. :class:`LoadOptions` is what a stage that trains one model takes (SFT, the
reward model, the GVM); :class:`ModelOptions` adds what only runs with frozen models or a
critic use (RL, DPO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dvpo_lightning.models.lora import LoraOptions

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class LoadOptions:
    """How the trained model loads and runs.

    Args:
        lora: train LoRA adapters instead of every weight (a value model's head trains fully);
            the export merges them (and writes the adapter alone to ``<export_dir>/adapter``).
            In RL and DPO without a ``reference``, the reference is then the policy with its
            adapters switched off.
        dtype: dtype the trained model(s) load in (a value model's head stays float32); None
            or ``auto``: as saved (the trainer's ``precision`` decides the compute dtype either
            way).
        attn_implementation: attention kernel of every model loaded (``eager``, ``sdpa``,
            ``flash_attention_2``, ...); None lets transformers choose.
        gradient_checkpointing: recompute the trained models' activations in the backward
            pass (less memory, ~30 % more update time).
    """

    lora: LoraOptions | None = None
    dtype: DTypeName | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class ModelOptions(LoadOptions):
    """How the policy, the critic and the frozen models are loaded and run.

    Args:
        critic_lora: LoRA adapters for the PPO critic's backbone (its head trains fully).
        frozen_dtype: dtype of the frozen reference, GVM and reward model; None keeps the
            loaded dtype (half precision halves their memory); ``auto``: bfloat16 where the
            run's device has bfloat16 kernels (a CUDA GPU with bfloat16, a CPU with AVX-512
            BF16 or AMX), else as loaded (models/frozen_dtype.py; its measured cost:
            docs/models.md). Under DeepSpeed with a 16-bit precision None and ``auto`` follow
            the policy into it (DeepSpeed casts the whole module) and ``float32`` keeps them in
            float32 (ZeRO-1/2); docs/deepspeed.md.
        offload_frozen: keep the frozen models in CPU memory except while they score a rollout
            or evaluate (frees their accelerator memory during generation and the update; a
            host-device copy per step). Not with DeepSpeed ZeRO-3, whose partitioned weights
            cannot move.
        fused_head: compute log-probs with the output head inside float32 row chunks, so the
            ``(B, T, V)`` logits never exist at once (Llama / Mistral / Qwen2 / Qwen3 outside
            ZeRO-3; other models use ``logits_to_keep``): less memory, one more head matmul
            in the backward.
    """

    critic_lora: LoraOptions | None = None
    frozen_dtype: DTypeName | None = None
    offload_frozen: bool = False
    fused_head: bool = True


# Modules keep their options in their hyper-parameters, which Lightning saves in every
# checkpoint: let `torch.load(weights_only=True)` (what resume uses) rebuild them.
torch.serialization.add_safe_globals([LoadOptions, ModelOptions])
