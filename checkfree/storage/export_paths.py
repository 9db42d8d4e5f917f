"""The paths of exports and checkpoints, and the clean-up of a killed export's leftovers: what both halves of an
export need (``checkfree.export``, the torch-free command line that checks paths first, and
``checkfree.model.hf_export``, the torch work), with no torch, so neither half imports the other for it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_DIR = re.compile(r"ckpt_(\d+)")


class ExportError(Exception):
    """A run or output directory that cannot be exported from or to; the message is one sentence."""


def clear_stale_exports(out_dir: Path | str) -> list[Path]:
    """Remove what a killed export left beside ``out_dir``: ``.<name>.*.tmp`` directories (half written) and,
    where the kill fell between the two renames of ``export_model``, put the earlier export (``.<name>.*.old``)
    back under its name first. Called by every export and by a resumed run, which hold the run directory
    (a run's own exports never overlap); returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    removed = []
    for aside in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.old")):
        if not out_dir.exists():
            os.replace(aside, out_dir)  # the only whole copy of the earlier export
            continue
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(aside)
    for tmp in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier export (``--out RUN_DIR`` is a typo)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"out_dir={str(out_dir)!r} is a file; give a new directory or an earlier export.")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ExportError(f"out_dir={str(out_dir)!r} is a non-empty directory that holds no config.json, so it is "
                          "not an earlier export that may be replaced; give a new directory.")


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint directory ``RUN_DIR/checkpoints/ckpt_<progress>/`` (one with meta.pt)."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("ckpt_*"):
        match = CHECKPOINT_DIR.fullmatch(path.name)
        # meta.pt is what makes a checkpoint directory complete; a *.tmp one never matches the pattern.
        if match and path.is_dir() and (path / "meta.pt").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None
