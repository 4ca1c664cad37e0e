"""The package's folders are its layers: no module imports from a higher layer, there are no
import cycles, and ``ops/`` is torch only (docs/design.md has the picture)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dvpo_lightning"
# low → high; a module may import its own layer and the ones below
LAYERS = [
    {"ops"},
    {"runtime"},
    {"models", "data", "tasks", "metrics"},
    {"rollout"},
    {"estimators", "report"},
    {"modules", "callbacks", "refresh"},
    {"commands"},
    {"__main__"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}
STDLIB_OK_IN_OPS = {"__future__", "math", "typing", "dataclasses", "collections", "torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth of the file, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[module_name(path)] = {m for m in imports(path) if m.startswith("dvpo_lightning.")}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    assert top in LAYER, f"{module}: its folder {top!r} has no layer; add it to LAYERS"
    return LAYER[top]


def test_every_module_is_in_a_layer_and_imports_downwards():
    upward = []
    for module, deps in package_graph().items():
        if module == "dvpo_lightning":
            continue
        for dep in deps:
            if layer_of(dep) > layer_of(module):
                upward.append(f"{module} -> {dep}")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = package_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], cycles


def test_ops_is_torch_only():
    for path in (PACKAGE / "ops").rglob("*.py"):
        outside = {m for m in imports(path) if m.split(".")[0] not in STDLIB_OK_IN_OPS
                   and not m.startswith("dvpo_lightning.ops")}
        assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_nothing_imports_a_command():
    for module, deps in package_graph().items():
        if module.startswith(("dvpo_lightning.commands", "dvpo_lightning.__main__")):
            continue
        assert not any(d.startswith("dvpo_lightning.commands") for d in deps), module


IMPORT_EACH_FIRST = r"""
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for k in [k for k in sys.modules if k.split(".")[0] == "dvpo_lightning"]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(failed))
"""


def test_every_module_imports_first_in_a_fresh_package():
    """A cycle through a package's ``__init__`` (which the graph above does not see) breaks
    the import of whichever module a user imports first: import each one first, once."""
    import subprocess
    import sys

    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *names],
                          capture_output=True, text=True, timeout=600, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", proc.stdout
