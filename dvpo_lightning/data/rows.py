"""One row of a data file, read field by field, and the parser of every format of every kind.

:class:`Row` gives typed access to a row's fields, each failure a :class:`DataFormatError`
naming the file, the row (and line), the field and the fix; :data:`PARSERS` maps kind → format
→ (parser, the fields it expects); :func:`detect_format` is the ``format="auto"`` rule. The
formats and the rule are described in :mod:`dvpo_lightning.data.formats`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

from dvpo_lightning.data.errors import DataFormatError

ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
_MISSING = object()


class Row:
    """One input row plus where it came from, with validating getters that raise located errors."""

    def __init__(self, data: dict, source: str, index: int, line: int | None, fmt: str,
                 expected: str) -> None:
        self.data, self.source, self.index, self.line = data, source, index, line
        self.fmt, self.expected = fmt, expected

    def error(self, field: str | None, problem: str, fix: str) -> DataFormatError:
        return DataFormatError(self.source, problem, fix, row=self.index, line=self.line,
                               field=field)

    def get(self, field: str, required: bool = True) -> Any:
        value = self.data.get(field)
        if value is None and required:
            present = ", ".join(k for k, v in self.data.items() if v is not None) or "none"
            raise self.error(
                field, f"is missing (this row has: {present}; format '{self.fmt}' expects: "
                f"{self.expected})", f"add '{field}' to every row, or pass the right format= "
                "if the file is in another format",
            )
        return value

    def text(self, field: str, value: Any = _MISSING) -> str:
        value = self.get(field) if value is _MISSING else value
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, found {type_name(value)}",
                             f"write '{field}' as a JSON string")
        if not value.strip():
            raise self.error(field, "is empty or whitespace only",
                             "fill it in or remove the row")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone "\ud800" escape: no tokenizer can encode it
            raise self.error(field, f"holds an unpaired surrogate ({value[e.start]!r} at "
                             f"character {e.start}), which is not Unicode text",
                             "fix the text's \\uXXXX escapes, or remove the row") from e
        return value

    def optional_str(self, field: str, value: Any = _MISSING) -> str | None:
        value = self.get(field, required=False) if value is _MISSING else value
        if value is not None and not isinstance(value, str):
            raise self.error(field, f"must be a string, found {type_name(value)}",
                             f"write '{field}' as a string or leave it out")
        return value

    def number(self, field: str, value: Any = _MISSING) -> float:
        value = self.get(field) if value is _MISSING else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.error(field, f"must be a number, found {type_name(value)}",
                             f"write '{field}' as a JSON number, e.g. 0.5")
        if not math.isfinite(value):
            raise self.error(field, f"must be finite, found {value}",
                             "replace NaN/inf scores with real numbers or remove the row")
        return float(value)

    def messages(self, field: str, value: Any = _MISSING) -> list[dict[str, str]]:
        """A non-empty list of ``{role, content}`` messages, with only those two keys kept."""
        value = self.get(field) if value is _MISSING else value
        if not isinstance(value, list) or not value:
            raise self.error(field, f"must be a non-empty list of messages, found "
                             f"{type_name(value)}", 'write [{"role": "user", "content": "..."}]')
        out = []
        for j, m in enumerate(value):
            if not isinstance(m, dict):
                raise self.error(f"{field}[{j}]", f"must be a message object, found "
                                 f"{type_name(m)}", 'write {"role": ..., "content": ...}')
            if m.get("role") not in ROLES:
                raise self.error(f"{field}[{j}].role", f"must be one of {', '.join(ROLES)}, "
                                 f"found {_short(m.get('role'))}", "rename the role (e.g. human → "
                                 "user, gpt → assistant)")
            out.append({"role": m["role"], "content": self.text(f"{field}[{j}].content",
                                                                m.get("content"))})
        return out

    def prompt(self, field: str, value: Any = _MISSING) -> str | list[dict[str, str]]:
        value = self.get(field) if value is _MISSING else value
        if isinstance(value, list):
            msgs = self.messages(field, value)
            if msgs[-1]["role"] != "user":
                raise self.error(field, f"must end with a user message, found "
                                 f"'{msgs[-1]['role']}'", "end the prompt with the user's turn")
            return msgs
        if isinstance(value, str):
            return self.text(field, value)
        raise self.error(field, f"must be a string or a list of messages, found "
                         f"{type_name(value)}", 'write "..." or [{"role": "user", "content": '
                         '"..."}]')


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    shown = repr(value) if isinstance(value, (str, int, float)) else ""
    shown = f" ({shown[:40]}{'…' if len(shown) > 40 else ''})" if shown else ""
    return f"{type(value).__name__}{shown}"


def _split_last(r: Row, field: str, msgs: list[dict[str, str]]) -> tuple[list, str]:
    """(turns before, content of the last turn), which must be the assistant's."""
    if msgs[-1]["role"] != "assistant":
        raise r.error(f"{field}[{len(msgs) - 1}].role", f"must be 'assistant' (the response), "
                      f"found '{msgs[-1]['role']}'", "end the conversation with the answer")
    return msgs[:-1], msgs[-1]["content"]


