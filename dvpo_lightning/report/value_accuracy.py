"""Held-out pair accuracy of any value-head directory (GVM, scalar RM, PPO critic) on one file.

One function for all three models, so the Table-3/4 analog compares them on the same pairs
with the same tokenisation and the same reductions (:mod:`dvpo_lightning.metrics.pair_accuracy`).
:func:`cached_pair_accuracies` keeps each result on disk under a key of everything that decides
its digits, so the pipeline's workers can measure a model as soon as it exists and the report
(and every rebuild of it) reads the number instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.pairwise import collate_pairs, encode_pairs
from dvpo_lightning.data.tokenize import LengthReport
from dvpo_lightning.metrics.pair_accuracy import PairAccuracy
from dvpo_lightning.models.loading import load_tokenizer, resolve_dtype
from dvpo_lightning.models.value_model import HEAD_WEIGHTS, ValueModel, freeze
from dvpo_lightning.rollout.scoring import response_values


def _tokenizer_digest(tok) -> str:
    """What decides a tokenisation: the tokenizer's vocabulary, special tokens and template."""
    parts = [json.dumps(sorted(tok.get_vocab().items())), str(tok.pad_token_id),
             str(tok.eos_token_id), str(getattr(tok, "chat_template", None))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


_ENCODED: dict[tuple, list] = {}  # (file, its mtime, tokenizer digest, template, max) → items


def _encoded_pairs(pairs_path: str, tok, chat_template: bool, max_length: int) -> list:
    """The file's pairs, tokenised once per tokenizer in this process (a report evaluates
    every seed's GVM, reward model and critic on the same two files with one tokenizer)."""
    key = (str(Path(pairs_path).resolve()), Path(pairs_path).stat().st_mtime_ns,
           _tokenizer_digest(tok), chat_template, max_length)
    if key not in _ENCODED:
        rows = load_examples(pairs_path, "pairwise")
        _ENCODED[key] = encode_pairs(rows, tok, chat_template, max_length, "truncate",
                                     LengthReport(pairs_path, max_length, "truncate"))
    return _ENCODED[key]


def pair_accuracy(model_dir: str, pairs_path: str, tokenizer: str | None = None,
                  batch_size: int = 64, max_length: int = 512,
                  chat_template: bool = True) -> dict:
    """Accuracy of ``model_dir``'s token values on the pairs of ``pairs_path``.

    Args:
        model_dir: a value-head artifact (``value_head.safetensors`` beside the backbone).
        pairs_path: held-out pairwise file (``{prompt, chosen, rejected}`` or another
            pairwise format).
        tokenizer: tokenizer directory (default: the model's own).
        batch_size: pairs per forward pass.
        max_length: longest prompt + response; longer pairs are truncated (counted).
        chat_template: wrap prompts in the tokenizer's chat template, as training did.

    Returns:
        ``{"pairs": N, "accuracy": {aggregation: fraction}}`` over ``u_1 … u_T`` (the values
        after each response token), the protocol of the GVM and RM validation.
    """
    return pair_accuracies(model_dir, [pairs_path], tokenizer, batch_size, max_length,
                           chat_template)[pairs_path]


@torch.no_grad()
def pair_accuracies(model_dir: str, pairs_paths: list[str], tokenizer: str | None = None,
                    batch_size: int = 64, max_length: int = 512,
                    chat_template: bool = True, dtype: str | None = None) -> dict[str, dict]:
    """:func:`pair_accuracy` of one model on several files, the model loaded once:
    ``{pairs_path: {"pairs", "accuracy"}}``. ``dtype``: run the model in it (``bfloat16``:
    what ``models.frozen_dtype`` does to a frozen GVM); None: as loaded."""
    if not (Path(model_dir) / HEAD_WEIGHTS).exists():
        raise FileNotFoundError(
            f"{model_dir} has no {HEAD_WEIGHTS}: pair accuracy needs a value-head artifact "
            "(a GVM, a reward model or a PPO critic export); check the path")
    tok = load_tokenizer(tokenizer or model_dir)
    model = freeze(ValueModel.from_pretrained(model_dir, tok))
    if resolve_dtype(dtype) is not None:
        model.to(resolve_dtype(dtype))
    out = {}
    for pairs_path in pairs_paths:
        items = _encoded_pairs(pairs_path, tok, chat_template, max_length)
        metric = PairAccuracy()
        for i in range(0, len(items), batch_size):
            batch = collate_pairs(items[i:i + batch_size], tok.pad_token_id)
            n = int(batch["n_pairs"])
            values = response_values(model, batch["prompt_ids"], batch["prompt_mask"],
                                     batch["response_ids"], batch["response_mask"])[:, 1:]
            mask = batch["response_mask"]
            metric.update(values[:n], mask[:n], values[n:], mask[n:])
        out[pairs_path] = {"pairs": len(items),
                           "accuracy": {k: float(v) for k, v in metric.compute().items()}}
    return out


def accuracy_key(model_dir: str, pairs_paths: list[str], **settings) -> str:
    """What decides :func:`pair_accuracies`' digits, as a hex digest: the model directory's
    files (name, size, modification time: a retrained model is a new key), each pairs file's
    bytes, the settings, and the kernels that run it here (device, torch threads, the CPU
    instruction set ``ATEN_CPU_CAPABILITY`` picks, float32 matmul precision): the same model
    measured with two threads may differ in the last digits from one thread."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for path in pairs_paths:
        h.update(f"{path}:".encode() + hashlib.sha256(Path(path).read_bytes()).digest())
    kernels = ("cuda" if torch.cuda.is_available() else "cpu", torch.get_num_threads(),
               torch.backends.cpu.get_cpu_capability(), torch.get_float32_matmul_precision())
    h.update(json.dumps([sorted(settings.items()), kernels], default=str).encode())
    return h.hexdigest()[:24]


def cached_pair_accuracies(model_dir: str, pairs_paths: list[str], cache_dir: str | Path,
                           **settings) -> dict[str, dict]:
    """:func:`pair_accuracies`, read from ``cache_dir`` when this process would compute the
    same digits (:func:`accuracy_key`), else computed and written there (atomically: a file
    is whole or absent, so workers and the report may share the directory)."""
    path = Path(cache_dir) / f"{accuracy_key(model_dir, pairs_paths, **settings)}.json"
    if path.exists():
        return json.loads(path.read_text())["result"]
    result = pair_accuracies(model_dir, pairs_paths, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model": str(model_dir), "result": result}))
    tmp.replace(path)
    return result
