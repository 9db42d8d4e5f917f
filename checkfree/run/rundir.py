"""One run per run directory: ``owned(run_dir, resume)`` holds it for the whole run, or refuses at once.

Two runs writing one directory would interleave their metrics lines and overwrite each other's summary,
checkpoints and resume state, and neither would notice. So a run holds an exclusive ``flock`` on
``<run_dir>/run.lock`` from before it writes anything until it ends. The kernel drops a flock when the
last descriptor of it closes, which includes the process dying by SIGKILL or a power cut of the
machine: a crashed run never leaves a stale lock that someone must find and delete (a pid file would).
The lock file itself stays: deleting it would let the next two runs lock two different files.

A new run is also refused over a directory that holds the resumable state of an earlier one (a fresh run
would drop it, and with it the only way to continue that run), and a path that is a file or cannot be
written is refused as a bad ``hydra.run.dir``, not reported as a traceback. Every refusal is a
ConfigError of one sentence, raised before anything is written or deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from checkfree.run.config import ConfigError
from checkfree.run.resume import state_path

LOCK_FILE = "run.lock"
_claimed: dict[Path, int] = {}
"""Run directories this process already holds (``claim``), by resolved path: the lock's descriptor."""
ALLOWED = "allowed is a directory this user can write, or a path where one can be created"


@contextlib.contextmanager
def owned(run_dir: Path | str, resume: bool, key: str | None = None) -> Iterator[Path]:
    """Hold ``run_dir`` for the run inside the block (creating it); refuse it with a ConfigError if it is
    unusable, in use by another run, or (``resume=False``) holds a resumable state. ``key`` is the setting
    that chose the directory, named in the refusals (default: trainer.resume or hydra.run.dir)."""
    run_dir = Path(run_dir)
    key = key or ("trainer.resume" if resume else "hydra.run.dir")
    if resume and not run_dir.is_dir():
        # Nothing to continue: the trainer refuses it with its own sentence. Creating the directory here
        # would turn "no such directory" into the vaguer "no saved state".
        yield run_dir
        return
    fd = _claimed.pop(run_dir.resolve(), None)  # held since the command line claimed it: keep holding it
    if fd is None:
        fd = _open_lock(run_dir, key)
    try:
        _lock(fd, run_dir, key)
        if not resume:
            refuse_saved_state(run_dir, key)
        _record_owner(fd)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


def claim(run_dir: Path | str, key: str = "hydra.run.dir") -> None:
    """Hold ``run_dir`` from now until its run ends (``owned`` takes the claim over), or refuse it with a
    ConfigError if another run holds it. The command line claims its run directory before Hydra writes its
    ``.hydra/`` files there: of two runs started on one fresh directory together, exactly one gets it, and the
    other writes nothing there."""
    run_dir = Path(run_dir)
    fd = _open_lock(run_dir, key)
    try:
        _lock(fd, run_dir, key)
    except ConfigError:
        os.close(fd)
        raise
    _record_owner(fd)
    _claimed[run_dir.resolve()] = fd


def release_claim(run_dir: Path | str) -> bool:
    """Let go of a claim that no run took over (the run was refused before it started). False: this process
    held no claim on ``run_dir`` (another run has it, perhaps: then nothing there is this one's to remove)."""
    fd = _claimed.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
    return fd is not None


