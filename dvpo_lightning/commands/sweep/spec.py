"""W&B sweep files: validation, trial expansion (grid, random) and the agent's argument list.

The same YAML drives ``wandb sweep`` + ``wandb agent`` and the local runner
(``dvpo_lightning/commands/sweep/run.py``). Hand-written checks give tailored messages for what the
local runner supports; then the file is checked against W&B's own schema
(``sweeps/config/schema.json``, see :mod:`dvpo_lightning.commands.sweep.schema`).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path
from typing import Any

import yaml

from dvpo_lightning.commands.sweep.schema import schema_violations

TOP_LEVEL_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job",
                  "image_uri", "entity", "project", "method", "command", "name", "run_cap",
                  "metric", "metrics", "scheduler", "early_terminate", "parameters"}
METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
METRIC_KEYS = {"name", "goal", "target", "impute", "impute_while_running"}
# distribution → required keys (besides ``distribution``); optional keys in OPTIONAL
DISTRIBUTIONS = {
    "constant": {"value"},
    "categorical": {"values"},
    "uniform": {"min", "max"},
    "int_uniform": {"min", "max"},
    "q_uniform": {"min", "max", "q"},
    "log_uniform_values": {"min", "max"},
    "log_uniform": {"min", "max"},  # min and max are exponents: exp(U(min, max))
    "normal": {"mu", "sigma"},
}
OPTIONAL = {"categorical": {"probabilities"}}
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
MACROS = ("env", "interpreter", "program", "args")  # of W&B's, the ones run locally
MACRO_RE = re.compile(r"^\$\{(\w+)\}$")


class SweepConfigError(ValueError):
    """An invalid sweep file; the message names the key, the rule and the fix."""


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep YAML (see :func:`validate_sweep`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file {path}: no such file")
    spec = yaml.safe_load(path.read_text())
    validate_sweep(spec, source=str(path))
    return spec


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def distribution_of(name: str, param: Any, source: str = "sweep") -> str:
    """The distribution of one ``parameters`` entry, inferred as W&B does (``values`` →
    categorical, ``value`` → constant, ``min``/``max`` → int_uniform if both are ints, else
    uniform); raises :class:`SweepConfigError` naming ``parameters.<name>.<key>``."""
    where = f"{source}: parameters.{name}"
    if not isinstance(param, dict):
        raise SweepConfigError(f"{where} must be a mapping such as {{values: [...]}} or "
                               f"{{value: x}} or {{distribution: uniform, min: a, max: b}}; "
                               f"got {param!r}")
    if "parameters" in param:
        raise SweepConfigError(f"{where}.parameters: nested parameters are not supported; "
                               "name each LightningCLI key in full (model.init_args.kl.coef)")
    dist = param.get("distribution")
    if dist is None:
        if "values" in param:
            dist = "categorical"
        elif "value" in param:
            dist = "constant"
        elif {"min", "max"} <= set(param):
            ints = all(isinstance(param[k], int) and not isinstance(param[k], bool)
                       for k in ("min", "max"))
            dist = "int_uniform" if ints else "uniform"
        else:
            raise SweepConfigError(f"{where}: give `values`, `value`, or `distribution` with its "
                                   f"arguments (min/max, mu/sigma); got keys {sorted(param)}")
    if dist not in DISTRIBUTIONS:
        raise SweepConfigError(f"{where}.distribution: {dist!r} is not supported here; "
                               f"supported: {sorted(DISTRIBUTIONS)}")
    need = DISTRIBUTIONS[dist]
    allowed = need | OPTIONAL.get(dist, set()) | {"distribution"}
    if missing := need - set(param):
        raise SweepConfigError(f"{where}: distribution {dist!r} needs {sorted(missing)}")
    if extra := set(param) - allowed:
        raise SweepConfigError(f"{where}.{sorted(extra)[0]}: unknown key for distribution "
                               f"{dist!r}; allowed: {sorted(allowed)}")
    if dist == "categorical":
        values = param["values"]
        if not isinstance(values, list) or not values:
            raise SweepConfigError(f"{where}.values must be a non-empty list; got {values!r}")
        probs = param.get("probabilities")
        if probs is not None and (not isinstance(probs, list) or len(probs) != len(values)
                                  or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)):
            raise SweepConfigError(f"{where}.probabilities: one per value ({len(values)}), "
                                   f"summing to 1; got {probs!r}")
    for k in need - {"value", "values"}:
        if not _is_num(param[k]):
            raise SweepConfigError(f"{where}.{k} must be a number; got {param[k]!r}")
    if {"min", "max"} <= need and not param["min"] < param["max"]:
        raise SweepConfigError(f"{where}: min ({param['min']}) must be < max ({param['max']})")
    if dist == "int_uniform" and not all(isinstance(param[k], int) for k in ("min", "max")):
        raise SweepConfigError(f"{where}: int_uniform needs integer min and max")
    if dist == "log_uniform_values" and param["min"] <= 0:
        raise SweepConfigError(f"{where}.min must be > 0 for log_uniform_values")
    return dist


def validate_sweep(spec: Any, source: str = "sweep") -> None:
    """Check a sweep config against the rules of W&B's sweep schema that matter here.

    Raises:
        SweepConfigError: naming the offending key (``metric.goal``, ``parameters.<name>``...).
    """
    if not isinstance(spec, dict):
        raise SweepConfigError(f"{source}: a sweep file is a mapping with method, metric, "
                               f"parameters (and command); got {type(spec).__name__}")
    if unknown := set(spec) - TOP_LEVEL_KEYS:
        raise SweepConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}; "
                               f"W&B sweep keys: {sorted(TOP_LEVEL_KEYS)}")
    method = spec.get("method")
    if method not in METHODS:
        raise SweepConfigError(f"{source}: method must be one of {list(METHODS)}; got {method!r}")
    metric = spec.get("metric")
    if not isinstance(metric, dict):
        raise SweepConfigError(f"{source}: metric is required, e.g. {{name: eval/gold_reward, "
                               f"goal: maximize}} (the runner ranks trials by it)")
    if extra := set(metric) - METRIC_KEYS:
        raise SweepConfigError(f"{source}: metric.{sorted(extra)[0]}: unknown key; "
                               f"allowed: {sorted(METRIC_KEYS)}")
    if not isinstance(metric.get("name"), str) or not metric["name"]:
        raise SweepConfigError(f"{source}: metric.name must name a logged metric "
                               f"(e.g. eval/gold_reward); got {metric.get('name')!r}")
    if metric.get("goal") not in GOALS:
        raise SweepConfigError(f"{source}: metric.goal must be one of {list(GOALS)}; "
                               f"got {metric.get('goal')!r}")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepConfigError(f"{source}: parameters must be a non-empty mapping of "
                               "LightningCLI keys, e.g. model.init_args.kl.coef: {values: [...]}")
    dists = {name: distribution_of(name, p, source) for name, p in params.items()}
    if method == "grid":
        for name, dist in dists.items():
            if dist not in GRID_DISTRIBUTIONS or "probabilities" in params[name]:
                raise SweepConfigError(
                    f"{source}: parameters.{name}: grid search needs discrete parameters "
                    f"({', '.join(GRID_DISTRIBUTIONS)}, no probabilities); got {dist!r}. "
                    "List `values`, or use method: random")
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap <= 0):
        raise SweepConfigError(f"{source}: run_cap must be a positive integer; got {run_cap!r}")
    command = spec.get("command")
    if command is None:
        if not spec.get("program"):
            raise SweepConfigError(f"{source}: give command (a list ending in ${{args}}) or "
                                   "program")
    else:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise SweepConfigError(f"{source}: command must be a list of strings")
        macros = [m.group(1) for c in command if (m := MACRO_RE.match(c))]
        if "args" not in macros:
            raise SweepConfigError(f"{source}: command must contain ${{args}}, where the agent "
                                   "puts --key=value for each parameter")
        if bad := [m for m in macros if m not in MACROS]:
            raise SweepConfigError(f"{source}: command macro ${{{bad[0]}}} is not supported by "
                                   f"the local runner; supported: {list(MACROS)}")
        if "program" in macros and not spec.get("program"):
            raise SweepConfigError(f"{source}: command uses ${{program}} but program is not set")
    violations = schema_violations(spec)
    if violations:
        raise SweepConfigError(
            f"{source}: does not follow W&B's sweep schema (sweeps/config/schema.json): "
            + "; ".join(violations) + ". Fix the key(s) named (W&B's sweep configuration "
            "reference: https://docs.wandb.ai/guides/sweeps/sweep-config-keys)")


def agent_args(parameters: dict[str, Any]) -> list[str]:
    """``--key=value`` for each parameter, exactly as ``wandb agent`` builds ``${args}``
    (``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``, the agent's own function)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in parameters.items()}}
                                     )["args"]


