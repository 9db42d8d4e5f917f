"""Nodes, not stages: R nodes a stage, a lost node is not a lost stage (checkfree.simulation.roster), the clock
re-prices a stage short of nodes, and the numbers a run reports about its nodes."""

from __future__ import annotations

import math

import pytest

from checkfree.analysis import load_runs
from checkfree.failure_models import build_failure_model
from checkfree.failure_models.base import FailureConfig, FailureEvent, Nodes
from checkfree.recovery import build_strategy
from checkfree.run.config import ConfigError
from checkfree.run.runlog import read_metrics
from checkfree.simulation.clock import Clock
from checkfree.simulation.replacements import Replacements
from checkfree.simulation.roster import Roster
from checkfree.train import build_run
from tests.processes import write_trace
from tests.test_reliability import same_weights, weights


def roster(resync=(10.0, 20.0, 30.0), mean_h=0.5) -> Roster:
    """3 stages x 2 nodes; every replacement comes ``mean_h`` hours after its loss."""
    return Roster(3, 2, Replacements("fixed", mean_h, 6, seed=0), resync, [100.0, 200.0, 300.0])


def test_a_lost_node_is_not_a_lost_stage_until_the_last_one_goes():
    r = roster()
    nodes, emptied = r.lose([FailureEvent(1, None, 100.0, 0)], floor_s=30.0)
    assert nodes == [(1, 0, 100.0)] and emptied == {}
    assert r.staff() == (2, 1, 2)
    assert r.next_join() == 100.0 + 1800.0 + 20.0  # arrives after 0.5 h, then copies stage 1's state (20 s)
    # Its other node goes while the first is away: now the stage is lost, and nobody can copy to the newcomers
    # until the strategy rebuilt it -- on the first node to arrive (replica 0's, at 1900 s; replica 1's at 2300 s).
    nodes, emptied = r.lose([FailureEvent(1, None, 500.0, 1)], floor_s=30.0)
    assert emptied == {1: 500.0} and r.staff() == (2, 0, 2) and r.next_join() is None
    assert r.first_arrival(1) == 1900.0
    r.rebuilt(1, 1930.0)
    assert r.staff() == (2, 1, 2)
    assert r.next_join() == 2300.0 + 20.0  # replica 1 arrives at 2300 s and copies the rebuilt state
    assert r.join(2319.0) == [] and r.join(2320.0) == [(1, 1)]
    assert r.staff() == (2, 2, 2) and r.resyncs == 1 and r.resynced_bytes == 200.0
    assert r.under_replicated_s == 2320.0 - 100.0  # short of a node from the first loss to the last join


def test_a_whole_stage_event_takes_every_node_and_a_lost_node_cannot_be_lost_again():
    r = roster()
    nodes, emptied = r.lose([FailureEvent(2, None, 50.0), FailureEvent(2, None, 60.0, 1)], floor_s=30.0)
    assert nodes == [(2, 0, 50.0), (2, 1, 50.0)] and emptied == {2: 50.0}
    assert r.short_s(80.0) == 30.0  # counted up to now while the stage is short


def test_a_loss_drawn_before_a_node_went_live_strikes_nothing():
    """Stage 0 lost whole at 0 s; its nodes come after 1 h and it is rebuilt then. A loss of replica 0 drawn for
    1,800 s (while the pipeline waited) struck a node that was not there: nothing is lost."""
    r = Roster(2, 2, Replacements("fixed", 1.0, 4, seed=0), [20.0, 20.0], [1.0, 1.0])
    assert r.lose([FailureEvent(0, None, 0.0)], floor_s=30.0)[1] == {0: 0.0}
    r.rebuilt(0, r.first_arrival(0))
    assert r.lose([FailureEvent(0, None, 1800.0, 0), FailureEvent(0, None, 1800.0, 1)], floor_s=30.0) == ([], {})
    assert r.staff() == (1, 2) and r.next_join() == 3600.0 + 20.0


