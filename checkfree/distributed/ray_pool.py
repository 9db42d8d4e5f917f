"""The process engine's stage workers as Ray actors, on one machine or across the nodes of a Ray cluster.

``engine=ray`` (``engine.launcher=ray``) keeps all of the process engine (commands, the two-phase
iteration, the per-generation rendezvous, recovery) and changes only how workers are started, watched,
killed and stopped: ``RayPool`` is a ``pool.Supervisor`` with one ``ray_actor.StageActor`` per stage x
replica where ``cluster.ProcessPool`` has one OS process.

* Placement: a placement group with one bundle per actor (``engine.ray.placement``: SPREAD by default, so
  the stages land on different nodes where there are nodes to spread over); rank ``r`` runs in bundle ``r``.
* Rendezvous: the supervisor hosts the TCP store on its own Ray node address (127.0.0.1 for a local Ray),
  which every node of the cluster can reach, and on no other interface; its keys carry the run's secret,
  which each actor gets in the spec of its ``start`` call (Ray's channel, trusted as Ray trusts its network).
* Detection: every actor has a call in flight that never returns (``watch``); Ray fails it the moment the
  actor is gone (``ray.kill``, a crash, a SIGKILL from outside, its node lost). It is the
  actor's sentinel, as the process sentinel is for a local process, so ``request`` raises ``WorkersDied`` with
  the same bounds (after the first loss the others answer within ``engine.timeout_s`` + ``GRACE_S`` or are
  killed and counted as lost).
* Injected failures: ``kill`` ends the actors with ``ray.kill``, which Ray keeps quiet about, so that its
  'A worker died or was killed' warning on the terminal is left to the deaths we did not cause (ours are in
  metrics.jsonl).
* Replacement: a new actor in the lost one's bundle while that bundle is on a live node (Ray moves the
  bundles of a lost node when another node has room); otherwise outside the group, wherever there is room,
  within ``engine.ray.start_timeout_s``. With ``engine.ray.standby`` each node that hosts a stage keeps one
  spare actor process that has imported torch and transformers (it reserves nothing); a replacement on that
  node takes it over and skips the seconds of a fresh interpreter, and a new spare warms up behind it.
  ``workers.json`` lists every actor started (``history``) and every stage that changed node (``moves``).
* Ray itself: ``engine.ray.address`` null starts Ray on this machine and stops it at the end; auto or
  HOST:PORT joins a running cluster, and at the end only our actors and placement group are removed. A Ray
  already initialised in this process (a test's, a notebook's) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from checkfree.distributed import messages as msg
from checkfree.distributed.pool import GRACE_S, Handle, Supervisor, WorkerError, WorkersDied
from checkfree.distributed.ray_actor import StageActor
from checkfree.distributed.rendezvous import new_secret, open_store
from checkfree.distributed.worker import WorkerSpec, rank_of
from checkfree.run.config import ConfigError, RayConfig, first_line

BUNDLE_WAIT_S = 10.0
"""After a node is lost: how long a replacement waits for Ray to move its bundle to a live node before it
is scheduled outside the placement group."""
CONNECT_S = 5.0
"""How long the head's address (engine.ray.address=HOST:PORT) may take to accept a connection."""
STOP_S = 5.0
"""How long ``shutdown`` lets the actors leave their process group before they are killed."""


class RayLaunchError(RuntimeError):
    """Ray cannot provide the stage actors: no cluster at the address, or no node to host a stage in time."""


@dataclass(frozen=True)
class Node:
    """A Ray node, as recovery records and workers.json name it."""

    id: str
    ip: str


