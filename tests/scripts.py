"""The experiment scripts (``experiments/*.py``) as modules, for the tests that call their functions without
training: one loader, so that each test imports them the same way."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` imported; it imports its siblings (``table2``, ``sweep``) by name, so their folder
    is on ``sys.path`` while it loads, and only then."""
    saved = list(sys.path)
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def assert_refused(name: str, out: Path, flags: list[str], message: str) -> None:
    """``experiments/<name>.py --out out *flags`` exits 2 with ``message`` in one line on stderr, before any work:
    nothing written to ``out``."""
    done = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists()
