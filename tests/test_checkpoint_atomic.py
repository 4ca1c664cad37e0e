"""Atomic checkpoints: a process killed half-way through a save leaves ``last.ckpt`` whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from dvpo_lightning.models.identity import check_same_models, fingerprint
from dvpo_lightning.runtime.checkpointing import AtomicCheckpointIO

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from dvpo_lightning.runtime.checkpointing import AtomicCheckpointIO
    path = sys.argv[1]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)   # a good checkpoint

    real_save = torch.save
    def dying_save(obj, f, *a, **k):          # write half the bytes, then die like a SIGKILL
        import io as _io
        buf = _io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    io.save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, path)
""")


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    res = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpt = AtomicCheckpointIO().load_checkpoint(str(path))
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_the_plain_write_would_have_been_torn(tmp_path):
    """The same half write straight into the target: the failure the rename prevents."""
    path = tmp_path / "last.ckpt"
    torch.save({"step": 1}, path)
    import io

    buf = io.BytesIO()
    torch.save({"step": 2, "w": torch.ones(1000)}, buf)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(Exception):  # noqa: B017 - torch raises several kinds on torn files
        torch.load(path, weights_only=True)


def test_fingerprint_tracks_weights_not_paths(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"weights")
    (a / "config.json").write_text("{}")
    b = tmp_path / "b"
    os.rename(a, b)
    fa = {"path": str(a), "sha256": fingerprint(str(b))["sha256"]}
    check_same_models({"gvm": fa}, {"gvm": fingerprint(str(b))})  # moved, same weights: fine
    (b / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ValueError) as e:
        check_same_models({"gvm": fa}, {"gvm": fingerprint(str(b))})
    msg = str(e.value)
    assert "resume refused" in msg and "gvm" in msg and str(b) in msg
    assert "start a new run without --ckpt_path" in msg
    assert fingerprint("test-llama") == {"path": "test-llama", "sha256": "name:test-llama"}