class Actor:
    """A stage actor (or a standby) and its sentinel: a call that never returns, which Ray fails when the actor
    is gone."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor
        self.sentinel = actor.watch.remote()
        self.exited = False

    def gone(self) -> bool:
        self.join(0)
        return self.exited

    def join(self, timeout: float | None = None) -> None:
        if not self.exited and ray.wait([self.sentinel], timeout=timeout)[0]:
            self.exited = True

    def kill(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone, or its node is
            pass


@dataclass(eq=False)
class RayHandle(Handle):
    """A stage actor: commands are its ``call``s (at most one in flight, as on a pipe).

    Ray pickles these calls and their replies between nodes (cloudpickle): the channel is as trusted as the
    Ray cluster's network, which Ray requires to be private (docs/engines.md, "What the process engine and Ray trust")."""

    actor: Actor | None = None
    pending: ray.ObjectRef | None = None
    """The call in flight (the hello while starting)."""
    node: Node | None = None
    """The node the actor runs on (known once it said hello)."""
    previous_node: Node | None = None
    """For a replacement: the node the stage's previous actor ran on."""
    placement: str = ""
    """'bundle <rank>' of the run's placement group, or 'outside the placement group'."""

    def send(self, command: msg.Command) -> None:
        self.pending = self.actor.actor.call.remote(command)

    def recv(self) -> msg.Reply:
        """The reply; ``EOFError`` when the actor is gone, as a pipe whose process died."""
        ref, self.pending = self.pending, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the actor's own code failed, not a lost stage
            return msg.Failed(f"{type(exc.cause).__name__}: {exc.cause}", str(exc))
        except ray.exceptions.RayError as exc:
            raise EOFError(first_line(exc) or type(exc).__name__) from exc

    def gone(self) -> bool:
        return self.actor.gone()

    def join(self, timeout: float | None = None) -> None:
        self.actor.join(timeout)

    def kill(self) -> None:
        self.actor.kill()

    def close(self) -> None:
        self.pending = None


