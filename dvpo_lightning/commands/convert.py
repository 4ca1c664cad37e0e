"""``python -m dvpo_lightning convert --gguf FILE_OR_NAME --out DIR``: a GGUF checkpoint (or a
named model) as a trainable Hugging Face directory (``save_pretrained`` layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dvpo_lightning.models.named import NAMED_MODELS, convert_gguf


def main(args: list[str]) -> None:
    """Parse ``args`` and convert."""
    p = argparse.ArgumentParser(prog="python -m dvpo_lightning convert",
                                description="Turn a GGUF checkpoint (or a named model) into a "
                                            "trainable Hugging Face directory.")
    p.add_argument("--gguf", required=True, help=f"a .gguf file or one of {sorted(NAMED_MODELS)}")
    p.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a = p.parse_args(args)
    src = NAMED_MODELS[a.gguf].path() if a.gguf in NAMED_MODELS else Path(a.gguf)
    if not src.is_file():
        p.error(f"--gguf {a.gguf!r} is neither a file nor one of {sorted(NAMED_MODELS)}")
    out = convert_gguf(src, a.out, a.dtype)
    print(f"converted {src} -> {out}")
