"""The module graph: every import of a ``checkfree`` module by another, at the top or inside a function, points
down. A cycle (a module importing one that imports it back, however lazily) is a seam to cut, not to hide."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import checkfree

ROOT = Path(checkfree.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the checkfree modules it imports anywhere in its text."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names} & set(modules)
        graph[name] = targets - {name}
    return graph


def test_no_module_imports_a_module_above_it():
    graph = import_graph()
    assert "checkfree.trainer" in graph["checkfree.lifecycle"]  # the walk sees imports at all
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert order.index("checkfree.averaging") < order.index("checkfree.compute")


def test_decide_and_compute_stay_apart():
    """Strategies and their rules never reach the tensor math, and the registry is the only dynamic import."""
    graph = import_graph()
    deciders = [m for m in graph if m.startswith("checkfree.recovery")]
    for module in deciders:
        assert not graph[module] & {"checkfree.averaging", "checkfree.compute", "checkfree.model"}, module
    assert "checkfree.recovery.rules" not in graph["checkfree.averaging"]
    source = (ROOT / "recovery" / "__init__.py").read_text()
    assert source.count("importlib.") == 1 and "__getattr__" not in source
