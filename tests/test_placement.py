"""Placement of logical stages on hosts, replacement arrivals, and the wait / shrink policies (checkfree.simulation.placement,
checkfree.simulation.replacements, checkfree.simulation.elastic): the rule on hand-made live sets, the re-priced clock against a hand
computation, and whole runs whose losses stay bitwise those of the run with immediate replacements."""

from __future__ import annotations

import json
import math

import pytest

from checkfree.run.config import ConfigError
from checkfree.run.runlog import deterministic_view, read_metrics
from checkfree.simulation.cost import compute_seconds, p2p_seconds
from checkfree.simulation.elastic import Hosts, NoHostsLeft
from checkfree.simulation.networks import stage_link
from checkfree.simulation.placement import Placement
from checkfree.simulation.replacements import Replacements
from checkfree.stage.routes import in_order, route
from checkfree.train import train
from tests.processes import losses, write_trace

ALL6 = set(range(6))


def test_the_placement_rule_on_hand_made_live_sets():
    assert Placement.of(ALL6, 6) == Placement.home(6) and Placement.home(6).at_home
    assert Placement.of(ALL6 - {2}, 6).hosts == (0, 1, 1, 3, 4, 5)  # a lone loss: onto the stage before it
    assert Placement.of(ALL6 - {0}, 6).hosts == (1, 1, 2, 3, 4, 5)  # stage 0 has only a right neighbour
    assert Placement.of(ALL6 - {5}, 6).hosts == (0, 1, 2, 3, 4, 4)
    assert Placement.of(ALL6 - {2, 3}, 6).hosts == (0, 1, 1, 4, 4, 5)  # a run of two: split between its sides
    assert Placement.of(ALL6 - {1, 2, 3}, 6).hosts == (0, 0, 0, 4, 4, 5)  # three: ceil(3/2) to the left
    assert Placement.of(ALL6 - {0, 1}, 6).hosts == (2, 2, 2, 3, 4, 5)
    assert Placement.of({3}, 6).hosts == (3,) * 6 and Placement.of(set(), 6) is None
    assert Placement.of(ALL6 - {1, 2, 3}, 6, floor=4) is None and Placement.of(ALL6 - {1, 2}, 6, floor=4) is not None
    shrunk = Placement.of(ALL6 - {2, 3}, 6)
    assert shrunk.live == (0, 1, 4, 5) and shrunk.stages_on(1) == [1, 2] and shrunk.max_stages_per_host() == 2
    assert shrunk.moves(Placement.of(ALL6 - {3}, 6)) == {2: (1, 2), 3: (4, 2)}


def test_a_route_between_stages_on_one_host_makes_one_hop_fewer():
    shrunk = Placement.of(ALL6 - {2}, 6)
    assert Placement.home(6).hops(in_order(6)) == 5 and shrunk.hops(in_order(6)) == 4
    swapped = route((1, 0, 2, 3, 5, 4), 6)  # CheckFree+'s odd micro-batches: 0 -> 1 -> 0 -> 2 ... 4 -> 5
    assert Placement.home(6).hops(swapped) == 7 and Placement.of(ALL6 - {1}, 6).hops(swapped) == 5


def test_replacement_delays_are_seeded_per_node_and_never_shorter_than_a_recovery():
    a, b = Replacements("exponential", 1.0, 4, seed=7), Replacements("exponential", 1.0, 4, seed=7)
    first = [a.delay(2, 30.0) for _ in range(3)] + [a.delay(0, 30.0)]
    # Another interleaving of the nodes' losses: each node's j-th loss gets the same delay.
    second = [b.delay(0, 30.0)] + [b.delay(2, 30.0) for _ in range(3)]
    assert first == second[1:] + second[:1] and len(set(first)) == 4 and min(first) >= 30.0
    assert Replacements("fixed", 0.5, 4, 0).delay(1, 30.0) == 1800.0
    assert Replacements("fixed", 0.001, 4, 0).delay(1, 30.0) == 30.0  # 3.6 s: not before the recovery is done
    assert Replacements("immediate", 0.0, 4, 0).delay(1, 30.0) == 30.0
    assert math.isinf(Replacements("never", 0.0, 4, 0).delay(1, 30.0))