# --- one parser per (kind, format); each maps one input row to canonical rows -------------


def _prompt_flat(r: Row) -> list[dict]:
    return [{"prompt": r.prompt("prompt")}]


def _prompt_messages(r: Row) -> list[dict]:
    msgs = r.messages("messages")
    if msgs[-1]["role"] == "assistant":  # a full conversation: prompt for its last answer
        msgs = msgs[:-1]
    if not msgs:
        raise r.error("messages", "has only an assistant turn, no prompt",
                      "include the user turn")
    return [{"prompt": r.prompt("messages", msgs)}]


def _sft_flat(r: Row) -> list[dict]:
    prompt = r.prompt("prompt")
    response, completion = r.get("response", False), r.get("completion", False)
    if response is not None and completion is not None:
        raise r.error("completion", "is given together with 'response'",
                      "keep only one of 'response' and 'completion'")
    field = "completion" if completion is not None else "response"  # "response" if neither
    return [{"prompt": prompt, "response": r.text(field)}]


def _sft_messages(r: Row) -> list[dict]:
    before, response = _split_last(r, "messages", r.messages("messages"))
    if not before:
        raise r.error("messages", "has only the assistant answer, no prompt",
                      "include the user turn before the answer")
    return [{"prompt": r.prompt("messages", before), "response": response}]


def _sft_alpaca(r: Row) -> list[dict]:
    prompt = r.text("instruction")
    extra = r.optional_str("input")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [{"prompt": prompt, "response": r.text("output")}]


def _scored_flat(r: Row) -> list[dict]:
    out = {"prompt": r.prompt("prompt"), "response": r.text("response"),
           "score": r.number("score"), "policy": r.optional_str("policy")}
    group = r.get("group", required=False)
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            raise r.error("group", f"must be a string or an integer, found {type_name(group)}",
                          "use one id per group of responses to the same prompt")
        out["group"] = group
    return [out]


def _scored_ultrafeedback(r: Row) -> list[dict]:
    prompt = r.prompt("instruction")
    comps = r.get("completions")
    if not isinstance(comps, list) or not comps:
        raise r.error("completions", f"must be a non-empty list, found {type_name(comps)}",
                      "give at least one completion or remove the row")
    out = []
    for j, c in enumerate(comps):
        name = f"completions[{j}]"
        if not isinstance(c, dict):
            raise r.error(name, f"must be an object, found {type_name(c)}",
                          'write {"response": ..., "overall_score": ...}')
        if c.get("overall_score") is None:
            present = ", ".join(k for k, v in c.items() if v is not None) or "none"
            raise r.error(f"{name}.overall_score", f"is missing (this completion has: {present})",
                          "give every completion an overall_score, or convert to flat "
                          "{prompt, response, score} rows with the score you want")
        out.append({"prompt": prompt, "response": r.text(f"{name}.response", c.get("response")),
                    "score": r.number(f"{name}.overall_score", c["overall_score"]),
                    "policy": r.optional_str(f"{name}.model", c.get("model"))})
    return out


def _pair(r: Row, prompt: Any, chosen: str, rejected: str) -> list[dict]:
    if chosen.strip() == rejected.strip():
        raise r.error("rejected", "is identical to 'chosen'",
                      "a preference pair needs two different responses; remove the row")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    policy = r.optional_str("policy")
    if policy is not None:
        out["policy"] = policy
    return [out]


def _pair_flat(r: Row) -> list[dict]:
    for field in ("chosen", "rejected"):
        if isinstance(r.get(field), list):
            raise r.error(field, "is a list of messages but format 'flat' expects a string",
                          "pass format='messages' (or format='auto')")
    return _pair(r, r.prompt("prompt"), r.text("chosen"), r.text("rejected"))


