"""Simulated wall-clock model of a pipeline-parallel run (its presets: ``checkfree.simulation.networks``).

A "second" here is a second of the *modelled* distributed run (S stages on S nodes, W data-parallel
replicas per stage, links from a preset), not of this machine. It replaces the reference's printed
estimate (docs/paper.md, 'Reference-code bugs we avoid' item 13: 8 B/element, (2W-1) instead of the ring
factor, one micro-batch of transfers, x2 and x2.5 fudge factors) with explicit, unit-tested pieces:

* compute: ``6 * params * tokens`` FLOPs for forward+backward (``2 * P * T`` forward only) over an
  effective device throughput (peak x MFU, or measured here);
* a hop: ``latency + bytes / bandwidth`` with activation bytes ``micro_batch * seq * d_model * dtype``;
* the pipeline: GPipe or 1F1B over ``M`` micro-batches, priced as a flow shop (see ``_pipeline``), or, where
  micro-batches take different routes (CheckFree+), played out in the stage programs' order (``_program_seconds``);
* data parallelism: ring all-reduce ``2 (W-1)/W * bytes / bw + 2 (W-1) * latency`` per stage;
* strategy overheads: checkpoint upload/download, weight transfer to a replacement node, replica
  syncs, the redundant forward (Bamboo) and CheckFree+'s extra hops on odd micro-batches.

Presets: ``single_cluster`` (one link for every pair) and ``geo_distributed`` (the reference's
7-location latency/bandwidth table, stage ``k`` at location ``k mod 7``), in ``networks``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from checkfree.model.presets import ModelConfig, edge_param_count, stage_param_counts
from checkfree.run.config import require
from checkfree.simulation.networks import (
    DEVICES,
    SCHEDULES,
    Link,
    NetworkConfig,
    replica_link,
    stage_link,
    storage_link,
)
from checkfree.simulation.placement import Placement
from checkfree.stage.routes import BODY, HEAD, route
from checkfree.stage.schedule import build_schedule


def p2p_seconds(n_bytes: float, link: Link) -> float:
    """Time to send ``n_bytes`` over ``link``: latency + bytes / bandwidth."""
    return link.latency_s + n_bytes / link.bandwidth_Bps


def activation_bytes(micro_batch: int, seq_len: int, d_model: int, dtype_bytes: int) -> int:
    """Bytes of one micro-batch's hidden states (and of its gradient on the way back)."""
    return micro_batch * seq_len * d_model * dtype_bytes


def sustained_period(background_s: float, iteration_s: float) -> int:
    """The smallest period, in iterations, at which copies that take ``background_s`` to reach their place never
    pile up: one ends before the next begins (CheckFreq's rule), ``ceil(background_s / iteration_s)``, >= 1.
    ``iteration_s`` is the part of an iteration the copy may use; 0 (the pipeline's own traffic fills the
    link) gives 1: no period hides the copies, each is paid as a stall (``background_seconds``), and the
    most recent copy is the one worth paying for."""
    if iteration_s <= 0:
        return 1
    return max(1, math.ceil(background_s / iteration_s - 1e-9))


def matmul_params(model: ModelConfig) -> tuple[list[int], int]:
    """The parameters whose matmuls the cost model counts: per stage its body's (an embedding lookup is a gather,
    not FLOPs), and the head's (a matmul)."""
    body = [p - edge_param_count(model, k) for k, p in enumerate(stage_param_counts(model))]
    return body, model.vocab_size * model.d_model + model.d_model


def compute_seconds(params: int, tokens: int, flops_per_s: float, backward: bool = True) -> float:
    """Matmul time of ``params`` over ``tokens``: 6PT FLOPs forward+backward, 2PT forward only.

    The usual dense-transformer estimate (Kaplan et al. 2020): attention-score FLOPs are left out.
    """
    return (6 if backward else 2) * params * tokens / flops_per_s