def test_a_replacement_trace_gives_each_node_its_delays_in_order(tmp_path):
    from checkfree.failure_models.trace_files import read_delays

    (tmp_path / "r.json").write_text(json.dumps([{"stage": 2, "delay_h": 0.5}, {"stage": 1, "delay_h": None},
                                                 {"stage": 2, "delay_h": 0}]))
    (tmp_path / "r.csv").write_text("stage,delay_h\n2,0.5\n1,\n\n2,0\n")
    for name in ("r.json", "r.csv"):
        assert read_delays(tmp_path / name, 4) == {2: [0.5, 0.0], 1: [math.inf]}
    (tmp_path / "bad.json").write_text(json.dumps([{"stage": 1, "delay_h": 1}, {"stage": 9, "delay_h": 1}]))
    with pytest.raises(ConfigError, match=r"bad.json record 1 is \{'stage': 9, 'delay_h': 1\}; allowed \{stage: 0..3"):
        read_delays(tmp_path / "bad.json", 4)
    (tmp_path / "bad.csv").write_text("stage,delay_h\n1,-2\n")
    with pytest.raises(ConfigError, match=r"bad.csv line 2 has delay_h=-2.0; allowed simulated hours >= 0"):
        read_delays(tmp_path / "bad.csv", 4)
    # A short row is not "never replaced", a long one does not lose cells, an empty trace is not a trace.
    for rows, message in (("2\n", r"line 2 has 1 cell\(s\) \('2'\); allowed 2: stage,delay_h"),
                          ("2,0.5,9\n", r"line 2 has 3 cell\(s\) \('2,0.5,9'\); allowed 2"),
                          ("", r"holds no record; allowed: at least one \{stage, delay_h\} record")):
        (tmp_path / "odd.csv").write_text("stage,delay_h\n" + rows)
        with pytest.raises(ConfigError, match=message):
            read_delays(tmp_path / "odd.csv", 4)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"empty.json holds no record"):
        read_delays(tmp_path / "empty.json", 4)
    traced = Replacements("trace", 0.0, 4, 0, read_delays(tmp_path / "r.json", 4))
    # Node 2's first loss waits 0.5 h, its second no longer than a recovery, its third (no record) is immediate.
    assert [traced.delay(2, 30.0) for _ in range(3)] == [1800.0, 30.0, 30.0]
    assert math.isinf(traced.delay(1, 30.0)) and traced.delay(1, 30.0) == 30.0 and traced.delay(0, 30.0) == 30.0
    resumed = Replacements("trace", 0.0, 4, 0, read_delays(tmp_path / "r.json", 4))
    resumed.load_state_dict(traced.state_dict())
    assert resumed.delay(2, 30.0) == 30.0 and resumed.state_dict()["used"] == [1, 2, 4, 0]


