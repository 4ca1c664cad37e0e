"""The CLI's argument parser: LightningCLI's, with "did you mean ...?" for unknown config keys
and a way around a jsonargparse bug with nulls in grouped settings.

:func:`suggest_key` finds the closest key, :func:`add_key_suggestions` adds one hint line per
unknown key to a jsonargparse error, :func:`nested_nulls` rewrites ``--a.b.c=null`` overrides,
and :class:`KeySuggestingParser` applies both.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser


def suggest_key(bad: str, valid: Iterable[str]) -> str | None:
    """The valid key closest to ``bad`` (difflib), or None when none is close.

    Dotted keys are compared under the same parent first (``trainer.max_stepz`` →
    ``trainer.max_steps``, not ``data.max_length``); a key that lives in a settings group is
    found there (``lr`` → ``optim.lr``, ``lora.r`` → ``models.lora.r``); ``-`` and ``_`` are
    treated alike.
    """
    valid = list(dict.fromkeys(valid))
    norm = {v.replace("-", "_").lower(): v for v in valid}
    key = bad.replace("-", "_").lower()
    if key in norm:
        return norm[key]
    if "." in key:
        parent, leaf = key.rsplit(".", 1)
        siblings = {k.rsplit(".", 1)[1]: v for k, v in norm.items()
                    if "." in k and k.rsplit(".", 1)[0] == parent}
        hit = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        if hit:
            return siblings[hit[0]]
    head, dot, rest = key.partition(".")
    grouped = [v for k, v in norm.items() if k.endswith("." + head)]
    if grouped:
        return grouped[0] + dot + rest
    hit = difflib.get_close_matches(key, list(norm), n=1, cutoff=0.6)
    if hit:
        return norm[hit[0]]
    leaves = {k.rsplit(".", 1)[1]: v for k, v in reversed(norm.items()) if "." in k}
    hit = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
    return leaves[hit[0]] if hit else None


def init_arg_names(class_path: str) -> list[str]:
    """The keyword arguments of ``class_path``'s ``__init__``, those its ``**kwargs`` pass on to
    a base class's, and each settings group's fields, dotted (``optim.lr``); [] if it cannot be
    imported."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())
        except (ValueError, TypeError):
            break
        for p in params:
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            names.append(p.name)
            if dataclasses.is_dataclass(p.default):
                names += [f"{p.name}.{f.name}" for f in dataclasses.fields(p.default)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def parser_keys(parser: Any) -> list[str]:
    """Every option a (jsonargparse) parser accepts, without the leading dashes."""
    keys = []
    for action in getattr(parser, "_actions", []):
        keys += [s.lstrip("-") for s in action.option_strings if s.startswith("--")]
    return keys


_HINT = "did you mean"
_CLASS_OPTION = re.compile(r"class_path '(?P<cls>[\w.]+)'|Option '(?P<opt>[^']+)' is not "
                           r"accepted(?! before)")
_PARSER_OPTION = [
    re.compile(r"unrecognized arguments: (?P<args>.+)"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted before subcommand"),
]


def _hint(bad: str, valid: list[str], where: str) -> str:
    best = suggest_key(bad, valid)
    if best is not None:
        return f"unknown key '{bad}' {where}: {_HINT} '{best}'?"
    shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
    return f"unknown key '{bad}' {where}; the valid keys are: {shown}"


def add_key_suggestions(message: str, parser: Any = None) -> str:
    """``message`` (a jsonargparse error) plus one "did you mean" line per unknown key.

    Handles the three shapes jsonargparse 4 prints: ``Option 'k' is not accepted`` under
    ``class_path 'pkg.Class'`` (valid keys: ``Class.__init__``'s arguments),
    ``unrecognized arguments: --a.b 1`` and ``... does not accept option 'a.b'`` (valid keys:
    ``parser``'s options). A message that already has hints is returned unchanged.
    """
    if _HINT in message or "the valid keys are" in message:
        return message
    hints: list[str] = []
    cls = None
    for m in _CLASS_OPTION.finditer(message):
        if m.group("cls"):
            cls = m.group("cls")
        elif cls is not None:
            names = init_arg_names(cls)
            if names:
                hints.append(_hint(m.group("opt"), names, f"for {cls.rsplit('.', 1)[-1]}"))
    valid = parser_keys(parser) if parser is not None else []
    if valid:
        for pattern in _PARSER_OPTION:
            for m in pattern.finditer(message):
                bads = ([a.split("=", 1)[0].lstrip("-") for a in m.group("args").split()
                         if a.startswith("--")] if "args" in pattern.groupindex
                        else [".".join(m.group(g) for g in ("group", "key")
                                      if g in pattern.groupindex)])
                hints += [_hint(b, valid, "in the config") for b in bads]
    hints = list(dict.fromkeys(hints))
    return "\n".join([message, *hints]) if hints else message


_NULLS = ("null", "none", "~")


def nested_nulls(args: list[str]) -> list[str]:
    """``--model.init_args.ppo.max_grad_norm=null`` → ``--model.init_args.ppo={"max_grad_norm":
    null}``, and a group inside a group the same way from its outer group:
    ``--model.init_args.rollout.vllm.logp_tolerance=null`` → ``--model.init_args.rollout={"vllm":
    {"logp_tolerance": null}}`` (also the two-token form ``--key null``).

    jsonargparse 4.53 reads a null given to a field of a dataclass inside a class's
    ``init_args`` as the string ``"None"`` and then refuses it ("Expected a <class 'float'>"),
    at any depth; the dict form given to the outermost group sets the field and keeps the
    group's other values. Keys with fewer than three parts besides ``init_args``
    (``--model.init_args.reference=null``) are left as they are.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        two_tokens = not eq and i + 1 < len(args)
        if two_tokens:
            value = args[i + 1]
        parts = key[2:].split(".") if key.startswith("--") else []
        if value.lower() in _NULLS and len([p for p in parts if p != "init_args"]) >= 3:
            # the group right after init_args (else the key's parent) takes a nested dict
            cut = parts.index("init_args") + 2 if "init_args" in parts[:-2] else len(parts) - 1
            nested = "null"
            for name in reversed(parts[cut:]):
                nested = f'{{"{name}": {nested}}}'
            out.append(f"--{'.'.join(parts[:cut])}={nested}")
            i += 2 if two_tokens else 1
            continue
        out.append(arg)
        i += 1
    return out


class KeySuggestingParser(LightningArgumentParser):
    """LightningCLI's parser, with "did you mean ...?" added to unknown-key errors and
    :func:`nested_nulls` applied to the command line."""

    def parse_args(self, args=None, *rest, **kwargs):
        import sys

        args = nested_nulls(list(sys.argv[1:] if args is None else args))
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        return super().error(add_key_suggestions(message, parser), ex)