# --- pipeline schedules ----------------------------------------------------------------------------
# A route is one micro-batch's forward walk: a list of (resource, forward seconds, backward seconds).
# Resources are ("stage", k) for a node's compute and ("link", a, b) for one direction of a full-duplex
# link; a forward hop a->b busies ("link", a, b) and its gradient comes back on ("link", b, a).


def _hop_ops(a: int, b: int, seconds: float, latency_s: float = 0.0) -> list[tuple]:
    """A hop a -> b: its link's two directions busy ``seconds`` (bytes / bandwidth), forward and back; then the
    latency, which delays the micro-batch but occupies nothing (resource None): the next message follows on
    the link without waiting out this one's latency. Measured on the process engine's emulated links
    (``engine.shape``): counting the latency as occupancy over-priced a geo-distributed iteration of a small
    model by ~40 % (docs/clock.md)."""
    ops = [(("link", a, b), seconds, 0.0), (("link", b, a), 0.0, seconds)]
    return ops + [(None, latency_s, latency_s)] if latency_s else ops


SIDE = "side"
"""An op ``((SIDE, resource[, needs]), forward, backward)``: work that loads ``resource`` but holds no micro-batch up
(a shadow's passes, after its keeper's own; the shadow's gradient on its own link): in the bottleneck, not the
path. ``needs`` = ``(sender's stage, link, transfer seconds, latency seconds)``: its backward waits for a message
that the sender's backward of the same micro-batch sends over that link (``_program_seconds`` plays it out)."""


def _side(resource: Any) -> bool:
    return resource is not None and resource[0] == SIDE


def _occupies(resource: Any) -> Any:
    """The resource an op loads (a side op's own)."""
    return resource[1] if _side(resource) else resource


def _tail(route: list[tuple]) -> float:
    """The side work (``SIDE``) of a route's last stage in the forward pass and of its first in the backward."""
    stages = [res for res, _, _ in route if res is not None and res[0] == "stage"]
    if not stages:
        return 0.0
    return sum(f for res, f, _ in route if _side(res) and res[1] == stages[-1]) + \
        sum(b for res, _, b in route if _side(res) and res[1] == stages[0])


def _pipeline(routes: list[list[tuple]], micro_batches: int, pipeline: str) -> float:
    """Makespan of one iteration; micro-batch ``m`` takes ``routes[m % len(routes)]``.

    Every micro-batch visits the resources in the same order and each resource serves them in order,
    which is a permutation flow shop with identical jobs; its makespan is exactly
    ``sum(t) + (M - 1) * max(t)`` (fill along one path, then one bottleneck slot per further job).
    For uniform stages without hops this is the textbook ``(M + S - 1) * t``.

    * GPipe (Huang et al. 2019): all forwards, flush, all backwards; each phase is its own flow shop:
      ``path_f + (M-1) * max_r load_f[r] + path_b + (M-1) * max_r load_b[r]``.
    * 1F1B (PipeDream-Flush, Narayanan et al. 2021): after warm-up each resource alternates one
      forward and one backward, so the steady-state slot is ``max_r (load_f[r] + load_b[r])`` and
      ``T = path_f + path_b + (M-1) * max_r (load_f + load_b)`` (exact for uniform stages, a
      steady-state approximation otherwise). Same bubble as GPipe for uniform stages (Narayanan et
      al.); lower when the forward and backward bottlenecks are different resources (e.g. the two
      directions of a slow link), and only S micro-batches in flight instead of M: a micro-batch starts only
      when one of S in flight has come back, so ``T >= ceil(M / S) * (path_f + path_b)`` (what binds when
      latencies make the path long against the slots).

    A hop's link is busy for bytes / bw; its latency is a delay on the path (``_hop_ops``), as a resource with
    unlimited servers, which adds to the fill and never to the bottleneck slot.

    With several route types (CheckFree+) the jobs are not identical and no closed form holds: the iteration is
    the stage programs' own schedule, played out (``_program_seconds``).
    """
    if len(routes) > 1 or (pipeline == "gpipe" and any(len(res) > 2 for r in routes for res, _, _ in r
                                                        if _side(res))):
        # Several routes, or a shadow's side work (an op whose key says what it needs, even when nothing): the
        # stages' programs played out.
        return _program_seconds(routes, micro_batches)
    mbs = [routes[m % len(routes)] for m in range(micro_batches)]
    path_f = sum(f for r in mbs for res, f, _ in r if not _side(res)) / micro_batches
    path_b = sum(b for r in mbs for res, _, b in r if not _side(res)) / micro_batches
    load_f: dict = defaultdict(float)
    load_b: dict = defaultdict(float)
    for path in mbs:
        for res, f, b in path:
            if res is None:  # a delay (a link's latency): on the path, in no resource's load
                continue
            res = _occupies(res)
            load_f[res] += f / micro_batches
            load_b[res] += b / micro_batches
    # Side work holds no micro-batch up, but two pieces of it lie on the iteration's span: the last stage's after
    # its last forward (before its first backward) and the first stage's after its last backward.
    tail = sum(_tail(r) for r in mbs) / micro_batches
    if pipeline == "gpipe":
        return path_f + path_b + tail + (micro_batches - 1) * (max(load_f.values()) + max(load_b.values()))
    if pipeline == "1f1b":
        in_flight = max(1, sum(1 for r in load_f if r[0] == "stage"))  # S: one micro-batch in flight a stage
        return max(path_f + path_b + (micro_batches - 1) * max(load_f[r] + load_b[r] for r in load_f),
                   math.ceil(micro_batches / in_flight) * (path_f + path_b)) + tail
    raise ValueError(f"pipeline={pipeline!r} is unknown; allowed: ['1f1b', 'gpipe'].")


