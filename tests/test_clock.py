"""The simulated clock at the granularity it stands for: every loss counts, an interrupted iteration charges the
work it threw away, a rollback discards this iteration's work too, and every strategy meets the same events."""

from __future__ import annotations

import pytest

from checkfree.model.presets import preset, stage_param_counts
from checkfree.run.runlog import read_metrics
from checkfree.simulation.clock import Clock, priced_as
from checkfree.simulation.paper_table2 import ITERATION_S as TABLE2_ITERATION_S
from checkfree.train import train
from tests.processes import write_trace

RECOVERY_S = 30.0  # the paper clock's recovery


def trace(tmp_path, events: list[dict]) -> str:
    return write_trace(tmp_path / "trace.json", events)


def paper_run(small_run, tmp_path, events, strategy="checkfree", iterations=2, **strategy_keys):
    """A paper-clock run where one CPU iteration stands for 10,000 / 500 = 20 paper iterations."""
    return small_run(strategy={"name": strategy, **strategy_keys},
                     failure={"name": "trace", "path": trace(tmp_path, events), "hourly_rate": 0.10},
                     trainer={"clock": "paper_table2", "paper_T": 500, "iterations": iterations,
                              "eval_every": iterations})


def test_one_stage_lost_twice_ten_paper_minutes_apart_inside_one_cpu_iteration(small_run, tmp_path):
    p = TABLE2_ITERATION_S["checkfree"][1]  # 91.32 s: a paper iteration of CheckFree at 10 %/h
    work = 20 * p
    cfg = paper_run(small_run, tmp_path, [{"time_s": 100.0, "stage": 2}, {"time_s": 700.0, "stage": 2}])
    summary = train(cfg, tmp_path / "run")
    [first, _] = read_metrics(tmp_path / "run" / "metrics.jsonl")[1:]
    # Lost at 100 s: one paper iteration (91.32 s) is done and kept, the next is 8.68 s in and thrown away.
    # The work resumes at 130 s (after a 30 s recovery) with 91.32 s done; lost again at 700 s, 91.32 + 570
    # = 661.32 s of work: 7 paper iterations kept (639.24 s), 22.08 s thrown away.
    lost = (100.0 - p) + (p + 570.0 - 7 * p)
    assert lost == pytest.approx(8.68 + 22.08)
    assert [r["stage"] for r in first["recoveries"]] == [2, 2]
    assert first["failure_times_s"] == [100.0, 700.0]
    assert first["lost_work_sim_s"] == pytest.approx(lost, abs=1e-9)
    assert first["recovery_sim_s"] == 2 * RECOVERY_S
    assert first["sim_time_s"] == pytest.approx(work + lost + 2 * RECOVERY_S, abs=1e-9)
    assert summary["n_failures"] == summary["n_recoveries"] == 2
    assert summary["lost_work_sim_s"] == pytest.approx(lost, abs=1e-9)
    assert summary["total_sim_time_s"] == pytest.approx(2 * work + lost + 2 * RECOVERY_S, abs=1e-9)


def test_where_a_loss_falls_inside_an_iteration_is_charged(small_run, tmp_path):
    """0.5 s and 23 s into a 60 s iteration (an iteration stands for itself): the same recovery and the same
    losses, 0.5 s against 23 s of thrown-away work on the clock."""
    runs = {}
    for at in (0.5, 23.0):
        cfg = small_run(failure={"name": "trace", "path": trace(tmp_path, [{"time_s": 60.0 + at, "stage": 1}]),
                                 "iteration_seconds": 60.0},
                        trainer={"clock": "fixed", "iterations": 3, "eval_every": 3})
        runs[at] = train(cfg, tmp_path / f"at{at}")
        records = read_metrics(tmp_path / f"at{at}" / "metrics.jsonl")
        assert records[2]["lost_work_sim_s"] == at and records[1]["lost_work_sim_s"] == 0.0
        runs[at]["losses"] = [r["train_loss"] for r in records[1:]]
    assert runs[0.5]["losses"] == runs[23.0]["losses"]
    assert runs[23.0]["total_sim_time_s"] - runs[0.5]["total_sim_time_s"] == pytest.approx(22.5, abs=1e-9)
    recovery = runs[0.5]["recovery_sim_s"]
    assert runs[0.5]["total_sim_time_s"] == pytest.approx(3 * 60.0 + 0.5 + recovery, abs=1e-9)


