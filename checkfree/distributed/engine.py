"""The process engine: the trainer's engine, with every stage (x replica) in its own OS process (after a shrink,
one process per live node, which may run several consecutive stages: ``place``).

It answers the trainer exactly as the local engine does (``checkfree.engine.Engine``) and executes the same
plans, but over processes: a ``WorkerPool`` starts, commands, watches, replaces and stops them (local
processes, or Ray actors on many machines: ``engine.launcher``), and the tensors a plan moves travel between
the processes over a new generation of the process group.

* One iteration is two-phase: every worker runs its program and replies *ready* (loss, gradient norms), and
  only then does ``commit`` step every optimizer. A stage lost before the commit discards the iteration
  everywhere (``StagesLost``: the trainer recovers and redoes it with the same micro-batches); a stage lost
  during the commit has missed only its own step, so the survivors' step stands.
* ``lose`` makes a stage's processes exit for real (the failure model's loss); ``execute`` starts
  replacements, re-forms the group and has the survivors send what the plan says. A stage lost while that
  is under way raises ``StagesLost`` too, and the trainer re-plans with it (a cascade). A rank lost while the
  others wait to form the new group calls that generation off (``rollcall``), so nobody waits out the timeout.
* So does a stage lost between iterations (the resumable save's ``get_state``, the export, the last
  validation): the trainer recovers it as lost at the start of the next iteration and asks again.

Each report's ``process`` holds the recovery's wall-clock anatomy (``detect_s``, ``respawn_s``,
``rendezvous_s``, ``transfer_s`` of its last attempt; ``attempts``), the old and new PIDs and, on Ray, the
nodes; its ``wall_s`` runs from its first attempt, so a cascade's aborted attempts count. Under
``engine.compute_time=cpu`` its ``wall_s`` and ``replacement_delay_s`` are the processes' emulated seconds (the
delay passed there, every attempt that respawns), the anatomy's other parts the wall's.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from checkfree.distributed import messages as msg
from checkfree.distributed.cluster import start_method
from checkfree.distributed.launchers import make_pool
from checkfree.distributed.pool import WorkerError, WorkerPool, WorkersDied, raise_errors
from checkfree.distributed.programs import replica_micro_batches
from checkfree.distributed.worker import WorkerSpec, from_bytes, rank_of, to_bytes
from checkfree.engine import Outcome, StagesLost
from checkfree.plan import (
    RECOMPUTED,
    Held,
    RecoveryPlan,
    Traffic,
    Upkeep,
    rebuild_reports,
    rollback_reports,
    sent_into,
)
from checkfree.run.config import EngineConfig
from checkfree.simulation.placement import Placement
from checkfree.stage.compute import StepResult
from checkfree.stage.schedule import Schedule
from checkfree.storage.checkpoints import CheckpointStore, DamagedCheckpoint

REPLACE_ATTEMPTS = 5
"""Losses in a row while a saved state is set (on resume) before the run gives up."""


class ProcessEngine:
    def __init__(self, spec: WorkerSpec, engine: EngineConfig, respawn_delay_s: float = 0.0,
                 core_delay_s: float = 0.0) -> None:
        self.spec, self.engine = spec, engine
        self.respawn_delay_s = respawn_delay_s
        """``engine.failure_clock=wall``: the real seconds a lost process's replacement takes to come
        (``network.replacement_delay_s``), waited before it is started; 0 on the simulated clock, which prices
        the delay instead."""
        self.core_delay_s = core_delay_s
        """``engine.compute_time=cpu``: the same delay in the processes' emulated time (``network.replacement_delay_s``):
        every process waits for the replacement, so the supervisor's time moves on by it before the new one starts."""
        self.delayed_s = 0.0
        """The replacement delay the recovery under way waited."""
        self.core_since: float | None = None
        """``engine.compute_time=cpu``: the emulated time the recovery under way began at."""
        self.n_stages, self.replicas = spec.n_stages, spec.replicas
        self.lrs = [spec.lr] * self.n_stages
        self.finite = [True] * self.n_stages
        self.held = [0] * self.n_stages
        """Bytes of the copies each stage holds (replica 0 of each pipeline)."""
        self.pool: WorkerPool | None = None
        self.store: CheckpointStore | None = None
        self.flushing: tuple[Path, dict[str, Any], int] | None = None
        """An asynchronous checkpoint being persisted by the stages' writers: (its directory, meta, keep)."""
        self.detect_s = 0.0
        self.recovering_since: float | None = None
        """When the first attempt of the recovery under way began (a cascade re-plans and executes again)."""
        self.attempts = 0
        self.running = Placement.home(self.n_stages)
        """Where the processes run the stages now (``checkfree.simulation.placement``)."""
        self.placement = self.running
        """Where the trainer wants them (``place``); differs from ``running`` while a loss is being recovered."""
        self.dead: set[int] = set()
        """Node slots whose processes ``lose`` ended, until ``execute`` has recovered their stages."""
        self.old_workers: dict[int, dict[str, Any]] = {}
        """Lost stage -> the worker that ran it (PID, node), for the recovery's record."""
        self.steps = 0
        """Optimizer steps taken (numbering the micro-batches the stages' activation rings keep)."""
        self.computed: set[Held] = set()
        """``engine.shadows=compute``: the shadows made once and computed by their keepers since."""

    def start(self, run_dir: Path | str, fresh: bool = True) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # workers.json lists the processes from the start
        self.store = CheckpointStore(Path(run_dir) / "checkpoints")
        if fresh:
            self.store.clear()
        self.pool = make_pool(self.spec, self.engine, Path(run_dir))
        self.pool.start()

    def close(self) -> None:
        if self.pool is not None:
            try:
                # The last background checkpoint is published when the run ends, as the local engine's writer
                # does; one that cannot be finished (a lost or failed stage) leaves no half-written directory.
                self.finish_flush()
            except (StagesLost, WorkerError, WorkersDied):
                pass
            finally:
                self.pool.shutdown()  # success, error or Ctrl-C: every worker is stopped and joined

    def first_ranks(self) -> list[int]:
        """The processes of replica 0: the pipeline that validates, reports and saves."""
        return sorted(key for key, handle in self.pool.handles.items() if handle.replica == 0)

    def first_replies(self, replies: dict[int, msg.Reply], field: str) -> dict[int, Any]:
        """Replica 0's per-stage ``field`` of ``replies``, merged over its processes: stage -> value."""
        return {k: v for rank in self.first_ranks() if rank in replies
                for k, v in getattr(replies[rank], field).items()}

    def pid_of(self, stage: int) -> int | None:
        """The PID of the live process of ``stage``'s own node slot (replica 0); None while it has none (lost and
        not yet replaced: its loss again would strike nothing)."""
        pool = self.pool
        key = rank_of(stage, 0, self.n_stages)
        handle = pool.handles.get(key) if pool is not None else None
        if handle is None or handle.gone():
            return None
        return handle.pid

    def runs(self, stage: int, replica: int = 0) -> int:
        """The process (pool key) that runs ``stage`` of pipeline ``replica``."""
        return self.pool.host_of(stage, replica)

    def lost(self, exc: WorkersDied, result: StepResult | None = None) -> StagesLost:
        """The pool's news for the trainer: the logical stages the dead processes ran (while stages are moving,
        those of either placement); its detection time goes into the recovery that follows."""
        self.detect_s = exc.detect_s
        stages = {k for k in range(self.n_stages)
                  if self.running.hosts[k] in exc.stages or self.placement.hosts[k] in exc.stages}
        return StagesLost(stages, exc.command, exc.detect_s, result)

    # --- training ------------------------------------------------------------------------------------

    def train_step(self, batches: list[torch.Tensor], schedule: Schedule, skip_nonfinite: bool = True) -> StepResult:
        """As ``LocalEngine.train_step``; with ``skip_nonfinite`` a non-finite loss or gradient norm turns the
        commit into an abort everywhere."""
        last, pool = self.n_stages - 1, self.pool
        # The token ids go to stage 0 and the targets to stage S-1; computed shadows also need them where the
        # shadow of stage 0 (kept by S-1) and of stage S-1 (kept by S-2) run.
        computed = self.spec.shadows == "compute"
        takes_inputs, takes_targets = {0, last} if computed else {0}, {last, last - 1} if computed else {last}
        messages = {}
        for rank, handle in pool.handles.items():
            mbs = replica_micro_batches(len(batches), self.replicas, handle.replica)
            stages = set(pool.stages_of(handle))
            messages[rank] = msg.Step(
                inputs={m: batches[m][:, :-1].numpy() for m in mbs} if stages & takes_inputs else {},
                targets={m: batches[m][:, 1:].numpy() for m in mbs} if stages & takes_targets else {},
                step=self.steps)
        try:
            ready = pool.request(messages, "step")
        except WorkersDied as exc:
            self._abort(exc.replies)
            raise self.lost(exc) from None
        if not all(isinstance(reply, msg.Ready) for reply in ready.values()):
            # Aborted with every process alive: a peer timed out on a stage that hung (paused, swapping, stuck)
            # and came back too late. A hung stage is lost, whenever it is noticed: the one that answered last.
            replied_at, trouble_at = dict(pool.replied_at), pool.trouble_at  # before the abort's own request
            self._abort(ready)
            raise_errors(ready, pool.handles, "step", pool.run_dir)
            raise self.lost(self._hung(ready, replied_at, trouble_at)) from None
        pre, post = self.first_replies(ready, "grad_norm"), self.first_replies(ready, "grad_norm_post")
        losses = [ready[self.runs(last, r)] for r in range(self.replicas)]
        result = StepResult(loss=sum(r.loss_sum for r in losses) / len(batches),
                            grad_norm=[pre[k] for k in range(self.n_stages)],
                            grad_norm_post=[post[k] for k in range(self.n_stages)],
                            tokens=sum(r.tokens for r in losses))
        if skip_nonfinite and not result.finite:
            self._abort(ready)
            result.stepped = False
            return result
        self.steps += 1  # the step stands from here on, even if a stage is lost while committing it
        commit = msg.Commit(last_seq=self.steps * len(batches) - 1)
        try:
            committed = pool.request({rank: commit for rank in ready}, "commit")
        except WorkersDied as exc:  # the survivors stepped: their step stands, the lost stage is rebuilt now
            self._note_commit(exc.replies)
            raise self.lost(exc, result) from None
        raise_errors(committed, pool.handles, "commit", pool.run_dir)
        self._note_commit(committed)
        return result

    def _note_commit(self, replies: dict[int, msg.Reply]) -> None:
        self._note_held(replies)
        self.finite = [True] * self.n_stages
        for reply in replies.values():
            for stage, lr in reply.lr.items():
                self.lrs[stage] = lr
                self.finite[stage] = self.finite[stage] and reply.finite[stage]

    def _hung(self, replies: dict[int, msg.Reply], replied_at: dict[int, float],
              trouble_at: float | None) -> WorkersDied:
        """The stage processes that held an aborted iteration up -- those whose reply came last (within a second
        of the last one) -- killed, as a loss whose detection took from the first trouble until now."""
        last = max(replied_at.values())
        slots = sorted({self.pool.handles[r].stage for r, t in replied_at.items() if t >= last - 1.0})
        self.pool.kill(slots)
        detect_s = time.perf_counter() - (trouble_at or last)
        return WorkersDied(set(slots), replies, "step", detect_s)

    def _abort(self, replies: dict[int, msg.Reply]) -> None:
        """Survivors that computed their gradients drop them (none of them stepped)."""
        holding = [rank for rank, reply in replies.items()
                   if isinstance(reply, msg.Ready) and rank in self.pool.handles and self.pool.alive(rank)]
        if holding:
            try:
                self.pool.request({rank: msg.Abort() for rank in holding}, "abort")
            except WorkersDied:
                pass  # recovery follows anyway; whoever died here is replaced with the others

    # --- validation ----------------------------------------------------------------------------------

    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        reply = self._eval(sequences, batch_size, per_sequence=False)
        return reply.loss_sum / reply.count

    def sequence_losses(self, sequences: torch.Tensor, batch_size: int) -> list[float]:
        return self._eval(sequences, batch_size, per_sequence=True).sequences

    def _eval(self, sequences: torch.Tensor, batch_size: int, per_sequence: bool) -> msg.Evaluated:
        last, pool = self.n_stages - 1, self.pool
        messages = {rank: msg.Eval(
            inputs=sequences[:, :-1].numpy() if 0 in pool.stages_of(pool.handles[rank]) else None,
            targets=sequences[:, 1:].numpy() if last in pool.stages_of(pool.handles[rank]) else None,
            n=sequences.shape[0], batch_size=batch_size, per_sequence=per_sequence) for rank in self.first_ranks()}
        try:
            replies = pool.request(messages, "eval")
        except WorkersDied as exc:
            raise self.lost(exc) from None
        raise_errors(replies, pool.handles, "eval", pool.run_dir)
        return replies[self.runs(last)]

    def first_nonfinite_output(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> int | None:
        """As ``LocalEngine.first_nonfinite_output``, from a forward probe on the workers."""
        pool = self.pool
        messages = {rank: msg.Probe(tuple(order), input_ids.numpy() if 0 in pool.stages_of(pool.handles[rank])
                                    else None, input_ids.shape[0]) for rank in self.first_ranks()}
        try:
            replies = self.pool.broadcast_each(messages)
        except WorkersDied as exc:
            raise self.lost(exc) from None
        outputs = sorted(entry for reply in replies.values() for entry in reply.outputs)
        return next((stage for _, stage, finite in outputs if not finite), None)

    # --- what the trainer reads ----------------------------------------------------------------------

    def stage_lrs(self) -> list[float]:
        return list(self.lrs)

    def nonfinite_stages(self) -> list[int]:
        return [k for k, ok in enumerate(self.finite) if not ok]

    def held_bytes(self) -> int:
        return sum(self.held)

    def core_seconds(self) -> float | None:
        return None if self.pool is None else self.pool.core_now

    def held_bytes_per_node(self) -> list[int]:
        return list(self.held)

    def _gather(self) -> list[dict[str, Any]]:
        """Replica 0's whole state of every stage (a resumable save, the export); a stage lost meanwhile is a
        ``StagesLost`` like any other, and the trainer recovers it and asks again."""
        try:
            replies = self.pool.broadcast(msg.GetState(), ranks=self.first_ranks())
        except WorkersDied as exc:
            raise self.lost(exc) from None
        states = {k: state for rank in self.first_ranks() for k, state in from_bytes(replies[rank].state).items()}
        return [states[k] for k in range(self.n_stages)]

    def stage_states(self) -> list[dict[str, torch.Tensor]]:
        return [state["weights"] for state in self._gather()]

    # --- recovery: the plan executor over processes ---------------------------------------------------

    def lose(self, stages: list[int]) -> None:
        """The processes that run the stages exit for real (every replica); the seconds until the supervisor
        saw them all gone are the next recovery's detection time."""
        self.finish_flush()  # the simulated clock decides whether a flush in flight counts: it is finished first
        slots = self.hosts_lost(stages)
        self.dead |= set(slots)
        self.detect_s = self.pool.kill(slots) or 0.0

    def lose_nodes(self, nodes: list[tuple[int, int]]) -> None:
        """Single nodes lost while their stages live on (``engine.replicas`` > 1): each one's process exits for
        real, a new process takes its place and copies the stage's whole state bitwise from a surviving replica
        (``msg.Resync``), in a new generation of the group. The clock prices the node's absence (the survivors'
        extra work, the replacement's delay and the copy); the arithmetic is the same with it or without."""
        self.finish_flush()  # a flush in flight on the lost node is finished first, as for a stage loss
        pool, n = self.pool, self.n_stages
        pool.kill_ranks([rank_of(k, r, n) for k, r in nodes])
        try:
            pool.respawn(sorted({k for k, _ in nodes}))
            pool.rendezvous()
            lost = set(nodes)
            copies = tuple((k, rank_of(k, next(s for s in range(self.replicas) if (k, s) not in lost), n),
                            rank_of(k, r, n)) for k, r in sorted(nodes))
            pool.broadcast(msg.Resync(copies))
        except WorkersDied as exc:  # another process gone meanwhile: a loss for the trainer to recover
            raise self.lost(exc) from None

    def hosts_lost(self, stages: set[int] | list[int]) -> list[int]:
        """The node slots whose every stage is among ``stages``: their processes go. A stage lost alone from a
        process that runs others too (a non-finite stage on a shrunk host) is rebuilt in that process, which
        is what a new one would do: a rebuild sets its weights and optimizer anew."""
        return sorted(h for h in {self.running.hosts[k] for k in stages}
                      if set(self.running.stages_on(h)) <= set(stages))

    def place(self, placement: Placement) -> None:
        """Run the stages where ``placement`` says from now on (``checkfree.simulation.elastic``). Right after a loss the
        lost processes are replaced by the recovery (``execute``) that follows; otherwise now: a process for
        each node that arrived, each stage moved to its host (weights, Adam state and held copies, sent)."""
        self.placement = placement
        if not self.dead and placement != self.running:
            self.finish_flush()  # a stage's shard is persisted by the process that runs it
            try:
                self._arrange(set(), delayed=False)  # the node is there: its arrival was the failure model's wait
            except WorkersDied as exc:  # (the trainer recovers the stages and calls again)
                raise self.lost(exc) from None

    def _arrange(self, lost_stages: set[int], delayed: bool = True) -> tuple[float, float]:
        """The processes for ``self.placement`` when ``lost_stages`` are being recovered: the processes of the
        node slots that ran only lost stages ended (replicas of theirs that still run, too), a new one for every
        live node slot without one, a new generation of the group, surviving stages moved to their host, and
        the processes of node slots that run nothing any more stopped. A worker found gone that ran a stage
        this recovery does not know of is a loss for the trainer to add (``WorkersDied``), before anything
        changes: it is never replaced by an empty process behind the recovery's back. Returns the seconds of
        the respawn and of the rendezvous. ``delayed``: a missing process's replacement comes the replacement delay
        later (a recovery's); False where the node has come already (``place``)."""
        pool, target, before = self.pool, self.placement, self.running
        live = set(target.live) if self.replicas == 1 else set(range(self.n_stages))
        dead = {h.stage for key, h in pool.handles.items() if not pool.alive(key)}
        unknown = {s for s in dead if not set(before.stages_on(s)) | set(target.stages_on(s)) <= lost_stages}
        if unknown:  # found gone while the group is re-formed: what the rendezvous itself would report
            raise WorkersDied(unknown, {}, "rendezvous", 0.0)
        lost = set(self.hosts_lost(lost_stages)) | dead
        pool.kill(sorted(lost))
        pool.drop(sorted(lost - live))  # no node for them now: the pipeline runs without them
        missing = [slot for slot in sorted(live) if any(key not in pool.handles or not pool.alive(key)
                                                        for key in pool.stage_ranks([slot]))]
        if missing and delayed and self.respawn_delay_s > 0:  # the replacement node comes when it comes
            time.sleep(self.respawn_delay_s)
            self.delayed_s += self.respawn_delay_s
        if missing and delayed and self.core_delay_s > 0 and pool.core_now is not None:  # the same, emulated
            pool.core_now += self.core_delay_s
            self.delayed_s += self.core_delay_s
        respawn_s = pool.respawn(missing) if missing else 0.0
        leaving = sorted({h.stage for h in pool.handles.values()} - live)
        pool.placement = target
        rendezvous_s = pool.rendezvous()
        ranks = pool.group_ranks()
        moves = tuple((k, ranks[rank_of(a, 0, self.n_stages)], ranks[rank_of(b, 0, self.n_stages)])
                      for k, (a, b) in before.moves(target).items() if k not in lost_stages and a not in lost)
        if moves:
            pool.broadcast(msg.Move(moves))
        if leaving:
            pool.retire(leaving)
            rendezvous_s += pool.rendezvous()
        self.running = target
        return respawn_s, rendezvous_s

    def execute(self, plan: RecoveryPlan, progress: int) -> Outcome:
        """Replace the lost stages' processes (or place them on others: a shrink), re-form the group, then move
        what the plan says."""
        pool = self.pool
        # A cascade's earlier attempts are part of this recovery's wall time: the record says what it really took.
        # It began when the loss was noticed: the wait that detected it counts (a cascade's later losses are
        # noticed inside this recovery's time already).
        start = self.recovering_since = self.recovering_since or time.perf_counter() - self.detect_s
        # compute_time=cpu: the recovery's emulated seconds, from the time its loss was met (a cascade's first).
        self.core_since = self.core_since if self.core_since is not None else pool.core_now
        self.attempts += 1
        for k in plan.lost:  # where each stage ran when it was lost (a cascade's later attempts keep it)
            self.old_workers.setdefault(k, pool.describe(k) if pool.host_of(k) in pool.handles else {})
        old = self.old_workers
        try:
            self.finish_flush()  # a stage killed from outside may take a flush in flight with it
        except StagesLost:
            pass  # its checkpoint never counts; the stages are replaced right here
        try:
            respawn_s, rendezvous_s = self._arrange(set(plan.lost))
            t = time.perf_counter()
            if plan.reads_storage:
                restored = self.store.restore(partial(self._load_checkpoint, lost=plan.lost), plan.unpersisted)
                reports = rollback_reports(plan, progress, restored)
            else:
                restored = None
                replies = pool.broadcast(msg.Recover(plan))
                self._note_held(replies)
                self._note_lrs(replies)
                received = self.first_replies(replies, "received")
                reports = rebuild_reports(plan, received, self.first_replies(replies, "fitted"))
        except WorkersDied as exc:
            raise self.lost(exc) from None
        transfer_s = time.perf_counter() - t
        wall = time.perf_counter() - start if pool.core_now is None else pool.core_now - self.core_since
        for report in reports:
            report.wall_s = wall
            report.process = {"detect_s": self.detect_s, "respawn_s": respawn_s, "rendezvous_s": rendezvous_s,
                              "transfer_s": transfer_s, "generation": pool.generation, "attempts": self.attempts,
                              "replacement_delay_s": self.delayed_s,
                              "start": start_method() if self.engine.launcher == "processes" else "ray",
                              **{f"old_{k}": v for k, v in old[report.stage].items()},
                              **{f"new_{k}": v for k, v in pool.describe(report.stage).items()}}
        self.detect_s, self.recovering_since, self.attempts, self.delayed_s = 0.0, None, 0, 0.0
        self.core_since = None
        self.dead, self.old_workers = set(), {}
        return Outcome(reports, restored)

    def _load_checkpoint(self, checkpoint: Path, meta: dict[str, Any], lost: tuple[int, ...]) -> None:
        replies = self.pool.broadcast(msg.Load(str(checkpoint), meta["digests"], lost))
        damaged = [reply for reply in replies.values() if isinstance(reply, msg.Damaged)]
        if damaged:  # every stage falls back together: the next candidate is loaded by all of them
            raise DamagedCheckpoint(Path(damaged[0].path), damaged[0].cause)
        self._note_lrs(replies)
        self._note_held(replies)

    def _note_lrs(self, replies: dict[int, msg.Reply]) -> None:
        for reply in replies.values():
            for stage, lr in reply.lr.items():
                self.lrs[stage] = lr

    def upkeep(self, upkeep: Upkeep, meta: dict[str, Any]) -> Traffic:
        traffic = Traffic()
        refresh = list(upkeep.refresh)
        if self.spec.shadows == "compute":
            # A shadow its keeper computes is current after every step: only its first copy is sent (a recovery's
            # plan re-makes a lost keeper's, in ``execute``).
            refresh = [h for h in refresh if h.what.kept != RECOMPUTED or h not in self.computed]
        if not refresh and not upkeep.checkpoint:
            return traffic
        if upkeep.checkpoint:
            self.finish_flush()  # one flush in flight at a time
        saving = self.store.writing(meta["progress"]) if upkeep.checkpoint else contextlib.nullcontext()
        with saving as directory:
            try:
                replies = self.pool.broadcast(msg.Upkeep(refresh,
                                                         str(directory) if directory is not None else None,
                                                         upkeep.in_background))
            except WorkersDied as exc:
                raise self.lost(exc) from None
            if self.spec.shadows == "compute":  # made now: computed by their keepers from here on
                self.computed |= {h for h in refresh if h.what.kept == RECOMPUTED}
            self._note_held(replies)
            for rank in self.first_ranks():
                for key, n_bytes in replies[rank].received:
                    sent_into(traffic, Held(*key), n_bytes)
            if directory is not None:
                sizes = self.first_replies(replies, "shard_bytes")
                traffic.shard_bytes = [sizes[k] for k in range(self.n_stages)]
                traffic.shards_in_background = upkeep.in_background
                meta = {**meta, "shard_bytes": traffic.shard_bytes}
                if upkeep.in_background:  # published once every stage's writer is done (finish_flush)
                    self.flushing = (directory, copy.deepcopy(meta), upkeep.keep)
                else:
                    digests = {f"stage{k}.pt": d for k, d in sorted(self.first_replies(replies, "digest").items())}
                    self.store.commit(directory, {**meta, "digests": digests}, upkeep.keep)
        return traffic

    def finish_flush(self) -> None:
        """Wait for the shards the stages are persisting in the background, then publish their checkpoint. A
        stage lost before its shard was written takes the checkpoint with it (the rollback uses the one
        before)."""
        if self.flushing is None:
            return
        (directory, meta, keep), self.flushing = self.flushing, None
        try:
            replies = self.pool.broadcast(msg.Flushed(), ranks=self.first_ranks())
        except WorkersDied as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise self.lost(exc) from None
        except WorkerError:  # a writer that failed (a full disk): its half-written checkpoint goes, as locally
            shutil.rmtree(directory, ignore_errors=True)
            raise
        digests = {f"stage{k}.pt": d for k, d in sorted(self.first_replies(replies, "digest").items())}
        self.store.commit(directory, {**meta, "digests": digests}, keep)

    def _note_held(self, replies: dict[int, msg.Reply]) -> None:
        for stage, n_bytes in self.first_replies(replies, "held_bytes").items():
            self.held[stage] = n_bytes

    # --- resume --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.finish_flush()
        states = self._gather()
        held = [item for state in states for item in state["held"]]
        staged = {k: s["staged"] for k, s in enumerate(states) if s["staged"]}
        return {"stages": [s["weights"] for s in states], "optimizers": [s["optimizer"] for s in states],
                "held": held, "staged": staged, "checkpoints": self.store.state_dict(), "steps": self.steps,
                "buffered": [item for s in states for item in s.get("buffered", [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every process takes its stage's part of a saved state. A process lost meanwhile loses nothing (the
        whole state comes from the file): it is replaced and the state set again, with no recovery."""
        def part(k: int) -> dict[str, Any]:
            held = [(key, copy) for key, copy in state["held"] if Held(*key).holder == k]
            return {"weights": state["stages"][k], "optimizer": state["optimizers"][k], "held": held,
                    "staged": state.get("staged", {}).get(k, 0),
                    "buffered": [(key, t) for key, t in state.get("buffered", []) if key[0] == k]}

        messages = {rank: msg.SetState(to_bytes({k: part(k) for k in self.pool.stages_of(handle)}))
                    for rank, handle in self.pool.handles.items()}
        lost: set[int] = set()
        for _ in range(REPLACE_ATTEMPTS):
            try:
                if lost:
                    self.pool.kill(sorted(lost))
                    self.pool.respawn(sorted(lost))
                    self.pool.rendezvous()
                    lost = set()
                replies = self.pool.broadcast_each(messages)
                break
            except WorkersDied as exc:
                lost |= exc.stages
        else:
            raise WorkerError(f"stage processes {sorted(lost)} were lost {REPLACE_ATTEMPTS} times in a row while "
                              "the saved state was being set; giving up.")
        self._note_lrs(replies)
        self._note_held(replies)
        self.store.load_state_dict(state["checkpoints"])
        self.steps = state.get("steps", 0)
