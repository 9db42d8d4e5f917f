"""Checkpoint storage, in one format for both engines, with a fall-back when the latest one is damaged.

A checkpoint is a directory ``<root>/ckpt_<progress:07d>/`` with one shard per stage, ``stage<k>.pt`` =
``{"weights": state_dict, "optimizer": optimizer_state_dict}`` (the same nested format as a shadow), and
``meta.pt``: the progress, the data position, the RNG state, each shard's bytes and its SHA-256. The local
engine writes every shard itself; each stage process writes its own (in a real system: stages upload their
shards to storage in parallel) and the supervisor writes the meta.

Writes are atomic: shards and meta go into ``ckpt_<progress>.tmp/`` which is renamed into place once
complete, so a kill mid-save leaves the previous checkpoint whole and only a ``*.tmp`` behind (cleared at
the next start). Reads verify each file's digest before ``torch.load(weights_only=True)``: a damaged file
(a torn write, a flipped bit, a foreign file) is never unpickled, and a rollback falls back to the older
checkpoint that ``keep`` retained, naming the damaged file; only when none is readable does it fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from checkfree.run.config import first_line
from checkfree.storage.atomic import signals_held, write_error

META = "meta.pt"


class DamagedCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read back as written; names the file and the cause."""

    def __init__(self, path: Path, cause: str) -> None:
        self.path, self.cause = Path(path), cause
        super().__init__(f"{path} is damaged ({cause})")


class NoReadableCheckpoint(RuntimeError):
    """Every retained checkpoint is damaged: the run cannot roll back."""


def shard_name(stage: int) -> str:
    return f"stage{stage}.pt"


def save_file(obj: Any, path: Path) -> str:
    """``torch.save`` into ``path`` (fsynced); returns the SHA-256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def load_file(path: Path, digest: str | None = None, map_location: Any = "cpu") -> Any:
    """Read a file written by ``save_file``; the digest (when known) is checked before anything is unpickled."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DamagedCheckpoint(path, exc.strerror or type(exc).__name__) from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise DamagedCheckpoint(path, "its SHA-256 differs from the one recorded when it was written")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle: name the file, never a pickle traceback
        first = first_line(exc, limit=200) or type(exc).__name__
        raise DamagedCheckpoint(path, f"{type(exc).__name__}: {first}") from None


