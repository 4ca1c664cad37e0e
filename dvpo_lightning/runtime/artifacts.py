"""Write a trained model as a directory ``transformers`` can load, atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

ARTIFACT_FILE = "dvpo_artifact.json"


def export_atomic(out_dir: str | Path, write, meta: dict) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``out_dir``.

    A crash while writing leaves the previous ``out_dir`` (if any) intact; ``meta`` is written
    to ``dvpo_artifact.json`` beside the weights (what made it, and when).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    (tmp / ARTIFACT_FILE).write_text(json.dumps({**meta, "created": time.time()}, indent=2,
                                                default=str))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out
