"""Validate a sweep file against W&B's own sweep schema, offline.

W&B publishes its sweep-config JSON schema in the ``sweeps`` package
(``sweeps/config/schema.json``, the file W&B's local controller validates with). That package
pins ``numpy<2`` and pulls scipy and scikit-learn, so ``scripts/setup.sh`` installs it
without its dependencies and this module reads only the schema file — it never imports the
package — and checks it with ``jsonschema`` (draft 7, as W&B does).
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any


def wandb_schema_path() -> Path | None:
    """Where the installed ``sweeps`` package keeps ``config/schema.json`` (None if absent)."""
    spec = importlib.util.find_spec("sweeps")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "config" / "schema.json"
    return path if path.exists() else None


@cache
def _validator():
    import jsonschema

    path = wandb_schema_path()
    if path is None:
        return None
    schema = json.loads(path.read_text())
    fmt = jsonschema.FormatChecker()
    fmt.checks("float")(lambda v: isinstance(v, float))
    fmt.checks("integer")(lambda v: isinstance(v, int))
    return jsonschema.Draft7Validator(schema, format_checker=fmt)


def schema_violations(spec: Any) -> list[str] | None:
    """W&B-schema violations of ``spec``, each as ``key.path: message`` (sorted by path);
    None when the schema is not installed (``pip install --no-deps sweeps``)."""
    validator = _validator()
    if validator is None:
        return None
    out = []
    for err in validator.iter_errors(spec):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        message = err.message if len(err.message) < 300 else err.message[:300] + "…"
        out.append(f"{where}: {message}")
    return sorted(out)
