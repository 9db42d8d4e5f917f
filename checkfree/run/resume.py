"""Resumable run state: what ``trainer.save_every`` writes and ``trainer.resume=DIR`` reads back.

The state lives in ``<run_dir>/resume/state.pt`` (one ``torch.save`` of plain values and tensors, so it
loads with ``weights_only=True``). It is written to a temporary file that is then renamed over the old
one: a kill during a save leaves the previous state whole, never a torn one. The trainer saves only at
iteration boundaries, where nothing is half-updated (see ``checkfree.lifecycle.Run.save_state``).

A resumed run continues in the *same* run directory: ``metrics.jsonl`` is cut back to the saved
iteration (lines written after the save are dropped, and so is a torn last line) and then appended to, so
the file ends up with exactly one record per iteration, as if the run had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from checkfree.run.config import ConfigError, first_line
from checkfree.storage.atomic import torch_save_atomic, write_atomic

STATE_DIR, STATE_FILE = "resume", "state.pt"
FORMAT = 2
"""Bumped whenever the layout of the state changes, so an old file is refused with a clear sentence."""

# Keys that may differ between the interrupted run and its continuation: they decide how long to go on,
# how to report and where to save, never what an iteration computes. Anything else must match, or the
# continued run would silently be a different experiment. (trainer.device and trainer.compile change only how
# floats round, as a run on another machine would.)
MAY_CHANGE = ("trainer.iterations", "trainer.resume", "trainer.save_every", "trainer.progress_bar",
              "trainer.sim_time_budget_s", "trainer.on_nonfinite", "trainer.device", "trainer.compile",
              "data.cache_dir", "logger.", "engine.")


NEVER_CHANGE = ("engine.failure_clock", "engine.compute_time")
"""Keys under MAY_CHANGE that may not change: the failures' clock decides which draws the saved state holds (the
simulated clock's, or none while a thread of the supervisor draws them on the wall clock); the compute time, what
the run's ``wall_time_s`` counts (the wall's seconds, or the processes' core clocks'), which a resume goes on from."""


def state_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / STATE_DIR / STATE_FILE


def save_state(run_dir: Path | str, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (tmp file, fsync, rename); return its path."""
    path = state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch_save_atomic({"format": FORMAT, **state}, path)


def check_saved_state(run_dir: Path | str) -> Path:
    """The path of the state saved in ``run_dir`` (not read), or a ConfigError naming ``trainer.resume``."""
    run_dir = Path(run_dir)
    path = state_path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: it is a file, not a directory; give the "
                          "run directory of the run to continue.")
    if not run_dir.is_dir():
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: no such directory; give the run "
                          "directory of the run to continue.")
    if not path.is_file():
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: it holds no "
                          f"{STATE_DIR}/{STATE_FILE}, so the run saved no resumable state (start runs with "
                          "trainer.save_every=N > 0).")
    problem = torch_file_problem(path)
    if problem is not None:
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: {path} {problem}, so there is nothing to "
                          "resume from; start a new run (or resume another copy of the run).")
    return path


def torch_file_problem(path: Path) -> str | None:
    """What makes ``path`` no file ``torch.save`` wrote, found without torch (which takes seconds to import):
    torch.save writes a zip archive whose directory sits at its end, so a truncated or overwritten file has
    none. None: it looks whole (the load itself checks the rest)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        size = path.stat().st_size if path.exists() else 0
        return f"is damaged ({size:,} bytes that are not a whole torch.save archive: {first_line(exc) or 'unreadable'})"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "is a zip archive but not one torch.save wrote (it holds no data.pkl)"
    return None


def load_state(run_dir: Path | str) -> dict[str, Any]:
    """The saved state of the run in ``run_dir``; a ConfigError naming ``trainer.resume`` if there is none."""
    run_dir = Path(run_dir)
    path = check_saved_state(run_dir)
    import torch  # here: the CLI imports this module (via checkfree.run.rundir) before it knows it needs torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated by a full disk, or not ours: say which file, not a pickle traceback
        # torch's text is several lines about its loader: keep its first line only.
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: {path} could not be read "
                          f"({type(exc).__name__}: {first_line(exc)}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ConfigError(f"trainer.resume={str(run_dir)!r} is invalid: {path} has format {found!r}, "
                          f"this version reads format {FORMAT}.")
    return state


def check_resume(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The saved state of ``trainer.resume=run_dir``, after checking that ``cfg`` may continue it."""
    state = load_state(run_dir)
    check_same_config(state["config"], cfg.to_dict(), run_dir)
    done = state["iteration"]
    if cfg.trainer.iterations < done:
        raise ConfigError(f"trainer.iterations={cfg.trainer.iterations} is invalid with trainer.resume="
                          f"{str(run_dir)!r}: the saved run is already at iteration {done}; allowed >= {done}.")
    return state


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def added_at_default(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A key this version has and the saved run's config does not (it was added since), at its default: the run
    computes with it what it computed without it (a new key's default keeps the old behaviour)."""
    if key in old:
        return False
    from checkfree.run.runconfig import RunConfig

    defaults = _flatten(RunConfig().to_dict())
    return key in defaults and new.get(key) == defaults[key]


def check_same_config(saved: dict[str, Any], current: dict[str, Any], run_dir: Path | str) -> None:
    """Refuse to continue a run under a config that would compute something else (one sentence)."""
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(set(old) | set(new)):
        if (key.startswith(MAY_CHANGE) and key not in NEVER_CHANGE) or old.get(key) == new.get(key) \
                or added_at_default(key, old, new):
            continue
        hint = ""
        overrides = Path(run_dir) / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            hint = f" (its command-line overrides are in {overrides})"
        raise ConfigError(
            f"trainer.resume={str(run_dir)!r} is invalid with {key}={new.get(key)!r}: the saved run has "
            f"{key}={old.get(key)!r}; resume with the run's own config{hint}, changing only "
            f"{', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in MAY_CHANGE)}."
        )


def truncate_metrics(path: Path, iteration: int) -> int:
    """Keep the first record of each iteration ``<= iteration`` (dropping torn or later lines); return how
    many records remain. Rewritten atomically, so a kill here leaves either the old or the new file."""
    if not path.is_file():
        return 0
    kept, seen = [], set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a kill: the resumed run rewrites that iteration
        it = record.get("iteration") if isinstance(record, dict) else None
        if isinstance(it, int) and it <= iteration and it not in seen:
            seen.add(it)
            kept.append(line)
    write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(kept)