def _pair_messages(r: Row) -> list[dict]:
    c_before, chosen = _split_last(r, "chosen", r.messages("chosen"))
    r_before, rejected = _split_last(r, "rejected", r.messages("rejected"))
    if c_before != r_before:
        raise r.error("rejected", "has different turns before its answer than 'chosen'",
                      "both lists must share the conversation up to the final assistant turn")
    given = r.get("prompt", required=not c_before)
    if not c_before:
        return _pair(r, r.prompt("prompt"), chosen, rejected)
    prompt = r.prompt("chosen", c_before)
    if given is not None:
        last_user = prompt[-1]["content"]
        agrees = (given.strip() == last_user.strip() if isinstance(given, str)
                  else r.prompt("prompt") == prompt)
        if not agrees:
            raise r.error("prompt", "does not match the user turn of 'chosen'",
                          "make 'prompt' equal the user message in 'chosen', or drop 'prompt'")
    return _pair(r, prompt, chosen, rejected)


def _hh_split(r: Row, field: str) -> tuple[str, str]:
    text = r.text(field)
    k = text.rfind(_HH_ASSISTANT)
    if k < 0:
        raise r.error(field, "has no '\\n\\nAssistant:' turn",
                      "HH-RLHF transcripts end with '\\n\\nAssistant: <response>'; use "
                      "format='flat' with a 'prompt' field for other data")
    response = text[k + len(_HH_ASSISTANT):]
    response = response[1:] if response.startswith(" ") else response
    if not response.strip():
        raise r.error(field, "has an empty final Assistant turn", "fill it in or remove the row")
    return text[:k], response


def _hh_prompt(r: Row, prefix: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + prefix.lstrip("\n"))  # ['', speaker, text, speaker, ...]
    if parts[0].strip() or len(parts) < 3:
        raise r.error("chosen", "does not start with a '\\n\\nHuman:' turn",
                      "HH-RLHF transcripts are '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]
    return r.prompt("chosen", msgs)


def _pair_hh(r: Row) -> list[dict]:
    c_prefix, chosen = _hh_split(r, "chosen")
    r_prefix, rejected = _hh_split(r, "rejected")
    if c_prefix != r_prefix:
        at = next((i for i, (a, b) in enumerate(zip(c_prefix, r_prefix)) if a != b),
                  min(len(c_prefix), len(r_prefix)))
        raise r.error("rejected", f"differs from 'chosen' before the last '\\n\\nAssistant:' "
                      f"(first difference at character {at})", "both transcripts must share "
                      "the conversation up to the final Assistant turn; fix or remove the row")
    return _pair(r, _hh_prompt(r, c_prefix), chosen, rejected)


_Parser = Callable[[Row], list[dict]]
PARSERS: dict[str, dict[str, tuple[_Parser, str]]] = {
    "prompt": {"flat": (_prompt_flat, "prompt"), "messages": (_prompt_messages, "messages")},
    "sft": {
        "flat": (_sft_flat, "prompt, response (or completion)"),
        "messages": (_sft_messages, "messages"),
        "alpaca": (_sft_alpaca, "instruction, input (optional), output"),
    },
    "scored": {
        "flat": (_scored_flat, "prompt, response, score, policy (optional), group (optional)"),
        "ultrafeedback": (_scored_ultrafeedback, "instruction, completions"),
    },
    "pairwise": {
        "flat": (_pair_flat, "prompt, chosen, rejected, policy (optional)"),
        "messages": (_pair_messages, "chosen, rejected (message lists), prompt (optional)"),
        "hh": (_pair_hh, "chosen, rejected (HH-RLHF transcripts)"),
    },
}
FORMAT_ALIASES = {("pairwise", "ultrafeedback"): "messages"}


def detect_format(kind: str, row: dict) -> str:
    """The ``format="auto"`` rule (see the module docstring), applied to one row."""
    keys = {k for k, v in row.items() if v is not None}
    if kind == "prompt":
        return "messages" if "messages" in keys and "prompt" not in keys else "flat"
    if kind == "sft":
        if "prompt" not in keys and "messages" in keys:
            return "messages"
        return "alpaca" if "prompt" not in keys and {"instruction", "output"} <= keys else "flat"
    if kind == "scored":
        return "ultrafeedback" if {"instruction", "completions"} <= keys else "flat"
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        return "messages"
    hh = isinstance(chosen, str) and "Human:" in chosen and "prompt" not in keys
    return "hh" if hh else "flat"
