"""The training loop end to end, on real stages and the real synthetic corpus."""

from __future__ import annotations

import json

import pytest

from checkfree.run.runlog import deterministic_view as strip
from checkfree.run.runlog import read_metrics
from checkfree.train import train
from tests.processes import write_trace


def test_same_seed_gives_identical_metrics(small_run, tmp_path):
    cfg = small_run(failure={"name": "bernoulli", "p": 0.1, "stages": "intermediate"})
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == 9 and strip(a) == strip(b)
    other = small_run(seed=1, failure={"name": "bernoulli", "p": 0.1, "stages": "intermediate"})
    train(other, tmp_path / "c")
    assert strip(read_metrics(tmp_path / "c" / "metrics.jsonl")) != strip(a)


def test_one_trace_event_gives_exactly_one_checkfree_recovery(small_run, tmp_path):
    trace = write_trace(tmp_path / "t.json", [{"iteration": 5, "stage": 2}])
    summary = train(small_run(failure={"name": "trace", "path": trace}), tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    with_recovery = [r for r in records if r.get("recoveries")]
    assert [r["iteration"] for r in with_recovery] == [5]
    [rec] = with_recovery[0]["recoveries"]
    assert (rec["stage"], rec["strategy"], rec["method"], rec["sources"]) == (2, "checkfree", "average", [1, 3])
    assert sum(rec["coefficients"]) == pytest.approx(1.0)
    assert rec["bytes_moved"] > 0 and rec["sim_seconds"] > 0 and rec["wall_s"] >= 0
    # The recovered stage trains at lr_scale * lr from then on; the others keep lr.
    assert records[5]["lr"] == pytest.approx([3e-3, 3e-3, 3.3e-3, 3e-3])
    assert records[4]["lr"] == pytest.approx([3e-3] * 4)
    assert summary["status"] == "completed" and summary["n_failures"] == summary["n_recoveries"] == 1
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["recoveries"] == [{"iteration": 5, "stage": 2, "method": "average", "sources": [1, 3]}]


@pytest.mark.parametrize("strategy", ["checkfree", "checkfree_plus", "checkpoint", "redundant", "copy", "uniform",
                                      "random", "zero"])
def test_every_strategy_survives_failures(small_run, tmp_path, strategy):
    events = [{"iteration": 3, "stage": 1}, {"iteration": 6, "stage": 2}]
    trace = write_trace(tmp_path / "t.json", events)
    summary = train(small_run(strategy={"name": strategy, "every": 4}, failure={"name": "trace", "path": trace}),
                    tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["n_failures"] == 2 and summary["n_recoveries"] == 2
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    if strategy == "checkpoint":
        # every=4 wall iterations: iteration 3 fails at progress 2 -> back to the initial save (lost 2);
        # iterations 3-4 redo progress 1-2 and iteration 4 saves (progress 2); iteration 6 fails at progress 3
        # -> back to 2 (lost 1).
        assert summary["lost_iterations"] == 2 + 1
    else:
        assert summary["lost_iterations"] == 0


def test_failure_times_are_the_same_for_every_strategy(small_run, tmp_path):
    first_time, first_iteration, iteration_s = {}, {}, {}
    for strategy in ("checkfree", "checkfree_plus", "redundant"):
        cfg = small_run(strategy={"name": strategy, "unrecoverable": "reinit"},
                        failure={"name": "poisson", "hourly_rate": 0.999, "stages": "all"},
                        trainer={"iterations": 30, "eval_every": 30})
        summary = train(cfg, tmp_path / strategy)
        first_time[strategy], first_iteration[strategy] = {}, {}
        for f in summary["failures"]:
            first_time[strategy].setdefault(f["stage"], f["time_s"])
            first_iteration[strategy].setdefault(f["stage"], f["iteration"])
        iteration_s[strategy] = summary["iteration_sim_s"]
    # Each stage's first failure strikes at the same simulated second whatever the strategy (later ones
    # can merge differently: a stage already lost within one iteration is lost once)...
    assert len(first_time["checkfree"]) >= 3
    for stage, t in first_time["checkfree"].items():  # checkfree has the shortest iterations: least sim time
        assert first_time["checkfree_plus"][stage] == t and first_time["redundant"][stage] == t
    # ...but lands in a later iteration for the strategy whose iterations take longer.
    assert iteration_s["checkfree_plus"] > iteration_s["checkfree"]
    later = [s for s in first_iteration["checkfree"] if first_iteration["checkfree_plus"][s] < first_iteration["checkfree"][s]]
    assert later and all(first_iteration["checkfree_plus"][s] <= first_iteration["checkfree"][s]
                         for s in first_iteration["checkfree"])


def test_unrecoverable_failure_stops_with_a_clear_error_and_leaves_results(small_run, tmp_path):
    from checkfree.recovery import UnrecoverableFailure

    trace = write_trace(tmp_path / "t.json", [{"iteration": 3, "stage": 0}])
    with pytest.raises(UnrecoverableFailure, match="stage 0"):
        train(small_run(failure={"name": "trace", "path": trace}), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "error" and "stage 0" in summary["error"]
    assert summary["iterations"] == 2
    assert [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]


def test_target_loss_and_sim_time_budget(small_run, tmp_path):
    summary = train(small_run(trainer={"iterations": 12, "eval_every": 2, "target_loss": 5.5}), tmp_path / "a")
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    first = next(r for r in records[1:] if r.get("val_loss", 99) <= 5.5)
    assert summary["time_to_target_s"] == first["sim_time_s"]
    assert summary["iterations_to_target"] == first["iteration"]
    per_iteration = summary["iteration_sim_s"]
    budget = train(small_run(trainer={"iterations": 50, "sim_time_budget_s": 3.5 * per_iteration}), tmp_path / "b")
    assert budget["iterations"] == 4 and budget["status"] == "completed"
    assert "val_loss" in read_metrics(tmp_path / "b" / "metrics.jsonl")[-1]


def test_checkfree_plus_logs_replica_traffic_and_memory(small_run, tmp_path):
    summary = train(small_run(strategy={"name": "checkfree_plus", "replica_sync_every": 2}), tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    synced = [r["iteration"] for r in records[1:] if r["overhead_sim_s"] > 0]
    assert synced == [2, 4, 6, 8]
    # Replicas: the embedding (V x d) and the head (V x d + d), fp32.
    v, d = 300, 32
    assert summary["memory_overhead_bytes"] == 4 * (v * d + v * d + d)


def test_checkpoint_run_in_a_reused_directory_rolls_back_to_its_own_checkpoints(small_run, tmp_path):
    """Old higher-numbered checkpoints from an earlier run must not shadow (or prune) the new run's."""
    trace = write_trace(tmp_path / "t.json", [{"iteration": 7, "stage": 1}])
    cfg = small_run(strategy={"name": "checkpoint", "every": 5, "keep": 1}, failure={"name": "trace", "path": trace})
    old = tmp_path / "run" / "checkpoints"
    (old / "ckpt_0000900").mkdir(parents=True)
    (old / "ckpt_0000900" / "meta.pt").write_bytes(b"not a checkpoint of this run")
    (old / "ckpt_0000800.pt").write_bytes(b"nor this (an older format)")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    assert summary["lost_iterations"] == 1  # progress 6 -> back to 5
    assert sorted(p.name for p in old.glob("ckpt_*")) == ["ckpt_0000005"]


def test_losses_minutes_apart_are_recovered_one_after_the_other(small_run, tmp_path):
    """Stage 2, then 200 s later its shadow holder (stage 1), within one 600 s iteration: the first recovery
    is long done when the second loss strikes, so both come back from shadows. Only losses closer than a
    recovery's time (network.replacement_delay_s) strike together, and then stage 2's only copy is gone."""
    from checkfree.recovery import UnrecoverableFailure

    trace = write_trace(tmp_path / "t.json", [{"time_s": 100.0, "stage": 2}, {"time_s": 300.0, "stage": 1}])
    sections = {"strategy": {"name": "redundant"}, "trainer": {"clock": "fixed", "iterations": 2}}
    summary = train(small_run(**sections, failure={"name": "trace", "path": trace, "iteration_seconds": 600.0}),
                    tmp_path / "apart")
    assert [(r["stage"], r["method"], r["sources"]) for r in summary["recoveries"]] == [
        (2, "shadow", [1]), (1, "shadow", [0])]
    records = read_metrics(tmp_path / "apart" / "metrics.jsonl")
    assert records[1]["failed_stages"] == [1, 2] and len(records[1]["recoveries"]) == 2
    with pytest.raises(UnrecoverableFailure, match="stage 2's only copy was its shadow on stage 1"):
        train(small_run(**sections, failure={"name": "trace", "path": trace, "iteration_seconds": 600.0},
                        network={"replacement_delay_s": 250.0}), tmp_path / "together")


def test_a_diverging_run_says_so_and_best_counts_the_initial_evaluation(small_run, tmp_path, capsys):
    summary = train(small_run(trainer={"lr": 10.0, "iterations": 6, "eval_every": 3}), tmp_path / "run")
    assert summary["status"] == "completed" and summary["diverged"] is True
    assert summary["final_val_loss"] > 1.1 * summary["initial_val_loss"]
    [warning] = summary["warnings"]
    assert warning.startswith("the run diverged") and "trainer.lr" in warning
    assert "warning: the run diverged" in capsys.readouterr().err
    assert summary["best_val_loss"] == summary["initial_val_loss"]  # nothing later was better
    healthy = train(small_run(), tmp_path / "healthy")
    assert healthy["diverged"] is False and healthy["warnings"] == []
    assert healthy["best_val_loss"] == min(r["val_loss"] for r in read_metrics(tmp_path / "healthy" / "metrics.jsonl")
                                           if "val_loss" in r)


def test_the_exported_model_has_the_runs_final_validation_loss(small_run, data_cache, tmp_path):
    """AutoModelForCausalLM.from_pretrained(run_dir / "model") computes what the pipeline computed."""
    from checkfree.data.loading import load_corpus
    from checkfree.model.hf_export import held_out_loss

    cfg = small_run(strategy={"name": "checkfree_plus"})
    summary = train(cfg, tmp_path / "run")
    assert summary["model_dir"] == str(tmp_path / "run" / "model")
    val = load_corpus(cfg.data, cfg.model.seq_len).val
    assert held_out_loss(tmp_path / "run" / "model", val) == pytest.approx(summary["final_val_loss"], abs=1e-5)
