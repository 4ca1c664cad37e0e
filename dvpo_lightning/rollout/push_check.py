"""Did the engine take the push? A check after every weight push, exact in any dtype.

The rollout probe (``rollout/sampler_logp_diff``) compares the engine's log-probs with the
trainer's, and its noise is the dtype's: in bfloat16 it is larger than one optimizer step's
drift, so an engine one push behind hides inside it. This check does not compare the engine
with the trainer; it compares the engine with itself, before and after a push:

- **What the engine should hold** — a fingerprint of the pushed tensors *as the engine stores
  them* (each cast to the engine's dtype): per tensor, the float64 sum and sum of absolute
  values. Computed as the engine reads the tensors (no copy of the model); equal fingerprints
  mean the engine's weights should be bit-identical, different ones that they should differ.
- **What the engine computes** — its raw log-probs of a fixed probe sequence (32 tokens, one
  prefill, right after the prefix cache is reset). A deterministic function of its weights.

Rules (see docs/reliability.md): the push must read every tensor it is given; when the
fingerprint changed, the probe's log-probs must change; when it did not (the same weights
pushed again: after a wake from sleep, a loaded checkpoint), they must stay within
``SAME_WEIGHTS_TOLERANCE`` of the last (bit-identical on a CPU; the margin is for GPU kernels
whose choice may vary between calls — weights a push left as garbage move them by nats).
An engine that read the tensors and did not load them (names that match nothing, a worker
that missed the call) computes bit-identical log-probs and stops the run at that push,
whatever the dtype. Cost: one prefill
of 32 tokens and one reduction per tensor per push.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from dvpo_lightning.runtime.distributed import all_reduce_max
from dvpo_lightning.runtime.guards import SamplerMismatchError

PROBE_LENGTH = 32
SAME_WEIGHTS_TOLERANCE = 0.01  # mean |Δ log p| of the probe, same weights pushed again
FIX = ("Fix: check the weight sync (a custom model's weight names must be vLLM's; "
       "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 so the push reaches the engine in this "
       "process); the last checkpoint is the last good one. "
       "model.init_args.rollout.vllm.push_check=false turns this check off")


def probe_tokens(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """A fixed token sequence spread over the vocabulary (the same in every run)."""
    return [(7919 * (i + 1)) % vocab_size for i in range(length)]


class Fingerprinted:
    """Wraps a ``(name, tensor)`` iterator: yields it unchanged and records, per tensor, the
    float64 sum and sum of |x| of the tensor cast to ``dtype`` (what the engine stores).

    Args:
        weights: the pushed ``(name, tensor)`` pairs.
        dtype: the engine's weight dtype.
    """

    def __init__(self, weights: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> None:
        self._weights, self.dtype = iter(weights), dtype
        self.rows: list[Tensor] = []
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, value in self._weights:
            cast = value.detach().to(self.dtype)
            self.rows.append(torch.stack([cast.sum(dtype=torch.float64),
                                          cast.abs().sum(dtype=torch.float64)]))
            yield name, value
        self.exhausted = True

    def fingerprint(self) -> Tensor:
        """``(n_tensors, 2) float64``."""
        return (torch.stack(self.rows).cpu() if self.rows  # (one device sync per push)
                else torch.zeros(0, 2, dtype=torch.float64))


class PushCheck:
    """The engine's last verified state (fingerprint, probe log-probs) and the rules above.

    Args:
        score_probe: ``() -> (L,) float`` the engine's log-probs of the probe sequence.
    """

    def __init__(self, score_probe) -> None:
        self.score_probe = score_probe
        self.fingerprint: Tensor | None = None  # None: none pushed yet (dummy weights)
        self.probe: Tensor | None = None

    def baseline(self) -> None:
        """Score the probe on what the engine holds now (e.g. its dummy weights)."""
        self.probe = self.score_probe()

    def after_push(self, pushed: Fingerprinted, device: torch.device) -> None:
        """Raise :class:`SamplerMismatchError` if the push was not taken (see the rules), on
        every process when any one's engine did not take it (``device``: the policy's, for the
        all-reduce of the verdict; pushes happen on all processes at the same rollouts)."""
        problem = self._verdict(pushed)
        failed = all_reduce_max(torch.tensor(float(problem is not None), device=device))
        if problem is not None:
            raise SamplerMismatchError(problem)
        if float(failed) > 0:
            raise SamplerMismatchError("another process's rollout engine did not take the "
                                       "weights pushed to it (its error says how). " + FIX)

    def _verdict(self, pushed: Fingerprinted) -> str | None:
        """What is wrong with this push (None: nothing); updates the verified state."""
        if not pushed.exhausted:
            return (
                f"the rollout engine did not read the weights pushed to it (it read "
                f"{len(pushed.rows)} tensors and stopped): it is sampling from stale weights. "
                + FIX)
        new_fp, new_probe = pushed.fingerprint(), self.score_probe()
        changed = self.fingerprint is None or not torch.equal(new_fp, self.fingerprint)
        if changed and self.probe is not None and torch.equal(new_probe, self.probe):
            return (
                "the rollout engine did not take the weights pushed to it: they differ from "
                "the ones it held (in its dtype, "
                f"{str(pushed.dtype).removeprefix('torch.')}), yet its log-probs of a fixed "
                f"probe sequence are bit-identical to those before the push. It would sample "
                "from stale weights. " + FIX)
        if not changed and self.probe is not None:
            moved = float((new_probe - self.probe).abs().mean())
            if moved > SAME_WEIGHTS_TOLERANCE:
                return (
                    f"the rollout engine was pushed the weights it held before, yet its "
                    f"log-probs of a fixed probe sequence moved by {moved:.4g} per token "
                    f"(more than {SAME_WEIGHTS_TOLERANCE}): the push left it with other weights "
                    "(partly loaded, or not restored after sleep). " + FIX)
        self.fingerprint, self.probe = new_fp, new_probe
        return None
