"""In-memory snapshots: restore only the lost stage (snapshot_restore), or roll every stage back to an
in-memory checkpoint (memory_checkpoint) — exact states, exact records, and the pricing rule by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from checkfree.model.presets import preset
from checkfree.plan import (
    HOST_SNAPSHOT,
    REPLICA,
    SHADOW,
    SNAPSHOT,
    Held,
    Traffic,
    sent_into,
)
from checkfree.recovery import StrategyConfig
from checkfree.run.runlog import read_metrics
from checkfree.simulation.cost import CostModel
from checkfree.simulation.networks import NetworkConfig
from checkfree.train import train
from tests.test_baselines import S, assert_equal_state, make_ctx, shard_bytes, snapshot, step


def driver(tmp_path, name: str, **cfg):
    return make_ctx(tmp_path, strategy=StrategyConfig(name=name, **cfg))


def stage_state(ctx, k: int) -> dict:
    return copy.deepcopy({"weights": ctx.engine.stages[k].state_dict(),
                          "optimizer": ctx.engine.optimizers[k].state_dict()})


def assert_stage_equals(ctx, k: int, saved: dict) -> None:
    now = stage_state(ctx, k)
    for name, tensor in saved["weights"].items():
        assert torch.equal(now["weights"][name], tensor), (k, name)
    assert now["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    for index, slots in saved["optimizer"]["state"].items():
        for name, tensor in slots.items():
            assert torch.equal(now["optimizer"]["state"][index][name], tensor), (k, index, name)


# --- the vocabulary --------------------------------------------------------------------------------


def test_held_copies_say_what_they_are_and_where_their_refresh_bytes_go():
    traffic = Traffic()
    for held, n in [(Held(REPLICA, 0, 1), 10), (Held(SHADOW, 2, 1), 20), (Held(SNAPSHOT, 2, 3), 30),
                    (Held(HOST_SNAPSHOT, 3, 3), 40)]:
        sent_into(traffic, held, n)
    assert traffic.sent == {(0, 1): 10} and traffic.background == {(2, 3): 30}  # shadow, host copy: no traffic
    assert [Held(k, 1, 2 if k != HOST_SNAPSHOT else 1).what.holds for k in (REPLICA, SHADOW, SNAPSHOT,
                                                                            HOST_SNAPSHOT)] == \
        ["edges", "state", "state", "state"]
    with pytest.raises(ValueError, match="unknown kind of held copy 'mirror'"):
        Held("mirror", 0, 1)
    with pytest.raises(ValueError, match="exactly when its holder is its owner"):
        Held(HOST_SNAPSHOT, 1, 2)
    with pytest.raises(ValueError, match="exactly when its holder is its owner"):
        Held(SNAPSHOT, 1, 1)


def test_background_stall_is_host_copy_plus_what_the_window_cannot_hide():
    network = NetworkConfig(bandwidth_Bps=1e8, latency_s=0.01, host_bandwidth_Bps=1e9)
    cost = CostModel(preset("tiny"), 2, 2, network)
    # 1e9 bytes: 1 s to host memory, 0.01 + 10 s to the peer.
    assert cost.background_seconds({(0, 1): 10**9}, {0: 4.0}) == pytest.approx(1.0 + 6.01)
    assert cost.background_seconds({(0, 1): 10**9}, {0: 20.0}) == pytest.approx(1.0)
    # Owners send in parallel: the slowest sets the stall; nothing to send costs nothing.
    assert cost.background_seconds({(0, 1): 10**9, (1, 2): 2 * 10**9}, {0: 4.0, 1: 4.0}) == pytest.approx(2.0 + 16.01)
    # Each owner hides its copy in its own node's free time: a node with more of it stalls less.
    assert cost.background_seconds({(0, 1): 10**9, (1, 2): 2 * 10**9}, {0: 20.0, 1: 19.0}) == pytest.approx(2.0 + 1.01)
    assert cost.background_seconds({}, {}) == 0.0


# --- snapshot_restore ------------------------------------------------------------------------------


def test_snapshot_restore_brings_back_only_the_lost_stage_from_its_snapshot(tmp_path):
    ctx = driver(tmp_path, "snapshot_restore", every=2)
    for _ in range(4):
        step(ctx)  # snapshots at setup and after iterations 2 and 4
    at_snapshot = stage_state(ctx, 2)
    traffic = step(ctx)[1]  # iteration 5: no snapshot
    assert traffic.background == {} and traffic.sent == {}
    before = snapshot(ctx)

    (report,) = ctx.recover({2})

    assert_stage_equals(ctx, 2, at_snapshot)  # weights, Adam moments, step counts and lr of iteration 4
    assert_equal_state(ctx, before, stages=[0, 1, 3])  # the survivors are untouched
    assert ctx.progress == 5
    assert (report.method, report.sources, report.coefficients, report.lost_iterations) == ("snapshot", [3], [1.0], 0)
    assert report.details == {"staleness": 1}
    # Its snapshot from stage 3 (the snapshot of stage 1 it held is re-sent in the background, not counted).
    assert report.bytes_moved == shard_bytes(ctx, 2)
    assert ctx.engine.held[Held(SNAPSHOT, 1, 2)]["weights"].keys() == before["stages"][1].keys()
    assert ctx.engine.stage_lrs()[2] == at_snapshot["optimizer"]["param_groups"][0]["lr"]
    traffic = step(ctx)[1]  # iteration 6: every stage's snapshot goes to its next peer, in the background
    assert traffic.background == {(k, (k + 1) % S): shard_bytes(ctx, k) for k in range(S)}


def test_snapshot_restore_falls_back_to_checkfree_when_the_snapshot_died_with_its_holder(tmp_path):
    ctx = driver(tmp_path, "snapshot_restore", every=2, copies=1)
    for _ in range(3):
        step(ctx)
    reports = ctx.recover({1, 2})  # stage 1's only snapshot was on stage 2; stage 2's is on stage 3
    assert [(r.stage, r.method, r.sources) for r in reports] == [(1, "interpolate", [0, 3]), (2, "snapshot", [3])]
    two = driver(tmp_path / "two", "snapshot_restore", every=2, copies=2)
    for _ in range(3):
        step(two)
    reports = two.recover({1, 2})  # with two copies, stage 1's second one is on stage 3
    assert [(r.stage, r.method, r.sources) for r in reports] == [(1, "snapshot", [3]), (2, "snapshot", [3])]


# --- memory_checkpoint -----------------------------------------------------------------------------


def test_memory_checkpoint_rolls_every_stage_back_to_the_snapshot_and_replays_the_same_losses(tmp_path):
    ctx = driver(tmp_path, "memory_checkpoint", every=2, storage_every=100)
    for _ in range(4):
        step(ctx)
    saved = snapshot(ctx)  # the in-memory checkpoint of iteration 4 (progress 4)
    after = [step(ctx)[0] for _ in range(1)]

    (report,) = ctx.recover({1})

    assert ctx.progress == 4
    assert_equal_state(ctx, saved)  # every stage and the data position
    assert (report.method, report.sources, report.from_storage, report.lost_iterations) == ("rollback", [2], False, 1)
    assert report.details == {"rolled_back_to": 4, "all_stages": True}
    # Its snapshot from stage 2; the snapshot of stage 0 it held is re-sent in the background and its own host
    # copy moves nothing: neither counts.
    assert report.bytes_moved == shard_bytes(ctx, 1)
    assert [step(ctx)[0] for _ in range(1)] == after  # bit for bit the same training from there
    assert not list((tmp_path / "checkpoints").glob("ckpt_0000004"))  # no storage was involved


def test_memory_overhead_per_node_is_what_each_node_holds(tmp_path):
    ctx = driver(tmp_path, "memory_checkpoint", every=1, copies=1)
    step(ctx)
    # Node k: its own host snapshot and the snapshot of stage k-1 (mod S).
    assert ctx.engine.held_bytes_per_node() == [shard_bytes(ctx, k) + shard_bytes(ctx, (k - 1) % S) for k in range(S)]
    two = driver(tmp_path / "two", "snapshot_restore", every=1, copies=2)
    step(two)
    assert two.engine.held_bytes_per_node() == [shard_bytes(two, (k - 1) % S) + shard_bytes(two, (k - 2) % S)
                                                for k in range(S)]
    assert two.engine.held_bytes() == 2 * sum(shard_bytes(two, k) for k in range(S))


def test_memory_checkpoint_falls_back_to_storage_when_every_copy_died(tmp_path):
    ctx = driver(tmp_path, "memory_checkpoint", every=2, storage_every=3, copies=1)
    for _ in range(3):
        step(ctx)
    in_storage = snapshot(ctx)  # the storage checkpoint of iteration 3
    step(ctx)  # an in-memory checkpoint at iteration 4
    step(ctx)

    reports = ctx.recover({1, 2})  # stage 1's only peer copy was on stage 2

    assert ctx.progress == 3
    assert_equal_state(ctx, in_storage)
    assert [(r.stage, r.method, r.from_storage, r.details["rolled_back_to"]) for r in reports] == [
        (1, "rollback", True, 3), (2, "rollback", True, 3)]
    # The in-memory checkpoint of progress 4 is a future this run no longer has: the next loss goes to storage.
    assert ctx.memory.progress is None
    (report,) = ctx.recover({0})
    assert report.from_storage and report.details["rolled_back_to"] == 3


# --- through the trainer -----------------------------------------------------------------------------


def test_memory_checkpoint_through_the_trainer(small_run, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 6, "stage": 1}, {"iteration": 8, "stage": 1},
                                 {"iteration": 8, "stage": 2}]))
    cfg = small_run(strategy={"name": "memory_checkpoint", "every": 2, "storage_every": 3},
                    failure={"name": "trace", "path": str(trace)}, trainer={"iterations": 9, "eval_every": 9})
    summary = train(cfg, tmp_path / "run")
    records = {r["iteration"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    # Iteration 6 starts at progress 5: back to the in-memory checkpoint of iteration 4.
    [first] = records[6]["recoveries"]
    assert (first["method"], first["from_storage"], first["details"]["rolled_back_to"]) == ("rollback", False, 4)
    # Iteration 8 starts at progress 6, snapshots of iteration 6 (progress 5) in memory; stages 1 and 2 lost
    # together take stage 1's only copy: back to storage, saved at iteration 6 (progress 5).
    assert [(r["stage"], r["from_storage"], r["details"]["rolled_back_to"]) for r in records[8]["recoveries"]] == \
        [(1, True, 5), (2, True, 5)]
    assert summary["status"] == "completed" and summary["lost_iterations"] == 1 + 1


# --- async_checkpoint --------------------------------------------------------------------------------


def test_an_asynchronous_checkpoint_is_written_off_the_step(tmp_path, monkeypatch):
    """The writer is held (its shard writes wait on an event): the step and its upkeep return while the
    checkpoint is still unpublished; released, the writer publishes it whole."""
    import threading

    from checkfree.storage import checkpoints

    release, real_save = threading.Event(), checkpoints.save_file

    def held_save(obj, path):
        if path.name.startswith("stage"):
            assert release.wait(timeout=60), "the test never released the writer"
        return real_save(obj, path)

    ctx = driver(tmp_path, "async_checkpoint", every=1, keep=2)  # setup: a synchronous save at progress 0
    monkeypatch.setattr(checkpoints, "save_file", held_save)
    saved = snapshot(ctx)
    _, traffic = step(ctx)  # returns with the writer held
    root = tmp_path / "checkpoints"
    assert traffic.shards_in_background and traffic.shard_bytes == [shard_bytes(ctx, k) for k in range(S)]
    assert not (root / "ckpt_0000001").exists() and ctx.engine.writer.busy  # unpublished, the writer still at it
    release.set()
    ctx.engine.writer.wait()
    assert sorted(p.name for p in (root / "ckpt_0000001").iterdir()) == ["meta.pt"] + [f"stage{k}.pt" for k in range(S)]
    # The shards hold the state at the end of the step, not what training did after it.
    shard = checkpoints.load_file(root / "ckpt_0000001" / "stage2.pt")
    step(ctx)
    ctx.engine.writer.wait()
    for name, tensor in shard["weights"].items():
        assert not torch.equal(tensor, saved["stages"][2][name])  # iteration 1 changed every weight
        assert torch.equal(tensor, checkpoints.load_file(root / "ckpt_0000001" / "stage2.pt")["weights"][name])


def test_a_rollback_skips_a_checkpoint_whose_flush_had_not_finished(tmp_path):
    from checkfree.plan import STORAGE, RecoveryPlan

    ctx = driver(tmp_path, "async_checkpoint", every=2, keep=2)
    for _ in range(2):
        step(ctx)
    at_two = snapshot(ctx)
    for _ in range(2):
        step(ctx)  # a checkpoint at progress 4, still being flushed in simulated time
    ctx.engine.lose([1])
    outcome = ctx.engine.execute(RecoveryPlan("async_checkpoint", (1,), rollback=STORAGE, unpersisted=4), 4)
    assert outcome.restored["progress"] == 2 and outcome.reports[0].details["rolled_back_to"] == 2
    ctx.data.load_state_dict(outcome.restored["data"])
    assert_equal_state(ctx, at_two)
    assert not (tmp_path / "checkpoints" / "ckpt_0000004").exists()  # forgotten: a future the run no longer has
    assert ctx.engine.store.retained == [2]


def test_async_checkpoint_holds_each_stage_s_host_staging_buffer(tmp_path):
    """The host buffer a background checkpoint is copied into is memory the node keeps: counted from the first
    background checkpoint on, on the stage's own node, and gone with a lost node (its replacement allocates
    one at its first background checkpoint)."""
    ctx = driver(tmp_path, "async_checkpoint", every=2, keep=2)
    assert ctx.engine.held_bytes_per_node() == [0] * S  # setup's save is synchronous: no host copy
    step(ctx)
    assert ctx.engine.held_bytes() == 0
    step(ctx)  # the first background checkpoint
    staged = [shard_bytes(ctx, k) for k in range(S)]
    assert ctx.engine.held_bytes_per_node() == staged and min(staged) > 0
    ctx.engine.lose([1])
    assert ctx.engine.held_bytes_per_node() == [0 if k == 1 else staged[k] for k in range(S)]
    # A resumable save carries the buffers, so a resumed run reports what an uninterrupted one does.
    state = ctx.engine.state_dict()
    ctx.engine.staged = {}
    ctx.engine.load_state_dict(state)
    assert ctx.engine.held_bytes_per_node() == [0 if k == 1 else staged[k] for k in range(S)]


def test_flush_stall_is_host_copy_plus_what_the_window_cannot_hide():
    network = NetworkConfig(storage_bandwidth_Bps=1e8, storage_latency_s=0.05, host_bandwidth_Bps=1e9)
    cost = CostModel(preset("tiny"), 2, 2, network)
    # 1e9 bytes: 1 s to host memory, 0.05 + 10 s to storage.
    assert cost.flush_seconds(10**9) == pytest.approx(11.05)
    assert cost.flush_stall_seconds([10**9], [4.0]) == pytest.approx(1.0 + 6.05)
    assert cost.flush_stall_seconds([10**9], [60.0]) == pytest.approx(1.0)
    # Stages flush their own shards in parallel, each in its own node's window: the slowest sets the stall.
    assert cost.flush_stall_seconds([10**9, 5 * 10**8], [60.0, 10.0]) == pytest.approx(1.0)  # 1.0 vs 0.5
    assert cost.flush_stall_seconds([10**9, 2 * 10**9], [4.0, 60.0]) == pytest.approx(1.0 + 6.05)  # vs 2.0
    assert cost.flush_stall_seconds([0], [1.0]) == cost.flush_seconds(0) == 0.0


def test_async_checkpoint_through_the_trainer_falls_back_while_a_flush_is_under_way(small_run, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 3, "stage": 1}, {"iteration": 6, "stage": 2}]))
    # Storage so fast that a flush takes the host copy + 0.05 s of latency: it ends within the iteration after
    # its step, but after that iteration's start.
    cfg = small_run(strategy={"name": "async_checkpoint", "every": 2, "keep": 2},
                    failure={"name": "trace", "path": str(trace)}, trainer={"iterations": 7, "eval_every": 7},
                    network={"storage_bandwidth_Bps": 1e15})
    summary = train(cfg, tmp_path / "run")
    records = {r["iteration"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    # Iteration 3 starts while the checkpoint of iteration 2 (progress 2) is being flushed: back to the
    # initial one.
    [first] = records[3]["recoveries"]
    assert (first["details"]["rolled_back_to"], first["details"]["checkpoint"], first["lost_iterations"]) == \
        (0, "ckpt_0000000", 2)
    # Progress restarts at 0: iteration 4 saves at progress 2, persisted during iteration 5, so iteration 6's
    # loss (at progress 3) goes back to it.
    [second] = records[6]["recoveries"]
    assert (second["details"]["rolled_back_to"], second["details"]["checkpoint"], second["lost_iterations"]) == \
        (2, "ckpt_0000002", 1)
    assert summary["status"] == "completed" and summary["lost_iterations"] == 3
    # The stall each asynchronous save charged: the host copy only (the upload hides in the next iterations).
    # (llama_500m's largest stage with Adam, at 16 GB/s).
    assert records[2]["overhead_sim_s"] == pytest.approx(records[4]["overhead_sim_s"])
    assert 0.05 < records[2]["overhead_sim_s"] < 0.5 and records[3]["overhead_sim_s"] == 0.0
    slow = small_run(strategy={"name": "async_checkpoint", "every": 2, "keep": 2},
                     failure={"name": "trace", "path": str(trace)}, trainer={"iterations": 7, "eval_every": 7})
    train(slow, tmp_path / "slow")
    # At 500 Mb/s the flush outlasts the next two iterations: iteration 6's loss finds it still under way.
    [late] = {r["iteration"]: r for r in read_metrics(tmp_path / "slow" / "metrics.jsonl")}[6]["recoveries"]
    assert late["details"]["rolled_back_to"] == 0


def test_every_auto_is_the_smallest_period_the_bandwidth_sustains(small_run, tmp_path):
    from checkfree.simulation.cost import sustained_period
    from checkfree.trainer import RunParts

    # CheckFreq's rule on hand-made numbers: a 25 s flush over 10 s iterations needs a period of 3.
    assert [sustained_period(s, 10.0) for s in (0.0, 9.0, 10.0, 25.0, 30.0, 30.5)] == [1, 1, 1, 3, 3, 4]
    run = small_run(strategy={"name": "async_checkpoint", "every": "auto"}, trainer={"iterations": 4})
    parts = RunParts.build(run, run.model)
    cost = parts.clock.cost
    # llama_500m priced as 4 stages: the slowest stage's weights + Adam to host memory, then to storage.
    worst = max(cost.stage_bytes(k, with_optimizer=True) for k in range(4))
    flush = worst / 16e9 + 0.05 + worst / 62.5e6
    # 25.8 s of flush over 18.6 s iterations (a link's latency delays a micro-batch and occupies nothing), of which
    # the pipeline's own traffic holds the geo preset's slowest interface 9.84 s (2 micro-batches x (activations
    # out + gradients back) x 33.6 MB at ~14 MB/s): 8.8 s of each iteration are left for the upload, so a
    # checkpoint every 3 iterations.
    clock = parts.clock
    assert flush == pytest.approx(25.77, abs=0.01) and clock.iteration_s == pytest.approx(18.59, abs=0.01)
    assert clock.link_busy * clock.iteration_s == pytest.approx(cost.pipeline_busy_seconds()) \
        == pytest.approx(9.84, abs=0.01)
    assert clock.background_window() == pytest.approx(clock.iteration_s - cost.pipeline_busy_seconds())
    assert parts.strategy.cfg.every == sustained_period(flush, clock.background_window()) == 3
    summary = train(run, tmp_path / "run")
    assert summary["strategy_every"] == parts.strategy.cfg.every


def test_on_the_paper_clock_memory_checkpoint_pays_for_its_storage_saves(small_run, tmp_path):
    """The paper's checkpointing time includes its saves; memory_checkpoint is priced at CheckFree's, so its
    synchronous fall-back saves to storage are charged on top (and a checkpoint strategy's are not)."""
    from checkfree.recovery import build_strategy
    from checkfree.simulation.clock import Clock
    from checkfree.storage.checkpoints import load_file

    cfg = small_run(strategy={"name": "memory_checkpoint", "every": 5, "storage_every": 2},
                    trainer={"iterations": 5, "eval_every": 5, "clock": "paper_table2", "paper_T": 500})
    train(cfg, tmp_path / "run")
    records = {r["iteration"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    shards = load_file(tmp_path / "run" / "checkpoints" / "ckpt_0000004" / "meta.pt")["shard_bytes"]
    clock = Clock.of(cfg, cfg.model.with_vocab(300), build_strategy(cfg.strategy, 4))
    # Each stage uploads its own shard at its own stage's size, in parallel: the slowest sets the time.
    upload = clock.cost.storage_seconds(max(int(n * scale) for n, scale in zip(shards, clock.byte_scale)))
    assert upload > 1.0
    assert [records[i]["overhead_sim_s"] for i in (1, 2, 3, 4)] == [0.0, pytest.approx(upload), 0.0,
                                                                    pytest.approx(upload)]
    checkpoint = small_run(strategy={"name": "checkpoint", "every": 2},
                           trainer={"iterations": 4, "eval_every": 4, "clock": "paper_table2", "paper_T": 500})
    assert train(checkpoint, tmp_path / "checkpoint")["overhead_sim_s"] == 0.0


ENGINES = {"local": {"name": "local"}, "process": {"name": "distributed", "timeout_s": 20}}


def test_both_engines_publish_the_last_background_checkpoint_when_the_run_ends(small_run, tmp_path):
    """A run that ends while its last asynchronous checkpoint is being flushed publishes it, on stage processes
    as the local engine's writer does: the same checkpoints, none half-written."""
    listings = {}
    for name, engine in ENGINES.items():
        cfg = small_run(strategy={"name": "async_checkpoint", "every": 2, "keep": 2},
                        trainer={"iterations": 4, "eval_every": 4}, engine=engine)
        assert train(cfg, tmp_path / name)["status"] == "completed"
        listings[name] = sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())
    assert listings["local"] == listings["process"] and "ckpt_0000004" in listings["local"]
    assert not [n for n in listings["local"] if n.endswith(".tmp")]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_background_flush_that_fills_the_disk_leaves_no_half_written_checkpoint(engine, small_run, tmp_path,
                                                                                    tmpfs):
    """The checkpoints live on a file system with room for the first checkpoint only: the background flush of
    the next one fails (no space left). The run stops with one sentence in its summary (a stage process's
    traceback goes to worker_errors.log, not the summary), and no ckpt_*.tmp is left behind."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoints = tmpfs("1400k", name="run/checkpoints")
    cfg = small_run(strategy={"name": "async_checkpoint", "every": 2, "keep": 2},
                    trainer={"iterations": 6, "eval_every": 6}, engine=ENGINES[engine])
    with pytest.raises(Exception, match="No space left on device"):
        train(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "error" and "\n" not in summary["error"]
    assert "No space left on device" in summary["error"] and "Traceback" not in summary["error"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt_0000000"]