def test_a_rollback_throws_away_the_iterations_work_before_the_loss(small_run, tmp_path):
    """Checkpointing every 2 CPU iterations (40 paper iterations): lost 500 s into iteration 3, everything
    this iteration did goes with the rollback (500 s, not the 500 - 5 x 91.35 s of one unfinished paper
    iteration), and a second loss 300 s after the restart throws away those 300 s again."""
    p = TABLE2_ITERATION_S["checkpointing"][1]
    work = 20 * p
    events = [{"time_s": 2 * work + 500.0, "stage": 1}, {"time_s": 2 * work + 500.0 + 30.0 + 300.0, "stage": 3}]
    summary = train(paper_run(small_run, tmp_path, events, strategy="checkpoint", iterations=3, every=2),
                    tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    third = records[3]
    assert [r["method"] for r in third["recoveries"]] == ["rollback", "rollback"]
    assert [r["details"]["checkpoint"] for r in third["recoveries"]] == ["ckpt_0000002"] * 2
    assert third["lost_work_sim_s"] == pytest.approx(500.0 + 300.0, abs=1e-9)
    assert third["sim_time_s"] == pytest.approx(3 * work + 800.0 + 2 * RECOVERY_S, abs=1e-9)
    assert summary["lost_iterations"] == 0  # the checkpoint was taken at the end of iteration 2
    assert summary["recoveries"][0]["checkpoint"] == "ckpt_0000002"


def test_every_strategy_meets_the_same_poisson_events(small_run, tmp_path):
    """At one seed, checkpointing and redundant computation (iterations of 91 vs 151 paper seconds) meet the
    same losses at the same simulated times, however their iterations slice the time."""
    events = {}
    for strategy in ("checkpoint", "redundant"):
        cfg = small_run(strategy={"name": strategy, "unrecoverable": "reinit", "every": 2},
                        failure={"name": "poisson", "hourly_rate": 0.16, "stages": "all"},
                        trainer={"clock": "paper_table2", "paper_T": 100, "iterations": 12, "eval_every": 12})
        summary = train(cfg, tmp_path / strategy)
        events[strategy] = ([(f["time_s"], f["stage"]) for f in summary["failures"]], summary["total_sim_time_s"])
    horizon = min(end for _, end in events.values())
    common = {s: [e for e in ev if e[0] < horizon] for s, (ev, _) in events.items()}
    assert len(common["checkpoint"]) >= 5
    assert common["checkpoint"] == common["redundant"]


@pytest.mark.parametrize("n_stages,layers", [(6, 4), (8, 3), (12, 2)])
def test_the_clock_preset_is_priced_with_the_runs_number_of_stages(n_stages, layers):
    priced = priced_as(preset("llama_500m"), n_stages)
    assert (priced.n_stages, priced.layers_per_stage, priced.d_model) == (n_stages, layers, 1024)
    assert len(stage_param_counts(priced)) == n_stages


def test_a_twelve_stage_run_with_failures_completes(small_run, tmp_path):
    """The reference now runs its 500M and 1.5B models as 12 stages x 2 layers; a loss of stage >= 6 once
    crashed the default clock (priced with llama_500m's 6 stages)."""
    model = {"name": "tiny", "n_stages": 12, "layers_per_stage": 1, "d_model": 32, "n_heads": 2, "seq_len": 32}
    events = [{"iteration": 2, "stage": 7}, {"iteration": 3, "stage": 11}, {"iteration": 4, "stage": 0}]
    summary = train(small_run(model=model, strategy={"name": "checkfree_plus"},
                              failure={"name": "trace", "path": trace(tmp_path, events)},
                              trainer={"iterations": 5, "eval_every": 5}), tmp_path / "run")
    assert summary["status"] == "completed"
    assert [r["stage"] for r in summary["recoveries"]] == [7, 11, 0]
    clock_cfg = small_run(model=model)
    from checkfree.recovery import build_strategy

    clock = Clock.of(clock_cfg, clock_cfg.model.with_vocab(300), build_strategy(clock_cfg.strategy, 12))
    assert len(clock.byte_scale) == 12


def test_paper_recovery_priced_charges_the_bytes_a_recovery_moves(small_run):
    """trainer.paper_recovery=priced: on the paper clock a recovery costs the replacement delay plus its bytes
    (at the clock preset's size) over the link, instead of the paper's flat 30 s."""
    from checkfree.plan import STATE, RecoveryReport, Transfer
    from checkfree.recovery import build_strategy

    cfg = small_run(strategy={"name": "snapshot_restore", "every": 4},
                    network={"name": "single_cluster", "bandwidth_Bps": 1e7, "latency_s": 0.0},
                    trainer={"clock": "paper_table2", "paper_T": 500, "paper_recovery": "priced"})
    model = cfg.model.with_vocab(300)
    clock = Clock.of(cfg, model, build_strategy(cfg.strategy, model.n_stages))
    # Stage 2's snapshot (its whole state), held by stage 3's node, sent to the replacement.
    report = RecoveryReport(2, "snapshot_restore", "snapshot", [3], [1.0], bytes_moved=100_000,
                            transfers=[Transfer(3, 2, STATE, 100_000)])
    scaled = int(100_000 * clock.byte_scale[2])  # the tiny stage's bytes as llama_500m's stage would have them
    assert clock.recovery_seconds(report) == pytest.approx(30.0 + scaled / 1e7)
    assert scaled / 1e7 > 60  # a minute of transfer on top of the delay: far from the flat 30 s
    measured = small_run(strategy={"name": "snapshot_restore", "every": 4},
                         trainer={"clock": "paper_table2", "paper_T": 500})
    assert Clock.of(measured, model, build_strategy(measured.strategy, model.n_stages)).recovery_seconds(report) == 30.0


def test_the_pipeline_s_own_traffic_is_the_busiest_node_sending_activations_and_gradients(small_run):
    """A middle stage sends each micro-batch's activations forward and its gradient back: 2 M hops of
    ``latency + bytes / bandwidth``; an edge stage sends M. The busiest node sets the figure."""
    from checkfree.recovery import build_strategy

    cfg = small_run(network={"name": "single_cluster", "bandwidth_Bps": 1e8, "latency_s": 0.01})
    clock = Clock.of(cfg, cfg.model.with_vocab(300), build_strategy(cfg.strategy, 4))
    act = 16 * 1024 * 1024 * 2  # llama_500m's micro-batch of 16 x 1024 tokens x d=1024, bf16 on the wire
    assert clock.cost.act_bytes == act
    assert clock.cost.pipeline_busy_seconds() == pytest.approx(2 * 2 * (0.01 + act / 1e8))
    # CheckFree+'s swapped route (1, 0, 2, 3 ... on odd micro-batches) still has the busiest node send two
    # messages per micro-batch.
    assert clock.cost.pipeline_busy_seconds("out_of_order") == pytest.approx(2 * 2 * (0.01 + act / 1e8))


def test_on_a_slow_link_the_paper_s_iteration_takes_as_long_as_its_activations_need(small_run):
    """paper_table2: the paper's measured time, or the busiest interface's share of its own pipeline traffic,
    whichever is longer; background copies get the part of the iteration the pipeline leaves them."""
    from checkfree.recovery import build_strategy

    def clock_at(bandwidth):
        cfg = small_run(network={"name": "single_cluster", "bandwidth_Bps": bandwidth, "latency_s": 0.0},
                        trainer={"clock": "paper_table2", "paper_T": 500})
        return Clock.of(cfg, cfg.model.with_vocab(300), build_strategy(cfg.strategy, 4))

    act = 16 * 1024 * 1024 * 2
    fast, slow = clock_at(1e8), clock_at(1.25e6)  # 800 Mb/s, 10 Mb/s
    paper = TABLE2_ITERATION_S["checkfree"][0]  # the paper's CheckFree iteration at failure.hourly_rate 5 %
    assert fast.sub_iteration_s == pytest.approx(paper)
    assert fast.link_busy == pytest.approx(4 * act / 1e8 / paper)
    assert fast.background_window(3) == pytest.approx(3 * 20 * paper * (1 - 4 * act / 1e8 / paper))
    # At 10 Mb/s four 33.6 MB messages take 107.4 s, longer than the paper's 94 s: the link sets the time,
    # and nothing is left for background copies (each is paid as a stall, and every: auto copies every time).
    assert slow.sub_iteration_s == pytest.approx(4 * act / 1.25e6) == pytest.approx(107.37, abs=0.01)
    assert slow.iteration_s == pytest.approx(20 * slow.sub_iteration_s)
    assert (slow.link_busy, slow.background_window(5)) == (1.0, 0.0)
    from checkfree.simulation.cost import sustained_period

    assert sustained_period(800.0, slow.background_window()) == 1


# --- bytes at their own stage's size (llama_500m cut into cpu_sweep's 6 stages, 10 Mb/s) ---------------------

def llama_500m_clock(small_run, strategy: str = "snapshot_restore", bandwidth: float = 1.25e6,
                     storage: float | None = None):
    """The Table 2 regime's model (6 stages x 1 block, d=64, pydocs' 1,024 tokens) priced as llama_500m on a
    single-cluster network of ``bandwidth`` (10 Mb/s by default; ``storage``: its storage link, the network's
    own by default), on the paper clock with priced recoveries."""
    from checkfree.recovery import build_strategy

    cfg = small_run(model={"name": "cpu_sweep", "n_stages": 6, "layers_per_stage": 1, "d_model": 64, "n_heads": 4,
                           "seq_len": 64},
                    strategy={"name": strategy, **({"every": 4} if strategy in ("snapshot_restore", "async_checkpoint") else {})},
                    network={"name": "single_cluster", "bandwidth_Bps": bandwidth, "latency_s": 0.0,
                             **({} if storage is None else {"storage_bandwidth_Bps": storage})},
                    trainer={"clock": "paper_table2", "paper_T": 486, "paper_recovery": "priced"})
    model = cfg.model.with_vocab(1024)
    return Clock.of(cfg, model, build_strategy(cfg.strategy, 6)), stage_param_counts(model)


def test_every_copy_is_priced_at_its_own_stage_s_size(small_run):
    """llama_500m in 6 stages: an edge stage's state (weights + Adam, 12 B/param) is 1.199 GB, a middle one's
    805 MB; at 10 Mb/s the edge's copy takes 959 s to send, not the 1,288 s of a middle stage's scale."""
    from checkfree.plan import EDGES, STATE, Traffic

    clock, trained = llama_500m_clock(small_run)
    edge, middle = 12 * trained[0], 12 * trained[1]  # the trained stages' states, in bytes
    traffic = Traffic(background={(0, 1): edge, (2, 3): middle}, holds={(0, 1): STATE, (2, 3): STATE})
    assert clock.copy_bytes((0, 1), edge, traffic) == pytest.approx(1_198_620_672, rel=1e-9)
    assert clock.copy_bytes((2, 3), middle, traffic) == pytest.approx(805_404_672, rel=1e-9)
    assert clock.cost.background_seconds({(0, 1): 1_198_620_672}, {0: 0.0}) == pytest.approx(
        1_198_620_672 / 16e9 + 958.9, abs=0.1)
    # A replica holds its owner's (de)embedding alone: 1,024 x 64 fp32 weights scale to llama_500m's
    # 32,000 x 1,024 (131 MB), not to the whole edge stage's 761x.
    embedding = 4 * 1024 * 64
    assert clock.copy_bytes((0, 1), embedding, Traffic(holds={(0, 1): EDGES})) == 4 * 32_000 * 1024


def test_a_background_copy_hides_in_its_own_node_s_free_link_time(small_run):
    """At 10 Mb/s the pipeline's activations fill a middle node's link (the iteration is the activations'
    floor), while an edge node sends only half as much: the edge's 1.2 GB snapshot hides in its idle half of the
    iteration (the stall is its host copy), the middle stage's 805 MB does not (host copy + its whole send)."""
    from checkfree.plan import STATE, Traffic

    clock, trained = llama_500m_clock(small_run)
    assert clock.floor_bound and clock.stage_busy == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5] and clock.link_busy == 1.0
    assert clock.background_window(1, 0) == pytest.approx(0.5 * clock.iteration_s)
    assert clock.background_window(1, 0) > 959 and clock.background_window(1, 2) == 0.0
    edge_only = Traffic(background={(0, 1): 12 * trained[0]}, holds={(0, 1): STATE})
    assert clock.upkeep_seconds(edge_only) == pytest.approx(1_198_620_672 / 16e9, rel=1e-6)
    middle = Traffic(background={(2, 3): 12 * trained[2]}, holds={(2, 3): STATE})
    assert clock.upkeep_seconds(middle) == pytest.approx(805_404_672 / 16e9 + 805_404_672 / 1.25e6, rel=1e-6)


