"""Grids: each method of a pipeline run at every point of its grid, each point its own run.

A point's run name is ``<method>@<axis>=<value>,<axis>=<value>`` (``dvpo@kl=0.03,lr=0.0001``),
axes in order (the study's ``grid`` first, then the method's), values spelled by
:func:`spell`. The name is its run directory (``<runs_dir>/<name>/seed<s>``), its W&B run
(``<name>-seed<s>``), its ``--only`` key and its "method" in the report. It uses only letters,
digits and ``_ . - @ = ,``: no ``/``, space or quote, so it is one path component on every
file system, needs no quoting in a shell, and is a valid W&B run name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from dvpo_lightning.commands.pipeline_spec import (
    NAME,
    GridAxis,
    MethodSpec,
    PipelineSpec,
    PipelineSpecError,
)


@dataclass
class Variant:
    """One grid point of one method (a method without a grid is its one variant).

    Args:
        name: the run name (:func:`variant_name`).
        method: the method it is a point of.
        point: ``{axis name: value}`` (empty without a grid).
        args: the point's overrides, ``--<arg>=<value>``, put after the method's own.
    """

    name: str
    method: MethodSpec
    point: dict
    args: list[str]


def spell(value) -> str:
    """A grid value as run names spell it: ``true``/``false``, integers as written, floats in
    Python's shortest round-trip form with the exponent's zeros and ``+`` dropped
    (``3e-05`` → ``3e-5``, ``0.0001`` stays), strings as written (they must then be names)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mant, exp = text.split("e")
            text = f"{mant}e{'-' if exp.startswith('-') else ''}{exp.lstrip('+-').lstrip('0')}"
        return text
    return str(value)


def _label(axis: GridAxis, i: int, where: str) -> str:
    if axis.labels:
        return axis.labels[i]
    text = spell(axis.values[i])
    if not NAME.fullmatch(text):
        raise PipelineSpecError(
            f"{where}.values[{i}]: {axis.values[i]!r} cannot be spelled in a run name (only "
            "letters, digits, '_', '.' and '-'). Give the axis labels: [one name per value]")
    return text


def _cli_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def variants(method: MethodSpec, study_grid: list[GridAxis], where: str = "methods") -> list[
        Variant]:
    """Every point of ``method``'s grid (the study's axes, when ``common``, then its own), in
    row-major order (the last axis varies fastest); one variant named as the method when it has
    no axes."""
    axes = [(a, "grid") for a in (study_grid if method.common else [])]
    axes += [(a, f"{where}.grid") for a in method.grid]
    if not axes:
        return [Variant(method.name, method, {}, [])]
    for i, (a, at) in enumerate(axes):
        if other := next((b for b, _ in axes[:i] if b.arg == a.arg), None):
            raise PipelineSpecError(
                f"{at}.{a.name}.arg: {a.arg!r} is also axis {other.name!r}'s key: one run "
                "cannot take two values of it. Drop one of the two axes")
    out = []
    for idx in itertools.product(*(range(len(a.values)) for a, _ in axes)):
        at = list(zip(axes, idx))
        labels = [f"{a.name}={_label(a, i, f'{where_}.{a.name}')}" for (a, where_), i in at]
        out.append(Variant(f"{method.name}@{','.join(labels)}", method,
                           {a.name: a.values[i] for (a, _), i in at},
                           [f"--{a.arg}={_cli_value(a.values[i])}" for (a, _), i in at]))
    return out


def expand(spec: PipelineSpec, source: str = "pipeline arguments") -> list[Variant]:
    """Every method's variants in file order; run names must differ from each other and from
    the stages' names, and ``only`` must name stages, methods, runs or ``data``."""
    out: list[Variant] = []
    for i, m in enumerate(spec.methods):
        try:
            out += variants(m, spec.grid, f"methods[{i}]")
        except PipelineSpecError as e:
            raise PipelineSpecError(f"{source}: {e}") from None
    seen: dict[str, str] = {s.name: "a stage" for s in spec.stages}
    for v in out:
        if v.name in seen:
            raise PipelineSpecError(
                f"{source}: methods: the run name {v.name!r} of method {v.method.name!r} is "
                f"also {seen[v.name]}'s: two runs would share {spec.runs_dir}/{v.name}. Rename "
                "a method, or give the grid values labels that differ")
        seen[v.name] = f"method {v.method.name!r}"
    if spec.only is not None:
        known = ["data", *[s.name for s in spec.stages], *[m.name for m in spec.methods],
                 *[v.name for v in out if v.point]]
        for name in spec.only:
            if name.split("/")[0] not in known:
                raise PipelineSpecError(f"{source}: only: {name!r} names no stage, method or "
                                        f"run. Known: {', '.join(known)}")
    return out
