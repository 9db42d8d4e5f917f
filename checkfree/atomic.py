"""Files that a kill never leaves half-written: write to a temporary file, fsync, then rename.

A reader (the analysis, a resumed run, a rollback) sees either the previous complete file or the new
complete one, never a torn one. A kill before the rename only leaves a ``*.tmp`` behind.

SIGINT/SIGTERM arriving during the write are held until the file is complete and then handed to the
handler that was installed: a handler that raises mid-write would leave the writer broken (torch.save's
zip stream then fails with its own error, and an interruption would be reported as a crash).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Record SIGINT/SIGTERM inside the block; deliver the first one to the previous handler after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed (and only run) in the main thread
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in HELD_SIGNALS}
    for sig in HELD_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])  # default action, now that the file is whole


def write_atomic(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Publish what ``write`` writes into the open binary file at ``path``, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_held():
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def torch_save_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save`` that never leaves a partial file at ``path``."""
    return write_atomic(path, lambda f: torch.save(obj, f))