def test_shrink_places_lost_nodes_on_neighbours_and_waits_below_the_floor():
    hosts = Hosts(6, "shrink", 4, Replacements("fixed", 1.0, 6, 0))
    assert hosts.struck({2: 100.0}) == ([2], [2])
    change = hosts.replace({2: 100.0}, now_s=100.0, recovery_s=30.0)
    assert hosts.placement.hosts == (0, 1, 1, 3, 4, 5) and change.wait_s == 0.0 and change.moves == {}
    assert hosts.absent == {2: 3700.0} and hosts.next_arrival() == 3700.0
    assert hosts.struck({2: 150.0, 1: 150.0}) == ([1], [1, 2])  # node 2 is not there; node 1 runs stages 1, 2
    hosts.replace({1: 200.0}, now_s=200.0, recovery_s=30.0)
    assert hosts.placement.hosts == (0, 0, 3, 3, 4, 5) and hosts.absent == {2: 3700.0, 1: 3800.0}
    # A third node lost leaves 3 of 6, below the floor of 4: the pipeline waits for node 2 (at 3700 s).
    change = hosts.replace({4: 300.0}, now_s=300.0, recovery_s=30.0)
    assert change.wait_s == 3700.0 - 330.0 and hosts.absent == {1: 3800.0, 4: 3900.0} and hosts.most_per_host == 2
    assert hosts.placement.hosts == (0, 0, 2, 3, 3, 5) and change.moves == {2: (3, 2)}  # 4 was rebuilt, not moved
    change = hosts.arrive(3800.0)
    assert hosts.placement.hosts == (0, 1, 2, 3, 3, 5) and change.moves == {1: (0, 1)} and hosts.min_live == 4
    # Each node's replacement is asked for when it was lost (node 1 at 0 s, node 2 at 40 s, during the recovery
    # of node 1's loss, which struck with it at 60 s): the pipeline waits for the later one, beyond the recovery.
    waits = Hosts(6, "wait", 3, Replacements("fixed", 1.0, 6, 0))
    assert waits.replace({1: 0.0, 2: 40.0}, now_s=60.0, recovery_s=30.0).wait_s == 3640.0 - 90.0
    # A loss drawn for node 2 while the pipeline waits for its replacement strikes no node; one after it does.
    assert waits.struck({2: 3000.0, 3: 3000.0}) == ([3], [3]) and waits.struck({2: 3640.0}) == ([2], [2])
    with pytest.raises(NoHostsLeft, match="wait for ever"):
        Hosts(6, "wait", 3, Replacements("never", 0.0, 6, 0)).replace({1: 0.0}, 0.0, 30.0)
    gone = Hosts(2, "shrink", 1, Replacements("never", 0.0, 2, 0))
    gone.replace({0: 0.0}, 0.0, 30.0)
    with pytest.raises(NoHostsLeft, match="only 0 node"):
        gone.replace({1: 10.0}, 10.0, 30.0)


def test_the_clock_reprices_a_placement_as_computed_by_hand(small_run):
    from checkfree.recovery import build_strategy
    from checkfree.simulation.clock import Clock

    cfg = small_run(network={"name": "single_cluster", "latency_s": 0.0, "bandwidth_Bps": 1e30},
                    trainer={"micro_batches": 8})
    clock = Clock.of(cfg, cfg.model, build_strategy(cfg.strategy, 4))
    cost = clock.cost
    # Per micro-batch, stage k's forward + backward: 6 x its matmul parameters x tokens / FLOP/s (no hops here).
    seconds = [compute_seconds(p, cost.tokens, cost.flops_per_s) for p in cost.body_params]
    seconds[-1] += compute_seconds(cost.head_params, cost.tokens, cost.flops_per_s)
    home = sum(seconds) + 7 * max(seconds)  # 1F1B: the path, then one bottleneck slot per further micro-batch
    merged = sum(seconds) + 7 * max(seconds[0], seconds[1] + seconds[2], seconds[3])  # stages 1 and 2 on host 1
    assert clock.iteration_s == pytest.approx(home, rel=1e-12)
    shrunk = Placement.of({0, 1, 3}, 4)
    clock.place(shrunk)
    assert clock.iteration_s == pytest.approx(merged, rel=1e-12) and clock.iteration_s > clock.home[0]
    clock.place(Placement.home(4))
    assert (clock.iteration_s, clock.sub_iteration_s, clock.link_busy, clock.stage_busy, clock.floor_bound) \
        == clock.home  # exactly back

    paper = Clock.of(small_run(trainer={"clock": "paper_table2", "paper_T": 500}, failure={"hourly_rate": 0.16}),
                  cfg.model, build_strategy(cfg.strategy, 4))
    c = [compute_seconds(p, paper.cost.tokens, paper.cost.flops_per_s) for p in paper.cost.body_params]
    c[-1] += compute_seconds(paper.cost.head_params, paper.cost.tokens, paper.cost.flops_per_s)
    ratio = max(c[0], c[1] + c[2], c[3]) / max(c)
    paper.place(shrunk)
    # The paper's measured CheckFree iteration at 16 %/h (its Table 2), scaled by the bottleneck host's share of
    # the compute (llama_500m's 24 layers as 4 x 6: the head makes the last stage the busiest alone, and two
    # middle stages on one host are ~1.5x its work).
    assert paper.sub_iteration_s == pytest.approx(paper.paper_s * ratio, rel=1e-12) and 1.45 < ratio < 1.55
    assert paper.iteration_s == pytest.approx(10_000 / 500 * paper.sub_iteration_s, rel=1e-12)
    a_move = {2: (1, 2)}
    assert paper.move_seconds(a_move) == pytest.approx(
        p2p_seconds(paper.cost.params[2] * 12, stage_link(paper.cost.network, 1, 2)), rel=1e-12)


