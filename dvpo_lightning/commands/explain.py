"""``python -m dvpo_lightning explain``: the token-level values a GVM gives responses, as a picture.

    python -m dvpo_lightning explain --gvm runs/sorting/gvm/model \\
        --prompt "6495028=" --responses 0224456889 0024868899
    python -m dvpo_lightning explain --gvm runs/sorting/gvm/model \\
        --file data/sorting/eval_pairs.jsonl --max_examples 4 --out runs/explain

Writes ``token_values.{html,png,csv,json}`` (see :mod:`dvpo_lightning.report.token_values`).
"""

from __future__ import annotations

from dvpo_lightning.data.examples import file_examples
from dvpo_lightning.report.explain import check_value_model_dir, write_token_values
from dvpo_lightning.report.token_values import COLOR_BY


def _usage_error(problem: str, fix: str) -> ValueError:
    return ValueError(f"explain: {problem}. Fix: {fix}")


def _check_inputs(prompt: str | None, responses: list[str] | None, file: str | None,
                  color_by: str, max_examples: int) -> None:
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
        file: a pairwise file (chosen and rejected side by side), a scored file (each prompt's
            responses with their scores), or rows with a prompt and a 'responses' list
            (excludes --prompt).
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
    _check_inputs(prompt, responses, file, color_by, max_examples)
    check_value_model_dir(gvm)
    if file is not None:
        examples = file_examples(file, max_examples)
    else:
        examples = [{"prompt": prompt,
                     "responses": {f"response {j + 1}": r for j, r in enumerate(responses)}}]
    return write_token_values(gvm, examples, out, tokenizer, color_by, chat_template,
                              batch_size, device)


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


def main(args: list[str]) -> None:
    """``python -m dvpo_lightning explain``: parse ``args`` with jsonargparse and run
    :func:`explain`."""
    from jsonargparse import CLI

    CLI(explain, args=_expand_responses(list(args)), as_positional=False,
        prog="python -m dvpo_lightning explain")