def _program_seconds(routes: list[list[tuple]], micro_batches: int) -> float:
    """Makespan of one GPipe iteration whose stages run their passes in program order, played out pass by pass.

    This is how the stage processes run (``checkfree.distributed.programs``): every stage does its forwards by
    (micro-batch, position), then its backwards by (micro-batch, reverse position), each when its input has
    come; every link carries one message at a time in the order its sender sends them. Under CheckFree+'s
    swapped routes that order is not the arrival order: stage 0 cannot run micro-batch 1's body before stage 1
    has sent it back, and stage 1 runs micro-batch 2 only after micro-batch 1, so the swapped pair's round trips
    serialize. The mean-path flow shop of identical jobs missed exactly that (46 % under an emulated CheckFree+
    iteration on the geo-distributed links, docs/results.md, 'The clock checked against emulated runs').
    Out-of-order schedules always run GPipe (``programs.stage_program``), so this prices any ``pipeline``.

    Passes are taken in the one global order every program follows, so each pass's inputs and its resource's
    previous pass are already placed: start = max(input ready, resource free). A link's latency delays its
    message and occupies nothing; on the way back it follows the gradient's transmission, as on the way out
    it follows the activation's. For one route this gives ``_pipeline``'s closed form (a test checks it).

    Each replica's pipeline runs all ``M`` micro-batches, both routes (the clock's weak scaling: docs/design.md,
    "Nodes and replicas"), where the process engine splits them over the replicas. A host running several stages
    (a shrunk pipeline) runs ``host_program``'s interleaving of their programs, not this global order: priced this
    way it is off by up to ~10 % either side (as the closed form is in order)."""
    free: dict = defaultdict(float)
    ready = [0.0] * micro_batches  # when each micro-batch's forward has come out of its last op
    end = 0.0

    def place(resource, seconds: float, at: float) -> float:
        if resource is None:
            return at + seconds
        if seconds <= 0 and resource[0] != "stage":  # a hop's other direction: no part in this pass
            return at
        start = max(at, free[resource])
        free[resource] = start + seconds
        return start + seconds

    for m in range(micro_batches):
        at = 0.0
        for resource, forward, _ in routes[m % len(routes)]:
            if _side(resource):  # after the pass before it, holding the micro-batch up nowhere
                end = max(end, place(resource[1], forward, at))
            else:
                at = place(resource, forward, at)
        ready[m] = at
    done: dict = {}  # (micro-batch, stage resource) -> when its backward pass ended
    last: list = []  # side backwards whose message comes from a stage the walk has not reached: the program's end

    def arrival(m: int, needs: tuple) -> float:
        sender, link, transfer, latency_s = needs
        return place(link, transfer, done[(m, sender)]) + latency_s

    for m in range(micro_batches):
        at, latency, side = ready[m], 0.0, []
        for resource, _, backward in reversed(routes[m % len(routes)]):
            if resource is None:  # the hop's latency comes after its gradient's transmission
                latency += backward
                continue
            if _side(resource):  # after its stage's backward (next in this reversed walk)
                needs = resource[2] if len(resource) > 2 else None
                if needs is not None and (m, needs[0]) not in done:  # its sender comes later: after every pass
                    last.append((m, resource[1], backward, needs))
                elif resource[1][0] == "stage":  # (a side link's time is its message's, placed with it)
                    side.append((resource[1], backward, arrival(m, needs) if needs is not None else 0.0))
                continue
            if resource[0] == "stage":  # a pass in the stage's program, even one without FLOPs (the embedding's)
                at = place(resource, backward, at + latency)
                done[(m, resource)] = at
                latency = 0.0
                for keeper, seconds, message in side:
                    end = max(end, place(keeper, seconds, max(at, message)))
                side = []
            elif backward > 0:
                at, latency = place(resource, backward, at) + latency, 0.0
        end = max(end, at + latency)
    for m, keeper, seconds, needs in last:
        end = max(end, place(keeper, seconds, arrival(m, needs)))
    return max(end, *ready)


