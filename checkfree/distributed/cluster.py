"""The supervisor's side of the stage processes: start, command, watch, replace and stop them.

Each worker has a control pipe (commands out, replies back) and a process sentinel. ``request`` sends
commands and waits on pipes and sentinels together, so a worker that dies (a failure, a SIGKILL from
outside) is seen the moment its process exits, never through a timeout. After the first death or
aborted reply, the others must answer within ``engine.timeout_s`` plus a margin (their own blocking
receives are bounded by the process group's timeout); one that does not is killed and counted as lost,
so nothing ever waits unboundedly.

Processes come from a forkserver that has already imported the worker module (torch + transformers):
a replacement starts in milliseconds instead of the seconds a fresh interpreter needs; set
``CHECKFREE_START_METHOD=spawn`` to pay the full start-up as a cold node would. ``workers.json`` in the
run directory always lists the live processes (stage, replica, rank, pid, generation).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from checkfree.distributed import worker as worker_module
from checkfree.distributed.rendezvous import RendezvousError, new_secret, open_store
from checkfree.distributed.rollcall import call_off
from checkfree.distributed.worker import WorkerSpec, rank_of
from checkfree.runlog import write_json_atomic

GRACE_S = 10.0
"""Extra seconds, beyond engine.timeout_s, that survivors get to report after a failure."""
START_TIMEOUT_S = 300.0
"""Bound on a worker's start-up (the first start imports torch and transformers in the forkserver)."""


class WorkersDied(RuntimeError):
    """Worker processes died (or hung and were killed) while a pool command was in flight: the pool's word,
    with the replies of the survivors. The process engine turns it into ``checkfree.engine.StagesLost``, the
    one word the trainer hears from any engine."""

    def __init__(self, stages: set[int], replies: dict[int, dict], command: str, detect_s: float) -> None:
        self.stages, self.replies, self.command, self.detect_s = set(stages), replies, command, detect_s
        super().__init__(f"stage(s) {sorted(stages)} lost during '{command}'")


class WorkerError(RuntimeError):
    """A worker reported an error that is not a lost peer: a bug or a bad setting, not a failure."""


@dataclass
class Handle:
    stage: int
    replica: int
    rank: int
    process: Any
    conn: Any
    pid: int
    started: float = field(default_factory=time.time)


def _context():
    method = os.environ.get("CHECKFREE_START_METHOD", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["checkfree.distributed.worker"])
    return ctx


