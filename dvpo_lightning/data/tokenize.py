"""Prompts and responses to token ids, with the chat template and an explicit length policy.

A prompt that is a chat message list goes through ``tokenizer.apply_chat_template`` (with the
generation prompt); a plain string prompt goes through it too when ``chat_template=True`` and the
tokenizer has one, and is tokenized as is otherwise. A response is its tokens plus EOS.
Sequences longer than ``max_length`` are truncated or dropped by ``length_policy``; either way
they are counted in a :class:`LengthReport`, never silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from dvpo_lightning.data.errors import DataFormatError

LENGTH_POLICIES = ("truncate", "drop", "error")
UNK_SHARE_LIMIT = 0.5
"""A data file is refused when more than this share of its tokens (its prompts and responses as
tokenized for training, special tokens included) is the tokenizer's unknown token: it was
written for another tokenizer, and a model trained on it sees almost nothing but ``<unk>``
(English text through the sorting task's character tokenizer: 138 ``<unk>`` of 139 tokens)."""


def _render_plain(messages: list[dict]) -> str:
    from dvpo_lightning.data.formats import render_messages_plain

    return render_messages_plain(messages)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict],
                  chat_template: bool = True) -> list[int]:
    """Token ids of ``prompt`` (a string or a list of ``{role, content}`` messages)."""
    has_template = chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list):
        if has_template:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        prompt = _render_plain(prompt)
    elif has_template:
        return encode_prompt(tokenizer, [{"role": "user", "content": prompt}], chat_template)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of ``response`` followed by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class LengthReport:
    """How many rows the length policy touched (reported at set-up and logged)."""

    source: str
    max_length: int
    policy: str
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    examples: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.source}: {self.total} rows, {self.truncated} truncated and "
                f"{self.dropped} dropped for exceeding max_length={self.max_length} "
                f"(length_policy={self.policy!r})")


def check_unknown_share(tokenizer: PreTrainedTokenizerBase, sequences: Iterable[Sequence[int]],
                        source: str, tokenizer_name: str) -> None:
    """Raise when more than :data:`UNK_SHARE_LIMIT` of the tokens of ``sequences`` (every
    tokenized prompt and response of the file ``source``) are the unknown token.

    Tokenizers without an unknown token skip the check, and so do those whose unknown token is
    also their EOS, padding or BOS token (GPT-2's ``<|endoftext|>``): byte-level tokenizers
    never produce it, and the appended EOS would count.
    """
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.pad_token_id,
                              tokenizer.bos_token_id):
        return
    total = n_unk = 0
    for ids in sequences:
        total += len(ids)
        n_unk += list(ids).count(unk)
    if total and n_unk > UNK_SHARE_LIMIT * total:
        raise DataFormatError(
            source, f"{n_unk} of its {total} tokens ({n_unk / total:.0%}) are the unknown token "
            f"{tokenizer.unk_token!r} of the tokenizer {tokenizer_name} (more than "
            f"{UNK_SHARE_LIMIT:.0%} is refused)", "this data was written for another tokenizer; "
            "point data.init_args.tokenizer at the model's tokenizer, or use data written for "
            "this one")


def check_prompt_ids(prompt_ids: list[int], source: str, row: int) -> None:
    """Raise unless the prompt has a token: the shared layout reads ``u_0`` and the first
    response token's logits at the last prompt token (a text the tokenizer normalises away,
    e.g. only zero-width characters, would leave a padding token there)."""
    if not prompt_ids:
        raise DataFormatError(source, "encodes to no tokens with this tokenizer",
                              "remove the row, or give it a prompt with visible text",
                              row=row, field="prompt")


def fit_length(prompt_ids: list[int], response_ids: list[int], max_length: int, policy: str,
               report: LengthReport, row: int) -> tuple[list[int], list[int]] | None:
    """Apply the length policy to one ``prompt + response``; None means the row is dropped.

    ``truncate`` keeps the prompt and cuts the response's tail (the last kept token is then not
    EOS); a prompt longer than the limit on its own keeps its last tokens and one response token.
    An empty prompt raises (:func:`check_prompt_ids`).
    """
    check_prompt_ids(prompt_ids, report.source, row)
    report.total += 1
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    if policy == "error":
        raise ValueError(
            f"{report.source}, row {row}: prompt + response is "
            f"{len(prompt_ids) + len(response_ids)} tokens, longer than max_length={max_length} "
            "(length_policy='error'). Fix: raise max_length, or set length_policy to "
            "'truncate' or 'drop'"
        )
    if len(report.examples) < 5:
        report.examples.append(row)
    if policy == "drop":
        report.dropped += 1
        return None
    report.truncated += 1
    keep_prompt = prompt_ids[-(max_length - 1):]
    return keep_prompt, response_ids[: max_length - len(keep_prompt)]


def check_length_policy(policy: str) -> None:
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy={policy!r} is not one of {LENGTH_POLICIES}. Fix: set "
                         "data.init_args.length_policy to one of those")
