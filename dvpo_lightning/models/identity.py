"""The identity of a model: its path and the SHA-256 of its weight files.

A resumed RL run compares the fingerprints of its frozen reference, GVM and reward model with
the checkpoint's, so it can refuse a different model than the one it started with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dvpo_lightning.models.named import resolve_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def fingerprint(name_or_path: str | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a model directory's weight files (sorted by name, hashed in
    order); a built-in tiny model name is its own fingerprint. None for None."""
    if name_or_path is None:
        return None
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
