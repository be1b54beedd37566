"""The package's layers import downwards only (docs/architecture.md): models and merging know
nothing of methods, experiments or the CLI. Every import, including those inside functions,
is read from the source, so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "steph"

# Lower number = lower layer. A module may import its own layer's and lower layers' modules.
LAYERS = {
    "errors": 0, "config": 0, "utils": 0, "__init__": 0, "__main__": 99,
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
