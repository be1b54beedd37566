"""The package's layers import downwards only (docs/architecture.md): models and merging know
nothing of methods, experiments or the CLI; and no two modules import each other, directly or
through others (a cycle between modules, even within a layer). Every import, including those
inside functions and under ``TYPE_CHECKING``, is read from the source, so a lazy import cannot
hide an upward dependency or a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "steph"

# Lower number = lower layer. A module may import its own layer's and lower layers' modules.
LAYERS = {
    "errors": 0, "config": 0, "utils": 0, "runs": 0, "__init__": 0, "__main__": 99,
    "survival": 1,
    "data": 2,
    "models": 3,
    "merging": 4, "transfer": 4,
    "training": 5,
    "methods": 6,
    "inference": 7,
    "experiments": 8,
    "report": 9, "analysis": 9,
    "cli": 10,
}


def _unit(path: Path) -> str:
    """The layer unit of a source file: its top-level package or module under steph/."""
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "steph":  # from steph import x
                names = [f"steph.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "steph" and len(parts) > 1:
                out.add(parts[1])
    return out


FILES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in FILES}
    missing = sorted(units - set(LAYERS))
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_downwards(path):
    me = _unit(path)
    upward = sorted(u for u in _imported_units(path) if u != me and LAYERS.get(u, 99) > LAYERS[me])
    assert not upward, f"{path.relative_to(SRC)} (layer {me}) imports upper layers {upward}"


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from steph.cli import main\n    import steph.experiments.cv\n")
    assert _imported_units(f) == {"cli", "experiments"}


# -- cycles between modules --------------------------------------------------------------------

def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_modules(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports: ``import a.b``, ``from a.b import c``
    (``a.b.c`` when that is a module) and relative imports resolved against ``package``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (packages' ``__init__`` excluded as
    targets: importing ``steph.x.y`` runs ``steph.x`` first, which is not a dependency of the
    importer's code)."""
    files = sorted(src.rglob("*.py"))
    names = {_module_name(p, src): p for p in files}
    packages = {n for n, p in names.items() if p.name == "__init__.py"}
    modules = set(names) - packages
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imported_modules(path, package, set(names))
                       if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "steph"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "sub/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("from steph.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from steph import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .a import x\n")
    (pkg / "d.py").write_text("import steph.a\n")  # reaches the cycle, is not part of it
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"steph.a", "steph.sub.b", "steph.c"}
    (pkg / "c.py").write_text("")  # broken: no cycle
    assert find_cycle(import_graph(pkg)) is None