def run_with(small_run, tmp_path, name, events, **sections):
    trace = write_trace(tmp_path / f"{name}.json", events)
    cfg = small_run(failure={"name": "trace", "path": trace, **sections.pop("failure", {})},
                    trainer={"iterations": 12, "eval_every": 4, **sections.pop("trainer", {})}, **sections)
    train(cfg, tmp_path / name)
    return json.loads((tmp_path / name / "summary.json").read_text()), read_metrics(tmp_path / name / "metrics.jsonl")


def test_wait_stalls_the_pipeline_until_the_node_arrives(small_run, tmp_path):
    events = [{"iteration": 3, "stage": 2}]
    now, _ = run_with(small_run, tmp_path, "now", events)
    waited, metrics = run_with(small_run, tmp_path, "waited", events,
                               failure={"replacement": "fixed", "replacement_mean_h": 0.5})
    assert losses(tmp_path / "now") == losses(tmp_path / "waited")  # the same training, only later
    assert waited["waiting_sim_s"] == pytest.approx(1800.0 - 30.0) and now["waiting_sim_s"] == 0.0
    assert waited["total_sim_time_s"] == pytest.approx(now["total_sim_time_s"] + 1770.0, rel=1e-12)
    # The same delay from a replacement trace (node 2's first replacement after 0.5 h).
    (tmp_path / "delays.csv").write_text("stage,delay_h\n2,0.5\n")
    traced, _ = run_with(small_run, tmp_path, "traced", events,
                         failure={"replacement": "trace", "replacement_path": str(tmp_path / "delays.csv")})
    assert traced["total_sim_time_s"] == waited["total_sim_time_s"]
    third = next(m for m in metrics if m["iteration"] == 3)
    assert third["waiting_sim_s"] == pytest.approx(1770.0) and third["hosts"] == [0, 1, 2, 3]
    assert all("hosts" not in m for m in read_metrics(tmp_path / "now" / "metrics.jsonl"))  # today's records
    # A budget that runs out while the pipeline waits: iteration 3 never finishes, and the run ends there.
    spent, metrics = run_with(small_run, tmp_path, "spent", events, trainer={"sim_time_budget_s": 500.0},
                              failure={"replacement": "fixed", "replacement_mean_h": 0.5})
    assert spent["status"] == "completed" and spent["iterations"] == 2 and [m["iteration"] for m in metrics] == [0, 1, 2]
    assert spent["total_sim_time_s"] > 500.0 and spent["waiting_sim_s"] == pytest.approx(1770.0)