class WorkerPool:
    """All stage processes (S stages x W replicas) of one run."""

    def __init__(self, spec: WorkerSpec, timeout_s: float, run_dir: Path) -> None:
        self.spec = spec  # template: stage / replica / fresh are filled per process
        self.n_stages, self.replicas = spec.n_stages, spec.replicas
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.handles: dict[int, Handle] = {}
        self.generation = -1
        self.store = None
        self.ctx = _context()
        self.history: list[dict] = []

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.store = open_store(self.spec.store_addr, self.spec.store_port, self.timeout_s)
        self.spec = dataclasses.replace(self.spec, store_port=self.store.port, secret=new_secret())
        for stage in range(self.n_stages):
            for replica in range(self.replicas):
                self._spawn(stage, replica, fresh=False)
        self._await_hello(list(self.handles))
        self.rendezvous()

    def _spawn(self, stage: int, replica: int, fresh: bool) -> Handle:
        spec = dataclasses.replace(self.spec, stage=stage, replica=replica, fresh=fresh)
        # The control pipe pickles (commands, replies, the spec with the run's secret): it is an anonymous
        # socket pair between this process and its own child, which no other process can open. What stage
        # processes send each other over the network never is (``transfer``, ``headers``).
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=worker_module.main, args=(child, spec), daemon=True,
                                   name=f"checkfree-stage{stage}-replica{replica}")
        process.start()
        child.close()
        handle = Handle(stage, replica, spec.rank, process, parent, process.pid)
        self.handles[handle.rank] = handle
        self.history.append({"stage": stage, "replica": replica, "rank": handle.rank, "pid": process.pid,
                             "started": handle.started})
        return handle

    def _await_hello(self, ranks: list[int], replacing: bool = False) -> None:
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
            if "error" in reply:
                raise WorkerError(f"stage {self.handles[rank].stage} could not start: {reply['error']}")
        self.write_workers()

    def rendezvous(self) -> float:
        """A new generation of the process group with every current worker; returns the seconds it took."""
        start = time.perf_counter()
        self.generation += 1
        generation = self.generation
        replies = self.request({r: {"cmd": "rendezvous", "generation": generation} for r in self.handles},
                               "rendezvous", on_loss=lambda: call_off(self.store, generation, self.spec.secret))
        errors = [reply["error"] for reply in replies.values() if "error" in reply]
        if errors:
            raise RendezvousError(f"generation {self.generation} of the rendezvous at {self.spec.store_addr}:"
                                  f"{self.spec.store_port} failed: {errors[0]}")
        self.write_workers()
        return time.perf_counter() - start

    def stage_ranks(self, stages: set[int] | list[int]) -> list[int]:
        return [rank_of(k, r, self.n_stages) for k in sorted(stages) for r in range(self.replicas)]

    def kill(self, stages: list[int]) -> float | None:
        """Make every replica of ``stages`` exit for real (a ``die`` order: ``os._exit``); returns the seconds
        from the order until the supervisor saw every process gone (detection), None if all were gone."""
        start = time.perf_counter()
        targets = [self.handles[r] for r in self.stage_ranks(stages) if self.handles[r].process.is_alive()]
        if not targets:
            return None
        for handle in targets:
            try:
                handle.conn.send({"cmd": "die"})
            except (BrokenPipeError, OSError):
                pass
        self._await_exit(targets)
        return time.perf_counter() - start

    def _await_exit(self, handles: list[Handle], grace_s: float = GRACE_S) -> None:
        sentinels = {h.process.sentinel: h for h in handles if h.process.exitcode is None}
        deadline = time.perf_counter() + grace_s
        while sentinels and time.perf_counter() < deadline:
            for sentinel in wait(list(sentinels), timeout=max(0.0, deadline - time.perf_counter())):
                sentinels.pop(sentinel).process.join(0)
        for handle in sentinels.values():  # did not obey: the kernel ends it
            handle.process.kill()
            handle.process.join(5)

    def alive(self, rank: int) -> bool:
        return self.handles[rank].process.exitcode is None

    def respawn(self, stages: list[int]) -> float:
        """Start replacement processes (new PIDs) for every replica of ``stages`` whose process is gone (the
        caller kills the others first); returns the seconds."""
        start = time.perf_counter()
        ranks = [rank for rank in self.stage_ranks(stages) if not self.alive(rank)]
        for rank in ranks:
            old = self.handles[rank]
            old.conn.close()
            old.process.join(0)
            self._spawn(old.stage, old.replica, fresh=True)
        self._await_hello(ranks, replacing=True)
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop every worker: ``stop`` first, then SIGTERM, then SIGKILL; join them all (no orphans)."""
        alive = [h for h in self.handles.values() if h.process.exitcode is None]
        for handle in alive:
            try:
                handle.conn.send({"cmd": "stop"})
            except (BrokenPipeError, OSError):
                pass
        self._await_exit(alive, grace_s=5.0)
        for handle in self.handles.values():
            if handle.process.exitcode is None:
                handle.process.terminate()
                handle.process.join(2)
            if handle.process.exitcode is None:
                handle.process.kill()
                handle.process.join(5)
            handle.conn.close()
        self.handles = {}
        self.write_last_workers()
        self.store = None

    def write_last_workers(self) -> None:
        """workers.json as the run leaves it; none at all when no worker was ever started (an unreachable
        cluster): an empty list would only suggest there was something to look at."""
        if self.history:
            self.write_workers()
        else:
            (self.run_dir / "workers.json").unlink(missing_ok=True)

    def write_workers(self) -> None:
        if not self.run_dir.exists():
            return
        live = [{"stage": h.stage, "replica": h.replica, "rank": h.rank, "pid": h.pid}
                for h in sorted(self.handles.values(), key=lambda h: h.rank)]
        write_json_atomic(self.run_dir / "workers.json", {
            "generation": self.generation, "supervisor_pid": os.getpid(), "workers": live,
            "history": self.history,
        })

    def describe(self, stage: int, replica: int = 0) -> dict[str, Any]:
        """What a recovery record says about the process hosting a stage (its PID; launchers add more)."""
        return {"pid": self.pid(stage, replica)}

    def pid(self, stage: int, replica: int = 0) -> int:
        return self.handles[rank_of(stage, replica, self.n_stages)].pid

    # --- commands ----------------------------------------------------------------------------------

    def request(self, messages: dict[int, dict | None], command: str, deadline: float | None = None,
                on_loss: Callable[[], Any] | None = None) -> dict[int, dict]:
        """Send each rank its message (None: just wait for a reply) and collect one reply per rank.

        ``on_loss`` runs once, the moment the first process is seen gone, to release the others from waiting
        on it (the rendezvous calls its generation off). Raises ``WorkersDied`` naming the stages whose processes
        are gone once every other rank has replied.
        """
        replies: dict[int, dict] = {}
        dead: set[int] = set()
        first_trouble: float | None = None
        gone = {rank for rank, message in messages.items()
                if message is not None and self.handles[rank].process.exitcode is not None}
        if gone:  # died while idle: say so before the others start waiting on it
            raise WorkersDied({self.handles[r].stage for r in gone}, {}, command, 0.0)
        for rank, message in messages.items():
            if message is None:
                continue
            try:
                self.handles[rank].conn.send(message)
            except (BrokenPipeError, OSError):
                dead.add(rank)
        pending = {rank for rank in messages if rank not in dead}
        while pending:
            if dead and on_loss is not None:
                on_loss()
                on_loss = None
            if dead or any(r.get("aborted") or "error" in r for r in replies.values()):
                first_trouble = first_trouble or time.perf_counter()
                trouble_deadline = first_trouble + self.timeout_s + GRACE_S
                deadline = trouble_deadline if deadline is None else min(deadline, trouble_deadline)
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.perf_counter())
            replied, gone = self._wait([self.handles[r] for r in pending], timeout)
            for handle in replied:
                try:
                    replies[handle.rank] = handle.conn.recv()
                except (EOFError, OSError):
                    gone.append(handle)
                pending.discard(handle.rank)
            for handle in gone:
                first_trouble = first_trouble or time.perf_counter()
                replies.pop(handle.rank, None)
                handle.process.join(1)
                dead.add(handle.rank)
                pending.discard(handle.rank)
            if deadline is not None and time.perf_counter() >= deadline and pending:
                for rank in list(pending):  # hung past every bound: treat as lost
                    self.handles[rank].process.kill()
                    self.handles[rank].process.join(5)
                    dead.add(rank)
                pending.clear()
        if dead:
            detect_s = time.perf_counter() - first_trouble if first_trouble is not None else 0.0
            raise WorkersDied({self.handles[r].stage for r in dead}, replies, command, detect_s)
        return replies

    def _wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        """Block until a reply or a death: (handles with a reply waiting, handles whose process is gone)."""
        ready = set(wait([h.conn for h in handles] + [h.process.sentinel for h in handles], timeout=timeout))
        replied = [h for h in handles if h.conn in ready]
        gone = [h for h in handles if h.conn not in ready and h.process.sentinel in ready]
        return replied, gone

    def broadcast(self, command: str, ranks: list[int] | None = None, **kwargs: Any) -> dict[int, dict]:
        """The same command to ``ranks`` (default: all); worker errors become ``WorkerError``."""
        ranks = list(self.handles) if ranks is None else ranks
        replies = self.request({r: {"cmd": command, **kwargs} for r in ranks}, command)
        raise_errors(replies, self.handles, command)
        return replies


    def broadcast_each(self, messages: dict[int, dict], command: str) -> dict[int, dict]:
        """A message of its own to each rank; worker errors become ``WorkerError``."""
        replies = self.request(messages, command)
        raise_errors(replies, self.handles, command)
        return replies


def raise_errors(replies: dict[int, dict], handles: dict[int, Handle], command: str) -> None:
    for rank, reply in sorted(replies.items()):
        if "error" in reply:
            raise WorkerError(f"stage {handles[rank].stage} (replica {handles[rank].replica}) failed in "
                              f"'{command}': {reply['error']}\n{reply.get('traceback', '')}")

