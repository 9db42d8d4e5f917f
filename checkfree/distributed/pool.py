"""The supervisor's view of the stage workers, whatever launches them: the ``WorkerPool`` protocol the process
engine drives, and ``Supervisor``, the one implementation of its commands that every launcher shares.

A launcher (``cluster.ProcessPool``: local processes; ``ray_pool.RayPool``: Ray actors) says only how a worker
is started, watched and ended — ``start``, ``respawn``, ``shutdown``, ``wait``, ``end`` and its ``Handle``
(send a command, take a reply, see the worker gone, kill it). Sending commands, waiting for every reply
within bounds, noticing a death the moment it happens, re-forming the process group and ``workers.json`` are
``Supervisor``'s, so a new launcher (SLURM, Kubernetes) is one module with its pool and handle, its config
and its tests, and touches neither of these.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from checkfree.distributed import messages as msg
from checkfree.distributed.rendezvous import RendezvousError
from checkfree.distributed.rollcall import call_off
from checkfree.distributed.worker import WorkerSpec, rank_of
from checkfree.run.config import first_line
from checkfree.run.runlog import write_json_atomic
from checkfree.simulation.placement import Placement

GRACE_S = 10.0
"""Extra seconds, beyond engine.timeout_s, that survivors get to report after a failure."""


class WorkersDied(RuntimeError):
    """Workers died (or hung and were killed) while a pool command was in flight: the pool's word, with the
    replies of the survivors. The process engine turns it into ``checkfree.engine.StagesLost``, the one word the
    trainer hears from any engine."""

    def __init__(self, stages: set[int], replies: dict[int, msg.Reply], command: str, detect_s: float) -> None:
        self.stages, self.replies, self.command, self.detect_s = set(stages), replies, command, detect_s
        super().__init__(f"stage(s) {sorted(stages)} lost during '{command}'")


class WorkerError(RuntimeError):
    """A worker reported an error that is not a lost peer: a bug or a bad setting, not a failure."""


@dataclass(eq=False)
class Handle(abc.ABC):
    """One worker as the supervisor holds it; a launcher says how to talk to it and how to end it."""

    stage: int
    replica: int
    rank: int
    pid: int
    started: float = field(default_factory=time.time, kw_only=True)

    @abc.abstractmethod
    def send(self, command: msg.Command) -> None:
        """Start a command (at most one in flight); ``BrokenPipeError`` / ``OSError`` if the worker is gone."""

    @abc.abstractmethod
    def recv(self) -> msg.Reply:
        """The reply of the command in flight; ``EOFError`` / ``OSError`` if the worker is gone."""

    @abc.abstractmethod
    def gone(self) -> bool:
        """Whether the worker is known to have exited (without blocking)."""

    @abc.abstractmethod
    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the worker to be gone (and reap it)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End the worker now, whatever it is doing (no-op if it is gone)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the supervisor's end of the channel."""


class WorkerPool(Protocol):
    """What the process engine asks of the workers of one run (S stages x W replicas)."""

    handles: dict[int, Handle]
    generation: int
    core_now: float | None
    """``engine.compute_time=cpu``: the emulated time the workers have reached (``Supervisor.core_now``)."""

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def request(self, commands: dict[int, msg.Command | None], command: str, deadline: float | None = None,
                on_loss: Callable[[], Any] | None = None) -> dict[int, msg.Reply]: ...

    def broadcast(self, command: msg.Command, ranks: list[int] | None = None) -> dict[int, msg.Reply]: ...

    def broadcast_each(self, commands: dict[int, msg.Command]) -> dict[int, msg.Reply]: ...

    def rendezvous(self) -> float: ...

    def retire(self, slots: list[int]) -> None: ...

    def drop(self, slots: list[int]) -> None: ...

    def kill(self, stages: list[int]) -> float | None: ...

    def kill_ranks(self, ranks: list[int]) -> float | None: ...

    def respawn(self, stages: list[int]) -> float: ...

    def alive(self, rank: int) -> bool: ...

    def describe(self, stage: int, replica: int = 0) -> dict[str, Any]: ...

    def pid(self, stage: int, replica: int = 0) -> int: ...