def nbytes(state: Any) -> int:
    """Bytes of every tensor in a (nested) state: a shard, a held copy, a rebuild's sources."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(nbytes(v) for v in state)
    return 0


def shard_bytes(shard: dict[str, Any]) -> int:
    """Tensor bytes of a shard: fp32 weights + Adam moments + step counts."""
    return nbytes(shard["weights"]) + nbytes(shard["optimizer"]["state"])


class CheckpointStore:
    """The checkpoints of one run under ``root``: write, retain the last ``keep``, read back."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.retained: list[int] = []
        """Progress of the checkpoints this run wrote and still keeps, oldest first."""
        self.saves = 0

    def path(self, progress: int) -> Path:
        return self.root / f"ckpt_{progress:07d}"

    def clear(self) -> None:
        """A fresh run starts from progress 0: checkpoints left in a reused directory by an earlier run would
        otherwise look newer than this run's (and be rolled back to)."""
        if self.root.is_dir():
            for old in self.root.glob("ckpt_*"):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.retained = []

    # --- writing -----------------------------------------------------------------------------------

    def begin(self, progress: int) -> Path:
        """An empty temporary directory for the shards of the checkpoint at ``progress``."""
        tmp = self.path(progress).with_name(self.path(progress).name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    @contextlib.contextmanager
    def writing(self, progress: int) -> Iterator[Path]:
        """``begin``, for a save that fails or is interrupted: the half-written checkpoint is removed (nothing
        half-written stays behind) and an I/O error says which checkpoint and why (e.g. no space left)."""
        tmp = self.begin(progress)
        try:
            yield tmp
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = write_error(exc, self.path(progress)) if isinstance(exc, Exception) else None
            if error is not None:
                raise error from exc
            raise

    @staticmethod
    def write_shard(directory: Path, stage: int, shard: dict[str, Any]) -> tuple[int, str]:
        """Write one stage's shard; returns (its tensor bytes, its digest) for the meta."""
        path = Path(directory) / shard_name(stage)
        try:
            return shard_bytes(shard), save_file(shard, path)
        except Exception as exc:
            error = write_error(exc, path)
            if error is None:
                raise
            raise error from exc

    def commit(self, tmp: Path, meta: dict[str, Any], keep: int) -> Path:
        """Write the meta and publish the checkpoint (one rename); keep only the last ``keep``."""
        progress = meta["progress"]
        final = self.path(progress)
        with signals_held():  # a Ctrl-C mid-commit must not leave the rename half done
            save_file(meta, tmp / META)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.retained = [p for p in self.retained if p != progress] + [progress]
        self.saves += 1
        for old in self.retained[:-keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        self.retained = self.retained[-keep:]
        return final

    # --- reading -----------------------------------------------------------------------------------

    def read_meta(self, checkpoint: Path) -> dict[str, Any]:
        meta = load_file(checkpoint / META)
        if not isinstance(meta, dict) or "digests" not in meta:
            raise DamagedCheckpoint(checkpoint / META, "it is not the meta of a checkpoint")
        return meta

    @staticmethod
    def read_shard(checkpoint: Path, stage: int, meta: dict[str, Any], map_location: Any = "cpu") -> dict:
        name = shard_name(stage)
        return load_file(Path(checkpoint) / name, meta["digests"].get(name, "missing"), map_location)

    def restore(self, load: Callable[[Path, dict[str, Any]], None], unpersisted: int | None = None) -> dict[str, Any]:
        """Roll back: ``load(checkpoint, meta)`` the newest readable checkpoint (it raises DamagedCheckpoint
        for a bad shard); returns its meta plus ``damaged``, the files skipped on the way. ``unpersisted``: a
        checkpoint whose background flush had not finished when the stages were lost; it is not used, and is
        forgotten (after the rollback it is a future the run no longer has)."""
        if unpersisted is not None and unpersisted in self.retained:
            self.retained.remove(unpersisted)
            shutil.rmtree(self.path(unpersisted), ignore_errors=True)
        damaged: list[str] = []
        for progress in reversed(self.retained):
            checkpoint = self.path(progress)
            try:
                meta = self.read_meta(checkpoint)
                load(checkpoint, meta)
            except DamagedCheckpoint as exc:
                damaged.append(f"{exc.path} ({exc.cause})")
                continue
            return {**meta, "damaged": damaged, "path": str(checkpoint)}
        raise NoReadableCheckpoint(
            f"no checkpoint in {self.root} is readable, so the run cannot roll back: "
            + ("; ".join(damaged) if damaged else "none was written") + ".")

    # --- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the retained list, and the newest checkpoint's files themselves (a later
        save of the interrupted run may have pruned it from storage)."""
        files = {}
        if self.retained:
            latest = self.path(self.retained[-1])
            files = {p.name: p.read_bytes() for p in sorted(latest.iterdir())}
        return {"retained": list(self.retained), "saves": self.saves, "latest_files": files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.retained, self.saves = list(state["retained"]), state["saves"]
        if self.retained:
            latest = self.path(self.retained[-1])
            tmp = self.begin(self.retained[-1])
            for name, data in state["latest_files"].items():
                (tmp / name).write_bytes(data)
            shutil.rmtree(latest, ignore_errors=True)
            os.replace(tmp, latest)
        # Checkpoints the interrupted run wrote after this state was saved are from a future this run will
        # not have: drop them (and forget retained ones that are gone).
        keep = {self.path(p).name for p in self.retained}
        if self.root.is_dir():
            for path in self.root.glob("ckpt_*"):
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.retained = [p for p in self.retained if self.path(p).is_dir()]


class BackgroundWriter:
    """One thread that persists checkpoints while training goes on (asynchronous checkpointing), one flush in
    flight at a time (CheckFreq's rule: a flush ends before the next begins). ``wait`` joins the flush in
    flight and raises what it raised (e.g. no space left), so a failed background save is never silent."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-flush")
        self._future = self._pool.submit(job)

    def wait(self) -> Any:
        future, self._future = self._future, None
        return future.result() if future is not None else None

    @property
    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
