"""Cost model: every formula against numbers worked out by hand in the comments."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from checkfree.distributed.programs import gpipe_program
from checkfree.model.presets import PRESETS, ModelConfig
from checkfree.run.config import ConfigError
from checkfree.simulation.cost import (
    SIDE,
    CostModel,
    StepOverhead,
    _hop_ops,
    _pipeline,
    _program_seconds,
    activation_bytes,
    compute_seconds,
    gpipe_seconds,
    one_f_one_b_seconds,
    p2p_seconds,
    ring_allreduce_seconds,
)
from checkfree.simulation.networks import (
    DEVICES,
    GEO_LOCATIONS,
    GEO_TABLE,
    Link,
    NetworkConfig,
    measure_flops,
    stage_link,
    validate_network_config,
)
from checkfree.stage.schedule import build_schedule

GiB = 1024**3
CONF = Path(__file__).resolve().parents[1] / "conf" / "network"
GEO = NetworkConfig(name="geo_distributed")
# 4 stages x 1 layer, d=8, d_ff=32, vocab 16: a block has 4*64 + 3*8*32 + 2*8 = 1040 params,
# the embedding 16*8 = 128, the final norm + head 8 + 128 = 136.
TINY = ModelConfig("t", n_stages=4, layers_per_stage=1, d_model=8, n_heads=2, seq_len=4, vocab_size=16)


def test_p2p_activation_and_compute():
    assert p2p_seconds(1e6, Link(0.01, 1e8)) == pytest.approx(0.02)  # 10 ms + 1e6 / 1e8
    assert activation_bytes(16, 1024, 1024, 2) == 32 * 1024**2  # 16*1024*1024*2 B = 32 MiB
    assert compute_seconds(10**9, 1000, 1e12) == pytest.approx(6.0)  # 6 * 1e9 * 1e3 / 1e12
    assert compute_seconds(10**9, 1000, 1e12, backward=False) == pytest.approx(2.0)


def _flow_shop(times: list[float], m: int) -> float:
    """Reference: the flow-shop recurrence C[j][k] = max(C[j-1][k], C[j][k-1]) + t_k."""
    done = [0.0] * len(times)
    for _ in range(m):
        ready = 0.0
        for k, t in enumerate(times):
            ready = done[k] = max(done[k], ready) + t
    return done[-1]


def test_gpipe_s3_m4_by_hand():
    # GPipe = forward flow shop + backward flow shop, each sum(t) + (M-1) * max(t), hops as resources.
    # forward : 1 + .5 + 2 + .5 + 1 = 5, bottleneck 2 -> 5 + 3*2 = 11
    # backward: 2 + .5 + 4 + .5 + 2 = 9, bottleneck 4 -> 9 + 3*4 = 21            total 32
    assert gpipe_seconds([1, 2, 1], [2, 4, 2], [0.5, 0.5], 4) == pytest.approx(32.0)
    assert _flow_shop([1, 0.5, 2, 0.5, 1], 4) + _flow_shop([2, 0.5, 4, 0.5, 2], 4) == pytest.approx(32.0)
    # Uniform stages, free hops: the textbook (M + S - 1) * (f + b) = 6 * 3 = 18.
    assert gpipe_seconds([1, 1, 1], [2, 2, 2], [0, 0], 4) == pytest.approx(18.0)
    assert gpipe_seconds([1.0], [2.0], [], 1) == pytest.approx(3.0)


def test_gpipe_matches_flow_shop_recurrence():
    rng = random.Random(0)
    for _ in range(20):
        s, m = rng.randint(1, 6), rng.randint(1, 8)
        f = [rng.uniform(0.1, 2) for _ in range(s)]
        b = [rng.uniform(0.1, 4) for _ in range(s)]
        h = [rng.uniform(0, 3) for _ in range(s - 1)]
        inter_f = [x for k in range(s) for x in ([h[k - 1]] if k else []) + [f[k]]]
        inter_b = [x for k in reversed(range(s)) for x in [b[k]] + ([h[k - 1]] if k else [])]
        assert gpipe_seconds(f, b, h, m) == pytest.approx(_flow_shop(inter_f, m) + _flow_shop(inter_b, m))


def test_one_f_one_b_by_hand():
    # 1F1B = path_f + path_b + (M-1) * max over resources of (fwd + bwd busy time per micro-batch).
    # Same inputs as the GPipe case: 5 + 9 + 3 * (2 + 4) = 32 (the slow stage is both bottlenecks).
    assert one_f_one_b_seconds([1, 2, 1], [2, 4, 2], [0.5, 0.5], 4) == pytest.approx(32.0)
    # Uniform stages: same bubble as GPipe (Narayanan et al. 2021): 3 + 6 + 3 * 3 = 18.
    assert one_f_one_b_seconds([1, 1, 1], [2, 2, 2], [0, 0], 4) == pytest.approx(18.0)
    # A slow link: its two directions work concurrently in 1F1B but in separate phases in GPipe.
    # paths 1+3+1+1+1 = 7 each way; the slots give 14 + 3 * max(1+1, 3) = 23, but 1F1B keeps S = 3 micro-batches
    # in flight: the 4th starts when the 1st is back (14 s), and takes its own 14 s: 28. GPipe: 7 + 3*3 + 7 + 3*3 = 32.
    assert one_f_one_b_seconds([1, 1, 1], [1, 1, 1], [3, 1], 4) == pytest.approx(28.0)
    assert gpipe_seconds([1, 1, 1], [1, 1, 1], [3, 1], 4) == pytest.approx(32.0)
    with pytest.raises(ValueError, match="len"):
        gpipe_seconds([1, 1], [1, 1], [1, 1], 2)


def test_ring_allreduce():
    assert ring_allreduce_seconds(1e9, 1, Link(0.001, 1e9)) == 0.0
    # W=4: 2*3/4 * 1e9/1e9 = 1.5 s + 2*3 * 1 ms = 1.506 s
    assert ring_allreduce_seconds(1e9, 4, Link(0.001, 1e9)) == pytest.approx(1.506)


def test_devices_and_measured_flops():
    assert DEVICES["a100"].flops == pytest.approx(312e12 * 0.4)
    assert DEVICES["h100"].peak_flops == 989e12
    assert measure_flops(d_model=32, repeats=1) > 0


def test_geo_table_lookups():
    assert len(GEO_TABLE) == 21  # every pair of the 7 locations
    assert GEO_LOCATIONS[0] == "Australia" and GEO_LOCATIONS[1] == "Belgium"
    # Australia -> Belgium: 129 ms, 0.00982666015625 GiB/s = 10551296 B/s; symmetric.
    assert stage_link(GEO, 0, 1) == Link(0.129, 10551296.0)
    assert stage_link(GEO, 1, 0) == stage_link(GEO, 0, 1)
    assert stage_link(GEO, 7, 8) == stage_link(GEO, 0, 1)  # stage 7 is Australia again, 8 Belgium
    assert stage_link(GEO, 1, 3) == Link(0.004, 0.2425 * GiB)  # Belgium-Germany
    assert stage_link(GEO, 2, 4) == Link(0.014, 0.07568359375 * GiB)  # Canada-Iowa
    assert stage_link(GEO, 0, 7) == Link(0.001, 2 * GiB)  # both in Australia: intra-site default
    assert stage_link(NetworkConfig(), 0, 1) == Link(0.001, 2 * GiB)
    # One 32 MiB hop Australia -> Belgium: 0.129 + 33554432 / 10551296 = 3.309 s (as on the reference testbed).
    assert p2p_seconds(32 * 1024**2, stage_link(GEO, 0, 1)) == pytest.approx(0.129 + 33554432 / 10551296)


def _unit_hops(**kw) -> CostModel:
    # Activations 2 * 4 * 8 * 2 = 128 B over a 128 B/s zero-latency link: every hop takes 1 s, and
    # compute is ~0 at 1e30 FLOP/s.
    net = NetworkConfig(latency_s=0.0, bandwidth_Bps=128.0, **kw)
    return CostModel(TINY, micro_batches=2, micro_batch_size=2, network=net, flops_per_s=1e30)


def test_out_of_order_hops_by_hand():
    # S=4, M=2. In order: 3 hops per micro-batch; GPipe per phase 3 + (2-1) * 1 = 4 -> 8 s.
    assert _unit_hops().iteration_seconds("in_order") == pytest.approx(8.0)
    # Odd micro-batch (bodies 1,0,3,2): 0->1, 1->0, 0->3, 3->2, 2->3 = 5 hops, played out in program order
    # (every link busy 1 s a message, one message at a time; compute ~0):
    #   forward  mb 0: links 0->1 [0,1], 1->2 [1,2], 2->3 [2,3]: at stage 3 at 3.
    #            mb 1: 0->1 waits for mb 0's [1,2], 1->0 [2,3], 0->3 [3,4], 3->2 [4,5], 2->3 [5,6]: at 6.
    #   backward mb 0 (stage 3 free at 6): 3->2 [6,7], 2->1 [7,8], 1->0 [8,9].
    #            mb 1: 3->2 [7,8], 2->3 [8,9], 3->0 [9,10], 0->1 [10,11], 1->0 [11,12]: 12 s.
    # (The mean-path flow shop said 10 s: it let the swapped micro-batch's hops overlap the other's.)
    assert _unit_hops().iteration_seconds("out_of_order") == pytest.approx(12.0)
    # 1F1B: in order 3 + 3 + 1 * 1 = 7. Out of order the stages run GPipe whatever the pipeline
    # (checkfree.distributed.programs): the same 12 s.
    assert _unit_hops(pipeline="1f1b").iteration_seconds("in_order") == pytest.approx(7.0)
    assert _unit_hops(pipeline="1f1b").iteration_seconds("out_of_order") == pytest.approx(12.0)
    one = CostModel(TINY, 1, 2, _unit_hops().network, flops_per_s=1e30)  # M=1: no odd micro-batch
    assert one.iteration_seconds("out_of_order") == pytest.approx(one.iteration_seconds("in_order"))
    with pytest.raises(ConfigError, match="n_stages"):
        three = CostModel(dataclasses.replace(TINY, n_stages=3), 2, 2, NetworkConfig())
        three.iteration_seconds("out_of_order")
    with pytest.raises(ConfigError, match="schedule"):
        _unit_hops().iteration_seconds("random")


def _stage_programs_played_out(cost: CostModel, schedule: str) -> float:
    """Reference for the clock's price of a GPipe iteration: the stage processes' own programs
    (``checkfree.distributed.programs.gpipe_program``) run pass by pass, each when its input has arrived, a
    message entering its link when the link is free (one at a time, in the order its sender sends) and arriving
    a latency after its bytes; compute per visit as the cost model prices it."""
    s, m = cost.model.n_stages, cost.micro_batches
    sched = build_schedule(schedule, s)
    programs = {k: gpipe_program(k, sched, list(range(m))) for k in range(s)}
    cursor, stage_free, link_free = dict.fromkeys(programs, 0), dict.fromkeys(programs, 0.0), {}
    inputs: dict = {}  # (backward, micro-batch, position) -> when that pass's input is at its stage
    end = 0.0

    def seconds(p) -> float:
        params = (cost.body_params[p.visit.stage] if "body" in p.visit.ops else 0) + \
            (cost.head_params if "head" in p.visit.ops else 0)
        return cost._bwd(params) if p.backward else cost._fwd(params)

    while any(cursor[k] < len(programs[k]) for k in programs):
        progressed = False
        for k, program in programs.items():
            while cursor[k] < len(program):
                p = program[cursor[k]]
                v = p.visit
                if v.prev is None and not p.backward:
                    inputs[(False, p.micro_batch, v.position)] = 0.0  # the token ids
                key = (p.backward, p.micro_batch, v.position)
                if key not in inputs:
                    break
                done = max(inputs[key], stage_free[k]) + seconds(p)
                stage_free[k] = done
                to = v.prev if p.backward else v.next
                if not p.backward and to is None:  # the loss: this visit's backward may start
                    inputs[(True, p.micro_batch, v.position)] = done
                elif to is None:
                    end = max(end, done)
                else:
                    link = stage_link(cost.network, k, to)
                    enter = max(done, link_free.get((k, to), 0.0))
                    link_free[(k, to)] = enter + cost.act_bytes / link.bandwidth_Bps
                    position = v.position - 1 if p.backward else v.position + 1
                    inputs[(p.backward, p.micro_batch, position)] = link_free[(k, to)] + link.latency_s
                cursor[k] += 1
                progressed = True
        assert progressed, "the stage programs deadlock"
    return end


@pytest.mark.parametrize("micro_batches", [1, 2, 4, 5])
@pytest.mark.parametrize("network", [NetworkConfig(latency_s=0.05, bandwidth_Bps=2048.0),  # compute-bound
                                     NetworkConfig(latency_s=0.05, bandwidth_Bps=64.0),  # links busier than stages
                                     GEO])
def test_the_clock_prices_an_out_of_order_iteration_as_the_stage_programs_run_it(micro_batches, network):
    """CheckFree+'s swapped micro-batches make the stages wait on each other's round trips (stage 0 runs micro-batch
    1's body only once stage 1 sent it back, and stage 1 micro-batch 2 only after 1): the clock plays the stage
    programs out, and agrees with an independent replay of ``gpipe_program`` to rounding. In order it is the
    closed form, which the replay agrees with too."""
    six = dataclasses.replace(TINY, n_stages=6)
    cost = CostModel(six, micro_batches, 2, network, flops_per_s=2e4)  # a visit's compute ~ a hop's bytes
    for schedule in ("in_order", "out_of_order"):
        assert cost.iteration_seconds(schedule) == pytest.approx(_stage_programs_played_out(cost, schedule),
                                                                 rel=1e-12)


def test_played_out_one_route_is_the_closed_form():
    """``_program_seconds`` on one route (identical jobs) gives the permutation flow shop's closed form, latencies
    (delays on no resource) and all: the in-order price keeps its formula, and the two agree."""
    rng = random.Random(1)
    for _ in range(30):
        s, m = rng.randint(1, 6), rng.randint(1, 8)
        route = [(("stage", 0), rng.uniform(0.1, 2), rng.uniform(0.1, 4))]
        for k in range(1, s):
            route += _hop_ops(k - 1, k, rng.uniform(0, 3), rng.choice([0.0, rng.uniform(0, 5)]))
            route.append((("stage", k), rng.uniform(0.1, 2), rng.uniform(0.1, 4)))
        assert _program_seconds([route], m) == pytest.approx(_pipeline([route], m, "gpipe"), rel=1e-12)


def test_a_link_s_latency_delays_each_micro_batch_and_occupies_nothing():
    """The hops of _unit_hops (1 s of bytes each) plus 10 s of latency: S=4, M=2, GPipe. Each phase's path gains
    3 x 10 s; the bottleneck slot stays the 1 s a link is busy sending: 2 x (3 x 11 + 1 x 1) = 68 s (counting the
    latency as occupancy, as the clock did before the emulated links measured it, gave 2 x (33 + 11) = 88 s)."""
    slow = CostModel(TINY, micro_batches=2, micro_batch_size=2, flops_per_s=1e30,
                     network=NetworkConfig(latency_s=10.0, bandwidth_Bps=128.0))
    assert slow.iteration_seconds("in_order") == pytest.approx(68.0)
    # 1F1B: the fill (33 + 33) plus one slot of the busiest resource, a link direction (1 s of bytes; its
    # gradients go the other way).
    one_f_one_b = CostModel(TINY, 2, 2, dataclasses.replace(slow.network, pipeline="1f1b"), flops_per_s=1e30)
    assert one_f_one_b.iteration_seconds("in_order") == pytest.approx(67.0)
    # More micro-batches add only bottleneck slots, never another latency.
    eight = CostModel(TINY, 8, 2, slow.network, flops_per_s=1e30)
    assert eight.iteration_seconds("in_order") - slow.iteration_seconds("in_order") == pytest.approx(2 * 6 * 1.0)
    # 1F1B keeps at most S = 4 micro-batches in flight: 16 of them take at least 4 round trips of 66 s, however
    # short the slots (the slot formula alone said 66 + 15 x 1 = 81 s).
    sixteen = CostModel(TINY, 16, 2, one_f_one_b.network, flops_per_s=1e30)
    assert sixteen.iteration_seconds("in_order") == pytest.approx(4 * 66.0)


def test_redundant_compute_by_hand():
    # tokens = 2 * 4 = 8 at 16 FLOP/s: a forward takes 2*P*8/16 = P s, a backward 2P s. The embedding
    # is a lookup (0 FLOPs), so matmul params per stage are 1040, 1040, 1040, 1040 + 136 = 1176.
    net = NetworkConfig(latency_s=0.0, bandwidth_Bps=1e30, redundant_backward=False)
    cm = CostModel(TINY, micro_batches=2, micro_batch_size=2, network=net, flops_per_s=16.0)
    # GPipe M=2: fwd 4296 + 1176 = 5472, bwd 8592 + 2352 = 10944 -> 16416.
    assert cm.iteration_seconds() == pytest.approx(16416.0)
    # Redundant: stage k also runs stage (k+1) mod 4's forward after its own, holding no micro-batch up: it
    # loads the stage (1040+1040, 1040+1040, 1040+1176, 1176+1040) but is not on the path -> fwd path 4296 +
    # bottleneck 2216 = 6512, and stage 3's last shadow forward (1040) before its first backward; bwd unchanged
    # 10944 -> 18496 (on the path it was 21752: measured on the process engine's computed shadows, that
    # over-priced the iteration).
    assert cm.iteration_seconds(shadows=True) == pytest.approx(18496.0)
    # Shadows kept identical also run the successor's backward (2P): bwd slots 4160, 4160, 4432, 4432
    # -> path 8592 + bottleneck 4432 = 13024, and stage 0's last shadow backward (2080) after its own; the
    # shadow's gradient is free on this network.
    full = CostModel(TINY, 2, 2, dataclasses.replace(net, redundant_backward=True), flops_per_s=16.0)
    assert full.iteration_seconds(shadows=True) == pytest.approx(6512.0 + 1040.0 + 13024.0 + 2080.0)
    # Played out pass by pass, the shadows' work lands where the closed form puts it
    (route,) = full._routes("in_order", True)
    assert _program_seconds([route], 2) == pytest.approx(22656.0)
    parts = cm.breakdown()
    assert parts["compute"] == pytest.approx(16416.0) and parts["allreduce"] == 0.0
    assert parts["total"] == pytest.approx(parts["compute"] + parts["p2p"] + parts["allreduce"])


def test_a_shadow_s_gradient_loads_its_own_link_and_the_last_stage_s_needs_none():
    """Stage k+2 sends stage k the gradient of its shadow's output: bytes / bandwidth on the link k+2 -> k, beside
    the pipeline (a side op: not on the micro-batch's path); the shadow of stage S-1 (kept by S-2) starts from
    its own loss, so nothing comes to stage 2 of 4."""
    net = NetworkConfig(latency_s=0.01, bandwidth_Bps=1e6, redundant_backward=True)
    cm = CostModel(TINY, micro_batches=2, micro_batch_size=2, network=net, flops_per_s=1e30)
    (ops,) = cm._routes("in_order", shadows=True)
    side_links = {res[1]: b for res, f, b in ops if res is not None and res[0] == SIDE and res[1][0] == "link"}
    per_message = cm.act_bytes / 1e6
    assert side_links == {("link", 2, 0): per_message, ("link", 3, 1): per_message, ("link", 1, 3): per_message}
    # Compute free: the iteration is the pipeline's hops alone (the shadows' links carry one message a
    # micro-batch, as every pipeline link does each way, so they bind nothing).
    assert cm.iteration_seconds(shadows=True) == pytest.approx(cm.iteration_seconds())


def test_a_shadow_backward_waits_for_its_gradient_and_the_first_stage_s_comes_last():
    """Three stages, no compute but the keeper of stage 0's shadow (stage 2): 1 s of backward, on the gradient stage
    1 sends it over a link of 5 s latency. Hops 1 s each way. Stage 1's backward ends at 3 s (forward to stage 2 at
    2 s, back 1 s); the gradient reaches stage 2 at 8 s, its shadow's backward runs 8-9 s, after every pass of the
    program (stage 0 ends at 4 s). Without the message it would run right after stage 2's own backward."""
    needs = (("stage", 1), ("link", 1, 2), 0.0, 5.0)
    route = [(("stage", 0), 0.0, 0.0), (None, 1.0, 1.0), (("stage", 1), 0.0, 0.0), (None, 1.0, 1.0),
             (("stage", 2), 0.0, 0.0), ((SIDE, ("stage", 2), needs), 0.0, 1.0), ((SIDE, needs[1]), 0.0, 0.0)]
    assert _program_seconds([route], 1) == pytest.approx(9.0)
    assert _pipeline([route], 1, "gpipe") == pytest.approx(9.0)  # a side op waiting on a message: played out
    free = [op if op[0] is None or op[0][0] != SIDE else ((SIDE, op[0][1], None), *op[1:]) for op in route]
    assert _program_seconds([free], 1) == pytest.approx(4.0)


def test_side_work_loads_its_resource_and_holds_no_micro_batch_up():
    """Stage 0 (1 s forward, 2 s backward) also does 5 s of side work after each forward; stage 1 (1 s, 2 s) waits
    only for stage 0's own forward. GPipe, 3 micro-batches: forwards 2 s of path + 2 x stage 0's 6 s slot, then
    backwards 4 s of path + 2 x 2 s; no side work on the last stage's forward or the first's backward. As an op
    on the path the side work would add 5 s to it (27 s)."""
    route = [(("stage", 0), 1.0, 2.0), ((SIDE, ("stage", 0)), 5.0, 0.0), (("stage", 1), 1.0, 2.0)]
    assert _pipeline([route], 3, "gpipe") == pytest.approx(2 + 2 * 6 + 4 + 2 * 2)
    assert _pipeline([[op if op[0][0] != SIDE else (op[0][1], *op[1:]) for op in route]], 3, "gpipe") == \
        pytest.approx(27.0)


def test_allreduce_and_stage_bytes():
    cm = CostModel(TINY, 2, 2, NetworkConfig(), flops_per_s=1e12, replicas=4)
    # Largest stage: 1040 + 136 = 1176 params * 2 B = 2352 B; ring over the 2 GiB/s, 1 ms link.
    assert cm.breakdown()["allreduce"] == pytest.approx(1.5 * 2352 / (2 * GiB) + 6 * 0.001)
    assert cm.stage_bytes(0) == (1040 + 128) * 4  # fp32 weights
    assert cm.stage_bytes(0, with_optimizer=True) == (1040 + 128) * 12  # + Adam's two fp32 moments
    assert cm.stage_bytes(1) == 1040 * 4


def test_checkpoint_upload_and_recovery():
    cm = CostModel(TINY, 2, 2, NetworkConfig(), flops_per_s=1e12)
    # 625 MB at 500 Mb/s = 62.5 MB/s: 10 s + 50 ms storage latency.
    assert cm.overhead_seconds(StepOverhead(storage_upload_bytes=625_000_000)) == pytest.approx(10.05)
    # Gensyn's sanity number: a 70B bf16 checkpoint (140 GB) takes well over 20 min at 500 Mb/s.
    assert cm.overhead_seconds(StepOverhead(storage_upload_bytes=140 * 10**9)) > 20 * 60
    assert cm.overhead_seconds(StepOverhead()) == 0.0
    # Recovery: 30 s replacement + transfer. 2 GiB in total from 2 neighbours over 2 GiB/s links in
    # parallel: 1 GiB each, 1 ms + 0.5 s.
    assert cm.recovery_seconds(2, [1, 3], 2 * GiB) == pytest.approx(30.501)
    assert cm.recovery_seconds(2, [1, 3], 62_500_000, from_storage=True) == pytest.approx(31.05)
    assert cm.recovery_seconds(2, [], 2 * GiB) == pytest.approx(30.0)


def test_geo_recovery_and_replica_sync():
    cm = CostModel(TINY, 2, 2, GEO, flops_per_s=1e12)
    n = 10551296  # 1 s on the Australia-Belgium link
    # Stage 1 (Belgium) from 0 (Australia, 0.129 + 1 s) and 2 (Canada, 0.041 + n / 21364736 s).
    assert cm.recovery_seconds(1, [0, 2], 2 * n) == pytest.approx(30 + 1.129)  # n from each neighbour
    assert cm.recovery_seconds(1, [2], n) == pytest.approx(30 + 0.041 + n / (0.0198974609375 * GiB))
    syncs = StepOverhead(replica_sync_bytes={(0, 1): n, (2, 1): n})
    assert cm.overhead_seconds(syncs) == pytest.approx(1.129)  # in parallel: the slower one


def test_paper_preset_ordering_on_geo():
    m = PRESETS["llama_500m"]
    cm = CostModel(m, 4, 16, GEO, replicas=4)
    base = cm.iteration_seconds()
    assert cm.iteration_seconds("out_of_order") > base
    # WAN-bound: the shadows' compute hides in the slot the links set (it holds no micro-batch up), but for the
    # last stage's shadow forward of stage 0 after its last forward and stage 0's shadow backward of stage 1
    # after its last backward
    body = cm.body_params
    assert cm.iteration_seconds(shadows=True) == pytest.approx(base + cm._fwd(body[0]) + cm._bwd(body[1]))
    assert cm.breakdown()["p2p"] > cm.breakdown()["compute"]  # WAN-bound, as in the paper's testbed
    single = CostModel(m, 4, 16, NetworkConfig(), replicas=4)
    assert single.iteration_seconds() < base
    assert single.iteration_seconds(shadows=True) > single.iteration_seconds()  # compute-bound: it shows


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "mars", "network.name='mars' is invalid: allowed: ['single_cluster', 'geo_distributed']"),
        ("device", "tpu", "network.device='tpu' is invalid: allowed: ["),
        ("pipeline", "zb", "network.pipeline='zb' is invalid: allowed: ['gpipe', '1f1b']"),
        ("dtype_bytes", 3, "network.dtype_bytes=3 is invalid: allowed: 1, 2 or 4"),
        ("bandwidth_Bps", 0.0, "network.bandwidth_Bps=0.0 is invalid: must be a finite number of bytes per second, "
                               "at least 1"),
        ("storage_bandwidth_Bps", -1.0, "network.storage_bandwidth_Bps=-1.0 is invalid"),
        ("storage_bandwidth_Bps", 1e-300, "network.storage_bandwidth_Bps=1e-300 is invalid: must be a finite number"),
        ("host_bandwidth_Bps", math.inf, "network.host_bandwidth_Bps=inf is invalid: must be a finite number"),
        ("latency_s", -0.1, "network.latency_s=-0.1 is invalid: must be >= 0 seconds"),
        ("replacement_delay_s", 1e300, "network.replacement_delay_s=1e+300 is invalid: must be >= 0 seconds and at "
                                       "most 1e+09"),
    ],
)
def test_validate_network_config_errors(field, value, message):
    with pytest.raises(ConfigError) as err:
        validate_network_config(dataclasses.replace(NetworkConfig(), **{field: value}), 4)
    assert message in str(err.value)