def _sample(param: dict, dist: str, rng: random.Random) -> Any:
    if dist == "constant":
        return param["value"]
    if dist == "categorical":
        return rng.choices(param["values"], weights=param.get("probabilities"))[0]
    lo, hi = param.get("min"), param.get("max")
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist == "q_uniform":
        return round(rng.uniform(lo, hi) / param["q"]) * param["q"]
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "log_uniform":
        return math.exp(rng.uniform(lo, hi))
    return rng.gauss(param["mu"], param["sigma"])  # normal


def _grid_values(param: dict, dist: str) -> list:
    if dist == "constant":
        return [param["value"]]
    if dist == "categorical":
        return list(param["values"])
    if dist == "int_uniform":
        return list(range(param["min"], param["max"] + 1))
    q, lo = param["q"], param["min"]  # q_uniform: W&B's np.arange(min, max, q)
    return [lo + i * q for i in range(math.ceil((param["max"] - lo) / q))]


def expand_trials(spec: dict, max_trials: int | None = None, seed: int = 0) -> list[dict]:
    """The parameter sets of a validated sweep, in order.

    grid: the product of the parameters' values in file order (W&B's order), cut at
    ``max_trials``; random: ``min(run_cap, max_trials)`` draws from a ``seed``-ed generator
    (the same trials on every call, so a sweep can be resumed).

    Raises:
        SweepConfigError: for ``bayes`` (needs a W&B server) or a random sweep without a cap.
    """
    params = spec["parameters"]
    dists = {name: distribution_of(name, p) for name, p in params.items()}
    if spec["method"] == "bayes":
        raise SweepConfigError(
            "method: bayes proposes each trial from the results so far on a W&B server; run it "
            "with `wandb sweep FILE` and `wandb agent SWEEP_ID` (same file), or use grid/random "
            "locally")
    if spec["method"] == "grid":
        grid = itertools.product(*(_grid_values(params[n], d) for n, d in dists.items()))
        trials = [dict(zip(dists, values)) for values in grid]
        return trials[:max_trials] if max_trials is not None else trials
    caps = [c for c in (spec.get("run_cap"), max_trials) if c is not None]
    if not caps:
        raise SweepConfigError("method: random has no end; set run_cap in the sweep file or "
                               "--max_trials")
    rng = random.Random(seed)
    return [{n: _sample(params[n], d, rng) for n, d in dists.items()} for _ in range(min(caps))]


def trial_command(spec: dict, params: dict, python: str) -> list[str]:
    """The sweep's ``command`` with W&B's macros filled as the agent fills them, ``${args}``
    last-but-extras: ``${env}`` is dropped (the agent's ``/usr/bin/env``), ``${interpreter}``
    is ``python``, ``${program}`` the sweep's program, ``${args}`` :func:`agent_args`."""
    command = spec.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    fill = {"env": [], "interpreter": [python], "program": [spec.get("program", "")],
            "args": agent_args(params)}
    out: list[str] = []
    for c in command:
        m = MACRO_RE.match(c)
        out += fill[m.group(1)] if m else [c]
    return out
