"""Checkpoints that a crash cannot corrupt, and the state a checkpoint must carry besides
the weights.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file in the same directory,
flushes it to disk, then renames it over the target (``os.replace`` is atomic on POSIX), so
a process killed during a save leaves the previous file — ``last.ckpt`` included — whole.
``rng_states`` / ``set_rng_states`` carry the global RNGs (Lightning does not save them);
``reloaded_weights`` and friends keep frozen base weights out of checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is write-temp → fsync → rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)


def rng_states() -> dict:
    """The global RNG states of Python, NumPy, torch and CUDA, in types that a
    ``weights_only`` checkpoint load accepts (tensors, lists, tuples, numbers)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` saved (CUDA only when there is a GPU now)."""
    import random

    import numpy as np

    random.setstate(tuple(states["python"][:1]) + (tuple(states["python"][1]),)
                    + tuple(states["python"][2:]))
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def reloaded_weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix + name: tensor}`` of the state-dict entries of ``module`` that are frozen
    parameters (``requires_grad=False``: a LoRA model's base weights). A checkpoint need not
    hold them: they are loaded again from the model directory, whose hash a resume checks."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False)  # tied: every name
              if not p.requires_grad}
    return {prefix + k: v for k, v in module.state_dict().items() if k in frozen}


def drop_reloaded(checkpoint: dict, reloaded: dict[str, torch.Tensor]) -> None:
    """Remove ``reloaded``'s keys from ``checkpoint["state_dict"]`` (on save)."""
    if "state_dict" in checkpoint:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k not in reloaded}


def restore_reloaded(checkpoint: dict, reloaded: dict[str, torch.Tensor]) -> None:
    """Put the current values of ``reloaded`` back into ``checkpoint["state_dict"]`` (on load),
    so a strict load finds every key."""
    if "state_dict" in checkpoint:
        for k, v in reloaded.items():
            checkpoint["state_dict"].setdefault(k, v)
