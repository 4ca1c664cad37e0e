"""What a config asks of DeepSpeed reaches DeepSpeed: clipping, the gradient norm and its guard,
the frozen models' dtype and the offload optimizer.

Lightning's ``DeepSpeedStrategy`` hands the optimizer step to DeepSpeed's engine, which owns
the gradients from the backward pass on. Three things a plain strategy does in the
LightningModule therefore do nothing there:

- ``LightningModule.clip_gradients`` is a no-op ("DeepSpeed handles gradient clipping
  internally"), and Lightning fills DeepSpeed's ``gradient_clipping`` from
  ``trainer.gradient_clip_val``, which manual optimisation may not set: the RL module's
  ``model.ppo.max_grad_norm`` has to be written into the engine's config
  (:func:`configure_deepspeed`).
- Under ZeRO-1/2/3 ``p.grad`` is None (the gradients are reduced into partitions), so a norm
  taken from it is 0 and a guard reading it never fires. The engine computes the global norm
  (before clipping) inside its step and skips a step whose gradient is not finite (its
  overflow check); :func:`deepspeed_step` reads both after the step.
- With ``bf16-mixed`` the engine casts every parameter of the LightningModule, the frozen
  reference, GVM and reward model included. :func:`configure_deepspeed` makes that a choice
  (``model.models.frozen_dtype``) and logs it; :class:`FrozenInFloat32` gives them float32
  back when that is the choice.

``docs/deepspeed.md`` tells the same story for users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FROZEN_PATTERN = r"^experience\.frozen\."  # the RL module's frozen models' names
_HALF = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16",
         "16-true": "float16"}


def is_deepspeed(strategy: Any) -> bool:
    """True for Lightning's ``DeepSpeedStrategy`` (and subclasses, e.g. the CPU test one)."""
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - Lightning always ships the class
        return False
    return isinstance(strategy, DeepSpeedStrategy)


def casts_every_parameter(strategy: Any, precision: Any) -> bool:
    """True when DeepSpeed will cast the whole module, frozen models included, to a 16-bit
    precision (``bf16-*`` / ``16-*`` under the DeepSpeed strategy)."""
    return is_deepspeed(strategy) and str(precision) in _HALF