def test_replacements_arrive_at_the_same_times_for_every_strategy_and_policy(small_run, tmp_path):
    """Poisson losses strike every strategy at the same simulated times; each node's j-th replacement is drawn
    from its own stream, so it arrives at the same time too, however the strategies' clocks differ."""
    arrivals = {}
    for strategy, policy in (("checkfree", "wait"), ("checkpoint", "wait"), ("checkfree", "shrink")):
        cfg = small_run(strategy={"name": strategy, "every": 4} if strategy == "checkpoint"
                        else {"name": strategy, "unrecoverable": "reinit"},
                        failure={"name": "poisson", "hourly_rate": 0.999, "replacement": "exponential",
                                 "replacement_mean_h": 0.05},
                        engine={"no_replacement": policy}, trainer={"iterations": 30, "eval_every": 10})
        summary = train(cfg, tmp_path / f"{strategy}-{policy}")
        arrivals[strategy, policy] = {(f["stage"], f["time_s"]): f["replaced_at_s"] for f in summary["failures"]}
    first = arrivals["checkfree", "wait"]
    assert len(first) >= 5 and sum(a - t > 30.0 for (_, t), a in first.items()) >= len(first) / 2  # drawn delays
    for other in arrivals.values():  # every loss both runs met, with its replacement at the same time
        common = first.keys() & other.keys()
        assert len(common) >= 3 and all(other[k] == first[k] for k in common)


def test_immediate_replacement_is_todays_run_under_either_policy(small_run, tmp_path):
    events = [{"iteration": 3, "stage": 2}, {"iteration": 6, "stage": 1}]
    run_with(small_run, tmp_path, "wait", events)
    run_with(small_run, tmp_path, "shrink", events, engine={"no_replacement": "shrink"})
    view = [deterministic_view(read_metrics(tmp_path / name / "metrics.jsonl")) for name in ("wait", "shrink")]
    assert view[0] == view[1] and len(view[0]) == 13 and view[0][3]["failed_stages"] == [2]


def test_shrink_keeps_training_on_a_neighbour_reprices_and_moves_the_stage_back(small_run, tmp_path):
    events = [{"iteration": 3, "stage": 2}]
    now, _ = run_with(small_run, tmp_path, "now", events)
    # 0.02 h = 72 s: the node is back a few iterations later (~19 s each, ~14 s on three hosts: this small run is
    # priced as llama_500m on the geo network, where a hop between two sites costs more than a stage's compute).
    shrunk, metrics = run_with(small_run, tmp_path, "shrunk", events, engine={"no_replacement": "shrink"},
                               failure={"replacement": "fixed", "replacement_mean_h": 0.02})
    assert losses(tmp_path / "now") == losses(tmp_path / "shrunk")  # where a stage runs never changes its math
    metrics = [m for m in metrics if m["iteration"] > 0]  # the records of the 12 iterations
    hosts = [m["hosts"] for m in metrics]
    shrunk_at = [i for i, h in enumerate(hosts) if h == [0, 1, 1, 3]]
    assert shrunk_at and shrunk_at[0] == 2 and hosts[-1] == [0, 1, 2, 3] and shrunk["min_live_hosts"] == 3
    moved = [m for m in metrics if m["moves"]]
    assert [m["moves"] for m in moved] == [[{"stage": 2, "from": 1, "to": 2}]]
    from checkfree.recovery import build_strategy
    from checkfree.simulation.clock import Clock

    cfg = small_run(failure={"name": "none"})
    clock = Clock.of(cfg, cfg.model, build_strategy(cfg.strategy, 4))
    assert moved[0]["moving_sim_s"] == pytest.approx(clock.move_seconds({2: (1, 2)}), rel=1e-12)
    assert moved[0]["moving_sim_s"] > 0
    home_s = clock.iteration_s
    clock.place(Placement.of({0, 1, 3}, 4))
    for i in shrunk_at[1:]:  # whole iterations on three hosts cost the re-priced time
        assert metrics[i]["iteration_sim_s"] == pytest.approx(clock.iteration_s, rel=1e-12)
    assert clock.iteration_s != home_s
    assert shrunk["shrunk_sim_s"] > 0 and shrunk["moving_sim_s"] == moved[0]["moving_sim_s"]


