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
    assert order.index("checkfree.stage.averaging") < order.index("checkfree.stage.compute")


def test_decide_and_compute_stay_apart():
    """Strategies and their rules never reach the tensor math, and the registry is the only dynamic import."""
    graph = import_graph()
    deciders = [m for m in graph if m.startswith("checkfree.recovery")]
    for module in deciders:
        assert not graph[module] & {"checkfree.stage.averaging", "checkfree.stage.compute", "checkfree.model.llama"}, module
    assert "checkfree.recovery.rules" not in graph["checkfree.stage.averaging"]
    source = (ROOT / "recovery" / "__init__.py").read_text()
    assert source.count("importlib.") == 1 and "__getattr__" not in source


def package_modules() -> set[str]:
    """Every module of the package as a path under ``checkfree/`` (``stage/host.py``), ``__init__`` left out."""
    return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name != "__init__.py"}


def test_the_readme_tree_and_the_design_map_name_every_module():
    """A reader sees the architecture in the README's file tree and in docs/design.md's map: a module added,
    moved or renamed without them fails here."""
    readme = (ROOT.parent / "README.md").read_text()
    tree = readme[readme.index("```\ncheckfree/\n"):]
    tree = tree[:tree.index("```", 4)]
    listed, folder = set(), ""
    for line in tree.splitlines()[2:]:
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folder = name if depth == 1 else folder
        else:
            listed.add(name if depth == 1 else folder + name)
    assert listed == package_modules()
    design = (ROOT.parent / "docs" / "design.md").read_text()
    start = design.index("## Architecture")
    section = design[start:design.index("\n## ", start + 1)]
    # Three packages are named whole in the map: their own docstrings list their modules, one line each.
    whole = ("recovery", "failure_models", "distributed")
    missing = [m for m in sorted(package_modules()) if f"`{Path(m).name}`" not in section
               and not (Path(m).parent.name in whole and f"`{Path(m).parent}/`" in section)]
    assert missing == []