def offloads_optimizer(strategy: Any) -> bool:
    """True when ``strategy`` is DeepSpeed with its optimizer state offloaded to CPU / NVMe."""
    if not is_deepspeed(strategy):
        return False
    zero = (strategy.config or {}).get("zero_optimization") or {}
    return (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")


def deepspeed_engine(trainer: Any) -> Any | None:
    """The trainer's ``deepspeed.DeepSpeedEngine`` once the strategy has built it, else None."""
    strategy = getattr(trainer, "strategy", None)
    if not is_deepspeed(strategy):
        return None
    engine = getattr(strategy, "model", None)
    return engine if hasattr(engine, "get_global_grad_norm") else None


def zero_engine(trainer: Any) -> Any | None:
    """:func:`deepspeed_engine` when it partitions the gradients (ZeRO stage 1-3), else None
    (no DeepSpeed, or stage 0, where ``p.grad`` holds the whole gradient)."""
    engine = deepspeed_engine(trainer)
    return engine if engine is not None and engine.zero_optimization_stage() > 0 else None


def local_grad_norm(params) -> Tensor:
    """The 2-norm of the gradients held in ``p.grad`` (0 when none): right under a plain
    strategy and DDP (after its all-reduce every rank holds the same gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@dataclass(frozen=True)
class DeepSpeedChoices:
    """What :func:`configure_deepspeed` put in the engine's config, for the start-up log.

    Args:
        clipping: the ``gradient_clipping`` the engine applies (0: none).
        frozen_dtype: the dtype the frozen models will hold (None: there are none).
        why: how that dtype was chosen, with the key that changes it.
        keeps_frozen_float32: the engine will cast the frozen models to 16 bits and the RL
            module is to give them float32 back (:class:`FrozenInFloat32`).
    """

    clipping: float
    frozen_dtype: str | None
    why: str
    keeps_frozen_float32: bool = False

    def message(self, frozen: list[str]) -> str:
        clip = f"gradient clipping at norm {self.clipping:g}" if self.clipping else \
            "no gradient clipping"
        line = f"DeepSpeed: {clip} (model.init_args.ppo.max_grad_norm)"
        if frozen and self.frozen_dtype:
            line += f"; frozen models ({', '.join(frozen)}) in {self.frozen_dtype} ({self.why})"
        return line


def configure_deepspeed(strategy: Any, precision: str, max_grad_norm: float | None,
                        grad_accum: int, frozen_dtype: str | None,
                        has_frozen: bool) -> DeepSpeedChoices | None:
    """Write the RL module's clipping and frozen-model dtype into a DeepSpeed strategy's
    config before the engine is built (call from ``LightningModule.setup``); None when the
    strategy is not DeepSpeed.

    Args:
        strategy: ``trainer.strategy``.
        precision: ``trainer.precision`` (``"bf16-mixed"``, ``"32-true"``, ...).
        max_grad_norm: ``model.ppo.max_grad_norm`` (None: no clipping).
        grad_accum: ``model.ppo.grad_accum``: backward passes per optimizer step. Above 1 the
            engine is told that the caller owns the accumulation boundary
            (``managed_gradient_accumulation: false``: each ``step()`` reduces what the
            backward passes since the last one accumulated); left to count micro-steps
            itself, with Lightning's ``gradient_accumulation_steps: 1``, ZeRO treats every
            backward pass as a boundary and the sum is wrong.
        frozen_dtype: ``model.models.frozen_dtype`` (None: what the strategy does).
        has_frozen: the run holds frozen models at all.

    Raises:
        ValueError: the DeepSpeed config itself sets a different ``gradient_clipping`` (two
            settings for one thing), or switches off what the gradient guard relies on.
    """
    if not is_deepspeed(strategy):
        return None
    config = strategy.config
    wanted = float(max_grad_norm or 0.0)
    given = float(config.get("gradient_clipping") or 0.0)
    if given and not math.isclose(given, wanted):
        raise ValueError(
            f"the DeepSpeed config sets gradient_clipping={given:g} and "
            f"model.init_args.ppo.max_grad_norm={max_grad_norm}: the RL module clips with "
            "model.init_args.ppo.max_grad_norm, which it writes into DeepSpeed's config. Fix: "
            "remove gradient_clipping from the DeepSpeed config (or set both to the same value)")
    config["gradient_clipping"] = wanted
    zero = config.get("zero_optimization") or {}
    if zero.get("compute_grad_norm") is False:
        raise ValueError(
            "the DeepSpeed config sets zero_optimization.compute_grad_norm=false: the RL "
            "module's gradient guard and its train/grad_norm log read DeepSpeed's global "
            "gradient norm. Fix: remove compute_grad_norm from the DeepSpeed config")
    if (config.get("bf16") or {}).get("check_grad_overflow") is False:
        raise ValueError(
            "the DeepSpeed config sets bf16.check_grad_overflow=false: DeepSpeed would then "
            "apply a step whose gradient is NaN / inf before the gradient guard sees it. Fix: "
            "remove check_grad_overflow from the DeepSpeed config")
    if grad_accum > 1:
        _caller_owned_accumulation(config, grad_accum)
    half = _HALF.get(str(precision))
    if not has_frozen:
        return DeepSpeedChoices(wanted, None, "")
    if half is None:  # float32 training: DeepSpeed casts nothing
        dtype = frozen_dtype or "float32"
        return DeepSpeedChoices(wanted, dtype, "model.init_args.models.frozen_dtype" if frozen_dtype
                                else f"as loaded; trainer.precision={precision}")
    if frozen_dtype in (None, half):
        how = ("model.init_args.models.frozen_dtype" if frozen_dtype else
               f"DeepSpeed casts them with the policy under trainer.precision={precision}; set "
               "model.init_args.models.frozen_dtype=float32 to keep them in float32")
        return DeepSpeedChoices(wanted, half, how)
    if frozen_dtype != "float32":
        raise ValueError(
            f"model.init_args.models.frozen_dtype={frozen_dtype} under DeepSpeed with "
            f"trainer.precision={precision}: DeepSpeed holds the module's parameters in {half}, "
            "and the RL module can give the frozen models back only float32. Fix: set "
            f"model.init_args.models.frozen_dtype to float32 or {half}")
    if (config.get("zero_optimization") or {}).get("stage", 0) >= 3:
        raise ValueError(
            "model.init_args.models.frozen_dtype=float32 under DeepSpeed ZeRO-3 with "
            f"trainer.precision={precision}: ZeRO-3 partitions and casts every parameter of the "
            f"module, the frozen models' included, to {half}. Fix: set "
            f"model.init_args.models.frozen_dtype={half} (or leave it unset), or use ZeRO-1/2")
    # DeepSpeed casts every parameter (its keep_in_fp32_modules spares buffers only): the RL
    # module keeps a float32 copy across the engine's construction (FrozenInFloat32)
    return DeepSpeedChoices(wanted, "float32", "model.init_args.models.frozen_dtype", True)


class FrozenInFloat32:
    """The frozen models' float32 weights kept (in CPU memory) across DeepSpeed's cast of the
    whole module, and put back after it: ``frozen_dtype=float32`` under ZeRO-1/2 with a
    16-bit precision.

    Args:
        frozen: the frozen models' container, before the engine is built.
    """

    def __init__(self, frozen: torch.nn.Module) -> None:
        self.frozen = frozen
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in frozen.state_dict().items()}

    def restore(self) -> None:
        """Back to float32, with the weights as loaded (call after the engine is built)."""
        self.frozen.float()
        self.frozen.load_state_dict(self.state)
        self.state = {}


def _caller_owned_accumulation(config: dict, grad_accum: int) -> None:
    """Let ``grad_accum`` backward passes accumulate into one ``engine.step()``."""
    from deepspeed import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
        import deepspeed

        raise ValueError(
            f"model.init_args.ppo.grad_accum={grad_accum} under DeepSpeed needs a DeepSpeed whose "
            "engine lets the caller own the accumulation boundary (managed_gradient_accumulation, "
            f"deepspeed 0.19.8 as locked); this one is {deepspeed.__version__}. Fix: install the "
            "locked deepspeed, or set model.init_args.ppo.grad_accum=1 and raise "
            "model.init_args.ppo.mini_batch_size")
    config["managed_gradient_accumulation"] = False
    zero = config.get("zero_optimization") or {}
    if zero.get("stage", 0) < 2 and zero.get("overlap_comm"):
        zero["overlap_comm"] = False  # (DeepSpeed overlaps only partitioned gradients then)


def start_forward(engine: Any | None) -> None:
    """Tell DeepSpeed's engine that a forward pass with a backward of its own starts.

    ``engine.forward`` does this (its ZeRO optimizer's ``clear_backward_seen_flag``) for a
    module it runs; but Lightning runs a whole ``training_step`` as one ``engine.forward``,
    and the RL step's update makes a forward and a backward per mini-batch inside it. Without
    this, ZeRO-3 counts them as one micro-step and its second backward pass overwrites the
    first one's gradient partitions instead of adding to them. No-op without an engine.
    """
    clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if clear is not None:
        clear()


def deepspeed_step(optimizer: Any, engine: Any) -> tuple[Tensor, bool]:
    """Step DeepSpeed's engine (its clipping, its overflow check) and return ``(norm,
    stepped)``: the global gradient norm before clipping, and whether the engine applied the
    step (it skips one whose gradient is NaN / inf, reporting the norm as inf).

    Args:
        optimizer: the LightningOptimizer wrapping the engine's optimizer.
        engine: the ``deepspeed.DeepSpeedEngine`` (:func:`deepspeed_engine`).
    """
    skipped_before = int(getattr(engine, "skipped_steps", 0))
    optimizer.step()
    skipped = int(getattr(engine, "skipped_steps", 0)) > skipped_before
    norm = engine.get_global_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    if norm < 0:  # DeepSpeed's group-norm helpers report a non-finite norm as -1
        norm = float("inf")
    if skipped and math.isfinite(norm):  # (fp16 loss-scale overflow reported as finite)
        norm = float("inf")
    return torch.tensor(norm), not skipped
