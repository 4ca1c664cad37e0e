"""Phase timings on a GPU synchronise the device at each boundary (``runtime/timing.py``): the
RL step's generate / score / update split and ``CostMeter``'s step time charge each phase its
own kernels, not the ones still queued from the phase before."""

from __future__ import annotations

import time

import pytest
import torch

from dvpo_lightning.runtime import timing
from dvpo_lightning.runtime.timing import phase_clock


@pytest.fixture
def syncs(monkeypatch) -> list:
    """torch.cuda.synchronize, recorded (device, clock at the call) instead of run: this
    machine has no GPU. The GPU test below runs the real one."""
    calls = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize",
                        lambda device=None: calls.append((device, time.perf_counter())))
    return calls


def test_a_cuda_boundary_waits_for_the_device_before_reading_the_clock(syncs):
    t = phase_clock(torch.device("cuda", 1))
    assert [d for d, _ in syncs] == [torch.device("cuda", 1)]
    assert syncs[0][1] <= t  # the clock is read after the wait
    phase_clock("cuda:0")
    assert syncs[1][0] == torch.device("cuda", 0)


def test_a_cpu_boundary_is_the_plain_clock(syncs):
    before = time.perf_counter()
    t = phase_clock(torch.device("cpu"))
    assert syncs == [] and before <= t <= time.perf_counter()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_phase_is_charged_its_queued_kernels():
    a = torch.randn(4096, 4096, device="cuda")
    t0 = phase_clock(a.device)
    for _ in range(50):  # queued: the loop returns long before the GPU is done
        a = torch.tanh(a @ a)
    launched = time.perf_counter() - t0
    phase = phase_clock(a.device) - t0
    assert phase > 2 * launched, (phase, launched)