def _linear_route(fwd: list[float], bwd: list[float], hops: list[float]) -> list[tuple]:
    if len(fwd) != len(bwd) or len(hops) != len(fwd) - 1:
        raise ValueError(
            f"need len(bwd) == len(fwd) and len(hops) == len(fwd) - 1, got {len(fwd)}, "
            f"{len(bwd)}, {len(hops)}."
        )
    route = [(("stage", 0), fwd[0], bwd[0])]
    for k in range(1, len(fwd)):
        route += _hop_ops(k - 1, k, hops[k - 1]) + [(("stage", k), fwd[k], bwd[k])]
    return route


def gpipe_seconds(fwd: list[float], bwd: list[float], hops: list[float], micro_batches: int) -> float:
    """GPipe iteration time: stage k takes fwd[k]/bwd[k] per micro-batch, hop k->k+1 takes hops[k]."""
    return _pipeline([_linear_route(fwd, bwd, hops)], micro_batches, "gpipe")


def one_f_one_b_seconds(fwd: list[float], bwd: list[float], hops: list[float], micro_batches: int) -> float:
    """1F1B (PipeDream-Flush) iteration time, same inputs as ``gpipe_seconds``."""
    return _pipeline([_linear_route(fwd, bwd, hops)], micro_batches, "1f1b")


def ring_allreduce_seconds(n_bytes: float, replicas: int, link: Link) -> float:
    """Ring all-reduce of ``n_bytes`` over W replicas: 2(W-1)/W * bytes/bw + 2(W-1) latencies."""
    if replicas <= 1:
        return 0.0
    w = replicas
    return 2 * (w - 1) / w * n_bytes / link.bandwidth_Bps + 2 * (w - 1) * link.latency_s


# --- the cost model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepOverhead:
    """Time-costing upkeep after a step: the clock fills it from the engine's ``Traffic`` (scaled to the priced
    model), the cost model prices it."""

    storage_upload_bytes: int = 0
    """Checkpoint upload: the largest stage's shard; stages upload their own shards in parallel."""
    replica_sync_bytes: dict[tuple[int, int], int] = field(default_factory=dict)
    """(src_stage, dst_stage) -> bytes: CheckFree+ (de)embedding replica refresh (redundant computation
    keeps its shadows identical by computing, so it sends nothing here)."""


FP32_BYTES = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 each


