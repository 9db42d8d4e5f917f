"""Files that a kill never leaves half-written: write to a temporary file, fsync, then rename.

A reader (the analysis, a resumed run, a rollback) sees either the previous complete file or the new
complete one, never a torn one. A kill before the rename only leaves a ``*.tmp`` behind; a write that
fails (a full disk) removes its ``*.tmp`` and raises a ``WriteError`` naming the file and the cause.

SIGINT/SIGTERM arriving during the write are held until the file is complete and then handed to the
handler that was installed: a handler that raises mid-write would leave the writer broken (torch.save's
zip stream then fails with its own error, and an interruption would be reported as a crash).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""The errors of a full disk (or a full quota): freeing space, or writing into space already held, helps."""


class WriteError(OSError):
    """A failed write as one sentence naming the file and the cause; ``errno`` is the underlying one."""

    def __str__(self) -> str:
        return str(self.strerror)  # OSError would prepend "[Errno 28]": the sentence already says it


def os_error_behind(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, else the first OSError in its chain of causes (or None).

    Libraries wrap I/O errors: torch.save reports a full disk as a RuntimeError ("unexpected pos 704 vs
    598"), logging a log file it cannot open as a ValueError ("Unable to configure handler 'file'").
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return cause if isinstance(cause, OSError) else None


def write_error(exc: BaseException, path: Path | str) -> WriteError | None:
    """The OSError behind ``exc`` as ``"<cause> writing <path>"`` (the user must read "No space left on
    device", not a zip writer's internals), or None if no OSError is behind it."""
    cause = os_error_behind(exc)
    if cause is None:
        return None
    if isinstance(cause, WriteError):
        return cause
    reason = cause.strerror or str(cause) or type(cause).__name__
    return WriteError(cause.errno, f"{reason} writing {path}")


@contextlib.contextmanager
def signals_to(handler: Callable[[int, Any], None]) -> Iterator[dict | None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block, and the handlers before it come back after it,
    however the block ends; yields those previous handlers. Outside the main thread, where handlers can be
    neither set nor run, nothing changes and it yields None."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {sig: signal.getsignal(sig) for sig in HELD_SIGNALS}
    for sig in HELD_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield previous
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Record SIGINT/SIGTERM inside the block; deliver the first one to the previous handler after it."""
    caught: list[int] = []
    previous = None
    try:
        with signals_to(lambda signum, frame: caught.append(signum)) as previous:
            yield
    finally:
        if caught and previous is not None:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])  # default action, now that the file is whole


def write_atomic(path: Path | str, write: Callable[[BinaryIO], None], reuse: Path | None = None) -> Path:
    """Publish what ``write`` writes into the open binary file at ``path``, atomically.

    ``reuse`` names a file whose blocks are already allocated (see ``checkfree.run.runlog.hold_reserve``): it
    becomes the temporary file and is overwritten in place, so the write needs no free space as long as
    it is no longer than that file. On any failure the temporary file is removed (a full disk must not
    stay full of our half-files), and an I/O error is raised again as a WriteError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_held():
        try:
            if reuse is not None:
                os.replace(reuse, tmp)
            # "r+b" keeps a reused file's blocks ("wb" would free them, for anyone to take, and then
            # allocate again); the tail beyond what was written is cut off before publishing.
            with open(tmp, "r+b" if reuse is not None else "wb") as f:
                write(f)
                if reuse is not None:
                    f.truncate()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            error = write_error(exc, path) if isinstance(exc, Exception) else None
            if error is None or error is exc:
                raise
            raise error from exc
    return path


def torch_save_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save`` that never leaves a partial file at ``path``."""
    import torch  # here: the CLI imports this module before it knows whether a run needs torch

    return write_atomic(path, lambda f: torch.save(obj, f))
