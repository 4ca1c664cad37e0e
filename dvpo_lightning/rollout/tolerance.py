"""The sampler probe's default tolerance, by trainer precision, engine dtype and device.

The RL module compares the engine's log-probs of its samples with the trainer's ``logp_old``
every step (mean ``|Δ log p|`` per token). A healthy gap is the two sides' numerical noise,
which the dtypes and the device set: ~1e-7 for float32 on both sides on a CPU, a few 1e-2 for
a bf16-mixed trainer beside a float32 engine. One fixed tolerance is either far too loose for
float32 (an engine one update behind passes) or too tight for bfloat16 (a sound run stops).
``logp_tolerance: auto`` takes it from :data:`AUTO_TOLERANCE`, measured on CPU with the tiny
test models and SmolLM2 (docs/reliability.md gives the numbers and the commands); where the
noise is larger than one update's drift, the push check (:mod:`.push_check`) is what catches
a stale engine, and the tolerance catches what is grossly wrong. The engine's dtype is
``rollout.vllm.dtype`` with ``auto`` resolved by the trainer's precision (:func:`engine_dtype`,
the rule the engine builds with).
"""

from __future__ import annotations

import torch

# (trainer precision family, engine dtype, device type) → mean |Δ log p| per token.
# CPU rows measured (docs/reliability.md); CUDA rows set from the CPU ones with the margin of
# GPU kernels (TF32 in float32, bfloat16 accumulation orders), not yet measured on a GPU.
AUTO_TOLERANCE: dict[tuple[str, str, str], float] = {
    ("32", "float32", "cpu"): 2e-4,
    ("32", "float32", "cuda"): 2e-3,
}
# any pairing with a 16-bit side, on either device: 2.9× the largest healthy mean measured on a
# CPU (0.052: SmolLM2, 32-true beside bfloat16; bf16-mixed and bf16-true up to 0.050)
LOW_PRECISION_TOLERANCE = 0.15


# trainer precision family → the engine dtype ``rollout.vllm.dtype: auto`` follows it to
ENGINE_DTYPE = {"32": "float32", "bf16": "bfloat16", "16": "float16"}


def precision_family(precision: str) -> str:
    """Lightning's ``trainer.precision`` (``32-true``, ``bf16-mixed``, ``16-mixed``, …) →
    ``32`` (float32 or float64 math), ``bf16``, ``16``, or the string itself if unknown."""
    head = str(precision).split("-")[0]
    return {"64": "32", "32": "32", "bf16": "bf16", "16": "16"}.get(head, str(precision))


def engine_dtype(option: str, precision: str | None) -> str:
    """``rollout.vllm.dtype`` as the engine resolves it: ``auto`` follows the trainer's
    ``precision`` (32 / 64 → float32, bf16 → bfloat16, 16 → float16; None — an engine used
    without a trainer — and any other precision → float32); a named dtype is itself."""
    if option != "auto":
        return option
    return ENGINE_DTYPE.get(precision_family(precision), "float32") if precision else "float32"


def auto_logp_tolerance(precision: str, dtype: str, device: torch.device) -> float:
    """The calibrated tolerance for a trainer at ``precision`` beside an engine in ``dtype``
    (already resolved, see :func:`engine_dtype`) on ``device``."""
    key = (precision_family(precision), dtype, device.type)
    return AUTO_TOLERANCE.get(key, LOW_PRECISION_TOLERANCE)


def resolve_logp_tolerance(setting: float | str | None, precision: str, dtype_option: str,
                           device: torch.device) -> float | None:
    """``rollout.vllm.logp_tolerance`` → the number the run uses: a user's number as given,
    None (only log the gap) as None, ``auto`` from :func:`auto_logp_tolerance`."""
    if setting is None:
        return None
    if setting == "auto":
        return auto_logp_tolerance(precision, engine_dtype(dtype_option, precision), device)
    if isinstance(setting, str) or setting <= 0:
        raise ValueError(f"model.init_args.rollout.vllm.logp_tolerance={setting!r}: expected a "
                         "positive number, `auto` or null. Fix: leave it at auto (calibrated by "
                         "precision, engine dtype and device) or give the mean |Δ log p| per "
                         "token past which the run stops")
    return float(setting)