def test_an_asynchronous_checkpoint_is_persisted_when_its_slowest_stage_s_shard_is(small_run):
    """56 Mb/s to peers and to storage: each stage flushes its own shard (an edge's 1.199 GB, a middle one's
    805 MB) with the share of its own interface the pipeline leaves it (an edge node carries half a middle one's
    activations); the edge's flush sets it, 191 s, not a middle stage's scale at the busiest node's share (291 s)."""
    from checkfree.plan import Traffic

    clock, trained = llama_500m_clock(small_run, "async_checkpoint", bandwidth=7e6, storage=7e6)
    busy = clock.stage_busy
    assert busy[0] == busy[5] == pytest.approx(busy[1] / 2) and busy[1:5] == [busy[1]] * 4 and 0 < busy[1] < 1
    shards = Traffic(shard_bytes=[12 * p for p in trained], shards_in_background=True)
    assert clock.shard_bytes(shards) == [1_198_620_672, *[805_404_672] * 4, 1_198_632_960]
    latency = clock.cost.network.storage_latency_s
    edge = 1_198_632_960 / 16e9 + (latency + 1_198_632_960 / 7e6) / (1 - busy[5])
    middle = 805_404_672 / 16e9 + (latency + 805_404_672 / 7e6) / (1 - busy[1])
    assert clock.flush_seconds(shards) == pytest.approx(edge, rel=1e-9) and edge > middle
    assert edge == pytest.approx(191.4, abs=0.1)


