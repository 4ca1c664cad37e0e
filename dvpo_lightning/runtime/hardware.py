"""Checks that a run's strategy, precision and accelerator fit this machine, before any
model is loaded.

:func:`check_strategy` is pure (the hardware facts are arguments), so every case is testable on
CPU; :func:`check_trainer_config` applies it to a parsed ``trainer`` section with this machine's
facts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ZERO_STAGES = (0, 1, 2, 3)
CPU_TEST_STRATEGY = "cpu_deepspeed"  # tests/cpu_deepspeed.py: DeepSpeed over gloo, tests only
_HALF = ("16-mixed", "bf16-mixed", "16-true", "bf16-true")
_PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true",
                      "half": "16-true", "double": "64-true"}


def _deepspeed_stage(strategy: Any) -> tuple[bool, Any, bool]:
    """(is DeepSpeed, its ZeRO stage or None if unknown, is the CPU test strategy)."""
    if isinstance(strategy, str):
        name = strategy.lower()
        if not name.startswith("deepspeed"):
            return False, None, name == CPU_TEST_STRATEGY
        m = re.match(r"deepspeed_stage_(\d+)", name)
        return True, int(m.group(1)) if m else 2, False  # Lightning's "deepspeed" is stage 2
    if isinstance(strategy, Mapping):  # {class_path, init_args} from a config
        cls = str(strategy.get("class_path", ""))
        args = strategy.get("init_args") or {}
        if "DeepSpeed" not in cls.rsplit(".", 1)[-1]:
            return False, None, False
        return True, args.get("stage", 2), cls.endswith("CPUDeepSpeedStrategy")
    cfg = getattr(strategy, "config", None)
    if type(strategy).__name__.endswith("DeepSpeedStrategy") and isinstance(cfg, Mapping):
        zero = cfg.get("zero_optimization") or {}
        return (True, zero.get("stage", 0),
                getattr(strategy, "strategy_name", "") == CPU_TEST_STRATEGY)
    return False, None, getattr(strategy, "strategy_name", "") == CPU_TEST_STRATEGY


def normalize_precision(precision: str | int | None) -> str:
    """Lightning's precision flag in its long form: ``16`` → ``"16-mixed"``, None →
    ``"32-true"``."""
    if precision is None:
        return "32-true"
    text = str(precision)
    return _PRECISION_ALIASES.get(text, text)


def check_strategy(strategy: Any, precision: str | int | None, accelerator: str | None,
                   cuda_available: bool, bf16_supported: bool) -> None:
    """Refuse a strategy / precision / accelerator the hardware cannot run, before loading.

    Args:
        strategy: ``trainer.strategy``: a name (``"auto"``, ``"ddp"``,
            ``"deepspeed_stage_3"``), a ``{class_path, init_args}`` mapping, or a strategy
            object.
        precision: ``trainer.precision`` (``"bf16-mixed"``, ``16``, ``"32-true"``, None).
        accelerator: ``trainer.accelerator`` (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"auto"``,
            None).
        cuda_available: ``torch.cuda.is_available()``.
        bf16_supported: ``torch.cuda.is_bf16_supported()`` (False without CUDA).

    Raises:
        ValueError: naming the rule, the values and the fix. Lightning itself would either
            fail later (after the models are loaded) or silently change the precision
            (``16-mixed`` becomes ``bf16-mixed`` on CPU).
    """
    prec = normalize_precision(precision)
    acc = (accelerator or "auto").lower()
    on_gpu = acc in ("gpu", "cuda") or (acc == "auto" and cuda_available)
    if acc in ("gpu", "cuda") and not cuda_available:
        raise ValueError(f"trainer.accelerator={accelerator!r} needs a CUDA GPU, and none is "
                         "visible (torch.cuda.is_available() is False). Fix: set "
                         "trainer.accelerator=cpu, or run where a GPU is visible "
                         "(check CUDA_VISIBLE_DEVICES)")
    is_ds, stage, cpu_test = _deepspeed_stage(strategy)
    if is_ds and stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed ZeRO stage {stage} does not exist; the stages are "
                         f"{', '.join(map(str, ZERO_STAGES))}. Fix: use strategy "
                         "deepspeed_stage_1, deepspeed_stage_2 or deepspeed_stage_3")
    if cpu_test:
        if prec not in ("32-true", "bf16-mixed", "bf16-true"):
            raise ValueError(f"the CPU DeepSpeed test strategy runs precision 32-true or "
                             f"bf16-mixed, got trainer.precision={precision!r}. Fix: set "
                             "trainer.precision=32-true")
        return
    if is_ds and not on_gpu:
        raise ValueError(f"DeepSpeed (ZeRO stage {stage}) needs a CUDA GPU, but the run is on CPU "
                         f"(trainer.accelerator={accelerator!r}, CUDA available: "
                         f"{cuda_available}). Fix: set trainer.strategy=auto (or ddp) on CPU, or "
                         "run on GPUs")
    if prec not in ("32-true", "64-true", *_HALF):
        return  # e.g. transformer-engine: Lightning checks those itself
    if on_gpu and prec.startswith("bf16") and not bf16_supported:
        raise ValueError(f"trainer.precision={precision!r} needs a GPU with bfloat16 support "
                         "(Ampere or newer), and this one has none. Fix: set "
                         "trainer.precision=16-mixed (or 32-true)")
    if not on_gpu and prec in ("16-mixed", "16-true"):
        raise ValueError(f"trainer.precision={precision!r} (float16) does not run on CPU; "
                         "Lightning would silently switch to bf16-mixed. Fix: set "
                         "trainer.precision=bf16-mixed or 32-true on CPU")


def check_trainer_config(trainer: Any) -> None:
    """:func:`check_strategy` on a parsed ``trainer`` config section (a mapping or a
    jsonargparse ``Namespace``), with this machine's hardware facts: what the CLI calls before
    it instantiates anything."""
    import torch

    if hasattr(trainer, "as_dict"):
        trainer = trainer.as_dict()
    cuda = torch.cuda.is_available()
    check_strategy(trainer.get("strategy", "auto"), trainer.get("precision"),
                   trainer.get("accelerator", "auto"), cuda,
                   cuda and torch.cuda.is_bf16_supported())