class Supervisor(abc.ABC):
    """``WorkerPool``'s commands, bounds and bookkeeping over any launcher's handles."""

    def __init__(self, spec: WorkerSpec, timeout_s: float, run_dir: Path) -> None:
        self.spec = spec  # template: stage / replica / fresh are filled per worker
        self.n_stages, self.replicas = spec.n_stages, spec.replicas
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.handles: dict[int, Handle] = {}
        self.generation = -1
        self.store = None
        self.history: list[dict] = []
        self.placement = Placement.home(self.n_stages)
        """Which worker runs which logical stage (``checkfree.simulation.placement``): the engine sets it before a
        rendezvous; a worker's ``stage`` is its node slot, the home of the stage it runs first."""
        self.placements: list[dict] = []
        """Every change of placement, as ``workers.json`` lists it: the generation from which the workers ran
        which stages (a shrink, a stage moved back)."""
        self.placed = self.placement
        self.replied_at: dict[int, float] = {}
        """When each rank's reply to the last ``request`` came in (perf_counter)."""
        self.trouble_at: float | None = None
        """When the last ``request`` first met trouble (a death or a troubled reply), or None."""
        self.core_now: float | None = 0.0 if spec.compute_time == "cpu" and spec.network is not None else None
        """``engine.compute_time=cpu``: the latest emulated time a worker has replied with (every command carries
        it: ``msg.Timed``); None: the run keeps wall time."""

    # --- what a launcher provides ------------------------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Open the store, start every worker, await their hello, and form generation 0."""

    @abc.abstractmethod
    def respawn(self, stages: list[int]) -> float:
        """New workers for every replica of ``stages`` (the old ones are gone or are ended first); returns the
        seconds. Raises ``WorkersDied`` when a replacement, or another worker, dies meanwhile."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every worker (``Stop`` first, then by force) and release what the launcher holds."""

    @abc.abstractmethod
    def wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        """Block until a reply or a death: (handles with a reply waiting, handles whose worker is gone)."""

    @abc.abstractmethod
    def end(self, handles: list[Handle]) -> None:
        """Make these workers exit for real, as a lost machine does (an injected failure)."""

    @abc.abstractmethod
    def await_exit(self, handles: list[Handle], grace_s: float = GRACE_S) -> None:
        """Wait up to ``grace_s`` for the workers to be gone; kill those that are not."""

    def entry(self, handle: Handle) -> dict[str, Any]:
        """A live worker as ``workers.json`` lists it (launchers add where it runs): ``stages``, the logical
        stages it runs (its own, ``stage``, alone unless the pipeline shrank)."""
        return {"stage": handle.stage, "stages": self.stages_of(handle), "replica": handle.replica, "rank": handle.rank,
                "pid": handle.pid}

    def about(self) -> dict[str, Any]:
        """What ``workers.json`` says of the launcher beyond its workers."""
        return {}

    # --- the shared part ----------------------------------------------------------------------------

    def stage_ranks(self, stages: set[int] | list[int]) -> list[int]:
        return [rank_of(k, r, self.n_stages) for k in sorted(stages) for r in range(self.replicas)]

    def alive(self, rank: int) -> bool:
        return not self.handles[rank].gone()

    def host_of(self, stage: int, replica: int = 0) -> int:
        """The key (node slot x replica) of the worker that runs logical stage ``stage``."""
        return rank_of(self.placement.hosts[stage], replica, self.n_stages)

    def pid(self, stage: int, replica: int = 0) -> int:
        return self.handles[self.host_of(stage, replica)].pid

    def stages_of(self, handle: Handle) -> list[int]:
        """The logical stages a worker runs (its own alone unless the pipeline shrank)."""
        return self.placement.stages_on(handle.stage) if self.replicas == 1 else [handle.stage]

    def group_ranks(self) -> dict[int, int]:
        """Each worker's rank in the next generation of the group. With replicas every worker runs its own
        stage (rank = its key); a single pipeline numbers its live workers in pipeline order, so a shrunk one
        (fewer workers than stages) still forms a group of consecutive ranks."""
        if self.replicas > 1:
            return {key: key for key in self.handles}
        return {key: i for i, key in enumerate(sorted(self.handles))}

    def describe(self, stage: int, replica: int = 0) -> dict[str, Any]:
        """What a recovery record says about the worker hosting a stage (its PID; launchers add more)."""
        return {"pid": self.pid(stage, replica)}

    def rendezvous(self) -> float:
        """A new generation of the process group with every current worker; returns the seconds it took."""
        start = time.perf_counter()
        self.generation += 1
        generation, ranks = self.generation, self.group_ranks()
        tables = {r: tuple(ranks[self.host_of(k, r)] for k in range(self.n_stages)) for r in range(self.replicas)}
        commands = {key: msg.Rendezvous(generation, ranks[key], len(ranks), tables[h.replica])
                    for key, h in self.handles.items()}
        replies = self.request(commands, "rendezvous",
                               on_loss=lambda: call_off(self.store, generation, self.spec.secret))
        errors = [reply.error for reply in replies.values() if msg.troubled(reply)]
        if errors:
            where = self.spec.store_path or f"{self.spec.store_addr}:{self.spec.store_port}"
            raise RendezvousError(f"generation {self.generation} of the rendezvous at {where} failed: {errors[0]}")
        if self.placement != self.placed:
            self.placed = self.placement
            self.placements.append({"generation": generation, "hosts": list(self.placement.hosts),
                                    "workers": [self.entry(h) for h in sorted(self.handles.values(),
                                                                              key=lambda h: h.rank)]})
        self.write_workers()
        return time.perf_counter() - start

    def kill(self, stages: list[int]) -> float | None:
        """Make every replica of ``stages`` exit for real; returns the seconds from the order until the
        supervisor saw every worker gone (detection), None if all were gone already."""
        return self.kill_ranks(self.stage_ranks(stages))

    def kill_ranks(self, ranks: list[int]) -> float | None:
        """``kill`` for the workers of ``ranks`` alone (single replicas of their stages)."""
        start = time.perf_counter()
        targets = [self.handles[r] for r in ranks if r in self.handles and not self.handles[r].gone()]
        if not targets:
            return None
        self.end(targets)
        self.await_exit(targets)
        return time.perf_counter() - start

    def retire(self, slots: list[int]) -> None:
        """Stop the workers of node slots that run no stage any more (their stages moved off first) and forget
        them: a node the placement no longer uses (resuming a shrunk run)."""
        keys = [key for key in self.stage_ranks(slots) if key in self.handles]
        try:  # each leaves the group and says so before it goes
            self.request({key: msg.Stop() for key in keys}, "stop")
        except WorkersDied:
            pass  # gone already: it was leaving anyway
        handles = [self.handles[key] for key in keys]
        self.end(handles)  # a local process has exited by now; an actor outlives its loop until it is killed
        self.await_exit(handles)
        self.drop(slots)

    def drop(self, slots: list[int]) -> None:
        """Forget the (gone) workers of node slots that have no node now: the pipeline runs without them."""
        for key in self.stage_ranks(slots):
            handle = self.handles.pop(key, None)
            if handle is not None:
                handle.join(1)
                handle.close()

    def request(self, commands: dict[int, msg.Command | None], command: str, deadline: float | None = None,
                on_loss: Callable[[], Any] | None = None) -> dict[int, msg.Reply]:
        """Send each rank its command (None: just wait for a reply, e.g. a hello) and collect one reply per rank.

        After the first death or troubled reply the others must answer within ``engine.timeout_s`` + GRACE_S
        (their own blocking receives are bounded by the process group's timeout); one that does not is killed
        and counted as lost, so nothing waits unboundedly. ``on_loss`` runs once, the moment the first worker is
        seen gone, to release the others from waiting on it (the rendezvous calls its generation off). Raises
        ``WorkersDied`` naming the stages whose workers are gone once every other rank has replied.
        """
        replies: dict[int, msg.Reply] = {}
        dead: set[int] = set()
        first_trouble: float | None = None
        self.replied_at, self.trouble_at = {}, None
        gone = {rank for rank, message in commands.items() if message is not None and self.handles[rank].gone()}
        if gone:  # died while idle: say so before the others start waiting on it
            raise WorkersDied({self.handles[r].stage for r in gone}, {}, command, 0.0)
        for rank, message in commands.items():
            if message is None:
                continue
            try:
                self.handles[rank].send(message if self.core_now is None else msg.Timed(self.core_now, message))
            except (BrokenPipeError, OSError):
                dead.add(rank)
        pending = {rank for rank in commands if rank not in dead}
        while pending:
            if dead and on_loss is not None:
                on_loss()
                on_loss = None
            if dead or any(msg.troubled(r) for r in replies.values()):
                first_trouble = first_trouble or time.perf_counter()
                trouble_deadline = first_trouble + self.timeout_s + GRACE_S
                deadline = trouble_deadline if deadline is None else min(deadline, trouble_deadline)
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.perf_counter())
            replied, gone_now = self.wait([self.handles[r] for r in pending], timeout)
            for handle in replied:
                try:
                    replies[handle.rank] = self._untimed(handle.recv())
                    self.replied_at[handle.rank] = time.perf_counter()
                except (EOFError, OSError):
                    gone_now.append(handle)
                pending.discard(handle.rank)
            for handle in gone_now:
                first_trouble = first_trouble or time.perf_counter()
                replies.pop(handle.rank, None)
                handle.join(1)
                dead.add(handle.rank)
                pending.discard(handle.rank)
            if deadline is not None and time.perf_counter() >= deadline and pending:
                for rank in list(pending):  # hung past every bound: treat as lost
                    self.handles[rank].kill()
                    self.handles[rank].join(5)
                    dead.add(rank)
                pending.clear()
        self.trouble_at = first_trouble
        if dead:
            detect_s = time.perf_counter() - first_trouble if first_trouble is not None else 0.0
            raise WorkersDied({self.handles[r].stage for r in dead}, replies, command, detect_s)
        return replies

    def _untimed(self, reply: msg.Reply | msg.Timed) -> msg.Reply:
        """A reply's body; a timed reply moves the emulated time on to its worker's, if that is later."""
        if isinstance(reply, msg.Timed):
            self.core_now = max(self.core_now or 0.0, reply.at)
            return reply.body
        return reply

    def broadcast(self, command: msg.Command, ranks: list[int] | None = None) -> dict[int, msg.Reply]:
        """The same command to ``ranks`` (default: all); worker errors become ``WorkerError``."""
        ranks = list(self.handles) if ranks is None else ranks
        return self.broadcast_each({r: command for r in ranks})

    def broadcast_each(self, commands: dict[int, msg.Command]) -> dict[int, msg.Reply]:
        """A command of its own to each rank; worker errors become ``WorkerError``."""
        name = msg.name(next(iter(commands.values()))) if commands else "nothing"
        replies = self.request(commands, name)
        raise_errors(replies, self.handles, name, self.run_dir)
        return replies

    def write_last_workers(self) -> None:
        """workers.json as the run leaves it; none at all when no worker was ever started (an unreachable
        cluster): an empty list would only suggest there was something to look at."""
        if self.history:
            self.write_workers()
        else:
            (self.run_dir / "workers.json").unlink(missing_ok=True)

    def write_workers(self) -> None:
        """``workers.json``: the live workers, every worker ever started (``history``), the generation, and each
        change of placement (``placements``; none while every stage runs on its own node)."""
        if not self.run_dir.exists():
            return
        live = [self.entry(h) for h in sorted(self.handles.values(), key=lambda h: h.rank)]
        write_json_atomic(self.run_dir / "workers.json", {
            **self.about(), "generation": self.generation, "supervisor_pid": os.getpid(), "workers": live,
            "history": self.history, **({"placements": self.placements} if self.placements else {}),
        })


WORKER_ERRORS = "worker_errors.log"
"""Where a stage process's traceback goes (in the run directory): the error itself is one sentence."""


def raise_errors(replies: dict[int, msg.Reply], handles: dict[int, Handle], command: str,
                 run_dir: Path | None = None) -> None:
    """A ``WorkerError`` of one sentence for the first worker that failed; its traceback is appended to the run
    directory's ``worker_errors.log`` (named in the sentence), never put in the summary."""
    for rank, reply in sorted(replies.items()):
        if isinstance(reply, msg.Failed):
            who = f"stage {handles[rank].stage} (replica {handles[rank].replica}) failed in '{command}'"
            where = ""
            if run_dir is not None:
                try:
                    with open(Path(run_dir) / WORKER_ERRORS, "a") as log:
                        log.write(f"{who}: {reply.error}\n{reply.traceback}\n")
                    where = f" (traceback in {Path(run_dir) / WORKER_ERRORS})"
                except OSError:  # a full disk: the sentence still says what failed
                    pass
            raise WorkerError(f"{who}: {first_line(reply.error, limit=500)}{where}")
