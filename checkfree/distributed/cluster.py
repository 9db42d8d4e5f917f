"""The local launcher: one OS process per stage worker on this machine (``engine.launcher=processes``).

Each worker has a control pipe (commands out, replies back) and a process sentinel; ``wait`` blocks on pipes
and sentinels together, so a worker that dies (a failure, a SIGKILL from outside) is seen the moment its
process exits, never through a timeout (``pool.Supervisor`` bounds the rest).

Processes come from a forkserver that has already imported the worker module (torch + transformers):
a replacement starts in milliseconds instead of the seconds a fresh interpreter needs; set
``CHECKFREE_START_METHOD=spawn`` to pay the full start-up as a cold node would. ``workers.json`` in the
run directory always lists the live processes (stage, replica, rank, pid, generation).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from checkfree.distributed import messages as msg
from checkfree.distributed import worker as worker_module
from checkfree.distributed.pool import GRACE_S, Handle, Supervisor, WorkerError, WorkersDied
from checkfree.distributed.rendezvous import new_secret, open_file_store, remove_file_store
from checkfree.distributed.worker import WorkerSpec

START_TIMEOUT_S = 300.0
"""Bound on a worker's start-up (the first start imports torch and transformers in the forkserver)."""


@dataclass(eq=False)
class ProcessHandle(Handle):
    """A stage process and its control pipe."""

    process: Any = None
    conn: Any = None

    def send(self, command: msg.Command) -> None:
        self.conn.send(command)

    def recv(self) -> msg.Reply:
        return self.conn.recv()

    def gone(self) -> bool:
        return self.process.exitcode is not None

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        self.conn.close()


def start_method() -> str:
    """How a replacement process starts: ``forkserver`` (forked from a server that has imported torch and the
    worker: a warm standby) or ``spawn`` (a fresh interpreter: a cold start), ``CHECKFREE_START_METHOD``."""
    return os.environ.get("CHECKFREE_START_METHOD", "forkserver")


def _context():
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["checkfree.distributed.worker"])
    return ctx


class ProcessPool(Supervisor):
    """All stage processes (S stages x W replicas) of one run, on this machine."""

    def __init__(self, spec: WorkerSpec, timeout_s: float, run_dir: Path) -> None:
        super().__init__(spec, timeout_s, run_dir)
        self.ctx = _context()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        # A file only this user can open, not a TCP port any local user could connect to (``rendezvous``).
        self.store, path = open_file_store(self.timeout_s)
        self.spec = dataclasses.replace(self.spec, store_path=str(path), secret=new_secret())
        for stage in range(self.n_stages):
            for replica in range(self.replicas):
                self.spawn(stage, replica, fresh=False)
        self.await_hello(list(self.handles))
        self.rendezvous()

    def spawn(self, stage: int, replica: int, fresh: bool) -> ProcessHandle:
        spec = dataclasses.replace(self.spec, stage=stage, replica=replica, fresh=fresh)
        # The control pipe pickles (commands, replies, the spec with the run's secret): it is an anonymous
        # socket pair between this process and its own child, which no other process can open. What stage
        # processes send each other over the network never is (``transfer``, ``headers``).
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=worker_module.main, args=(child, spec), daemon=True,
                                   name=f"checkfree-stage{stage}-replica{replica}")
        process.start()
        child.close()
        handle = ProcessHandle(stage, replica, spec.rank, process.pid, process=process, conn=parent)
        self.handles[handle.rank] = handle
        self.history.append({"stage": stage, "replica": replica, "rank": handle.rank, "pid": process.pid,
                             "started": handle.started})
        return handle

    def await_hello(self, ranks: list[int], replacing: bool = False) -> None:
        """Wait for the new processes' hello. A replacement that dies while starting is a stage lost during the
        recovery (``WorkersDied``: the supervisor adds it to the recovery); at the first start it is an error."""
        try:
            replies = self.request({r: None for r in ranks}, "start", deadline=time.perf_counter() + START_TIMEOUT_S)
        except WorkersDied as lost:
            if replacing:
                raise
            codes = {self.handles[r].stage: self.handles[r].process.exitcode for r in ranks}
            raise WorkerError(f"stage process(es) {sorted(lost.stages)} exited while starting (exit codes {codes}); "
                              "see the messages above.") from lost
        for rank, reply in replies.items():
            if isinstance(reply, msg.Failed):
                raise WorkerError(f"stage {self.handles[rank].stage} could not start: {reply.error}")
        self.write_workers()

    def end(self, handles: list[Handle]) -> None:
        """A ``Die`` order: the process leaves by ``os._exit``, as a lost machine does."""
        for handle in handles:
            try:
                handle.send(msg.Die())
            except (BrokenPipeError, OSError):
                pass

    def await_exit(self, handles: list[Handle], grace_s: float = GRACE_S) -> None:
        sentinels = {h.process.sentinel: h for h in handles if not h.gone()}
        deadline = time.perf_counter() + grace_s
        while sentinels and time.perf_counter() < deadline:
            for sentinel in wait(list(sentinels), timeout=max(0.0, deadline - time.perf_counter())):
                sentinels.pop(sentinel).join(0)
        for handle in sentinels.values():  # did not obey: the kernel ends it
            handle.kill()
            handle.join(5)

    def respawn(self, stages: list[int]) -> float:
        """Start replacement processes (new PIDs) for every replica of ``stages`` (node slots) whose process is
        gone or that have none (a node that arrives after the pipeline shrank); the caller kills the others
        first. Returns the seconds."""
        start = time.perf_counter()
        ranks = [rank for rank in self.stage_ranks(stages) if rank not in self.handles or not self.alive(rank)]
        for rank in ranks:
            old = self.handles.get(rank)
            if old is not None:
                old.close()
                old.join(0)
            # (a slot with no handle: the node that arrives after the pipeline shrank)
            self.spawn(rank % self.n_stages, rank // self.n_stages, fresh=True)
        self.await_hello(ranks, replacing=True)
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop every worker: ``Stop`` first, then SIGTERM, then SIGKILL; join them all (no orphans)."""
        alive = [h for h in self.handles.values() if not h.gone()]
        for handle in alive:
            try:
                handle.send(msg.Stop())
            except (BrokenPipeError, OSError):
                pass
        self.await_exit(alive, grace_s=5.0)
        for handle in self.handles.values():
            if not handle.gone():
                handle.process.terminate()
                handle.join(2)
            if not handle.gone():
                handle.kill()
                handle.join(5)
            handle.close()
        self.handles = {}
        self.write_last_workers()
        self.store = None
        remove_file_store(self.spec.store_path)

    # --- commands ----------------------------------------------------------------------------------

    def wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        ready = set(wait([h.conn for h in handles] + [h.process.sentinel for h in handles], timeout=timeout))
        replied = [h for h in handles if h.conn in ready]
        gone = [h for h in handles if h.conn not in ready and h.process.sentinel in ready]
        return replied, gone