def test_replica_refreshes_are_priced_where_no_measured_time_holds_them(small_run):
    """The paper's measured iterations include CheckFree+'s replica refreshes; on a link so slow that the
    activations set the iteration, they are priced: the embedding's 131 MB at 10 Mb/s, 104.9 s."""
    from checkfree.plan import EDGES, Traffic

    slow, _ = llama_500m_clock(small_run, "checkfree_plus")
    fast, _ = llama_500m_clock(small_run, "checkfree_plus", bandwidth=1e9)
    sync = Traffic(sent={(0, 1): 4 * 1024 * 64, (5, 4): 4 * (1024 * 64 + 64)}, holds={(0, 1): EDGES, (5, 4): EDGES})
    assert not fast.floor_bound and fast.upkeep_seconds(sync) == 0.0
    assert slow.upkeep_seconds(sync) == pytest.approx(4 * (32_000 * 1024 + 1024) / 1.25e6)  # the head's, larger


def test_a_recovery_prices_each_piece_at_its_size_on_its_own_link(small_run):
    """snapshot_restore rebuilding stage 1: its snapshot (805 MB) from stage 2's node and the embedding replica it
    held (131 MB) made anew by stage 0, in parallel: the delay + the slower, 644 s. A rollback downloads every
    shard at its own stage's size in parallel: the edge's 1.199 GB sets it."""
    from checkfree.plan import EDGES, STATE, RecoveryReport, Transfer

    clock, trained = llama_500m_clock(small_run)
    delay = clock.cost.network.replacement_delay_s
    rebuild = RecoveryReport(1, "snapshot_restore", "snapshot", [2], [1.0], 0,
                             transfers=[Transfer(2, 1, STATE, 12 * trained[1]), Transfer(0, 0, EDGES, 4 * 1024 * 64)])
    assert clock.recovery_seconds(rebuild) == pytest.approx(delay + 805_404_672 / 1.25e6, rel=1e-6)
    rollback = RecoveryReport(2, "checkpoint", "rollback", [], [], 12 * trained[2], from_storage=True,
                              details={"shard_bytes": [12 * p for p in trained]})
    storage = clock.cost.network
    assert clock.recovery_seconds(rollback) == pytest.approx(
        delay + storage.storage_latency_s + 1_198_632_960 / storage.storage_bandwidth_Bps, rel=1e-6)


