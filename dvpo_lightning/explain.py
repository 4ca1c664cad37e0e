"""``python -m dvpo_lightning explain``: the token-level values a GVM gives responses, as a picture.

    python -m dvpo_lightning explain --gvm runs/sorting/gvm/model \\
        --prompt "6495028=" --responses 0224456889 0024868899
    python -m dvpo_lightning explain --gvm runs/sorting/gvm/model \\
        --file data/sorting/eval_pairs.jsonl --max_examples 4 --out runs/explain

Writes ``token_values.{html,png,csv,json}`` (see :mod:`dvpo_lightning.report.token_values`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.formats import load_examples, parse_prompts
from dvpo_lightning.data.readers import read_rows_with_lines
from dvpo_lightning.models.value_model import HEAD_WEIGHTS

ARTIFACT_META = "dvpo_artifact.json"


def _usage_error(problem: str, fix: str) -> ValueError:
    return ValueError(f"explain: {problem}. Fix: {fix}")


def _check_inputs(prompt: str | None, responses: list[str] | None, file: str | None,
                  color_by: str, max_examples: int) -> None:
    from dvpo_lightning.report.token_values import COLOR_BY

    example = ("--prompt '6495028=' --responses 0224456889 0024868899, or "
               "--file data/sorting/eval_pairs.jsonl")
    if file is not None and (prompt is not None or responses is not None):
        raise _usage_error(f"--file ({file!r}) cannot be combined with --prompt/--responses; "
                           "the two input modes exclude each other", "drop one of them")
    if file is None and prompt is None:
        if responses is not None:
            raise _usage_error("--responses needs a --prompt", "add --prompt PROMPT")
        raise _usage_error("no input: give either --prompt with --responses, or --file "
                           "(neither was given)", example)
    if prompt is not None and not responses:
        raise _usage_error(f"--prompt ({prompt!r}) needs at least one --responses",
                           "add --responses RESPONSE [RESPONSE ...]")
    if prompt is not None and not prompt.strip():
        raise _usage_error("--prompt is empty", "give the prompt text")
    for i, r in enumerate(responses or []):
        if not r.strip():
            raise _usage_error(f"--responses[{i}] is empty or whitespace only",
                               "give the response text (EOS is appended for you)")
    if color_by not in COLOR_BY:
        raise _usage_error(f"--color_by={color_by!r} is not one of {COLOR_BY}",
                           "use 'delta' (u_t − u_{t−1}) or 'value' (u_t)")
    if max_examples < 1:
        raise _usage_error(f"--max_examples={max_examples} must be at least 1",
                           "pass a positive number of prompts to show")


def _check_gvm(gvm: str) -> None:
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
    meta = Path(gvm) / ARTIFACT_META
    if meta.exists():
        recorded = json.loads(meta.read_text()).get("hparams", {}).get("tokenizer")
        if recorded:
            return recorded
    raise FileNotFoundError(
        f"explain: --gvm {gvm!r} holds no tokenizer (no tokenizer_config.json) and records "
        f"none in {ARTIFACT_META}. Fix: pass --tokenizer DIR, the tokenizer the GVM was "
        "trained with")


def file_examples(path: str, max_examples: int) -> list[dict]:
    """The first ``max_examples`` rows of ``path`` as ``{"prompt", "responses": {label: text}}``.

    A pairwise file (``load_examples(path, "pairwise")``, any of its formats) gives
    ``{"chosen": …, "rejected": …}``; a file whose rows have a ``responses`` list (plus a
    prompt, ``flat`` or ``messages``) gives ``{"response 1": …, …}``.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` directory.
        max_examples: how many rows to keep, from the top.

    Raises:
        DataFormatError: naming the file, the row and the field.
    """
    rows, lines = read_rows_with_lines(path)
    if "responses" not in rows.column_names:
        pairs = load_examples(path, "pairwise")[:max_examples]
        return [{"prompt": p["prompt"], "responses": {"chosen": p["chosen"],
                                                      "rejected": p["rejected"]}} for p in pairs]
    rows = rows.select(range(min(max_examples, len(rows))))
    prompts = parse_prompts(rows, str(path), lines=lines)
    out = []
    for i, (p, row) in enumerate(zip(prompts, rows)):
        resp = row["responses"]
        if not isinstance(resp, list) or not resp or not all(
                isinstance(r, str) and r.strip() for r in resp):
            raise DataFormatError(path, "must be a non-empty list of non-empty strings",
                                  'write "responses": ["first answer", "second answer"]',
                                  row=i, line=lines[i] if lines else None, field="responses")
        out.append({"prompt": p["prompt"],
                    "responses": {f"response {j + 1}": r for j, r in enumerate(resp)}})
    return out


def explain(gvm: str, prompt: str | None = None, responses: list[str] | None = None,
            file: str | None = None, out: str = "runs/explain", tokenizer: str | None = None,
            color_by: str = "delta", max_examples: int = 8, chat_template: bool = True,
            batch_size: int = 16, device: str = "auto") -> dict[str, str]:
    """Show the GVM's token-level values u_t and steps u_t − u_{t−1} for some responses.

    Args:
        gvm: the value model directory (backbone + value_head.safetensors), e.g.
            runs/sorting/gvm/model.
        prompt: one prompt, explained with --responses (excludes --file).
        responses: responses to --prompt, shown side by side (--responses A B ...).
        file: a pairwise file (chosen and rejected side by side), or rows with a prompt and a
            'responses' list (excludes --prompt).
        out: directory for token_values.{html,png,csv,json}.
        tokenizer: the tokenizer directory (default: the GVM's own, or the one it records).
        color_by: colour tokens by 'delta' (u_t − u_{t−1}) or 'value' (u_t).
        max_examples: prompts taken from the top of --file.
        chat_template: apply the tokenizer's chat template to prompts, as in training.
        batch_size: (prompt, response) rows per forward pass.
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.

    Returns:
        The written files by kind: {"html", "png", "csv", "json"}.
    """
    from dvpo_lightning.models import ValueModel, freeze, load_tokenizer
    from dvpo_lightning.report import token_values as tv

    _check_inputs(prompt, responses, file, color_by, max_examples)
    _check_gvm(gvm)
    if file is not None:
        examples = file_examples(file, max_examples)
    else:
        examples = [{"prompt": prompt,
                     "responses": {f"response {j + 1}": r for j, r in enumerate(responses)}}]
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


def _expand_responses(args: list[str]) -> list[str]:
    """``--responses A B`` / ``--responses=A`` → ``--responses+ A --responses+ B`` (jsonargparse's
    append form, which keeps each value a string: ``007`` stays ``"007"``)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--responses="):
            out += ["--responses+", a.split("=", 1)[1]]
        elif a in ("--responses", "--responses+"):
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                out += ["--responses+", args[i]]
                i += 1
            continue
        else:
            out.append(a)
        i += 1
    return out


def explain_main(args: list[str]) -> None:
    """``python -m dvpo_lightning explain``: parse ``args`` with jsonargparse and run
    :func:`explain`."""
    from jsonargparse import CLI

    CLI(explain, args=_expand_responses(list(args)), as_positional=False,
        prog="python -m dvpo_lightning explain")
