"""Helpers of the tests that start real processes (the process engine, Ray, CUDA): what a run's files say, and
which processes are still alive. One place, so that the engines are checked by the same rules."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from checkfree.run.runlog import read_metrics

HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
"""Helpers of the pytest process itself (started once, shared by the tests), never counted as strays."""


def losses(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """(iteration, train loss, validation loss) of every record of a run."""
    return [(r["iteration"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_losses(local: Path, other: Path) -> None:
    """Bit for bit: the engines share every rule of the per-stage compute and execute the same plans, whatever
    the launcher."""
    assert losses(local) == losses(other)


def write_trace(path: Path, events: list[dict]) -> str:
    """A failure trace file (``failure=trace``); returns its path for ``failure.path``."""
    path.write_text(json.dumps(events))
    return str(path)


def two_peers(target: Callable, *args, timeout_s: float = 60.0) -> tuple[list[dict], list[int | None]]:
    """Run ``target(rank, store_port, secret, *args, conn)`` in two spawned processes (ranks 0 and 1, a rendezvous
    store on 127.0.0.1) and return what each sent on ``conn`` and their exit codes. Both are joined (killed after
    ``timeout_s``) before this returns: nothing the test started outlives it."""
    from checkfree.distributed.rendezvous import new_secret, open_store

    store = open_store("127.0.0.1", 0, timeout_s)
    secret = new_secret()
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for rank in (0, 1):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(rank, store.port, secret, *args, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        replies = [p.recv() if p.poll(timeout_s * 3) else {"ok": False, "error": "no reply"} for p in pipes]
    finally:
        for proc in procs:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        del store
    return replies, [p.exitcode for p in procs]


def workers_file(run_dir: Path) -> dict:
    """The run's ``workers.json`` ({} before the pool wrote one, or while it is being replaced)."""
    try:
        return json.loads((run_dir / "workers.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def children() -> list[int]:
    """Live descendants of this pytest process, its multiprocessing helpers aside."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if live(child.pid) and not any(h in " ".join(child.cmdline()) for h in HELPERS):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def listed_alive(run_dir: Path | None) -> set[int]:
    """Every worker PID the run ever listed in ``workers.json`` that is still alive."""
    if run_dir is None:
        return set()
    return {entry["pid"] for entry in workers_file(run_dir).get("history", []) if live(entry["pid"])}


def eventually(check, seconds: float = 10.0):
    """``check()`` once it is falsy, or its last value after ``seconds`` (a killed process takes a moment)."""
    deadline = time.monotonic() + seconds
    while (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value
