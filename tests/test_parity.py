"""Every registered strategy, on both engines, under traced failures: the same run, bit for bit.

The strategies return plans and each engine executes them with the same per-stage compute, so the local
engine (every stage in this process) and the process engine (one OS process per stage, real exits and
replacements) must write identical metrics: losses, gradient norms, learning rates, recovery records
(PIDs and wall-clock phases aside) — for every strategy in the registry, not a hand-kept list.
"""

from __future__ import annotations

import json

import pytest

from checkfree.recovery import STRATEGIES
from checkfree.runlog import deterministic_view, read_metrics
from checkfree.train import train

# Losses at an intermediate stage, then at an edge and an intermediate stage together (two at once), then
# two adjacent stages together, one of them the other edge; strategies that cannot rebuild a stage re-initialise
# it (strategy.unrecoverable=reinit).
EVENTS = [{"iteration": 2, "stage": 1}, {"iteration": 4, "stage": 0}, {"iteration": 4, "stage": 2},
          {"iteration": 6, "stage": 2}, {"iteration": 6, "stage": 3}]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_bitwise_equal_on_both_engines(name, small_run, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(EVENTS))
    failure = {"name": "none"} if name == "none" else {"name": "trace", "path": str(trace)}
    sections = {"strategy": {"name": name, "unrecoverable": "reinit", "every": 3, "replica_sync_every": 2},
                "failure": failure, "trainer": {"iterations": 7, "eval_every": 3}}
    local = train(small_run(**sections), tmp_path / "local")
    process = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20}), tmp_path / "process")

    a = deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))
    b = deterministic_view(read_metrics(tmp_path / "process" / "metrics.jsonl"))
    assert a == b
    assert process["status"] == local["status"] == "completed"
    for key in ("failures", "recoveries", "lost_iterations", "memory_overhead_bytes",
                "memory_overhead_bytes_per_node", "final_val_loss"):
        assert process[key] == local[key], key
    if name != "none":
        assert local["n_recoveries"] == len(EVENTS)
        assert all(r.get("process", {}).get("new_pid") for rec in read_metrics(tmp_path / "process" / "metrics.jsonl")
                   for r in rec["recoveries"])


def test_waiting_for_late_replacements_is_bitwise_equal_on_both_engines(small_run, tmp_path):
    """``engine.no_replacement=wait`` changes only the clock: the process engine replaces the lost processes as
    always, and both engines write the same stalls, times and losses."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(EVENTS))
    sections = {"strategy": {"name": "checkfree_plus", "unrecoverable": "reinit"},
                "failure": {"name": "trace", "path": str(trace), "replacement": "exponential",
                            "replacement_mean_h": 0.2},
                "trainer": {"iterations": 7, "eval_every": 3}}
    local = train(small_run(**sections), tmp_path / "local")
    process = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20}), tmp_path / "process")
    a = deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))
    assert a == deterministic_view(read_metrics(tmp_path / "process" / "metrics.jsonl"))
    assert local["waiting_sim_s"] == process["waiting_sim_s"] > 0 and sum(r["waiting_sim_s"] for r in a[1:]) > 0
    assert local["total_sim_time_s"] == process["total_sim_time_s"]