def test_a_replacement_lost_while_it_copies_the_state_is_replaced_again():
    r = roster()
    r.lose([FailureEvent(1, None, 100.0, 0)], floor_s=30.0)  # arrives 1,900 s, joins 1,920 s
    nodes, emptied = r.lose([FailureEvent(1, None, 1910.0, 0)], floor_s=30.0)  # it had arrived, and goes
    assert nodes == [(1, 0, 1910.0)] and emptied == {}
    assert r.vacant[(1, 0)].lost_s == 100.0 and r.next_join() == 1910.0 + 1800.0 + 20.0
    assert r.lose([FailureEvent(1, None, 2000.0, 0)], floor_s=30.0) == ([], {})  # no node there now


def test_the_replacement_floor_is_a_node_s_start_up():
    r = Roster(2, 2, Replacements("immediate", 0.0, 4, seed=0), [5.0, 5.0], [1.0, 1.0])
    r.lose([FailureEvent(0, None, 10.0, 1)], floor_s=30.0)
    assert r.next_join() == 10.0 + 30.0 + 5.0


def test_a_stage_short_of_nodes_is_priced_by_its_share_of_the_work(small_run):
    """With R = 2 and stage 1 down to one node, stage 1 does twice its compute per micro-batch: on the paper's
    clock the iteration scales by the bottleneck's share -- max over stages of each stage's compute, stage 1's
    doubled -- against every node live; every node live again gives the run's own prices back, exactly."""
    cfg = small_run(engine={"replicas": 2}, network={"name": "single_cluster", "bandwidth_Bps": 1e12},
                    trainer={"clock": "paper_table2", "paper_T": 500})
    model = cfg.model.with_vocab(300)
    clock = Clock.of(cfg, model, build_strategy(cfg.strategy, 4))
    home = clock.sub_iteration_s
    cost = clock.cost
    # Matmul parameters per stage (the embedding is a gather); the head runs on the last stage.
    work = [*cost.body_params[:-1], cost.body_params[-1] + cost.head_params]
    short = [2 * w if k == 1 else w for k, w in enumerate(work)]
    clock.staff((2, 1, 2, 2))
    assert clock.sub_iteration_s == pytest.approx(home * max(short) / max(work), rel=1e-12)
    assert clock.sub_iteration_s > home
    clock.staff((2, 2, 2, 2))
    assert clock.sub_iteration_s == home and clock.load is None
    seconds, n_bytes = clock.resync(1)
    assert n_bytes == 12 * cost.params[1]  # fp32 weights + Adam's two moments, at llama_500m's size
    assert seconds == pytest.approx(1e-3 + n_bytes / 1e12)  # single_cluster's intra-site link


def _paper(small_run, tmp_path, events, replicas=2, **extra):
    return small_run(engine={"replicas": replicas},
                     failure={"name": "trace", "path": write_trace(tmp_path / "t.json", events)},
                     network={"name": "single_cluster", "bandwidth_Bps": 1e12},
                     trainer={"clock": "paper_table2", "paper_T": 500, "iterations": 6, "eval_every": 3}, **extra)


