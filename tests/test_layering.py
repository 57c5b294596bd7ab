"""The package's import graph, read from the sources (lazy imports inside functions included):
no module imports itself back through others, and data flows one way through the layers of
docs/DEVELOPING.md (io -> graph -> layers -> net -> passes/fast/solver/export/tools -> cli/compat)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "caffeport"

# A module may import modules of its own rank or below, never above.
RANK = {
    "errors": 0, "proto": 0,
    "io": 1,
    "data": 2, "fillers": 2, "graph": 2,
    "layers": 3,
    "net": 4, "passes": 4, "fast": 4,  # Net(fast=True) builds through fast -> passes, lazily
    "fast_train": 5, "surgery": 5,
    "solver": 6, "optim": 6, "export": 6, "tools": 6,
    "cli": 7, "compat": 7, "demo": 7, "__main__": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs or ([mod] if mod in mods else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in mods]
            edges[name].update(t for t in targets if t != name)
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles() -> None:
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    assert circles == []


def test_data_flows_one_way() -> None:
    upward = sorted(
        f"{a} -> {b}" for a, targets in _graph().items() for b in targets
        if _part(a) in RANK and _part(b) in RANK and RANK[_part(b)] > RANK[_part(a)]
    )
    assert upward == []


def test_every_part_has_a_rank() -> None:  # a new top-level module must be placed in RANK
    parts = {_part(m) for m in _modules()} - {""}
    assert parts <= set(RANK), sorted(parts - set(RANK))