def refuse_saved_state(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """A ConfigError if ``run_dir`` holds a resumable state: a new run there would throw it away."""
    state = state_path(run_dir)
    if state.exists():
        how = {"killed": " (killed: its summary still said running)", "interrupted": " (interrupted)",
               "error": " (stopped on an error)"}.get(read_status(run_dir) or "", "")
        raise ConfigError(
            f"{key}={str(run_dir)!r} is invalid for a new run: it holds the resumable state of an earlier run"
            f"{how} ({state}); continue that run with trainer.resume={run_dir} hydra.run.dir={run_dir}, or set "
            f"{key} to another directory (or delete {state} to start over there).")


def unusable(path: Path | str, exc: OSError, key: str = "hydra.run.dir") -> ConfigError:
    """``exc`` (raised creating or writing ``path``) as the one sentence of a bad run directory setting."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        why = f"{blocker} is a file, not a directory"
    else:
        why = f"{exc.filename or path} cannot be written ({exc.strerror or exc})"
    return ConfigError(f"{key}={str(path)!r} is invalid: {why}; {ALLOWED}.")


def check_creatable(path: Path | str, key: str, expand_user: bool = True) -> Path:
    """Refuse ``path`` unless it is a directory this user can write, or can be created as one; creates nothing.

    The command line checks the run directory (and data.cache_dir) with this before Hydra writes anything:
    the nearest existing ancestor must be a writable directory, and the path itself, if it exists, one too.
    ``expand_user``: ``~`` is the home directory (as for data.cache_dir; Hydra takes it literally).
    """
    text = str(path)
    if not text.strip():
        # An empty path is the current directory for Path and for Hydra: never what was meant.
        raise ConfigError(f"{key}={text!r} is invalid: it is empty; {ALLOWED}.")
    path = Path(text).expanduser() if expand_user else Path(text)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"{key}={text!r} is invalid: {existing} is a file, not a directory; {ALLOWED}.")
    pseudo = _pseudo_file_system(existing)
    if pseudo is not None:
        # root may "write" /proc or /sys by os.access, but no directory can be made there.
        raise ConfigError(f"{key}={text!r} is invalid: {existing} is on a {pseudo} file system, where no directory "
                          f"can be created; {ALLOWED}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        # os.access answers for a read-only mount too (EROFS), where even root cannot write.
        why = os.strerror(errno.EROFS if _read_only(existing) else errno.EACCES)
        raise ConfigError(f"{key}={text!r} is invalid: {existing} cannot be written ({why}); {ALLOWED}.")
    return path


PSEUDO_FILE_SYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs"}


def _pseudo_file_system(path: Path) -> str | None:
    """The type of the kernel file system ``path`` lies on when it is one that holds no user files."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return None  # not Linux, or no /proc: nothing to say
    resolved = str(path.resolve())
    best = max(((point, kind) for point, kind in mounts
                if resolved == point or resolved.startswith(point.rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best is not None and best[1] in PSEUDO_FILE_SYSTEMS else None


def check_free(run_dir: Path | str, key: str = "hydra.run.dir") -> None:
    """Refuse ``run_dir`` if a live run holds it (``owned``); takes and drops the lock only for a moment. The
    claim of this very process (``claim``: the command line's, for the run about to start) is no other run."""
    if Path(run_dir).resolve() in _claimed:
        return
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or none we may read): nobody holds it, or owned() says why later
    try:
        _lock(fd, Path(run_dir), key, fcntl.LOCK_SH)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_held(run_dir: Path | str) -> bool:
    """True while a live run holds ``run_dir`` (``owned``); False for a finished, stopped or killed one."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: no run ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def reported_status(run_dir: Path | str, status: str | None) -> str | None:
    """The status a run's summary.json gives, told truly: "running" in the summary of a run that no process
    holds any more (SIGKILL, power loss, the OOM killer: nothing could write its end) is "killed"."""
    if status == "running" and not is_held(run_dir):
        return "killed"
    return status


def read_status(run_dir: Path | str) -> str | None:
    """``reported_status`` of the summary.json in ``run_dir`` (None: no readable summary)."""
    try:
        status = json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return reported_status(run_dir, status)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _open_lock(run_dir: Path, key: str) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a worker process started from this one must not keep the lock alive after the run.
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise unusable(run_dir, exc, key) from None


def _lock(fd: int, run_dir: Path, key: str, mode: int = fcntl.LOCK_EX) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        raise ConfigError(
            f"{key}={str(run_dir)!r} is in use by another run ({owner}); wait for it to end, or set "
            f"{key} to another directory.") from None


def _record_owner(fd: int) -> None:
    """Write who holds the lock, for the refusal of the next run. Only a hint: a full disk may refuse even
    these few bytes, and the lock holds all the same."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