def test_a_lost_replica_changes_the_time_and_not_one_weight(small_run, tmp_path):
    """R = 2, stage 1's replica 0 lost 100 s into the run: the run trains exactly as without the loss (weights,
    losses), and its simulated time is longer by the lost sub-iteration's unfinished work plus, for the D
    seconds until the replacement joined (30 s start-up + the copy of the stage's state), the slower pipeline:
    D (1 - 1 / rho), rho the short pipeline's price over the full one's."""
    calm = build_run(small_run(engine={"replicas": 2}, network={"name": "single_cluster", "bandwidth_Bps": 1e12},
                               trainer={"clock": "paper_table2", "paper_T": 500, "iterations": 6, "eval_every": 3}),
                     tmp_path / "calm")
    calm_summary = calm.run()
    hit = build_run(_paper(small_run, tmp_path, [{"time_s": 100.0, "stage": 1, "replica": 0}]), tmp_path / "hit")
    summary = hit.run()
    assert same_weights(weights(calm), weights(hit))
    a, b = read_metrics(tmp_path / "calm" / "metrics.jsonl"), read_metrics(tmp_path / "hit" / "metrics.jsonl")
    assert [r.get("train_loss") for r in a] == [r.get("train_loss") for r in b] and len(a) == 7
    assert summary["final_val_loss"] == calm_summary["final_val_loss"]
    assert (summary["node_losses"], summary["stage_losses"], summary["n_recoveries"], summary["resyncs"]) == (1, 0, 0, 1)
    assert b[1]["lost_nodes"] == [[1, 0]] and b[1]["joined_nodes"] == [[1, 0]] and b[1]["staff"] == [2, 2, 2, 2]
    clock = hit.trainer.clock
    resync_s, resync_bytes = clock.resync(1)
    d = 30.0 + resync_s
    clock.staff((2, 1, 2, 2))
    rho = clock.sub_iteration_s / clock.home[1]
    clock.staff((2, 2, 2, 2))
    sub = clock.home[1]
    lost = 100.0 - math.floor(100.0 / sub) * sub
    assert summary["lost_work_sim_s"] == pytest.approx(lost)
    assert summary["total_sim_time_s"] == pytest.approx(calm_summary["total_sim_time_s"] + lost + d * (1 - 1 / rho),
                                                        rel=1e-12)
    assert summary["under_replicated_sim_s"] == pytest.approx(d)
    assert summary["resync_priced_bytes"] == resync_bytes
    assert summary["failures"] == [{"iteration": 1, "stage": 1, "replica": 0, "time_s": 100.0}]


def test_a_stage_is_rebuilt_when_its_last_node_goes(small_run, tmp_path):
    """Both nodes of stage 2 lost far apart (the first one's replacement joined in between: no stage loss), then
    both together: one CheckFree rebuild, on one node, and the other node copies the rebuilt state."""
    events = [{"time_s": 50.0, "stage": 2, "replica": 1}, {"time_s": 3000.0, "stage": 2, "replica": 0},
              {"time_s": 6000.0, "stage": 2, "replica": 0}, {"time_s": 6001.0, "stage": 2, "replica": 1},
              {"time_s": 6500.0, "stage": 1}]
    run = build_run(_paper(small_run, tmp_path, events), tmp_path / "run")
    summary = run.run()
    assert summary["node_losses"] == 6 and summary["stage_losses"] == 2 and summary["adjacent_stage_losses"] == 0
    assert [(r["stage"], r["method"]) for r in summary["recoveries"]] == [(2, "average"), (1, "average")]
    lost = [f for f in summary["failures"] if f.get("stage_lost")]
    assert [(f["stage"], f["replica"]) for f in lost] == [(2, 1), (1, 1)]  # the node whose loss emptied it
    # Four replacements copied a state: the two lone losses', and one of each rebuilt stage's two nodes.
    assert summary["resyncs"] == 4
    [row] = load_runs([tmp_path / "run"]).to_dict("records")  # the analysis tables carry the node counts
    assert (row["replicas"], row["node_losses"], row["stage_losses"], row["adjacent_stage_losses"],
            row["resyncs"]) == (2, 6, 2, 0, 4)


def test_two_neighbouring_stages_emptied_together_are_counted(small_run, tmp_path):
    run = build_run(_paper(small_run, tmp_path, [{"time_s": 500.0, "stage": 1}, {"time_s": 510.0, "stage": 2}]),
                    tmp_path / "run")
    summary = run.run()
    assert (summary["stage_losses"], summary["adjacent_stage_losses"], summary["node_losses"]) == (2, 1, 4)


