"""Checkpoints that a crash cannot corrupt, and the identity of the frozen models a run uses.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file in the same directory,
flushes it to disk, then renames it over the target (``os.replace`` is atomic on POSIX), so
a process killed during a save leaves the previous file — ``last.ckpt`` included — whole.
``fingerprint`` names a model by its path and the SHA-256 of its weight files, so a resumed
RL run can refuse a different GVM, reward model or reference than the one it started with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


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


def fingerprint(name_or_path: str | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a model directory's weight files (sorted by name, hashed in
    order); a built-in tiny model name is its own fingerprint. None for None."""
    if name_or_path is None:
        return None
    from dvpo_lightning.models.named import resolve_model

    p = Path(resolve_model(name_or_path))
    if not p.exists():
        return {"path": str(name_or_path), "sha256": f"name:{name_or_path}"}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*")
                                           if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return {"path": str(name_or_path), "sha256": h.hexdigest()}


def check_same_models(saved: dict[str, dict | None], current: dict[str, dict | None]) -> None:
    """Refuse to resume when a frozen model's weights differ from the checkpoint's.

    ``saved`` / ``current``: ``{role: fingerprint}``. A moved directory with the same weights
    is accepted (only the hash is compared).
    """
    for role, old in saved.items():
        new = current.get(role)
        if old is None or new is None or old["sha256"] == new["sha256"]:
            continue
        raise ValueError(
            f"resume refused: the checkpoint was trained with {role} {old['path']} "
            f"(sha256 {old['sha256'][:12]}…), but this run loads {new['path']} "
            f"(sha256 {new['sha256'][:12]}…). Resume with the same {role} (set its path in "
            "model.init_args back), or start a new run without --ckpt_path.")


def make_resumable(trainer) -> None:
    """The CLI's checkpoint defaults, applied to a built ``Trainer`` (explicit settings win):

    - checkpoints are written atomically (``AtomicCheckpointIO``) unless a strategy or a plugin
      brought its own checkpoint IO (DeepSpeed writes its own directories);
    - ``ModelCheckpoint`` without a ``dirpath`` writes to ``<default_root_dir>/checkpoints``
      (not under a logger's per-run version, which a new run would not find) and keeps
      ``last.ckpt``, so ``--ckpt_path last`` resumes; with an integer ``val_check_interval``
      it saves after every validation (Lightning would save only at the epoch's end when the
      interval is 1);
    - SIGTERM writes ``last.ckpt`` before the run stops (:class:`SaveOnSigterm`).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dvpo_lightning.callbacks.preemption import SaveOnSigterm

    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.dirpath is None:
                cb.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if cb.save_last is None:
                cb.save_last = True
            # Lightning reads an integer val_check_interval of 1 (validate after every batch)
            # as "once per epoch" and would then save only at the epoch's end
            if (cb._save_on_train_epoch_end is None and isinstance(trainer.val_check_interval, int)
                    and trainer.limit_val_batches != 0):
                cb._save_on_train_epoch_end = False
    if trainer.checkpoint_callback is not None and not any(
            isinstance(cb, SaveOnSigterm) for cb in trainer.callbacks):
        trainer.callbacks.append(SaveOnSigterm())


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


class ReloadsFrozenBase:
    """LightningModule mixin for a stage that trains ``self.model``: with LoRA its checkpoints
    hold the adapters (and any head), not the frozen base weights, which are reloaded from the
    model directory at start-up."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_reloaded(checkpoint, reloaded_weights(self.model, "model."))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_reloaded(checkpoint, reloaded_weights(self.model, "model."))