class RayPool(Supervisor):
    """All stage actors (S stages x W replicas) of one run."""

    def __init__(self, spec: WorkerSpec, timeout_s: float, run_dir: Path, cfg: RayConfig) -> None:
        if spec.device == "cuda" and cfg.gpus_per_stage == 0:
            raise ConfigError("trainer.device resolved to cuda but engine.ray.gpus_per_stage=0, so Ray would hide "
                              "every GPU from the stage actors; set engine.ray.gpus_per_stage=1 (or a fraction) "
                              "or trainer.device=cpu.")
        super().__init__(dataclasses.replace(spec, threads=max(1, int(cfg.cpus_per_stage))), timeout_s, run_dir)
        self.cfg = cfg
        self.placement_group = None
        self.owns_ray = False
        """We called ray.init (a local Ray, or a connection to a cluster), so we call ray.shutdown."""
        self.moves: list[dict] = []
        self.standbys: dict[str, Actor] = {}
        """node id -> a warm spare actor there (engine.ray.standby)."""
        self.departed: dict[int, Node] = {}
        """Node slot -> the node of its last actor, while the pipeline runs without it (a shrink)."""

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._connect()
        self.spec = dataclasses.replace(self.spec, store_addr=ray.util.get_node_ip_address())
        self.store = open_store(self.spec.store_addr, self.spec.store_port, self.timeout_s)
        self.spec = dataclasses.replace(self.spec, store_port=self.store.port, secret=new_secret())
        self._place()
        for stage in range(self.n_stages):
            for replica in range(self.replicas):
                self.spawn(stage, replica, fresh=False)
        self._await_start(list(self.handles), replacing=False)
        self.rendezvous()
        self._replenish_standbys()

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        with _our_sigterm_handler():
            self._init_ray()
        self.owns_ray = True

    def _init_ray(self) -> None:
        address = self.cfg.address
        if address is None:  # sized for every stage, whatever this machine's core count
            world = self.n_stages * self.replicas
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(world * self.cfg.cpus_per_stage)),
                     resources={k: v * world for k, v in self.cfg.resources.items()} or None,
                     runtime_env={"env_vars": {"PYTHONPATH": _our_pythonpath()}},
                     include_dashboard=False, log_to_driver=False, namespace="checkfree")
        else:
            try:
                if address != "auto":  # Ray itself retries an unreachable address for minutes
                    socket.create_connection(address.rsplit(":", 1), timeout=CONNECT_S).close()
                ray.init(address=address, log_to_driver=False, namespace="checkfree")
            except (OSError, RuntimeError, ValueError) as exc:
                raise RayLaunchError(f"cannot join the Ray cluster at engine.ray.address={address!r} "
                                     f"({(first_line(exc) or type(exc).__name__)}); start it with `ray start --head` (docs/engines.md, 'Many machines (Ray)'), "
                                     "or use engine.ray.address=null for a Ray of our own.") from exc

    def actor_resources(self) -> dict[str, float]:
        """What one stage actor reserves: one bundle of the placement group."""
        bundle = {"CPU": float(self.cfg.cpus_per_stage)}
        if self.cfg.gpus_per_stage:
            bundle["GPU"] = float(self.cfg.gpus_per_stage)
        bundle.update({name: float(amount) for name, amount in self.cfg.resources.items()})
        return bundle

    def _place(self) -> None:
        count, bundle = self.n_stages * self.replicas, self.actor_resources()
        self.placement_group = placement_group([bundle] * count, strategy=self.cfg.placement)
        ready, _ = ray.wait([self.placement_group.ready()], timeout=self.cfg.start_timeout_s)
        if not ready:
            raise RayLaunchError(
                f"the Ray cluster could not place {count} stage actors of {bundle} with engine.ray.placement="
                f"{self.cfg.placement} within engine.ray.start_timeout_s={self.cfg.start_timeout_s} s (it has "
                f"{_resources(ray.cluster_resources())} in all, {_resources(ray.available_resources())} free); "
                "add nodes, lower engine.ray.cpus_per_stage / gpus_per_stage, or use placement SPREAD or PACK.")

    def spawn(self, stage: int, replica: int, fresh: bool) -> RayHandle:
        rank = rank_of(stage, replica, self.n_stages)
        spec = dataclasses.replace(self.spec, stage=stage, replica=replica, fresh=fresh)
        node = self._bundle_node(rank)
        standby = self.standbys.pop(node, None) if node is not None else None
        if standby is not None and not standby.gone():
            # The bundle's node has a warm spare: it runs the stage in place of the bundle's reservation.
            actor, where = standby, f"bundle {rank}, standby"
        else:
            if node is not None:
                strategy, where = PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank), f"bundle {rank}"
            else:
                spread = self.cfg.placement in ("SPREAD", "STRICT_SPREAD")
                strategy, where = ("SPREAD" if spread else "DEFAULT"), "outside the placement group"
            resources = self.actor_resources()
            actor = Actor(StageActor.options(
                num_cpus=resources.pop("CPU"), num_gpus=resources.pop("GPU", 0.0), resources=resources,
                scheduling_strategy=strategy, max_restarts=0, max_task_retries=0,
            ).remote())
        handle = RayHandle(stage, replica, rank, -1, actor=actor, placement=where)
        handle.pending = actor.actor.start.remote(spec)
        self.handles[rank] = handle
        return handle

    def _bundle_node(self, rank: int) -> str | None:
        """The live node that holds bundle ``rank``, waiting up to BUNDLE_WAIT_S for Ray to move it off a lost
        node; None: the bundle is nowhere usable (the replacement goes outside the placement group)."""
        if self.placement_group is None:
            return None
        deadline = time.perf_counter() + BUNDLE_WAIT_S
        while True:
            table = placement_group_table(self.placement_group)
            node = table.get("bundles_to_node_id", {}).get(rank)
            if table.get("state") == "CREATED" and node in live_nodes():
                return node
            if time.perf_counter() >= deadline:
                return None
            time.sleep(0.1)

    def _replenish_standbys(self) -> None:
        """A warm spare on every node that hosts a stage and has none (it imports while training goes on).

        CPU stages only: Ray makes GPUs visible to an actor when it creates it, with what it reserved, so a
        spare that reserves no GPU could never drive one."""
        if not self.cfg.standby or self.cfg.gpus_per_stage > 0:
            return
        for node in sorted({h.node.id for h in self.handles.values() if h.node is not None}):
            spare = self.standbys.get(node)
            if spare is None or spare.gone():
                self.standbys[node] = Actor(StageActor.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                    max_restarts=0).remote())

    def _await_start(self, ranks: list[int], replacing: bool) -> None:
        """Wait for the hello of every actor in ``ranks``, at most ``engine.ray.start_timeout_s``.

        An actor that dies meanwhile is a ``WorkersDied`` when replacing (the supervisor adds its stage to the
        recovery), a ``WorkerError`` at the run's start. One that never came up (no node had room for it, or
        it hung) is killed and named in a ``RayLaunchError``."""
        deadline = time.perf_counter() + self.cfg.start_timeout_s
        waiting = {self.handles[r].pending: r for r in ranks}
        lost, errors = set(), {}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting),
                                timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            for ref in ready:
                handle = self.handles[waiting.pop(ref)]
                try:
                    reply = handle.recv()
                except EOFError:
                    lost.add(handle.rank)
                    continue
                if isinstance(reply, msg.Hello):
                    self._started(handle, reply)
                else:
                    errors[handle.rank] = reply.error
        self.write_workers()
        if waiting:
            handles = [self.handles[r] for r in sorted(waiting.values())]
            for handle in handles:
                handle.kill()
            names = ", ".join(f"stage {h.stage} replica {h.replica} ({h.placement})" for h in handles)
            raise RayLaunchError(
                f"{names} had no actor up within engine.ray.start_timeout_s={self.cfg.start_timeout_s} s: no live "
                f"node of the Ray cluster has {self.actor_resources()} free, or the actor hung building its "
                "stage; add nodes, lower engine.ray.cpus_per_stage / gpus_per_stage, or raise the timeout.")
        for rank, error in sorted(errors.items()):
            raise WorkerError(f"stage {self.handles[rank].stage} could not start: {error}")
        if lost:
            stages = {self.handles[r].stage for r in lost}
            if replacing:
                raise WorkersDied(stages, {}, "respawn", 0.0)
            raise WorkerError(f"the actor(s) of stage(s) {sorted(stages)} died while starting; see the Ray logs "
                              "(/tmp/ray/session_latest/logs on their node).")

    def _started(self, handle: RayHandle, hello: msg.Hello) -> None:
        handle.pid = hello.pid
        handle.node = Node(hello.node_id, hello.node_ip)
        self.history.append({"stage": handle.stage, "replica": handle.replica, "rank": handle.rank,
                             "pid": handle.pid, "node_id": handle.node.id, "node_ip": handle.node.ip,
                             "placement": handle.placement, "started": handle.started})
        # A replacement in place (its bundle's node alive) is only in ``history``; ``moves`` lists the stages
        # that changed node.
        if handle.previous_node is not None and handle.previous_node.id != handle.node.id:
            self.moves.append({"stage": handle.stage, "replica": handle.replica, "generation": self.generation + 1,
                               "from": dataclasses.asdict(handle.previous_node),
                               "to": dataclasses.asdict(handle.node)})

    def respawn(self, stages: list[int]) -> float:
        """New actors (new PIDs, maybe other nodes) for every replica of ``stages``; returns the seconds.

        Raises ``WorkersDied`` when a replacement, or any other actor, died meanwhile."""
        start = time.perf_counter()
        ranks = self.stage_ranks(stages)
        old = {rank: self.handles[rank] for rank in ranks if rank in self.handles}
        self.await_exit(list(old.values()), grace_s=0.0)  # a replaced actor is gone, and its bundle free
        for rank in ranks:  # (a slot with no actor: the node that arrives after the pipeline shrank)
            handle = old.get(rank)
            new = self.spawn(rank % self.n_stages, rank // self.n_stages, fresh=True)
            new.previous_node = (handle.node or handle.previous_node) if handle else self.departed.pop(rank, None)
        self._await_start(ranks, replacing=True)
        gone = {h.stage for rank, h in self.handles.items() if rank not in ranks and h.gone()}
        if gone:
            raise WorkersDied(gone, {}, "respawn", 0.0)
        elapsed = time.perf_counter() - start
        self._replenish_standbys()
        return elapsed

    def drop(self, slots: list[int]) -> None:
        for key in self.stage_ranks(slots):
            handle = self.handles.get(key)
            if handle is not None and (handle.node or handle.previous_node) is not None:
                self.departed[key] = handle.node or handle.previous_node
        super().drop(slots)

    def end(self, handles: list[Handle]) -> None:
        """By ``ray.kill`` rather than a ``Die`` order: Ray takes an actor's own ``os._exit`` for a crash and prints
        a ~600-character 'A worker died or was killed ... OOM killer' warning on the driver's terminal for each
        injected failure, while ``ray.kill`` is an end it expects. A death we did not cause (a crash, a SIGKILL
        from outside, a lost node) still gets Ray's warning."""
        for handle in handles:
            handle.kill()

    def await_exit(self, handles: list[Handle], grace_s: float = GRACE_S) -> None:
        waiting = {h.actor.sentinel: h for h in handles if not h.gone()}
        if waiting and grace_s > 0:
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=grace_s)
            for ref in ready:
                waiting.pop(ref).join(0)
        for handle in waiting.values():  # did not obey: Ray ends it
            handle.kill()
        for handle in waiting.values():
            handle.join(5)

    def shutdown(self) -> None:
        """Every actor leaves its group (``stop``) and is killed; the placement group goes; Ray too if ours."""
        if ray.is_initialized():
            alive = [h for h in self.handles.values() if not h.gone()]
            for handle in alive:
                handle.send(msg.Stop())
            if alive:
                ray.wait([h.pending for h in alive], num_returns=len(alive), timeout=STOP_S)
            actors = [h.actor for h in self.handles.values()] + list(self.standbys.values())
            for actor in actors:
                actor.kill()
            sentinels = [actor.sentinel for actor in actors]
            if sentinels:
                ray.wait(sentinels, num_returns=len(sentinels), timeout=STOP_S)
            if self.placement_group is not None:
                remove_placement_group(self.placement_group)
        self.handles, self.standbys = {}, {}
        self.placement_group = None
        self.write_last_workers()
        self.store = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    def entry(self, handle: RayHandle) -> dict[str, Any]:
        return {**super().entry(handle), "node_id": handle.node.id if handle.node else None,
                "node_ip": handle.node.ip if handle.node else None, "placement": handle.placement}

    def about(self) -> dict[str, Any]:
        return {"launcher": "ray", "moves": self.moves, "standby_nodes": sorted(self.standbys)}

    def node(self, stage: int, replica: int = 0) -> Node | None:
        """The node the stage's actor runs on (what a recovery record names as the stage's new home)."""
        return self.handles[self.host_of(stage, replica)].node

    def describe(self, stage: int, replica: int = 0) -> dict:
        """A recovery record's view of a stage's actor: its PID and the node it runs (or ran) on."""
        node = self.node(stage, replica) or self.handles[self.host_of(stage, replica)].previous_node
        return {**super().describe(stage, replica), "node_id": node.id if node else None,
                "node_ip": node.ip if node else None}

    # --- commands ----------------------------------------------------------------------------------

    def wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        replies = {h.pending: h for h in handles if h.pending is not None}
        sentinels = {h.actor.sentinel: h for h in handles}
        refs = [*replies, *sentinels]
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # everything else that is ready too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        replied = [h for ref, h in replies.items() if ref in ready]
        answered = {h.rank for h in replied}
        gone = [h for ref, h in sentinels.items() if ref in ready and h.rank not in answered]
        return replied, gone


@contextlib.contextmanager
def _our_sigterm_handler() -> Iterator[None]:
    """Keep the run's SIGTERM handler over ``ray.init``, which puts in its own (``sys.exit(15)``): with it a
    SIGTERM ended the run with exit status 15 and a summary saying "error" instead of 143 and "interrupted".
    The Ray we started is stopped all the same, by ``shutdown`` as the run ends."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _our_pythonpath() -> str:
    """PYTHONPATH that makes a local Ray's actors import this very checkfree (a source checkout can sit beside
    an installed copy; Ray's workers would otherwise import whichever their working directory finds)."""
    import checkfree

    root = str(Path(checkfree.__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def live_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _resources(resources: dict[str, float]) -> dict[str, float]:
    """The resources a message names (not Ray's per-node and memory entries)."""
    return {k: v for k, v in sorted(resources.items()) if not k.startswith("node:") and "memory" not in k}