def test_one_node_a_stage_counts_nodes_as_stages(small_run, tmp_path):
    run = build_run(_paper(small_run, tmp_path, [{"time_s": 500.0, "stage": 1}, {"time_s": 510.0, "stage": 2}],
                           replicas=1), tmp_path / "run")
    summary = run.run()
    assert (summary["replicas"], summary["node_losses"], summary["stage_losses"], summary["adjacent_stage_losses"],
            summary["resyncs"]) == (1, 2, 2, 1, 0)


def test_poisson_per_node_with_one_node_a_stage_draws_what_per_stage_does():
    per_stage = build_failure_model(FailureConfig(hourly_rate=0.5), 4, seed=7)
    per_node = build_failure_model(FailureConfig(hourly_rate=0.5, unit="node"), 4, seed=7, nodes=Nodes(1))
    a, b = per_stage.events(1, 0.0, 50 * 3600.0), per_node.events(1, 0.0, 50 * 3600.0)
    assert len(a) > 20 and [(e.stage, e.time_s) for e in a] == [(e.stage, e.time_s) for e in b]
    assert {e.replica for e in a} == {None} and {e.replica for e in b} == {0}
    two = build_failure_model(FailureConfig(hourly_rate=0.5, unit="node"), 4, seed=7, nodes=Nodes(2))
    c = two.events(1, 0.0, 50 * 3600.0)
    assert [(e.stage, e.time_s) for e in c if e.replica == 0] == [(e.stage, e.time_s) for e in a]
    assert 0.5 < sum(e.replica == 1 for e in c) / len(a) < 2.0  # replica 1: its own stream at the same rate


@pytest.mark.parametrize("override, message", [
    ({"failure": {"unit": "rack"}}, r"^failure.unit='rack' is invalid: allowed stage, node"),
    ({"failure": {"name": "bernoulli", "p": 0.1, "unit": "node"}},
     r"^failure.unit='node' is invalid: only failure=poisson draws per node"),
    ({"failure": {"format": "bamboo"}}, r"^failure.format='bamboo' is invalid: only failure=churn reads"),
])
def test_bad_node_settings_are_refused_in_one_sentence(small_run, override, message):
    with pytest.raises(ConfigError, match=message):
        small_run(**override)


def test_a_traced_replica_out_of_range_is_refused(small_run, tmp_path):
    with pytest.raises(ConfigError, match=r"record 0 has replica 2, which is out of range: allowed 0..1 "
                                          r"\(engine.replicas=2\)"):
        _paper(small_run, tmp_path, [{"time_s": 1.0, "stage": 1, "replica": 2}])


def test_spread_replicas_make_a_location_s_failure_take_one_replica_of_two_stages():
    """7 stages x 2 on the geo network: same_zone keeps both replicas of stage k at location k, so a location's
    failure takes the stage whole; spread puts replica 1 of stage k at location k + 1, so it takes replica 0 of
    one stage and replica 1 of the stage before it, and no stage."""
    same = build_failure_model(FailureConfig(name="zone", hourly_rate=0.5), 7, seed=0, nodes=Nodes(2))
    spread = build_failure_model(FailureConfig(name="zone", hourly_rate=0.5), 7, seed=0, nodes=Nodes(2, True))
    a, b = same.events(1, 0.0, 5 * 3600.0), spread.events(1, 0.0, 5 * 3600.0)
    assert len(a) > 3 and {e.replica for e in a} == {None}  # whole stages, as with one node a stage
    moments: dict[float, set] = {}
    for e in b:
        moments.setdefault(e.time_s, set()).add((e.stage, e.replica))
    for t, struck in moments.items():
        [z] = {e.stage for e in a if e.time_s == t}  # the same location fails at the same moment
        assert struck == {(z, 0), ((z - 1) % 7, 1)}


