"""Phase boundaries that time finished work: CUDA kernels run asynchronously, so a clock read
right after a phase is launched charges its kernels to whichever later phase first waits on the
GPU (a step's generate/score/update split, and the step's own time, would say where work was
queued, not where it ran). :func:`phase_clock` synchronises a CUDA device before reading the
clock; on a CPU it is ``time.perf_counter()`` and nothing else."""

from __future__ import annotations

import time

import torch


def phase_clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` once every kernel queued on ``device`` has finished (CUDA: a
    ``torch.cuda.synchronize(device)`` first; any other device: no wait)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
