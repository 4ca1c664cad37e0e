"""The training process stays the user's when a vLLM engine is built in it.

vLLM's import and build change the process they run in: its GPU worker reports usage statistics
(machine facts, sent over the network) unless told not to; an exported
``VLLM_ENABLE_V1_MULTIPROCESSING=1`` moves the engine to a child process, where the weight push
cannot reach it; and the build sets torch's float32 matmul precision, freezes the garbage
collector's heap (``gc.freeze``), replaces ``torch.set_num_threads`` with a no-op, reseeds the
RNGs and rewrites environment variables (``LOCAL_WORLD_SIZE``, ``LD_PRELOAD``,
``TORCHINDUCTOR_COMPILE_THREADS``, …).

:func:`import_vllm` is the only way the package imports vLLM: it first switches the usage
statistics off and forces the in-process engine (:data:`FORCED_ENV`, set whatever the user
exported: a training framework does not report to anyone by itself). :func:`process_preserved`
wraps the build and puts back everything else it changed; :func:`keep_teardown_local` stops a
collected engine from tearing down process-wide state.

The trainer's autocast stays the trainer's: Lightning runs the training and validation steps
(and so every rollout) under ``torch.autocast`` at a ``*-mixed`` precision, which would cast
what the engine computes in this process — vLLM's GPU linear layers are ``F.linear``, and a
LoRA policy's merged weight ``W + B A`` is a matmul of the push — to 16 bits whatever the
engine's dtype. :func:`autocast_off` is around every entry point of the engine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import weakref
from collections.abc import Iterator

import numpy as np
import torch

_LOG = logging.getLogger(__name__)

# Set before vLLM is imported, and left set (on purpose; see the module docstring).
# VLLM_NO_USAGE_STATS and VLLM_DO_NOT_TRACK are what vLLM's usage_lib.is_usage_stats_enabled
# reads (DO_NOT_TRACK too, but that one speaks for every library in the process, so it is not
# ours to set); VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process.
FORCED_ENV = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # where vLLM runs (and Lightning's autocast with it)


def force_env() -> None:
    """Set :data:`FORCED_ENV`, saying so when it overrides the user's multiprocessing choice."""
    multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if multiprocessing not in (None, "0"):
        _LOG.warning("rollout engine vllm: VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden with 0: "
                     "the weight push needs the engine in the training process",
                     multiprocessing)
    os.environ.update(FORCED_ENV)


def import_vllm():
    """The ``vllm`` module, imported with its usage statistics off and the in-process engine
    forced (:func:`force_env`)."""
    force_env()
    import vllm
    from vllm.usage import usage_lib

    # (it caches its answer: a vLLM imported and asked before us keeps no stale "yes")
    usage_lib._USAGE_STATS_ENABLED = False
    return vllm


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """No autocast in the block on any device type it was on for (CPU, CUDA): the engine's
    build, weight push, push check and sampling compute in the engine's dtype, not in the
    trainer's autocast dtype. Also a decorator (``@autocast_off()``)."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def isolated_rngs(device: torch.device) -> Iterator[None]:
    """torch (CPU, and the current CUDA device), NumPy and Python RNGs as they were after the
    block: vLLM reseeds them at construction and draws from torch's while sampling on a CPU."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


@contextlib.contextmanager
def process_preserved(device: torch.device) -> Iterator[None]:
    """After the block (an engine's import and build), the process as it was before it: every
    environment variable (but :data:`FORCED_ENV`), the RNGs, torch's thread count and
    ``torch.set_num_threads``, the float32 matmul precision, and an unfrozen garbage-collector
    heap if it was unfrozen (``gc.freeze`` cannot be partly undone: a heap the user froze
    before stays frozen, vLLM's objects with it)."""
    env = dict(os.environ)
    threads = torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    frozen = gc.get_freeze_count()
    try:
        with isolated_rngs(device):
            yield
    finally:
        for key in set(os.environ) - set(env) - set(FORCED_ENV):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k not in FORCED_ENV})
        torch.set_num_threads = torch._C.set_num_threads  # vLLM replaced it with a no-op
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        if frozen == 0 and gc.get_freeze_count() > 0:
            gc.unfreeze()


def _release(core) -> None:
    """vLLM's ``EngineCore.shutdown`` without its last step (``cleanup_dist_env_and_memory``):
    the engine's own workers, scheduler and structured-output backend are released."""
    core.structured_output_manager.clear_backend()
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()


def keep_teardown_local(llm) -> None:
    """When ``llm`` (an in-process ``vllm.LLM``) is collected, release only its own resources.

    vLLM's own finalizer ends with ``cleanup_dist_env_and_memory``, which destroys its parallel
    groups (shared with any engine built later in this process) and torch.distributed's default
    process group (the trainer's, under DDP). While vLLM kept the heap frozen an engine was
    never collected and this never ran; with the heap unfrozen (:func:`process_preserved`) a
    dropped engine would run it.
    """
    client = llm.llm_engine.engine_core
    client._finalizer.detach()
    client._finalizer = weakref.finalize(client, _release, client.engine_core)
