"""Responses to show side by side, read from a file: what ``explain`` and the token-value
pictures of the value stages and the report take."""

from __future__ import annotations

from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.formats import parse_pairwise, parse_prompts, parse_scored
from dvpo_lightning.data.prompts import preference_kind
from dvpo_lightning.data.readers import read_records


def scored_examples(rows: list[dict], max_examples: int) -> list[dict]:
    """Canonical scored rows grouped by prompt (the first ``max_examples`` prompts, in file
    order), each response labelled with its score: ``{"prompt", "responses": {label: text}}``."""
    groups: dict[str, dict] = {}
    for r in rows:
        key = repr(r["prompt"])
        if key not in groups:
            if len(groups) == max_examples:
                continue
            groups[key] = {"prompt": r["prompt"], "responses": {}}
        responses = groups[key]["responses"]
        responses[f"response {len(responses) + 1} (score {r['score']:g})"] = r["response"]
    return list(groups.values())


def file_examples(path: str, max_examples: int) -> list[dict]:
    """The first ``max_examples`` rows of ``path`` as ``{"prompt", "responses": {label: text}}``.

    A pairwise file (any of the pairwise formats of :mod:`~dvpo_lightning.data.formats`) gives
    ``{"chosen": …, "rejected": …}``; a scored file (``{prompt, response, score}`` rows or
    UltraFeedback's ``{instruction, completions}``) gives each prompt's responses labelled with
    their scores, ``{"response 1 (score 8.5)": …, …}``; a file whose rows have a ``responses``
    list (plus a prompt, ``flat`` or ``messages``) gives ``{"response 1": …, …}``.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``save_to_disk`` directory.
        max_examples: how many rows to keep, from the top.

    Raises:
        DataFormatError: naming the file, the row and the field.
    """
    rows, lines = read_records(path)
    if rows and preference_kind(rows[0]) == "scored":
        return scored_examples(parse_scored(rows, str(path), lines=lines), max_examples)
    if not any("responses" in r for r in rows):
        pairs = parse_pairwise(rows, str(path), lines=lines)[:max_examples]
        return [{"prompt": p["prompt"], "responses": {"chosen": p["chosen"],
                                                      "rejected": p["rejected"]}} for p in pairs]
    rows = rows[:max_examples]
    prompts = parse_prompts(rows, str(path), lines=lines)
    out = []
    for i, (p, row) in enumerate(zip(prompts, rows)):
        resp = row.get("responses")
        if not isinstance(resp, list) or not resp or not all(
                isinstance(r, str) and r.strip() for r in resp):
            raise DataFormatError(path, "must be a non-empty list of non-empty strings",
                                  'write "responses": ["first answer", "second answer"]',
                                  row=i, line=lines[i] if lines else None, field="responses")
        out.append({"prompt": p["prompt"],
                    "responses": {f"response {j + 1}": r for j, r in enumerate(resp)}})
    return out
