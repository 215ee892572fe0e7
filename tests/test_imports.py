"""The package's import rules, read from the source with ``ast`` (nothing is imported):

* layers: ``config``, ``pruning`` and ``checkout`` at the ground, then ``data``, then ``models``, then ``training``
  and ``evaluation`` (which never import each other), then ``synthetic``, ``demo`` and ``cli``;
  nothing in the product imports the embedded world (``tpkit.synthetic``);
* no import circle between modules;
* no function-local tpkit import outside ``tpkit/cli.py`` (whose commands import what they run
  lazily, for start-up time);
* ``importlib.import_module`` only in the lazy ``__init__`` tables and in ``tpkit/models/registry.py``,
  whose discovery of the family folders counts as an import of each ``tpkit/models/<name>/family.py``
  that defines ``FAMILIES`` (so a circle through a family folder is seen too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tpkit"

# package -> the tpkit packages it may import (its own always)
ALLOWED = {
    "config": set(),
    "pruning": set(),
    "checkout": set(),
    "data": {"config", "pruning", "checkout"},
    "models": {"config", "pruning", "data", "checkout"},
    "training": {"config", "pruning", "data", "models", "checkout"},
    "evaluation": {"config", "pruning", "data", "models", "checkout"},
    "synthetic": {"config", "pruning", "data", "models", "training", "evaluation", "checkout"},
    "demo": {"config", "pruning", "data", "models", "training", "evaluation", "synthetic", "checkout"},
    "cli": {"config", "pruning", "data", "models", "training", "evaluation", "synthetic", "demo", "checkout"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tpkit"


def _imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported tpkit module, line, inside a function) for every import of ``path``; the lazy
    ``_LAZY = {name: module}`` tables of package ``__init__`` files count as imports too."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from tpkit.x import y``: y may be a submodule
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            names = list(ast.literal_eval(node.value).values())
        for name in names:
            if name == "tpkit" or name.startswith("tpkit."):
                out.append((name, node.lineno, id(node) in local))
    return out


REGISTRY = "tpkit.models.registry"


def _defines_families(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(
        isinstance(n, (ast.Assign, ast.AnnAssign))
        and any(
            getattr(t, "id", None) == "FAMILIES"
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        )
        for n in tree.body
    )


def _family_modules() -> list[str]:
    """What the registry discovers: ``tpkit/models/<name>/family.py`` files that define FAMILIES."""
    return sorted(_module_name(p) for p in (PKG / "models").glob("*/family.py") if _defines_families(p))


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    raw = {}
    for mod, path in files.items():
        raw[mod] = _imports(path, set(files))
        if mod == REGISTRY:
            raw[mod] += [(m, 0, False) for m in _family_modules()]
        for target, _, _ in raw[mod]:
            if target in files and target != mod:
                edges[mod].add(target)
    return edges, raw


def test_the_graph_sees_the_package():
    edges, _ = _graph()
    assert "tpkit.models.core.prefill" in edges and "tpkit.cli" in edges
    assert "tpkit.models.core.masks" in edges["tpkit.models.core.prefill"]
    assert "tpkit.models.families" in edges["tpkit.models"]  # through the lazy table


def test_the_graph_sees_the_registry_discovery():
    edges, _ = _graph()
    assert {"tpkit.models.llava.family", "tpkit.models.qwen2_vl.family"} <= edges[REGISTRY]
    assert "tpkit.models.core.family" not in _family_modules()  # the seam itself defines no FAMILIES


def test_importlib_loads_only_where_the_graph_sees_them():
    loads = [
        f"{_module_name(p)}:{n.lineno}"
        for p in PKG.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Attribute) and n.attr == "import_module"
    ]
    allowed = {REGISTRY} | {_module_name(p) for p in PKG.rglob("__init__.py")}
    assert all(entry.split(":")[0] in allowed for entry in loads), loads


def test_layers():
    _, raw = _graph()
    broken = []
    for mod, imports in raw.items():
        area = _area(mod)
        for target, line, _ in imports:
            other = _area(target)
            if other not in (area, "tpkit") and other not in ALLOWED[area]:
                broken.append(f"{mod}:{line} imports {target} ({area} may import {sorted(ALLOWED[area])})")
    assert not broken, "\n".join(broken)


def test_no_import_circles():
    edges, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_function_local_tpkit_imports_only_in_the_cli():
    _, raw = _graph()
    local = [
        f"{mod}:{line} imports {t}" for mod, imports in raw.items() for t, line, inside in imports if inside
    ]
    assert all(entry.startswith("tpkit.cli:") for entry in local), "\n".join(local)
