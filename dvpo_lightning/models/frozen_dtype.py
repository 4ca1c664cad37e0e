"""The frozen models' dtype when ``model.models.frozen_dtype=auto``: bfloat16 where the device
multiplies bfloat16 matrices in hardware, the loaded dtype elsewhere.

A frozen model only runs forward passes, so half precision halves its memory and, where the
hardware has bfloat16 kernels, its matrix-multiply time: a CUDA GPU that supports bfloat16, or
a CPU with AVX-512 BF16 or AMX (oneDNN's bfloat16 GEMM). On a CPU without them PyTorch emulates
bfloat16 arithmetic and the forward is slower than in float32, so ``auto`` keeps the loaded
dtype there. What bfloat16 costs in accuracy (pair accuracy, the reference's log-probs, a
short RL run) is measured by ``benchmarks/frozen_bf16.py`` (docs/models.md).
"""

from __future__ import annotations

import torch
from torch import nn

from dvpo_lightning.models.loading import resolve_dtype


def bf16_kernels(device: torch.device) -> str | None:
    """What gives ``device`` hardware bfloat16 matrix multiplies (for the log line), or None.

    Args:
        device: where the frozen models run (``trainer.strategy.root_device``).
    """
    if device.type == "cuda":
        return "a CUDA GPU with bfloat16" if torch.cuda.is_bf16_supported(
            including_emulation=False) else None
    if device.type == "cpu":
        probes = (("AMX", "_is_amx_tile_supported"),
                  ("AVX-512 BF16", "_is_avx512_bf16_supported"))
        for name, probe in probes:  # (private probes: absent ones count as "no")
            if getattr(torch.cpu, probe, lambda: False)():
                return f"a CPU with {name}"
    return None


def resolve_frozen_dtype(setting: str | None, device: torch.device) -> tuple[str | None, str]:
    """``model.models.frozen_dtype`` as a dtype name for ``device``, and why.

    Returns:
        ``(dtype, why)``: ``dtype`` is ``"float32" | "bfloat16" | "float16"`` or None (keep
        the loaded dtype); ``why`` says how it was chosen, for the start-up log.
    """
    if setting != "auto":
        return setting, "model.init_args.models.frozen_dtype"
    kernels = bf16_kernels(device)
    if kernels:
        return "bfloat16", f"model.init_args.models.frozen_dtype=auto: {kernels}"
    return None, f"model.init_args.models.frozen_dtype=auto: {device.type} has no bfloat16 kernels"


def cast_frozen(frozen: nn.ModuleDict, setting: str | None, device: torch.device,
                follows_strategy: bool = False) -> tuple[str | None, str | None]:
    """Resolve ``frozen_dtype=auto`` on the run's device and cast ``frozen`` to its choice
    (explicit dtypes were applied when the models loaded).

    Args:
        frozen: the frozen models by role (the reference, GVM and reward model the run holds).
        setting: ``model.models.frozen_dtype``.
        device: ``trainer.strategy.root_device``.
        follows_strategy: a strategy casts every parameter itself (DeepSpeed with a 16-bit
            precision): ``auto`` then leaves the frozen models to it.

    Returns:
        ``(dtype, line)``: the dtype name the setting gives them (``setting`` itself unless it
        is ``auto``; None: as loaded, or the strategy's), and the start-up log line for
        ``auto`` (None otherwise).
    """
    if setting != "auto":
        return setting, None
    if follows_strategy or not any(True for _ in frozen.parameters()):
        return None, None
    dtype, why = resolve_frozen_dtype(setting, device)
    if dtype is not None:
        frozen.to(resolve_dtype(dtype))
    return dtype, f"frozen models ({', '.join(frozen)}) in {dtype or 'their loaded dtype'} ({why})"