def test_measured_device_needs_flops():
    with pytest.raises(ValueError, match="measured"):
        CostModel(TINY, 2, 2, NetworkConfig(device="measured"))
    assert CostModel(TINY, 2, 2, NetworkConfig(device="measured"), flops_per_s=1e9).flops_per_s == 1e9


def test_a_profiled_device_prices_one_micro_batch_at_the_seconds_it_took(monkeypatch):
    """``network.device=profiled``: one micro-batch of the model itself, forward and backward through every stage,
    is timed (here by a clock that says 0.25 s each pass); the cost model at the FLOP/s it returns prices that
    micro-batch's compute (M = 1, every stage in turn) at exactly those 0.25 s."""
    import itertools

    from checkfree.simulation import profiled

    ticks = itertools.count()
    monkeypatch.setattr(profiled.time, "perf_counter", lambda: next(ticks) * 0.25)  # each pass: 0.25 s
    model = dataclasses.replace(TINY, vocab_size=64)
    flops = profiled.profile_flops(model, micro_batch_size=2, repeats=3)
    cost = CostModel(model, 1, 2, NetworkConfig(device="profiled"), flops_per_s=flops)
    assert cost.breakdown()["compute"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="profiled"):
        CostModel(TINY, 2, 2, NetworkConfig(device="profiled"))


@pytest.mark.parametrize("preset", ["single_cluster", "geo_distributed"])
def test_yaml_presets_are_valid_network_configs(preset):
    cfg = NetworkConfig(**OmegaConf.to_container(OmegaConf.load(CONF / f"{preset}.yaml")))
    assert cfg.name == preset
    validate_network_config(cfg, 6)
    assert cfg.storage_bandwidth_Bps == 500e6 / 8
