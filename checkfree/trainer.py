"""The training loop: failures -> recovery -> step -> upkeep -> clock -> eval -> log (docs/design.md, "One iteration").

One iteration, top to bottom (``Trainer.iteration``):

1. The failure model yields the stages lost in this iteration's window of simulated time; the engine
   loses them (a stage process really exits) and the strategy's plan rebuilds *all* of them at once.
2. The engine runs ``M`` micro-batches in the strategy's schedule, clips per stage and steps. A stage
   process that dies meanwhile (from outside the failure model) is recovered the same way and the step
   is redone with the same micro-batches.
3. The numeric guard checks that everything is finite (``checkfree.stage.guard``).
4. The strategy's upkeep runs (replica / shadow refresh, checkpoint save) and the clock prices it all.

The trainer holds an engine (local or processes; built in ``checkfree.train``) and a strategy, and never
asks which one either is. How a run starts and ends — result files, resume, signals — is
``checkfree.lifecycle``; the trainer is only the loop.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from checkfree.data.loading import Corpus
from checkfree.engine import Engine, StagesLost
from checkfree.failure_models.base import FailureConfig
from checkfree.failure_models.trace_files import read_delays
from checkfree.model.presets import ModelConfig
from checkfree.plan import (
    MEMORY,
    Held,
    RecoveryPlan,
    RecoveryReport,
    RunView,
    Traffic,
    Upkeep,
    rolled_back_in_memory,
)
from checkfree.recovery import RecoveryStrategy, build_strategy, strategy_class
from checkfree.run.records import IterationRecord
from checkfree.run.runconfig import RunConfig, min_hosts, nodes_of
from checkfree.simulation.clock import Clock
from checkfree.simulation.elastic import Change, Hosts, NoHostsLeft
from checkfree.simulation.failures import FailureDraws
from checkfree.simulation.ledger import Work
from checkfree.simulation.replacements import Replacements
from checkfree.simulation.roster import Roster
from checkfree.stage.fitting import buffered_per_holder
from checkfree.stage.guard import check
from checkfree.stage.schedule import Schedule, build_schedule
from checkfree.storage.memory_store import MemoryStore

MAX_ATTEMPTS = 5
"""A step (or validation) interrupted by stage losses more often than this in a row stops the run."""
MAX_INCIDENTS = 1000
"""An iteration whose work is interrupted this often never finishes: the run stops and says why."""


class SimTimeSpent(Exception):
    """``trainer.sim_time_budget_s`` ran out in the middle of an iteration of a run whose nodes may be missing
    (a pipeline that mostly stood waiting for them): the iteration never finished, and the run ends there."""


@dataclass
class Totals:
    """Everything the summary needs, kept up to date as the run goes."""

    iterations: int = 0
    sim_time_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)
    lost_iterations: int = 0
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    time_to_target_s: float | None = None
    """Simulated seconds at the first validation that reached trainer.target_loss."""
    iterations_to_target: int | None = None
    time_to_target_interp_s: float | None = None
    """The crossing, interpolated linearly between that validation and the one before (as the paper's plots)."""
    iterations_to_target_interp: float | None = None
    last_eval: list[float] | None = None
    """[sim seconds, iterations, val loss] of the latest validation."""
    final_val_loss_se: float | None = None
    """Standard error of the final validation loss over the validation sequences."""
    tokens: int = 0
    recovery_sim_s: float = 0.0
    overhead_sim_s: float = 0.0
    lost_work_sim_s: float = 0.0
    """Simulated seconds of work that losses threw away (unfinished iterations, rolled-back work within one)."""
    waiting_sim_s: float = 0.0
    """Simulated seconds the pipeline stood still waiting for replacement nodes (``checkfree.simulation.elastic``)."""
    moving_sim_s: float = 0.0
    """Simulated seconds the pipeline stood still while stages moved between hosts."""
    shrunk_sim_s: float = 0.0
    """Simulated seconds of work done on fewer hosts than stages."""
    node_losses: int = 0
    """Nodes lost (with one node a stage, every stage lost; with several, also those whose stage lived on)."""
    stage_losses: int = 0
    """Stages emptied: every node of theirs lost, so the strategy rebuilt them."""
    adjacent_stage_losses: int = 0
    """Pairs of neighbouring stages (k, k + 1) emptied in one incident."""


@dataclass
class RunParts:
    """What a run is made of besides its engine and data, built once from its validated config
    (``train.build_run``): the engine takes its schedule from the same strategy the trainer asks."""

    strategy: RecoveryStrategy
    schedule: Schedule
    failures: FailureDraws
    clock: Clock
    hosts: Hosts
    roster: Roster | None = None
    """The nodes of each stage, with several a stage (``engine.replicas`` > 1); None with one."""
    wall: FailureDraws | None = None
    """``engine.failure_clock=wall``: the run's failure model, drawn in wall seconds by the thread that kills
    processes (``checkfree.distributed.wall_failures``); the simulated clock then draws none of its own."""

    @classmethod
    def build(cls, cfg: RunConfig, model: ModelConfig) -> RunParts:
        n = model.n_stages
        declared = strategy_class(cfg.strategy.name)  # what the clock prices; the strategy is built once, below
        clock = Clock.of(cfg, model, declared)
        # every = auto: the smallest period the bandwidth sustains, from the clock's prices.
        every = clock.sustained_period(declared, cfg.strategy) if cfg.strategy.every == "auto" else cfg.strategy.every
        strategy = build_strategy(replace(cfg.strategy, every=every), n)
        trace = read_delays(cfg.failure.replacement_path, n) if cfg.failure.replacement == "trace" else None
        replicas = cfg.engine.replicas
        failures = FailureDraws(cfg.failure, n, cfg.seed, nodes_of(cfg))
        wall = None
        if cfg.engine.failure_clock == "wall":  # the losses happen to processes; the clock meets them as they come
            wall, failures = failures, FailureDraws(FailureConfig(name="none"), n, cfg.seed, nodes_of(cfg))
        replacements = Replacements(cfg.failure.replacement, cfg.failure.replacement_mean_h, n * replicas,
                                    cfg.seed + cfg.failure.seed_offset, trace, failures.model.pool())
        roster = None
        if replicas > 1:
            resync = [clock.resync(k) for k in range(n)]
            roster = Roster(n, replicas, replacements, [s for s, _ in resync], [b for _, b in resync])
        return cls(strategy, build_schedule(strategy.schedule_name, n), failures, clock,
                   Hosts(n, cfg.engine.no_replacement, min_hosts(cfg), replacements), roster, wall)


class Trainer:
    def __init__(self, cfg: RunConfig, engine: Engine, corpus: Corpus, model: ModelConfig, run_dir: Path,
                 parts: RunParts | None = None) -> None:
        self.cfg, self.engine, self.corpus, self.model, self.run_dir = cfg, engine, corpus, model, Path(run_dir)
        parts = parts if parts is not None else RunParts.build(cfg, model)
        self.strategy, self.schedule, self.failures, self.clock, self.hosts, self.roster = (
            parts.strategy, parts.schedule, parts.failures, parts.clock, parts.hosts, parts.roster)
        self.wall_failures = None
        """``engine.failure_clock=wall``: the thread that kills the lost stages' processes at their wall times."""
        if parts.wall is not None:
            from checkfree.distributed.wall_failures import WallFailures

            self.wall_failures = WallFailures(parts.wall, engine.pid_of)
        self.totals = Totals()
        self.iteration_no, self.progress = 0, 0
        self.grad_norm: list[float] | None = None
        self.grad_norm_post: list[float] | None = None
        self.held_since: dict[Held, int] = {}
        self.memory = MemoryStore()
        """The run's position at the latest in-memory checkpoint (its snapshots are held copies on the nodes)."""
        self.flushing: tuple[int, float] | None = None
        """An asynchronous checkpoint being flushed to storage: (its progress, the simulated time it is done)."""
        self.loss_at_s: float | None = None
        """The simulated time of the loss being recovered (None: now, the clock's current time)."""
        self.start = time.perf_counter()
        self.core_start = 0.0
        """``engine.compute_time=cpu``: the emulated seconds at which this run's processes started (a resumed run
        goes on from the interrupted one's)."""
        self.carried: IterationRecord | None = None
        """The next iteration's record, begun early by a stage lost between two iterations (``between``)."""

    # --- one iteration -------------------------------------------------------------------------------

    def iteration(self, iteration: int) -> IterationRecord:
        """Failures -> recovery -> step -> guard -> upkeep -> clock. Returns the iteration's metrics record."""
        self.iteration_no = iteration
        record, self.carried = self.carried or IterationRecord(iteration), None
        work_s = self.strike(iteration, record)

        batches = self.next_batches()
        wall = time.perf_counter()
        result = self.step(batches, record)
        step_wall = time.perf_counter() - wall
        nonfinite = self.survive(lambda: check(self.engine, result, batches, self.schedule, iteration,
                                               self.cfg.trainer.on_nonfinite, self.cfg.strategy.name), record)
        self.failures.pending |= set(nonfinite)
        overhead_s = 0.0
        if result.stepped:
            self.progress += 1
            # A skipped step keeps the last finite norms: CheckFree weighs neighbours by them.
            self.grad_norm, self.grad_norm_post = result.grad_norm, result.grad_norm_post
        if result.stepped and not nonfinite:  # no checkpoint, replica or shadow may ever hold a NaN
            upkeep = self.strategy.after_step(self.view())
            traffic = self.upkeep(upkeep, record)
            overhead_s = self.clock.upkeep_seconds(traffic, upkeep.period)
            if traffic.shards_in_background:  # persisted once the flush that starts at the end of the step ends
                done_s = self.totals.sim_time_s + self.clock.iteration_s + self.clock.flush_seconds(traffic)
                self.flushing = (self.progress, done_s)

        self.totals.sim_time_s += work_s
        self.totals.sim_time_s += overhead_s
        if not self.hosts.placement.at_home:
            self.totals.shrunk_sim_s += work_s
        self.totals.iterations, self.totals.tokens = iteration, self.totals.tokens + result.tokens
        self.totals.overhead_sim_s += overhead_s
        skipped = {"step_skipped": not result.stepped, "nonfinite_stages": nonfinite} \
            if nonfinite or not result.stepped else {}
        record.stepped(progress=self.progress, sim_time_s=self.totals.sim_time_s, wall_time_s=self.wall_time(),
                       train_loss=result.loss, lr=self.engine.stage_lrs(), grad_norm=result.grad_norm,
                       grad_norm_post=result.grad_norm_post, tokens=result.tokens,
                       throughput_tok_s=result.tokens / step_wall if step_wall > 0 else 0.0,
                       iteration_sim_s=work_s, overhead_sim_s=overhead_s, **skipped)
        if self.hosts.elastic:
            record.hosts = list(self.hosts.placement.hosts)
        if self.roster is not None:
            record.staff = list(self.roster.staff())
        return record

    def node_counts(self) -> dict:
        """What the nodes went through: losses of nodes and of whole stages (and of neighbouring stages together),
        and with several nodes a stage the replicas re-synced, their bytes at the priced size, and the
        stage-seconds spent short of nodes; with a pool of nodes (``failure=churn``), the pool's own counts."""
        t, roster = self.totals, self.roster
        return {"replicas": self.cfg.engine.replicas, "node_losses": t.node_losses, "stage_losses": t.stage_losses,
                "adjacent_stage_losses": t.adjacent_stage_losses,
                "resyncs": roster.resyncs if roster is not None else 0,
                "resync_priced_bytes": roster.resynced_bytes if roster is not None else 0.0,
                "under_replicated_sim_s": roster.short_s(t.sim_time_s) if roster is not None else 0.0,
                **self.failures.model.counts()}

    def priced_memory_per_node(self) -> list[float]:
        """What each node holds for others at the priced model's size (``Clock.memory_per_node``): every copy
        the run has kept, a background checkpoint's host buffer where the strategy flushes one, and the activations
        a fitting strategy's stages buffer for their neighbours."""
        buffered = buffered_per_holder([self.schedule.order(m) for m in range(self.cfg.trainer.micro_batches)],
                                       self.cfg.strategy.fit_buffer, self.model.n_stages) \
            if self.strategy.fits else []
        return self.clock.memory_per_node(self.held_since, self.strategy.sends_in_background == "storage", buffered)

    def strike(self, iteration: int, record: IterationRecord) -> float:
        """The iteration's work meets the failures of its simulated time, one incident after another.

        The work (``clock.iteration_s``) starts at the current simulated time; an incident interrupts it at
        its time, the lost stages are recovered (the recovery's seconds pass), and the work goes on. What an
        interruption throws away is charged as lost time: the unfinished sub-iteration (``clock.sub_iteration_s``:
        a paper iteration when a CPU iteration stands for many) — or, when the recovery rolled back, all of this
        iteration's work so far, which the rollback discards with the rest since the checkpoint. So every
        loss counts, at the granularity of the iterations the clock stands for. (The weights follow at CPU
        granularity: the step itself runs after the iteration's last recovery.)

        Without replacement nodes (``checkfree.simulation.elastic``) a loss may also stall the pipeline until nodes
        arrive, or change the placement, and a node that arrives takes its stage back at the end of the
        sub-iteration under way; a placement change re-prices the rest of the work. The arithmetic of all this
        is the time ledger's (``checkfree.simulation.ledger.Work``); here are the failures. Returns the simulated seconds of
        the work kept (``clock.iteration_s`` when the price never changed)."""
        work = Work(self.totals.sim_time_s, self.clock.iteration_s, self.clock.sub_iteration_s)
        # A cap on the incidents keeps an iteration that can never finish from running for ever. A run whose
        # nodes may be missing can stand still for long (waiting for them): there the budget of simulated time,
        # if any, ends it instead, mid-iteration (each incident moves the time on). Every other run is as before.
        budget = self.cfg.trainer.sim_time_budget_s if self.hosts.elastic else None
        for _ in range(MAX_INCIDENTS) if budget is None else itertools.count():
            # A stage moves back between sub-iterations; a replica joins its stage when it has its state -- one
            # due while the pipeline stood still (a recovery, a wait, the last step's upkeep) before the work goes on.
            joining = self.roster.next_join() if self.roster is not None else None
            if joining is not None and joining <= work.t:
                self.join(work.t, record)
                work.reprice(self.clock.iteration_s, self.clock.sub_iteration_s)
                continue
            stop = work.stop(self.hosts.next_arrival()) if joining is None else min(work.end, joining)
            incident = self.failures.next_incident(iteration, work.t, stop, self.clock.incident_s)
            if incident is None:
                if stop >= work.end:
                    return work.kept_s
                work.reach(stop)
                if joining is None:
                    work.wait(self.place(self.hosts.arrive(stop), record))
                else:
                    self.join(stop, record)
                work.reprice(self.clock.iteration_s, self.clock.sub_iteration_s)
                continue
            nonfinite = [r["stage"] for r in incident.records if r.get("cause") == "nonfinite"]
            if self.roster is None:
                losses = {e.stage: e.time_s for e in incident.events}  # node slot -> when it was lost
                hosts, stages = self.hosts.struck(losses)
                struck = [r for r in incident.records if r.get("cause") == "nonfinite" or r["stage"] in hosts]
                self.totals.node_losses += len(hosts)
            else:
                nodes, losses = self.roster.lose(incident.events, self.clock.incident_s)
                hosts, stages = self.hosts.struck(losses)
                # The node whose loss emptied its stage says so (the last of the stage's in this incident).
                last = {k: i for i, (k, _, _) in enumerate(nodes) if k in losses}
                struck = [{"iteration": iteration, "stage": k, "replica": r, "time_s": t,
                           **({"stage_lost": True} if last.get(k) == i else {})} for i, (k, r, t) in enumerate(nodes)]
                struck += [r for r in incident.records if r.get("cause") == "nonfinite"]
                record.lost_nodes += [[k, r] for k, r, _ in nodes]
                self.totals.node_losses += len(nodes)
            stages = sorted(set(stages) | set(nonfinite))
            if self.roster is not None:  # nodes lost from stages that live on: their processes replaced
                singles = [(k, r) for k, r, _ in nodes if k not in losses]
                if singles:
                    self.survive(lambda singles=singles: self.engine.lose_nodes(singles), record)
            if not stages:  # no stage emptied: nothing for the strategy, the work goes on
                if self.roster is not None and nodes:  # the survivors redo the lost node's unfinished share
                    self.totals.failures += struck
                    lost = work.interrupt(incident.time_s, False, 0.0)
                    self.totals.sim_time_s += lost
                    self.totals.lost_work_sim_s += lost
                    record.struck([t for _, _, t in nodes], lost)
                    self.clock.staff(self.roster.staff())
                    work.reprice(self.clock.iteration_s, self.clock.sub_iteration_s)
                continue
            self.totals.failures += struck
            lost_stages = sorted(set(stages) - set(nonfinite))
            self.totals.stage_losses += len(lost_stages)
            self.totals.adjacent_stage_losses += sum(1 for k in lost_stages if k + 1 in lost_stages)
            self.engine.lose(stages)
            change, no_hosts = None, None
            if hosts and self.hosts.elastic:  # where the lost stages are rebuilt: the engine must know first
                try:  # with several nodes a stage, it is rebuilt on the first of them to arrive
                    first = {h: self.roster.first_arrival(h) for h in hosts} if self.roster is not None else None
                    change = self.hosts.replace({h: losses[h] for h in hosts}, incident.time_s,
                                                self.clock.incident_s, first)
                    self.engine.place(self.hosts.placement)
                except NoHostsLeft as exc:  # the run ends, once this loss is recovered and on the clock
                    no_hosts = exc
            reports = self.recover(set(stages), incident.time_s)
            rolled_back = any("rolled_back_to" in r.details for r in reports)
            recovery_s = max(r.sim_seconds for r in reports)
            lost = work.interrupt(incident.time_s, rolled_back, recovery_s)
            self.totals.sim_time_s += lost
            self.totals.lost_work_sim_s += lost
            record.struck([e.time_s for e in incident.events if e.stage in hosts] if self.roster is None
                          else [t for _, _, t in nodes], lost)
            self.note(record, reports, recovery_s)
            if no_hosts is not None:
                raise no_hosts
            if change is not None:
                for failure in struck:  # when each lost node's replacement is there, in the summary
                    if failure.get("cause") != "nonfinite" and self.roster is None:
                        failure["replaced_at_s"] = change.arrivals[failure["stage"]]
                work.wait(self.place(change, record))
            if self.roster is not None:  # the rebuilt stages are live again, on one node each so far
                for k in hosts:
                    self.roster.rebuilt(k, work.t)
                self.clock.staff(self.roster.staff())
            if change is not None or self.roster is not None:
                work.reprice(self.clock.iteration_s, self.clock.sub_iteration_s)
            if budget is not None and self.totals.sim_time_s >= budget:
                raise SimTimeSpent(f"the simulated time budget ran out during iteration {iteration}")
        raise RuntimeError(f"iteration {iteration} was interrupted by {MAX_INCIDENTS} incidents (losses, and nodes "
                           "rejoining their stages) and never finished: "
                           "at this failure rate no stretch of work of one iteration outlasts the time between "
                           "failures; lower failure.hourly_rate or the simulated iteration time.")

    def join(self, now_s: float, record: IterationRecord) -> None:
        """Replacement nodes that have copied their stage's state join it at ``now_s``: the stage's work is
        shared by more nodes again (re-priced), and the copies' bytes are on the run's account."""
        joined = self.roster.join(now_s)
        record.joined_nodes += [[k, r] for k, r in joined]
        self.clock.moved_bytes += sum(self.roster.resync_bytes[k] for k, _ in joined)
        self.clock.staff(self.roster.staff())

    def place(self, change: Change, record: IterationRecord) -> float:
        """A wait for replacement nodes and stages moving between hosts: the pipeline stands still meanwhile
        (the seconds, returned, are on the clock); then the clock prices the new placement."""
        move_s = self.clock.move_seconds(change.moves)
        self.totals.sim_time_s += change.wait_s + move_s
        self.totals.waiting_sim_s += change.wait_s
        self.totals.moving_sim_s += move_s
        record.placed(change.wait_s, move_s, change.moves)
        self.clock.place(self.hosts.placement)
        # A process lost while stages move (the arriving node's, say) is recovered like any loss from outside.
        self.survive(lambda: self.engine.place(self.hosts.placement), record)
        return change.wait_s + move_s

    def recover(self, lost: set[int], at_s: float | None = None) -> list[RecoveryReport]:
        """The strategy plans, the engine executes; a stage lost while that is under way joins the recovery.
        ``at_s``: the simulated time of the loss (default: the clock's current time)."""
        progress, self.loss_at_s = self.progress, at_s
        for _ in range(MAX_ATTEMPTS):
            plan = self.strategy.plan(frozenset(lost), self.view())
            try:
                outcome = self.engine.execute(plan, self.progress)
                break
            except StagesLost as more:  # a cascade: re-plan with every stage lost so far
                self.note_failures(more)
                lost |= more.stages
        else:
            raise RuntimeError(f"the recovery of stages {sorted(lost)} was interrupted {MAX_ATTEMPTS} times in a row")
        self.loss_at_s = None
        restored = outcome.restored
        if plan.rollback == MEMORY:  # the stages restored their snapshots; the run's position is kept here
            restored = self.memory.restore()
            rolled_back_in_memory(outcome.reports, progress, restored["progress"])
        if restored is not None:  # a rollback: data position, RNG and progress come back with it
            self.corpus.train.load_state_dict(restored["data"])
            torch.set_rng_state(restored["rng"])
            self.progress = restored["progress"]
        if plan.reads_storage:  # an in-memory checkpoint newer than the state rolled back to is a future the run
            self.memory.clear()  # no longer has; one as old lacks the lost stages' copies: none is usable
            self.flushing = None  # and a flush in flight was either used or forgotten
        self.refreshed(plan)
        self.clock.count_recovery(outcome.reports)
        for report in outcome.reports:
            report.sim_seconds = self.clock.recovery_seconds(report)
            self.totals.recoveries.append({"iteration": self.iteration_no, "stage": report.stage,
                                           "method": report.method, "sources": report.sources,
                                           **({"checkpoint": report.details["checkpoint"]}
                                              if "checkpoint" in report.details else {})})
        self.totals.lost_iterations += progress - self.progress
        return outcome.reports

    def step(self, batches: list[torch.Tensor], record: IterationRecord):
        """The engine's optimizer step; a discarded attempt costs its iteration on the clock, and a rollback
        rewinds the data stream, so the redone step reads the checkpoint's next micro-batches."""
        return self.survive(lambda: self.engine.train_step(batches, self.schedule, skip_nonfinite=True), record,
                            attempt_s=self.clock.iteration_s,
                            rolled_back=lambda: batches.__setitem__(slice(None), self.next_batches()))

    def upkeep(self, upkeep: Upkeep, record: IterationRecord | None = None) -> Traffic:
        """Refresh held copies / save a checkpoint; the copies it refreshed are now current. (After a rollback
        the state it was for is gone: nothing left to keep.)"""
        progress = self.progress
        if upkeep.snapshot:  # half-refreshed snapshots are no checkpoint: until all are, there is none
            self.memory.clear()
        # A rollback to an earlier progress makes the upkeep moot (its state is gone); one to this very progress
        # (a save at the end of this step) restored the same state: the upkeep is redone.
        traffic = self.survive(lambda: self.engine.upkeep(upkeep, self.checkpoint_meta()), record,
                               rolled_back=lambda: Traffic() if self.progress != progress else None)
        for held in upkeep.refresh:
            self.held_since[held] = self.progress
        if upkeep.snapshot and self.progress == progress:  # not when a rollback meanwhile made it moot
            self.memory.commit(self.checkpoint_meta())
        return traffic

    def survive(self, call, record: IterationRecord | None, attempt_s: float = 0.0, rolled_back=None):
        """``call()`` on the engine. A stage process lost meanwhile (not drawn by the failure model: killed from
        outside, or its node gone) is recorded, recovered like any loss and the call redone; lost during a
        step's commit, the survivors' step stands and is the result. When the recovery rolled back -- to an
        earlier progress, or to a save of this very progress, which rewinds the data stream all the same --
        ``rolled_back()`` says what becomes of the call: an answer ends it, None redoes it."""
        for _ in range(MAX_ATTEMPTS):
            try:
                return call()
            except StagesLost as lost:
                self.note_failures(lost)
                reports = self.recover(set(lost.stages))
                if record is not None:
                    spent = 0.0 if lost.result is not None else attempt_s
                    self.note(record, reports, max(r.sim_seconds for r in reports) + spent, self.engine.stage_lrs())
                if lost.result is not None:
                    return lost.result
                rolled = any("rolled_back_to" in r.details for r in reports)
                if rolled and rolled_back is not None and (answer := rolled_back()) is not None:
                    return answer
        raise RuntimeError(f"iteration {self.iteration_no} was interrupted by stage failures {MAX_ATTEMPTS} times "
                           "in a row; giving up.")

    def between(self, call):
        """``call()`` on the engine between two iterations (a resumable save, the export, the last validation).
        A stage lost meanwhile is lost at the start of the next iteration, as a failure drawn for that iteration
        would be: it is recovered at once (planned as at that iteration), the call redone, and the recovery goes
        into that iteration's record."""
        done = self.iteration_no
        record = self.carried or IterationRecord(done + 1)
        self.iteration_no = done + 1
        try:
            answer = self.survive(call, record)
        finally:
            self.iteration_no = done
        if record.failed_stages:
            self.carried = record
        return answer

    def note_failures(self, lost: StagesLost) -> None:
        """Losses from outside the failure model, counted as drawn ones are: one per node lost (its slot in
        ``stage``), however many logical stages its process ran (``stages``, when not only its own)."""
        hosts = self.hosts.placement.hosts
        self.totals.node_losses += len({hosts[k] for k in lost.stages})
        self.totals.stage_losses += len(lost.stages)
        for host in sorted({hosts[k] for k in lost.stages}):
            ran = sorted(k for k in lost.stages if hosts[k] == host)
            self.totals.failures.append({"iteration": self.iteration_no, "stage": host, "time_s": self.totals.sim_time_s,
                                         "cause": f"process exited during {lost.command}",
                                         **({"stages": ran} if ran != [host] else {})})

    def note(self, record: IterationRecord, reports: list[RecoveryReport], seconds: float,
             lr: list[float] | None = None) -> None:
        """Recoveries (one per lost stage, cascades included) that took ``seconds`` of simulated time: on the
        clock, and in the iteration's record."""
        self.totals.sim_time_s += seconds
        self.totals.recovery_sim_s += seconds
        record.recovered(reports, seconds, self.totals.sim_time_s, lr)

    # --- what the strategy and the engine read -------------------------------------------------------

    def view(self) -> RunView:
        norms, post = self.grad_norm, self.grad_norm_post
        return RunView(self.engine.n_stages, self.iteration_no, self.progress, self.cfg.seed, self.cfg.trainer.lr,
                       tuple(self.engine.stage_lrs()), tuple(norms) if norms is not None else None,
                       tuple(post) if post is not None else None, dict(self.held_since), self.memory.progress,
                       self.flushing_at(self.totals.sim_time_s if self.loss_at_s is None else self.loss_at_s))

    def flushing_at(self, t: float) -> int | None:
        """The progress of an asynchronous checkpoint still being flushed at simulated time ``t``, or None."""
        return self.flushing[0] if self.flushing is not None and t < self.flushing[1] else None

    def refreshed(self, plan: RecoveryPlan) -> None:
        for held in (*plan.refresh, *(h for r in plan.rebuilds for h in r.fetch)):
            self.held_since[held] = self.progress

    def checkpoint_meta(self) -> dict:
        return {"progress": self.progress, "data": self.corpus.train.state_dict(), "rng": torch.get_rng_state()}

    def next_batches(self) -> list[torch.Tensor]:
        cfg = self.cfg.trainer
        return [self.corpus.train.next_batch(cfg.micro_batch_size) for _ in range(cfg.micro_batches)]

    # --- resume ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer's part of a resumable state: the engine's stages and held copies, the failure model's
        draws, the data position, torch's RNG, totals, progress, last gradient norms, the clock's iteration
        time, when each held copy was refreshed, and a recovery not yet logged."""
        return {
            **self.engine.state_dict(), "wall_time_s": self.wall_time(), "failures": self.failures.state_dict(),
            "data": self.corpus.train.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "totals": asdict(self.totals), "progress": self.progress, "grad_norm": self.grad_norm,
            "grad_norm_post": self.grad_norm_post, "iteration_s": self.clock.iteration_s,
            "held_since": [((h.kind, h.owner, h.holder), p) for h, p in self.held_since.items()],
            "carried": self.carried.to_dict() if self.carried is not None else None, "memory": self.memory.state_dict(),
            "flushing": self.flushing, "hosts": self.hosts.state_dict(), "moved_bytes": self.clock.moved_bytes,
            **({"roster": self.roster.state_dict()} if self.roster is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)
        self.failures.load_state_dict(state["failures"])
        self.corpus.train.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.totals = Totals(**state["totals"])
        self.iteration_no, self.progress = state["iteration"], state["progress"]
        self.grad_norm, self.grad_norm_post = state["grad_norm"], state["grad_norm_post"]
        self.held_since = {Held(*key): p for key, p in state["held_since"]}
        self.clock.moved_bytes = state.get("moved_bytes", 0.0)  # states saved before it was counted: from here on
        if "hosts" in state:  # absent from states saved before nodes could be missing
            self.hosts.load_state_dict(state["hosts"])
            self.clock.place(self.hosts.placement)
        if self.roster is not None:
            self.roster.load_state_dict(state["roster"])
            self.clock.staff(self.roster.staff())
        # Kept, not recomputed: a measured device throughput would give another clock on another machine.
        self.clock.iteration_s = state["iteration_s"]
        # Wall time goes on from where the interrupted run stopped, so wall_time_s stays monotone.
        self.start = time.perf_counter() - state["wall_time_s"]
        self.core_start = state["wall_time_s"] - (self.engine.core_seconds() or 0.0)
        if "memory" in state:  # absent from states saved before in-memory and asynchronous checkpoints existed
            self.memory.load_state_dict(state["memory"])
            self.flushing = None if state["flushing"] is None else tuple(state["flushing"])
        carried = state.get("carried")  # absent from states saved before losses between iterations were kept
        self.carried = IterationRecord.from_dict(carried) if carried is not None else None
        # The stages go where the saved run had them (absent nodes' stages to their neighbours), as between two
        # iterations: a process lost meanwhile is recovered at the start of the next.
        self.between(lambda: self.engine.place(self.hosts.placement))

    def wall_time(self) -> float:
        """Seconds since training began: the wall clock's, or under ``engine.compute_time=cpu`` the emulated time
        the stage processes have reached (a core each), where the supervisor's own work between commands is not
        counted."""
        core = self.engine.core_seconds()
        return time.perf_counter() - self.start if core is None else self.core_start + core

    # --- validation ----------------------------------------------------------------------------------

    def evaluate(self, record: IterationRecord | None = None) -> float:
        """Validation loss (a stage lost meanwhile is recovered into ``record``); updates the totals."""
        loss = self.survive(lambda: self.engine.evaluate(self.corpus.val, self.cfg.trainer.eval_batch_size), record)
        t = self.totals
        t.final_val_loss = loss
        t.best_val_loss = loss if t.best_val_loss is None else min(t.best_val_loss, loss)
        target = self.cfg.trainer.target_loss
        if target is not None and t.time_to_target_s is None and loss <= target and t.iterations > 0:
            t.time_to_target_s, t.iterations_to_target = t.sim_time_s, t.iterations
            s0, i0, l0 = t.last_eval
            share = (l0 - target) / (l0 - loss) if l0 > loss else 1.0
            t.time_to_target_interp_s = s0 + share * (t.sim_time_s - s0)
            t.iterations_to_target_interp = i0 + share * (t.iterations - i0)
        t.last_eval = [t.sim_time_s, t.iterations, loss]
        return loss

    def validation_se(self) -> float:
        """Standard error of the validation loss, from the per-sequence losses of the current model."""
        losses = self.between(lambda: self.engine.sequence_losses(self.corpus.val, self.cfg.trainer.eval_batch_size))
        mean = sum(losses) / len(losses)
        return (sum((x - mean) ** 2 for x in losses) / (len(losses) - 1) / len(losses)) ** 0.5 if len(losses) > 1 \
            else float("nan")
