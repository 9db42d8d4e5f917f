"""The simulated clock of a run: how many simulated seconds an iteration, a recovery and an upkeep cost.

``trainer.clock`` picks the pricing:

* ``cost_model`` — ``checkfree.simulation.cost``: FLOPs, the network's hops, the pipeline schedule, each strategy's
  overheads. With ``trainer.clock_preset`` (e.g. ``llama_500m``) every iteration is priced as that model
  would cost, and bytes scale from the trained model's stages to the preset's.
* ``fixed`` — ``failure.iteration_seconds`` per iteration (recoveries and upkeep still from the cost model).
* ``paper_table2`` — the paper's own measured prices (its Table 2, arXiv 2506.15461v2; ``checkfree.simulation.paper_table2``): seconds per iteration of
  its 500M model for each strategy at 5 / 10 / 16 %/h, a recovery of about 30 s, checkpoint saves and
  replica refreshes included in the iteration time. Each CPU iteration stands for ``10,000 / T`` paper
  iterations (``T = trainer.paper_T``, the calibrated no-failure iterations to target; the paper's is
  10,000), so simulated hours are paper hours and Poisson failures at the paper's hourly rates strike as
  often per ``T`` as in the paper (docs/design.md, "Experiments in the paper's units").

The trainer asks the clock and never prices anything itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from checkfree.failure_models.base import FailureConfig
from checkfree.model.presets import ModelConfig, edge_param_count, preset, stage_param_counts
from checkfree.plan import (
    ACTIVATIONS,
    BODY,
    BYTES_PER_PARAM,
    EDGES,
    STATE,
    Held,
    RecoveryReport,
    Traffic,
    Transfer,
)
from checkfree.recovery import RecoveryStrategy, StrategyConfig
from checkfree.run.config import TrainerConfig
from checkfree.simulation import paper_table2
from checkfree.simulation.cost import (
    FP32_BYTES,
    CostModel,
    StepOverhead,
    activation_bytes,
    p2p_seconds,
    sustained_period,
)
from checkfree.simulation.networks import NetworkConfig, measure_flops, stage_link
from checkfree.simulation.placement import Placement

if TYPE_CHECKING:
    from checkfree.run.runconfig import RunConfig

Pricing = RecoveryStrategy | type[RecoveryStrategy]
"""What the clock reads of a strategy: the class attributes it declares for pricing (``schedule_name``,
``redundant_compute``, ``table2_column``, ``sends_in_background``), so a strategy's class serves before the
strategy itself is built (``strategy.every: auto`` is decided from the clock's prices)."""


def priced_as(paper: ModelConfig, n_stages: int) -> ModelConfig:
    """The paper-scale model ``paper`` cut into the trained model's ``n_stages`` stages, so that every stage of
    the run has a priced counterpart: its layers spread evenly (llama_500m's 24 as 8 x 3 or 12 x 2, the
    reference's 12-stage layout), rounded to whole layers per stage when S does not divide them."""
    if n_stages == paper.n_stages:
        return paper
    return replace(paper, n_stages=n_stages, layers_per_stage=max(1, round(paper.n_layers / n_stages)))


class Clock:
    """The run's prices, from the config sections they depend on: ``trainer`` (clock, preset, batch shape, paper
    T), ``network``, ``failure`` (the hourly rate the paper's measured iteration depends on, or a fixed
    iteration time) and the data-parallel ``replicas`` per stage."""

    @classmethod
    def of(cls, run: RunConfig, model: ModelConfig, strategy: Pricing) -> Clock:
        """The clock of a whole run config (its sections, picked out)."""
        return cls(run.trainer, run.network, run.failure, run.engine.replicas, model, strategy,
                   run.engine.replica_placement == "spread", cpu_time=run.engine.compute_time == "cpu")

    def __init__(self, trainer: TrainerConfig, network: NetworkConfig, failure: FailureConfig, replicas: int,
                 model: ModelConfig, strategy: Pricing, spread: bool = False, cpu_time: bool = False) -> None:
        priced, micro_batch_size = model, trainer.micro_batch_size
        if trainer.clock_preset is not None:
            # Price every iteration as the paper-scale model would cost, so that failure rates per hour
            # mean at CPU scale what they mean in the paper's setting (docs/clock.md, 'Three ways to price an iteration').
            priced = priced_as(preset(trainer.clock_preset), model.n_stages)
            micro_batch_size = trainer.clock_micro_batch_size or micro_batch_size
        flops = measure_flops() if network.device == "measured" else None
        if network.device == "profiled":  # the trained model itself, one micro-batch on this machine
            from checkfree.simulation.profiled import profile_flops

            # Timed as the run's stage processes time their compute: the wall, or (compute_time=cpu) the CPU.
            flops = profile_flops(model, trainer.micro_batch_size, timer=time.thread_time if cpu_time else time.perf_counter)
        self.byte_scale = [p / a for p, a in zip(stage_param_counts(priced), stage_param_counts(model))]
        """Per stage: the priced model's parameters over the trained model's. A stage's copy, shard or state is
        priced at its own stage's size (an edge stage's (de)embedding makes its scale another than a middle
        stage's)."""
        self.edge_scale = [edge_param_count(priced, k) / edge_param_count(model, k) if edge_param_count(model, k)
                           else 0.0 for k in range(model.n_stages)]
        """Per stage: the scale of its (de)embedding alone (what a CheckFree+ replica holds; 0 for a middle
        stage, which has none)."""
        self.moved_bytes = 0.0
        """Bytes moved so far at the priced model's size: every copy sent, checkpoint shard uploaded and piece
        a recovery received or downloaded (``upkeep_seconds`` and ``count_recovery`` count them)."""
        self.body_scale = [(p - edge_param_count(priced, k)) / (a - edge_param_count(model, k))
                           for k, (p, a) in enumerate(zip(stage_param_counts(priced), stage_param_counts(model)))]
        """Per stage: the scale of its decoder blocks alone (what a CheckFree source sends)."""
        self.cost = CostModel(priced, trainer.micro_batches, micro_batch_size, network, flops_per_s=flops,
                              replicas=replicas, spread=spread)
        self.buffered_bytes = activation_bytes(micro_batch_size, priced.seq_len, priced.d_model, FP32_BYTES)
        """One micro-batch's activations at the priced model's size as a stage buffers them for a neighbour's fitted
        rebuild (``checkfree.stage.fitting``): in fp32, as the ring keeps them (twice what the links carry them in
        at ``network.dtype_bytes`` 2), so that at the trained model's own size the priced memory is the real one."""
        self.activation_scale = self.buffered_bytes / activation_bytes(trainer.micro_batch_size, model.seq_len,
                                                                       model.d_model, FP32_BYTES)
        """The priced bytes of a buffered activation over the trained model's (what a fitted rebuild's pairs scale
        by on their way to the replacement)."""
        self.spread_s = self.cost.allreduce_seconds() - self.cost.allreduce_seconds(spread=False) if spread else 0.0
        """Spread replicas: what their cross-site all-reduce adds to an iteration over one within a site. The paper's
        measured times (and the fixed clock's) stand for a pipeline whose replicas share its sites, so this is added
        to them; the cost model's iteration has the all-reduce in it already."""
        self.paper, self.paper_T = trainer.clock == "paper_table2", trainer.paper_T
        self.saves_in_paper_time = strategy.table2_column == "checkpointing"
        """On paper_table2: the strategy's measured iteration time includes its synchronous checkpoint saves."""
        self.priced_recovery = trainer.paper_recovery == "priced"
        """On paper_table2: price recoveries by the bytes they move (``trainer.paper_recovery``)."""
        self.incident_s = paper_table2.RECOVERY_S if self.paper else network.replacement_delay_s
        """Losses closer together than this (a recovery's time) strike the pipeline together."""
        self.schedule, self.shadows = strategy.schedule_name, strategy.redundant_compute
        self.paper_s = paper_table2.iteration_seconds(strategy.table2_column, failure.hourly_rate) \
            if self.paper else None
        self.fixed_s = failure.iteration_seconds if trainer.clock == "fixed" else None
        self._price(None)
        self.home = (self.iteration_s, self.sub_iteration_s, self.link_busy, self.stage_busy, self.floor_bound)
        """The prices with every stage on its own node and every node live (what ``place`` and ``staff`` return to,
        exactly)."""
        self.placement: Placement | None = None
        """Where the stages run, when not every one at home."""
        self.load: tuple[float, ...] | None = None
        """Per stage, R / its live nodes, when a stage is short of nodes (``checkfree.simulation.roster``)."""

    def _price(self, placement: Placement | None, load: tuple[float, ...] | None = None) -> None:
        node_busy = self.cost.node_busy_seconds(self.schedule, placement)
        busy_s = max(node_busy.values(), default=0.0)
        # On the paper's and the fixed clock a placement scales the measured (given) time by the bottleneck host's
        # share of the work against every stage at home (``CostModel.bottleneck_seconds``, at the preset's size):
        # two like stages on one host, twice the time. Compute only: what the paper's time spent on its network
        # is unknown, and the floor below already holds it to what the placement's own hops need.
        # A stage short of nodes scales its compute the same way (its survivors do the lost replicas' share).
        scale = 1.0 if placement is None and load is None else \
            self.cost.bottleneck_seconds(self.schedule, self.shadows, placement, load) / \
            self.cost.bottleneck_seconds(self.schedule, self.shadows)
        if self.paper:
            # The paper's measured time, or the time its own activations need on the network preset's busiest
            # interface, whichever is longer: a slow enough link cannot carry the paper's pipeline in its time.
            self.sub_iteration_s = max(self.paper_s * scale, busy_s) + self.spread_s
            self.iteration_s = paper_table2.PAPER_T / self.paper_T * self.sub_iteration_s
        elif self.fixed_s is not None:
            self.iteration_s = self.sub_iteration_s = self.fixed_s * scale + self.spread_s
        else:  # the cost model prices the placement's pipeline whole: compute per host, and the hops that remain
            self.iteration_s = self.cost.iteration_seconds(self.schedule, self.shadows, placement, load)
            self.sub_iteration_s = self.iteration_s
        """``iteration_s``: simulated seconds of one CPU iteration's work. ``sub_iteration_s``: of the iterations
        it stands for (a paper iteration on ``paper_table2``; the iteration itself otherwise): a loss throws
        away the unfinished one of them (docs/clock.md, 'Time inside one iteration')."""
        self.floor_bound = self.paper and busy_s > self.paper_s * scale
        """On paper_table2: the activations' floor, not the paper's measured time, sets the iteration (a link too
        slow to carry the paper's pipeline in its time); what the paper's time included (its replica refreshes)
        is then priced on its own (``upkeep_seconds``)."""
        hosts = placement.hosts if placement is not None else range(len(self.byte_scale))
        fraction = {h: min(1.0, b / self.sub_iteration_s) if self.sub_iteration_s > 0 else 0.0
                    for h, b in node_busy.items()}
        self.stage_busy = [fraction.get(h, 0.0) for h in hosts]
        """Per stage: the fraction of an iteration its node's interface carries the pipeline's own activations
        and gradients (``CostModel.node_busy_seconds``); what the node sends in the background gets the rest."""
        self.link_busy = max(self.stage_busy, default=0.0)
        """The busiest node's ``stage_busy`` (the summary's ``link_busy_fraction``)."""

    def place(self, placement: Placement) -> None:
        """Re-price the iteration for ``placement`` (stages that share a host share its compute; no hop between
        them); every stage at home gives back the run's own prices, exactly."""
        self.placement = None if placement.at_home else placement
        self._reprice()

    def staff(self, live: Sequence[int]) -> None:
        """Re-price the iteration for ``live`` nodes per stage (of ``replicas``): a stage with ``l`` of them does
        ``R / l`` times its compute (an emptied stage, being rebuilt, is priced as one node); every node live
        gives back the run's own prices, exactly."""
        load = tuple(self.cost.replicas / max(n, 1) for n in live)
        self.load = None if all(x == 1.0 for x in load) else load
        self._reprice()

    def _reprice(self) -> None:
        if self.placement is None and self.load is None:
            self.iteration_s, self.sub_iteration_s, self.link_busy, self.stage_busy, self.floor_bound = self.home
        else:
            self._price(self.placement, self.load)

    def resync(self, stage: int) -> tuple[float, float]:
        """(seconds, bytes) of a new node copying ``stage``'s state -- fp32 weights and Adam's two moments, at the
        priced model's size -- from a surviving replica of it, over the link between two nodes of one stage (the
        one its gradient all-reduce runs over). The stage trains on meanwhile; the node joins when it is done."""
        n_bytes = self.cost.stage_bytes(stage, with_optimizer=True)
        return p2p_seconds(n_bytes, self.cost.replica_link(stage)), float(n_bytes)

    def move_seconds(self, moves: dict[int, tuple[int, int]]) -> float:
        """Stages moving between hosts (their weights + Adam at the priced model's size; ``CostModel.move_seconds``)
        — on every clock from the cost model, as the paper measured no moves."""
        return self.cost.move_seconds(moves)

    def recovery_seconds(self, report: RecoveryReport) -> float:
        """Replacement delay + the bytes that bound the recovery, each piece at its own stage's size: a rollback
        from storage downloads every stage's shard in parallel (the slowest sets it); a rebuild receives its
        pieces (``RecoveryReport.transfers``) from each sending node in parallel, each over its own link."""
        fit_s = self.cost.fit_seconds(report.stage, report.details.get("fit_pairs", 0),
                                      report.details.get("fit_steps", 0))
        if self.paper and not self.priced_recovery:
            # The paper's measured recovery, plus what a fit adds to it (the buffered pairs' transfer, the steps).
            pairs = [p for p in report.transfers if p.holds == ACTIVATIONS]
            return paper_table2.RECOVERY_S + (self.transfer_seconds(pairs, report.stage) + fit_s if pairs else 0.0)
        if report.from_storage:
            shards = self.shard_bytes_of(report.details["shard_bytes"])
            return self.cost.recovery_seconds(report.stage, [], max(shards), from_storage=True)
        return self.cost.network.replacement_delay_s + self.transfer_seconds(report.transfers, report.stage) + fit_s

    def transfer_seconds(self, pieces: list[Transfer], stage: int) -> float:
        """``pieces`` to ``stage``'s node, each at its own priced size: each sending node's one after another on its
        link, the nodes in parallel (the slowest sets it)."""
        by_node: dict[int, int] = {}
        for piece in pieces:
            by_node[piece.src] = by_node.get(piece.src, 0) + int(piece.n_bytes * self.piece_scale(piece))
        return max((p2p_seconds(n, stage_link(self.cost.network, src, stage)) for src, n in by_node.items() if n > 0),
                   default=0.0)

    def count_recovery(self, reports: list[RecoveryReport]) -> None:
        """Add what one recovery moved to ``moved_bytes``, at the priced size, however it is priced in time: a
        rollback from storage downloads every stage's shard once (each lost stage's report names all of
        them), a rebuild receives its pieces. (Copies re-made for a replaced node after its rebuild, the
        plan's ``refresh``, are not in any report and not counted.)"""
        storage = [r for r in reports if r.from_storage]
        if storage:
            self.moved_bytes += sum(self.shard_bytes_of(storage[0].details["shard_bytes"]))
        self.moved_bytes += sum(int(p.n_bytes * self.piece_scale(p)) for r in reports if not r.from_storage
                                for p in r.transfers)

    def piece_scale(self, piece: Transfer) -> float:
        return self.scale_of(piece.holds, piece.owner)

    def scale_of(self, holds: str | None, owner: int) -> float:
        """The priced model's bytes per byte of what ``owner``'s piece or copy ``holds``: its blocks at its
        blocks' size, a replica at its (de)embedding's, its weights or state at its stage's."""
        if holds == BODY:
            return self.body_scale[owner]
        if holds == ACTIVATIONS:
            return self.activation_scale
        return self.edge_scale[owner] if holds == EDGES else self.byte_scale[owner]

    def upkeep_seconds(self, traffic: Traffic, period: int = 1) -> float:
        """Checkpoint upload (stages upload their own shards in parallel) + refreshes the owners wait for (in
        parallel) + the stall of what is sent or flushed in the background, which may take ``period``
        iterations (``CostModel.background_seconds`` / ``flush_stall_seconds``). Every copy and shard is priced
        at its own stage's size (``byte_scale``; a replica at its (de)embedding's, ``edge_scale``) and hides in
        its own node's free link time. On ``paper_table2`` the paper's iteration times already include its
        checkpoint saves and replica refreshes -- unless the activations' floor set the iteration
        (``floor_bound``), when the refreshes are priced as on the cost model; it measured neither snapshots
        nor asynchronous checkpoints, so those are priced by the cost model at the preset's size
        (``trainer.clock_preset``)."""
        shards = self.shard_bytes(traffic)
        windows = [self.background_window(period, k) for k in range(len(self.byte_scale))]
        background = self.cost.background_seconds(
            {key: self.copy_bytes(key, n, traffic) for key, n in traffic.background.items()}, dict(enumerate(windows)))
        upload = max(shards, default=0)
        if traffic.shards_in_background:
            background = max(background, self.cost.flush_stall_seconds(shards, windows))
            upload = 0  # not uploaded on the step's time
        syncs = {key: self.copy_bytes(key, n, traffic) for key, n in traffic.sent.items()}
        self.moved_bytes += sum(syncs.values()) + sum(self.copy_bytes(key, n, traffic)
                                                      for key, n in traffic.background.items()) + sum(shards)
        if self.paper:
            # 0 for the paper's strategies (checkpointing: 91.35 vs 91.32 s per iteration, its saves included);
            # a strategy priced at another column pays the synchronous saves it makes (memory_checkpoint's
            # fall-back to storage).
            own_saves = 0.0 if self.saves_in_paper_time else self.cost.storage_seconds(upload)
            refreshes = self.cost.overhead_seconds(StepOverhead(replica_sync_bytes=syncs)) if self.floor_bound else 0.0
            return background + own_saves + refreshes
        return self.cost.overhead_seconds(StepOverhead(storage_upload_bytes=upload, replica_sync_bytes=syncs)) \
            + background

    def held_copy_bytes(self, held: Held) -> float:
        """One held copy at the priced model's size, from what its kind holds and how it is encoded: a replica
        is the owner's fp32 (de)embedding, a state its fp32 weights and Adam's two moments, weights their
        encoding's bytes a parameter (int8's per-channel scales left out)."""
        what, owner, cost = held.what, held.owner, self.cost
        if what.holds == EDGES:
            return FP32_BYTES * (cost.params[owner] - cost.body_params[owner])
        if what.holds == STATE:
            return cost.stage_bytes(owner, with_optimizer=True)
        return BYTES_PER_PARAM[what.encoding] * cost.params[owner]

    def memory_per_node(self, held: Iterable[Held], staging: bool, buffered: Sequence[int] = ()) -> list[float]:
        """Bytes each node keeps beyond its own stage at the priced model's size: the held copies it holds,
        for a strategy that flushes checkpoints in the background (``staging``) the host buffer its own stage's
        state is copied into, and ``buffered`` micro-batches of its neighbours' activations (one fp32 tensor each,
        ``buffered_bytes``; ``checkfree.stage.fitting.buffered_per_holder``)."""
        out = [float(self.cost.stage_bytes(k, with_optimizer=True)) if staging else 0.0
               for k in range(len(self.cost.params))]
        for k, count in enumerate(buffered):
            out[k] += count * self.buffered_bytes
        for copy in held:
            out[copy.holder] += self.held_copy_bytes(copy)
        return out

    def shard_bytes(self, traffic: Traffic) -> list[int]:
        """Each stage's checkpoint shard at the priced model's size of that stage."""
        return self.shard_bytes_of(traffic.shard_bytes)

    def shard_bytes_of(self, shards: list[int]) -> list[int]:
        return [int(n * self.byte_scale[k]) for k, n in enumerate(shards)]

    def copy_bytes(self, key: tuple[int, int], n_bytes: int, traffic: Traffic) -> int:
        """A refreshed copy (``key`` = (owner, holder)) at the priced model's size of what it holds: the owner's
        (de)embedding for a replica, the owner's stage otherwise; an encoded copy at its encoding's bytes a
        parameter (its per-channel scales, a few per cent at a CPU model's narrow rows, left out as
        ``held_copy_bytes`` and ``every: auto`` leave them)."""
        encoding = traffic.encodings.get(key)
        if encoding is not None:
            return int(BYTES_PER_PARAM[encoding] * self.cost.params[key[0]])
        return int(n_bytes * self.scale_of(traffic.holds.get(key), key[0]))

    def background_window(self, period: int = 1, stage: int | None = None) -> float:
        """Seconds a copy made every ``period`` iterations has to reach its place in the background: the
        period's iterations, less the share of them the pipeline's own traffic holds the interface of
        ``stage``'s node (None: the busiest node's)."""
        busy = self.link_busy if stage is None else self.stage_busy[stage]
        return period * self.iteration_s * (1.0 - busy)

    def sustained_period(self, strategy: Pricing, cfg: StrategyConfig) -> int:
        """``strategy.every: auto``: the smallest period at which every stage's background copies (of the
        preset's size, over the network preset's links, in the time the pipeline leaves that stage's node)
        never pile up (``checkfree.simulation.cost.sustained_period``)."""
        copies = self.cost.background_copy_seconds(strategy.sends_in_background,
                                                   strategy.background_bytes_per_param(cfg))
        return max(sustained_period(seconds, self.background_window(1, k)) for k, seconds in enumerate(copies))

    def flush_seconds(self, traffic: Traffic) -> float:
        """Simulated seconds from the end of a step until its asynchronous checkpoint is persisted: each stage's
        upload shares its node's interface with the pipeline's traffic (``stage_busy``), unless that leaves it
        nothing, when it is paid as a stall at the full link (``upkeep_seconds``); the last stage to finish
        sets it."""
        return max((self.cost.flush_seconds(n, share=1.0 - busy if busy < 1.0 else 1.0)
                    for n, busy in zip(self.shard_bytes(traffic), self.stage_busy)), default=0.0)