def test_bytes_moved_are_counted_at_the_priced_size_once_each(small_run):
    """The run's moved bytes at llama_500m's size: a background snapshot of an edge (1.199 GB) and a middle
    stage (805 MB) and an int8 one of a middle stage (67.1 MB, its encoding's byte a parameter); a rebuild
    receiving a middle stage's state (805 MB) and a replica (131 MB); a rollback that lost two stages downloads
    all six shards once (2 x 1.199 GB + 4 x 805 MB), though both lost stages' reports name them."""
    from checkfree.plan import EDGES, INT8, STATE, WEIGHTS, RecoveryReport, Traffic, Transfer

    clock, trained = llama_500m_clock(small_run)
    assert clock.moved_bytes == 0.0
    clock.upkeep_seconds(Traffic(background={(0, 1): 12 * trained[0], (2, 3): 12 * trained[2], (3, 4): 999},
                                 holds={(0, 1): STATE, (2, 3): STATE, (3, 4): WEIGHTS}, encodings={(3, 4): INT8}))
    assert clock.moved_bytes == pytest.approx(1_198_620_672 + 805_404_672 + 805_404_672 / 12, rel=1e-9)
    before = clock.moved_bytes
    clock.count_recovery([RecoveryReport(1, "snapshot_restore", "snapshot", [2], [1.0], 0, transfers=[
        Transfer(2, 1, STATE, 12 * trained[1]), Transfer(0, 0, EDGES, 4 * 1024 * 64)])])
    assert clock.moved_bytes - before == pytest.approx(805_404_672 + 4 * 32_000 * 1024, rel=1e-9)
    before = clock.moved_bytes
    shards = {"shard_bytes": [12 * p for p in trained]}
    clock.count_recovery([RecoveryReport(k, "checkpoint", "rollback", [], [], 12 * trained[k], from_storage=True,
                                         details=shards) for k in (2, 3)])
    assert clock.moved_bytes - before == pytest.approx(2 * 1_198_632_960 + 4 * 805_404_672, rel=1e-5)


