"""Token-value pictures of a value model's directory: what ``explain`` and the study's report
write (``token_values.{html,png,csv,json}``, see :mod:`~dvpo_lightning.report.token_values`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dvpo_lightning.models import ValueModel, freeze, load_tokenizer
from dvpo_lightning.models.value_model import HEAD_WEIGHTS
from dvpo_lightning.report import token_values as tv
from dvpo_lightning.runtime.artifacts import ARTIFACT_FILE


def check_value_model_dir(gvm: str) -> None:
    """Refuse a path that is not a value model directory (one holding a trained head)."""
    path = Path(gvm)
    if not path.is_dir():
        raise FileNotFoundError(
            f"explain: --gvm {gvm!r} is not a directory (working directory: {Path.cwd()}). "
            "Fix: point --gvm at a value model saved by the GVM stage, e.g. "
            "runs/sorting/gvm/model")
    if not (path / HEAD_WEIGHTS).exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"explain: --gvm {gvm!r} has no {HEAD_WEIGHTS}, so it is not a value model "
            f"(found: {found}); loading it would put a fresh, untrained head on the backbone. "
            "Fix: point --gvm at the GVM stage's export_dir (e.g. runs/sorting/gvm/model), "
            "not at the policy or the SFT model")


def resolve_tokenizer(gvm: str, tokenizer: str | None) -> str:
    """``tokenizer`` if given, else the GVM directory when it holds a tokenizer, else the
    ``tokenizer`` recorded in its ``dvpo_artifact.json``.

    Args:
        gvm: the value model directory.
        tokenizer: an explicit tokenizer directory, or None.
    """
    if tokenizer is not None:
        return tokenizer
    if (Path(gvm) / "tokenizer_config.json").exists():
        return gvm
    meta = Path(gvm) / ARTIFACT_FILE
    if meta.exists():
        recorded = json.loads(meta.read_text()).get("hparams", {}).get("tokenizer")
        if recorded:
            return recorded
    raise FileNotFoundError(
        f"explain: --gvm {gvm!r} holds no tokenizer (no tokenizer_config.json) and records "
        f"none in {ARTIFACT_FILE}. Fix: pass --tokenizer DIR, the tokenizer the GVM was "
        "trained with")


def write_token_values(gvm: str, examples: list[dict], out: str | Path,
                       tokenizer: str | None = None, color_by: str = "delta",
                       chat_template: bool = True, batch_size: int = 16,
                       device: str = "auto") -> dict[str, str]:
    """Score ``examples`` with the value model in ``gvm`` and write the four files to ``out``.

    Args:
        gvm: the value model directory (backbone + ``value_head.safetensors``).
        examples: ``{"prompt": P, "responses": {label: text}}`` each
            (:func:`~dvpo_lightning.data.examples.file_examples` reads them from a file).
        out: the output directory.
        tokenizer: the tokenizer directory (default: the GVM's own, or the one it records).
        color_by: colour tokens by ``delta`` (u_t − u_{t−1}) or ``value`` (u_t).
        chat_template: apply the tokenizer's chat template to prompts, as in training.
        batch_size: (prompt, response) rows per forward pass.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Returns:
        The written files by kind: ``{"html", "png", "csv", "json"}``.
    """
    check_value_model_dir(gvm)
    tok = load_tokenizer(resolve_tokenizer(gvm, tokenizer))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = freeze(ValueModel.from_pretrained(gvm, tok, kind="gvm")).to(device)
    results = tv.token_values(model, tok, examples, chat_template, batch_size)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Token values of {gvm} ({model.kind}), colour = {color_by}"
    paths = {
        "html": tv.render_html(results, out_dir / "token_values.html", color_by, title),
        "png": tv.render_png(results, out_dir / "token_values.png", color_by),
        "csv": tv.write_csv(results, out_dir / "token_values.csv"),
        "json": tv.write_json(results, out_dir / "token_values.json"),
    }
    n_resp = sum(len(ex.responses) for ex in results)
    n_tok = sum(len(r.tokens) for ex in results for r in ex.responses)
    for kind, path in paths.items():
        print(f"explain: wrote {path} ({kind}; {len(results)} prompts, {n_resp} responses, "
              f"{n_tok} tokens, colour = {color_by})")
    return {kind: str(path) for kind, path in paths.items()}