class CostModel:
    """Prices iterations, recoveries and strategy overheads of one modelled run in simulated seconds."""

    def __init__(
        self,
        model: ModelConfig,
        micro_batches: int,
        micro_batch_size: int,
        network: NetworkConfig,
        flops_per_s: float | None = None,
        replicas: int = 1,
        spread: bool = False,
    ) -> None:
        # ``network`` is validated (validate_network_config, run by validate_run_config: the one gate).
        if flops_per_s is None:
            if network.device in ("measured", "profiled"):
                raise ValueError(f"network.device={network.device!r} needs flops_per_s (measure_flops() or "
                                 "profile_flops()).")
            flops_per_s = DEVICES[network.device].flops
        require(micro_batches >= 1, "trainer.micro_batches", micro_batches, "must be >= 1")
        require(flops_per_s > 0, "flops_per_s", flops_per_s, "must be > 0")
        self.model, self.network = model, network
        self.micro_batches, self.micro_batch_size = micro_batches, micro_batch_size
        self.replicas = replicas
        """W data-parallel replicas per stage (``engine.replicas``): only the gradient all-reduce depends on it."""
        self.spread = spread
        """``engine.replica_placement=spread``: replica ``r`` of stage ``k`` runs where stage ``k + r`` does, so its
        all-reduce and re-syncs cross sites (``replica_link``)."""
        self.flops_per_s = flops_per_s
        self.params = stage_param_counts(model)
        self.body_params, self.head_params = matmul_params(model)
        self.tokens = micro_batch_size * model.seq_len
        self.act_bytes = activation_bytes(micro_batch_size, model.seq_len, model.d_model, network.dtype_bytes)

    # Per-micro-batch pieces.
    def _fwd(self, params: int) -> float:
        return compute_seconds(params, self.tokens, self.flops_per_s, backward=False)

    def _bwd(self, params: int) -> float:
        return compute_seconds(params, self.tokens, self.flops_per_s) - self._fwd(params)

    def _hop(self, a: int, b: int) -> list[tuple]:
        link = stage_link(self.network, a, b)
        return _hop_ops(a, b, self.act_bytes / link.bandwidth_Bps, link.latency_s)

    def _routes(self, schedule: str, shadows: bool, hops: bool = True, placement: Placement | None = None,
                load: Sequence[float] | None = None) -> list[list[tuple]]:
        s = self.model.n_stages
        # A stage short of nodes (``load[k]`` = R / live, ``checkfree.simulation.roster``) does its lost replicas'
        # share of the micro-batches on the ones left: its compute per micro-batch is that much longer.
        share = load if load is not None else [1.0] * s
        # The host of each stage: its own node, unless a placement puts several stages on one host, whose compute
        # they then share (one resource) and between which a micro-batch makes no hop.
        host = placement.hosts if placement is not None else range(s)
        require(schedule in SCHEDULES, "schedule", schedule, f"allowed: {list(SCHEDULES)}")
        require(
            schedule == "in_order" or s >= 4,
            "model.n_stages",
            s,
            "out-of-order pipelining (CheckFree+) swaps 0<->1 and S-2<->S-1, so it needs >= 4 stages",
        )
        body = list(self.body_params)
        body[-1] += self.head_params  # in order, the head runs right after stage S-1's body

        def hop(a: int, b: int) -> list[tuple]:
            return self._hop(host[a], host[b]) if hops and host[a] != host[b] else []

        def visit(k: int, params: int, shadow: bool = True) -> list[tuple]:
            ops = [(("stage", host[k]), share[k] * self._fwd(params), share[k] * self._bwd(params))]
            if not (shadows and shadow):
                return ops
            # Bamboo: stage k also runs the forward of its shadow (k+1) mod S once per micro-batch. To keep the
            # shadow's weights and optimizer state *identical* (what makes its restore exact), it also runs the
            # shadow's backward, on the gradient of the shadow's output that stage k+2 sends it: one more message
            # a micro-batch (network.redundant_backward=false drops both), none for the shadow of stage S-1, whose
            # output is the loss, taken on stage S-2 itself. The shadow's work follows its keeper's own pass and
            # its gradient travels beside the pipeline's, so neither holds a micro-batch up: they load the stage
            # and the link (SIDE), not the path -- as the process engine's computed shadows run
            # (checkfree.distributed.shadows; measured there: charged on the path, they over-priced an emulated
            # iteration by 54 % on the geo-distributed links).
            # Played out (GPipe), the shadow's backward waits for its gradient, after its keeper's own backward --
            # the shadow of stage 0, whose gradient stage 1 sends at the end of the backward pass, after the
            # keeper's last pass (a slow link 1 -> S-1 then lengthens the iteration).
            successor = (k + 1) % s
            backward = self.network.redundant_backward
            sender = host[(k + 2) % s]
            needs = None
            if backward and successor != s - 1 and hops and sender != host[k]:
                link = stage_link(self.network, sender, host[k])
                transfer = self.act_bytes / link.bandwidth_Bps
                needs = (("stage", sender), ("link", sender, host[k]), transfer, link.latency_s)
            ops.append(((SIDE, ("stage", host[k]), needs), share[k] * self._fwd(body[successor]),
                        share[k] * self._bwd(body[successor]) if backward else 0.0))
            if needs is not None:
                ops.append(((SIDE, needs[1]), 0.0, needs[2]))
            return ops

        # One priced route per distinct micro-batch path (checkfree.stage.routes): each visit's compute (the embedding
        # is a gather, no matmul FLOPs), a hop between consecutive visits, and Bamboo's shadow work on visits
        # that run a stage body.
        orders = dict.fromkeys(build_schedule(schedule, s).order(m) for m in range(2))
        priced = []
        for order in orders:
            ops: list[tuple] = []
            for v in route(order, s):
                if v.prev is not None:
                    ops += hop(v.prev, v.stage)
                params = (self.body_params[v.stage] if BODY in v.ops else 0) + (self.head_params if HEAD in v.ops else 0)
                ops += visit(v.stage, params, shadow=BODY in v.ops)
            priced.append(ops)
        return priced

    def _pipe(self, schedule: str, shadows: bool, hops: bool = True, placement: Placement | None = None,
              load: Sequence[float] | None = None) -> float:
        routes = self._routes(schedule, shadows, hops, placement, load)
        return _pipeline(routes, self.micro_batches, self.network.pipeline)

    def bottleneck_seconds(self, schedule: str = "in_order", shadows: bool = False,
                           placement: Placement | None = None, load: Sequence[float] | None = None) -> float:
        """The busiest host's compute (forward + backward) per micro-batch, hops left out: what each further
        micro-batch adds to a pipeline once it is full, so a placement's share of the work against every stage
        at home is the ratio of the two (the paper clock's rule; ``checkfree.simulation.clock``)."""
        routes = self._routes(schedule, shadows, hops=False, placement=placement, load=load)
        busy: dict = defaultdict(float)
        for m in range(self.micro_batches):
            for resource, f, b in routes[m % len(routes)]:
                busy[_occupies(resource)] += (f + b) / self.micro_batches
        return max(busy.values())

    def replica_link(self, stage: int, spread: bool | None = None) -> Link:
        """``networks.replica_link`` of this run's replicas, placed as ``spread`` says (None: as they are)."""
        return replica_link(self.network, stage, self.replicas, self.spread if spread is None else spread)

    def allreduce_seconds(self, spread: bool | None = None) -> float:
        """Gradient ring all-reduce over the W replicas of each stage (``replica_link``, its replicas placed as
        ``spread`` says, or as they are); stages run theirs in parallel, the slowest sets the time."""
        w = self.replicas
        return max(ring_allreduce_seconds(p * self.network.dtype_bytes, w, self.replica_link(k, spread))
                   for k, p in enumerate(self.params))

    def breakdown(self, schedule: str = "in_order", shadows: bool = False) -> dict[str, float]:
        """compute (pipeline time on a zero-cost network), p2p (what the hops add), allreduce, total."""
        compute = self._pipe(schedule, shadows, hops=False)
        p2p = self._pipe(schedule, shadows) - compute
        allreduce = self.allreduce_seconds()
        return {"compute": compute, "p2p": p2p, "allreduce": allreduce, "total": compute + p2p + allreduce}

    def iteration_seconds(self, schedule: str = "in_order", shadows: bool = False,
                          placement: Placement | None = None, load: Sequence[float] | None = None) -> float:
        """Simulated seconds of one iteration (M micro-batches + gradient all-reduce); ``shadows``: every stage
        also computes a shadow of its successor (what redundant computation keeps up); ``placement``: stages
        on hosts other than their own (a host running two stages does both stages' compute in turn); ``load``:
        per stage, the factor its compute takes longer on the nodes it has left (R / live)."""
        return self._pipe(schedule, shadows, placement=placement, load=load) + self.allreduce_seconds()

    def pipeline_busy_seconds(self, schedule: str = "in_order", placement: Placement | None = None) -> float:
        """Seconds per iteration that the busiest node spends sending the pipeline's own traffic
        (``node_busy_seconds``' largest)."""
        return max(self.node_busy_seconds(schedule, placement).values(), default=0.0)

    def node_busy_seconds(self, schedule: str = "in_order", placement: Placement | None = None) -> dict[int, float]:
        """Seconds per iteration each host spends sending the pipeline's own traffic: each hop of a micro-batch's
        route sends its activations forward and, on the way back, their gradient the other way (micro-batch
        ``m`` takes the ``m % R``-th of the schedule's ``R`` distinct routes). A node has one network interface:
        what it sends in the background (snapshots, checkpoint uploads) gets the rest of the iteration
        (``background_seconds``) -- its own rest: an edge node sends half of what a middle one does. A host that
        sends nothing is 0."""
        s = self.model.n_stages
        host = placement.hosts if placement is not None else range(s)
        busy = dict.fromkeys(host, 0.0)
        orders = [build_schedule(schedule, s).order(m) for m in range(2)]
        for m in range(self.micro_batches):
            for v in route(orders[m % 2], s):
                if v.prev is None or host[v.prev] == host[v.stage]:
                    continue  # the route's start, or no hop: both stages on one host
                a, b = host[v.prev], host[v.stage]
                busy[a] += p2p_seconds(self.act_bytes, stage_link(self.network, a, b))
                busy[b] += p2p_seconds(self.act_bytes, stage_link(self.network, b, a))
        return busy

    def move_seconds(self, moves: dict[int, tuple[int, int]]) -> float:
        """Stages that change host (``stage -> (from, to)``; a stage moving back to a node that arrived) send
        their weights + Adam state over the link between the two hosts, all in parallel: the slowest sets
        the time. The pipeline is paused meanwhile (a stage cannot train while its state is on the way)."""
        return max((p2p_seconds(self.stage_bytes(k, with_optimizer=True), stage_link(self.network, a, b))
                    for k, (a, b) in moves.items()), default=0.0)

    def fit_seconds(self, stage: int, pairs: int, steps: int) -> float:
        """``steps`` full-batch steps of ``stage``'s blocks over ``pairs`` buffered micro-batches (a forward and a
        backward of each, ``checkfree.stage.fitting``) on the replacement node."""
        body = self.body_params[stage]
        return steps * pairs * (self._fwd(body) + self._bwd(body))

    def stage_bytes(self, stage: int, with_optimizer: bool = False) -> int:
        """Bytes of a stage's fp32 weights (4 B/param), + Adam's two fp32 moments (8 B/param)."""
        per_param = FP32_BYTES * (1 + (ADAM_STATES if with_optimizer else 0))
        return self.params[stage] * per_param

    def storage_seconds(self, n_bytes: float) -> float:
        """One transfer to or from the checkpoint storage; 0 for nothing to move."""
        if n_bytes <= 0:
            return 0.0
        return p2p_seconds(n_bytes, storage_link(self.network))

    def recovery_seconds(
        self, stage: int, sources: list[int], n_bytes: int, from_storage: bool = False
    ) -> float:
        """Replacement delay + bringing ``n_bytes`` to the replacement node of ``stage``.

        from_storage: one download from storage (a rollback: every stage downloads its own shard in
        parallel, so the caller passes the largest shard). Otherwise ``n_bytes`` is the total the sources
        send, in equal parts (e.g. each CheckFree neighbour sends its full stage), each over its own link,
        in parallel: the slowest link sets the time. No sources (re-initialisation) costs only the
        replacement delay.
        """
        delay = self.network.replacement_delay_s
        if from_storage:
            return delay + self.storage_seconds(n_bytes)
        if not sources or n_bytes <= 0:
            return delay
        share = n_bytes / len(sources)
        return delay + max(p2p_seconds(share, stage_link(self.network, src, stage)) for src in sources)

    def background_seconds(self, copies: dict[tuple[int, int], int], windows: dict[int, float]) -> float:
        """The stall of copies sent in the background (snapshots to a peer's RAM), all owners in parallel.

        Each owner waits for its copy to reach host memory (``bytes / host_bandwidth_Bps``), then sends it to
        the holder over their link while training goes on. The send must end before the next refresh of the
        same copy begins (CheckFreq's rule: one in flight at a time), ``windows[owner]`` later: what it needs
        beyond that window stalls the run. So a stage's stall is ``host copy + max(0, send - window)``; the
        slowest owner sets the run's. An owner's window is the time its own interface is free of the pipeline's
        traffic (``Clock.background_window``)."""
        stalls = [n / self.network.host_bandwidth_Bps
                  + max(0.0, p2p_seconds(n, stage_link(self.network, a, b)) - windows[a])
                  for (a, b), n in copies.items() if n > 0]
        return max(stalls, default=0.0)

    def background_copy_seconds(self, to: str, bytes_per_param: float = 12.0) -> list[float]:
        """How long each stage's background copy takes to reach ``to``: 'storage' (host copy + upload) or 'peer'
        (host copy + the send to the next stage). A copy is ``bytes_per_param`` a parameter: 12 for a whole
        state (fp32 weights + Adam's two moments), less for a compressed snapshot."""
        n = self.model.n_stages
        sizes = [self.params[k] * bytes_per_param for k in range(n)]
        if to == "storage":
            return [self.flush_seconds(size) for size in sizes]
        return [size / self.network.host_bandwidth_Bps + p2p_seconds(size, stage_link(self.network, k, (k + 1) % n))
                for k, size in enumerate(sizes)]

    def flush_seconds(self, n_bytes: float, share: float = 1.0) -> float:
        """An asynchronous checkpoint shard from the device to host memory, then from there to storage with
        ``share`` of the node's interface (the rest carries the pipeline's own traffic)."""
        return n_bytes / self.network.host_bandwidth_Bps + self.storage_seconds(n_bytes) / share if n_bytes > 0 \
            else 0.0

    def flush_stall_seconds(self, shards: list[float], windows: list[float]) -> float:
        """What an asynchronous checkpoint costs the run: each stage copies its shard (``shards[k]`` bytes) to
        host memory, and the part of its flush to storage that ``windows[k]`` (until the next checkpoint) cannot
        hide (CheckFreq's rule, as ``background_seconds``); stages flush in parallel, the slowest sets it."""
        return max((n / self.network.host_bandwidth_Bps + max(0.0, self.storage_seconds(n) - w)
                    for n, w in zip(shards, windows) if n > 0), default=0.0)

    def overhead_seconds(self, overhead: StepOverhead) -> float:
        """Checkpoint upload (largest shard, stages in parallel) + replica syncs (in parallel: max)."""
        syncs = [
            p2p_seconds(n, stage_link(self.network, a, b))
            for (a, b), n in overhead.replica_sync_bytes.items()
            if n > 0
        ]
        return self.storage_seconds(overhead.storage_upload_bytes) + max(syncs, default=0.0)