@pytest.mark.parametrize("override, message", [
    ({"engine": {"no_replacement": "shrink", "min_hosts": 5}}, r"^engine.min_hosts=5 is invalid: allowed is null or 1..4"),
    ({"engine": {"min_hosts": 2}}, r"^engine.min_hosts=2 is invalid: only engine.no_replacement=shrink reads it"),
    ({"failure": {"replacement": "exponential", "replacement_mean_h": -1.0}},
     r"^failure.replacement_mean_h=-1.0 is invalid: allowed a number of simulated hours > 0"),
    ({"failure": {"replacement": "fixed", "replacement_mean_h": 1e306}},
     r"^failure.replacement_mean_h=1e\+306 is invalid: allowed a number of simulated hours > 0 and at most 1e\+06"),
    ({"strategy": {"name": "snapshot_restore", "every": 9}},
     r"^strategy.every=9 is invalid: it is larger than the run \(trainer.iterations=8\)"),
    ({"strategy": {"name": "memory_checkpoint", "every": 2, "storage_every": 12}},
     r"^strategy.storage_every=12 is invalid: it is larger than the run"),
    ({"strategy": {"name": "async_checkpoint", "every": 100}}, r"^strategy.every=100 is invalid: it is larger"),
    ({"trainer": {"paper_recovery": "priced"}},
     r"^trainer.paper_recovery='priced' is invalid: only trainer.clock=paper_table2 reads it"),
    ({"failure": {"replacement": "immediate", "replacement_mean_h": 2.0}},
     r"^failure.replacement_mean_h=2.0 is invalid: only failure.replacement=fixed\|exponential reads it"),
    ({"failure": {"replacement": "never"}}, r"^failure.replacement=never with engine.no_replacement=wait would wait"),
    ({"failure": {"replacement": "sometimes"}}, r"^failure.replacement='sometimes' is invalid: allowed immediate, "),
    ({"failure": {"replacement": "trace"}}, r"^failure.replacement_path=None is invalid: failure.replacement=trace "
                                            r"needs it"),
    ({"failure": {"replacement_path": "r.json"}},
     r"^failure.replacement_path='r.json' is invalid: only failure.replacement=trace reads it"),
    ({"failure": {"replacement": "trace", "replacement_path": "/nonexistent/r.json"}},
     r"^failure.replacement_path=/nonexistent/r.json is invalid: no such file"),
    ({"engine": {"no_replacement": "shrink"}, "model": {"n_stages": 1}, "strategy": {"name": "checkpoint", "every": 4}},
     r"^engine.no_replacement='shrink' is invalid: a stage can only move to a neighbouring host"),
    ({"engine": {"name": "distributed", "replicas": 2, "no_replacement": "shrink"}},
     r"^engine.no_replacement='shrink' is invalid: a stage moves to a neighbour host only when its one node is "
     r"gone, and engine.replicas=2 keeps the stage on its surviving replicas instead; allowed here: wait"),
    ({"engine": {"replicas": 2, "no_replacement": "shrink"}},
     r"^engine.no_replacement='shrink' is invalid: a stage moves to a neighbour host only when its one node is "
     r"gone, and engine.replicas=2 keeps the stage"),
])
def test_bad_placement_input_is_refused_in_one_sentence(small_run, override, message):
    with pytest.raises(ConfigError, match=message):
        small_run(**override)


def test_a_process_lost_from_outside_counts_once_per_node_however_many_stages_it_ran(small_run, tmp_path):
    """One counting rule for n_failures: node slots. A drawn loss strikes a node; a process that dies from outside
    while it runs stages 1 and 2 (its neighbour's, under shrink) is one node lost, not two."""
    from checkfree.engine import StagesLost
    from checkfree.train import build_run

    trainer = build_run(small_run(), tmp_path / "run").trainer
    trainer.hosts.placement = Placement((0, 1, 1, 3))  # node 2 absent: stage 2 runs on node 1
    trainer.note_failures(StagesLost({1, 2}, "step"))
    trainer.note_failures(StagesLost({3}, "upkeep"))
    assert [(f["stage"], f.get("stages"), f["cause"]) for f in trainer.totals.failures] == [
        (1, [1, 2], "process exited during step"), (3, None, "process exited during upkeep")]