def test_held_memory_at_the_priced_size_from_each_copy_s_kind(small_run):
    """llama_500m in 6 stages: a snapshot of a middle stage is its 805 MB state, in int8 its 67.1 MB of weights
    (one byte a parameter), in bf16 134 MB; a replica is the embedding's 131 MB; a background checkpoint's host
    buffer is each node's own state."""
    from checkfree.plan import REPLICA, SNAPSHOT, SNAPSHOT_BF16, SNAPSHOT_INT8, Held

    clock, _ = llama_500m_clock(small_run)
    middle = clock.cost.params[2]
    assert clock.held_copy_bytes(Held(SNAPSHOT, 2, 3)) == 12 * middle == 805_404_672
    assert clock.held_copy_bytes(Held(SNAPSHOT_INT8, 2, 3)) == middle
    assert clock.held_copy_bytes(Held(SNAPSHOT_BF16, 2, 3)) == 2 * middle
    assert clock.held_copy_bytes(Held(REPLICA, 0, 1)) == 4 * 32_000 * 1024
    per_node = clock.memory_per_node([Held(SNAPSHOT_INT8, 2, 3), Held(REPLICA, 0, 1)], staging=False)
    assert per_node == [0.0, 4 * 32_000 * 1024, 0.0, middle, 0.0, 0.0]
    staged = clock.memory_per_node([], staging=True)
    assert staged[2] == 805_404_672 and staged[0] == pytest.approx(1_198_620_672, rel=1e-5)


@pytest.mark.parametrize("strategy", ["checkfree_plus", "checkfree_plus_fit", "snapshot_restore", "memory_checkpoint", "redundant",
                                      "async_checkpoint", "compressed_snapshot"])
def test_priced_memory_at_the_trained_size_is_what_the_nodes_really_hold(strategy, small_run, tmp_path):
    """Priced at the trained model's own size (no clock preset), the memory the clock says each node holds for
    others is what the engine measured on it, within the optimizer's step counters (a few bytes a tensor)."""
    extra = {"compressed_snapshot": {"encoding": "bf16"}}.get(strategy, {})
    periodic = ("snapshot_restore", "memory_checkpoint", "async_checkpoint", "compressed_snapshot")
    every = {"every": 3, **({"storage_every": 4} if strategy == "memory_checkpoint" else {})} \
        if strategy in periodic else {}
    summary = train(small_run(strategy={"name": strategy, **every, **extra},
                              trainer={"iterations": 8, "clock_preset": None},
                              failure={"name": "trace", "path": str(write_trace(tmp_path / "t.json",
                                                                                 [{"iteration": 4, "stage": 2}]))}),
                    tmp_path / "run")
    measured, priced = summary["memory_overhead_bytes_per_node"], summary["memory_overhead_priced_bytes_per_node"]
    assert sum(measured) > 0
    assert priced == pytest.approx(measured, rel=1e-3)
    assert summary["moved_priced_bytes"] > 0 or strategy == "redundant"