def test_spread_replicas_all_reduce_and_re_sync_over_their_slowest_link(small_run):
    """Spread, stage 0's replicas run in Australia and Belgium: the ring all-reduce of each stage's gradients
    (2 (W-1)/W bytes / bandwidth + 2 (W-1) latencies) runs over the link between its replicas' sites, a new
    replica copies the state over it, and the paper clock's measured iteration gets what that adds over an
    all-reduce within one site."""
    from checkfree.simulation.cost import ring_allreduce_seconds
    from checkfree.simulation.networks import stage_link

    same = small_run(engine={"replicas": 2}, trainer={"clock": "paper_table2", "paper_T": 500})
    spread = small_run(engine={"replicas": 2, "replica_placement": "spread"},
                       trainer={"clock": "paper_table2", "paper_T": 500})
    model = same.model.with_vocab(300)
    a = Clock.of(same, model, build_strategy(same.strategy, 4))
    b = Clock.of(spread, model, build_strategy(spread.strategy, 4))
    cost = b.cost
    link = stage_link(cost.network, 0, 1)
    assert cost.replica_link(0) == link and a.cost.replica_link(0) == stage_link(cost.network, 0, 0)
    ring = [ring_allreduce_seconds(p * cost.network.dtype_bytes, 2, cost.replica_link(k))
            for k, p in enumerate(cost.params)]
    assert cost.allreduce_seconds() == max(ring)
    assert b.sub_iteration_s == pytest.approx(a.sub_iteration_s + cost.allreduce_seconds()
                                              - a.cost.allreduce_seconds(), rel=1e-12)
    assert b.resync(0)[0] == pytest.approx(link.latency_s + cost.stage_bytes(0, True) / link.bandwidth_Bps)


@pytest.mark.parametrize("override, message", [
    ({"engine": {"replica_placement": "spread"}}, r"^engine.replica_placement='spread' is invalid: it places a "
                                                   r"stage's replicas at different locations, and engine.replicas=1"),
    ({"engine": {"replicas": 2, "replica_placement": "spread"}, "network": {"name": "single_cluster"}},
     r"^engine.replica_placement='spread' is invalid: network=single_cluster is one site"),
    ({"engine": {"replica_placement": "apart"}}, r"^engine.replica_placement='apart' is invalid: allowed same_zone or "
                                                  r"spread"),
])
def test_bad_replica_placements_are_refused_in_one_sentence(small_run, override, message):
    with pytest.raises(ConfigError, match=message):
        small_run(**override)


def test_a_replica_due_back_while_the_pipeline_recovers_another_stage_joins_at_its_own_time(small_run, tmp_path,
                                                                                            monkeypatch):
    """Replica 0 of stage 1 lost at 100 s comes back 30 s later and copies its state over a 10 MB/s link (its
    join due at 130 s + the copy, 121 s); stage 2 is lost whole at 240 s and recovered in 30 s, the join due inside
    that recovery. The
    replica joins at its own time, inside the recovery: the run's time never runs back, and the stage was short
    of a node for exactly the start-up and the copy."""
    cfg = small_run(engine={"replicas": 2},
                    failure={"name": "trace", "path": write_trace(tmp_path / "t.json", [
                        {"time_s": 100.0, "stage": 1, "replica": 0}, {"time_s": 240.0, "stage": 2}])},
                    network={"name": "single_cluster", "bandwidth_Bps": 1e7},
                    trainer={"clock": "paper_table2", "paper_T": 500, "iterations": 3, "eval_every": 3})
    from checkfree.simulation.ledger import Work

    reached, reach = [], Work.reach
    monkeypatch.setattr(Work, "reach", lambda work, stop: (reached.append((work.t, stop)), reach(work, stop))[1])
    run = build_run(cfg, tmp_path / "run")
    copy_s = run.trainer.clock.resync(1)[0]
    assert 240.0 < 130.0 + copy_s < 270.0  # due inside the recovery of stage 2
    summary = run.run()
    assert reached and all(stop >= t for t, stop in reached)
    assert summary["status"] == "completed" and (summary["node_losses"], summary["stage_losses"]) == (3, 1)
    assert summary["under_replicated_sim_s"] == pytest.approx(30.0 + copy_s + 30.0 + copy_s)  # stage 2's too