def test_a_fitted_rebuild_pays_its_pairs_on_their_links_and_its_steps_and_its_buffers_hold_memory(small_run):
    """checkfree_fit at llama_500m's size, 10 Mb/s: a buffered micro-batch is 16 x 1,024 x 1,024 fp32 activations,
    67.1 MB (1,024x the trained model's 4 x 64 x 64; the ring keeps fp32, twice what the links carry in bf16). Stage
    2 rebuilt from 8 pairs: stage 1 sends its blocks (67.1 M parameters, 268 MB) and the 8 inputs (537 MB), one
    after the other on its link; stage 3 its blocks and the 8 outputs, in parallel: 30 s + 805.3 MB / 1.25 MB/s =
    674.3 s; then 20 steps over the 8 pairs, a forward and a backward of 67.1 M parameters x 16,384 tokens each at
    124.8 TFLOP/s: 6 x 67.1e6 x 16,384 x 160 / 124.8e12 = 8.46 s; 682.7 s in all. On the paper clock's measured recovery (not
    priced) the fit adds its pairs and its steps to the 30 s. Memory: a middle node holds 16 tensors (8 inputs it
    sent, 8 outputs it received): 1.07 GB."""
    from checkfree.plan import ACTIVATIONS, BODY, RecoveryReport, Transfer

    clock, trained = llama_500m_clock(small_run, "checkfree_fit")
    assert clock.buffered_bytes == 16 * 1024 * 1024 * 4 and clock.activation_scale == 1024.0
    body, pairs = 4 * trained[2], 8 * 4 * 4 * 64 * 64  # trained bytes: stage 2's blocks (all of it), 8 fp32 tensors
    report = RecoveryReport(2, "checkfree_fit", "average", [1, 3], [0.5, 0.5], 2 * body + 2 * pairs,
                            details={"fit_pairs": 8, "fit_steps": 20},
                            transfers=[Transfer(1, 1, BODY, body), Transfer(3, 3, BODY, body),
                                       Transfer(1, 2, ACTIVATIONS, pairs), Transfer(3, 2, ACTIVATIONS, pairs)])
    steps_s = 6 * 67_117_056 * 16_384 * 160 / 124.8e12
    assert steps_s == pytest.approx(8.4588, abs=1e-4)
    assert clock.recovery_seconds(report) == pytest.approx(30 + (4 * 67_117_056 + 8 * 67_108_864) / 1.25e6 + steps_s,
                                                           rel=1e-9)
    assert clock.recovery_seconds(report) == pytest.approx(682.7, abs=0.05)
    clock.priced_recovery = False
    assert clock.recovery_seconds(report) == pytest.approx(30 + 8 * 67_108_864 / 1.25e6 + steps_s, rel=1e-9)
    assert clock.memory_per_node([], False, [8, 16, 16, 16, 16, 8]) == [8 * 67_108_864] + [16 * 67_108_864] * 4 + \
        [8 * 67_108_864]


def test_a_run_on_core_clocks_profiles_its_compute_in_cpu_seconds(small_run, monkeypatch):
    """``network.device=profiled`` under ``engine.compute_time=cpu``: the clock times its profile of the model by
    this thread's CPU seconds (as the stage processes time their compute), not the wall's; under the wall's time, by
    the wall. Here every pass takes 0.25 s of CPU and 1 s of wall, so the FLOP/s priced are 4x apart exactly."""
    import itertools
    import time

    from checkfree.recovery import build_strategy

    wall, cpu = itertools.count(), itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(wall) * 1.0)
    monkeypatch.setattr(time, "thread_time", lambda: next(cpu) * 0.25)

    def flops(**engine) -> float:
        cfg = small_run(network={"name": "single_cluster", "device": "profiled"}, trainer={"clock_preset": None},
                        engine={"name": "distributed", "shape": True, **engine})
        model = cfg.model.with_vocab(300)
        return Clock.of(cfg, model, build_strategy(cfg.strategy, model.n_stages)).cost.flops_per_s

    assert flops(compute_time="cpu") == pytest.approx(4 * flops(compute_time="wall"), rel=1e-12)
