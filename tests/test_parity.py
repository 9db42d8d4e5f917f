"""Every registered strategy, on both engines, under traced failures: the same run, bit for bit.

The strategies return plans and each engine executes them with the same per-stage compute, so the local
engine (every stage in this process) and the process engine (one OS process per stage, real exits and
replacements) must write identical metrics: losses, gradient norms, learning rates, recovery records
(PIDs and wall-clock phases aside) — for every strategy in the registry, not a hand-kept list.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from checkfree.recovery import STRATEGIES
from checkfree.run.runlog import deterministic_view, read_metrics
from checkfree.train import train
from tests.conftest import hooked_run

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
    sections = {"strategy": {"name": name, "unrecoverable": "reinit", "every": 3, "replica_sync_every": 2,
                             "storage_every": 6}, "failure": failure, "trainer": {"iterations": 7, "eval_every": 3}}
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


def test_a_loss_after_the_last_background_checkpoint_leaves_the_same_held_memory_on_both_engines(small_run, tmp_path):
    """async_checkpoint's host staging buffers: the lost node's goes with it and no checkpoint comes after the
    rollback, so on both engines the run ends with every buffer but the lost stage's."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 7, "stage": 0}]))
    sections = {"strategy": {"name": "async_checkpoint", "every": 3, "keep": 2},
                "failure": {"name": "trace", "path": str(trace)}, "trainer": {"iterations": 8, "eval_every": 4}}
    local = train(small_run(**sections), tmp_path / "local")
    process = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20}), tmp_path / "process")
    per_node = local["memory_overhead_bytes_per_node"]
    assert process["memory_overhead_bytes_per_node"] == per_node
    assert per_node[0] == 0 and min(per_node[1:]) > 0 and local["n_recoveries"] == 1
    assert deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl")) == \
        deterministic_view(read_metrics(tmp_path / "process" / "metrics.jsonl"))


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


def shrink_sections(trace, replacement: dict, strategy: dict, iterations: int) -> dict:
    return {"strategy": {"unrecoverable": "reinit", **strategy},
            "failure": {"name": "trace", "path": str(trace), **replacement},
            "trainer": {"iterations": iterations, "eval_every": 4}}


def equal_states(a, b) -> bool:
    """Nested states (dicts, lists, tuples of tensors and plain values) equal bit for bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(equal_states, a, b))
    return a == b


def export_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("strategy, replacement, iterations", [
    # CheckFree+ (GPipe, swapped routes, embedding / head replicas): node 2 is back 0.02 h later.
    ({"name": "checkfree_plus"}, {"replacement": "fixed", "replacement_mean_h": 0.02}, 12),
    # CheckFree (1F1B): node 2 never comes back; the run ends on three processes.
    ({"name": "checkfree"}, {"replacement": "never"}, 8),
    # Rollbacks on a shrunk pipeline: node 1's process loads the shards of stages 1 and 2 from storage.
    ({"name": "checkpoint", "every": 2}, {"replacement": "fixed", "replacement_mean_h": 0.06}, 12),
    # Peer snapshots in RAM whose holder moves with its stage, and a rollback from memory (the snapshots over
    # the WAN make its iterations long: its node comes back later in simulated time).
    ({"name": "memory_checkpoint", "every": 2, "storage_every": 12},
     {"replacement": "fixed", "replacement_mean_h": 0.15}, 12),
])
def test_a_shrunk_pipeline_runs_two_stages_in_one_process_bitwise_as_the_local_engine(
        strategy, replacement, iterations, small_run, tmp_path):
    """Node 2 is lost at iteration 3 with no replacement yet: stage 2 is rebuilt inside the process of node 1,
    which runs stages 1 and 2 (their activations and gradients handed over in memory); when node 2 arrives, a
    new process takes stage 2 back, its weights and Adam state sent over. Metrics and exported weights equal the
    local engine's bit for bit (where a stage runs never changes its math)."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 3, "stage": 2}]))
    sections = shrink_sections(trace, replacement, strategy, iterations)
    states: dict[str, list] = {"local": [], "process": []}

    def run(name: str, engine: dict) -> dict:
        def keep(n, e):  # before each step: every stage's weights and Adam state, wherever it runs
            state = e.state_dict()
            states[name].append(copy.deepcopy((state["stages"], state["optimizers"])))  # the local one's are live
        return hooked_run(small_run(**sections, engine=engine), tmp_path / name, train_step=keep).run()

    local = run("local", {"no_replacement": "shrink"})
    process = run("process", {"name": "distributed", "timeout_s": 20, "no_replacement": "shrink"})
    # Bitwise at every step: after the rebuild inside node 1's process and after the move back (Adam included).
    assert len(states["process"]) == iterations and equal_states(states["local"], states["process"])
    records = read_metrics(tmp_path / "process" / "metrics.jsonl")
    assert deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl")) == deterministic_view(records)
    for key in ("failures", "recoveries", "final_val_loss", "shrunk_sim_s", "moving_sim_s", "min_live_hosts",
                "total_sim_time_s"):
        assert process[key] == local[key], key
    assert process["min_live_hosts"] == 3 and process["shrunk_sim_s"] > 0
    a, b = export_weights(tmp_path / "local"), export_weights(tmp_path / "process")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    workers = json.loads((tmp_path / "process" / "workers.json").read_text())
    first_pid = {w["stage"]: w["pid"] for w in reversed(workers["history"])}  # each slot's first process
    [rebuild] = [r for rec in records for r in rec["recoveries"]]
    assert rebuild["stage"] == 2 and rebuild["process"]["new_pid"] == first_pid[1]  # rebuilt in node 1's process
    shrunk = workers["placements"][0]
    assert shrunk["hosts"] == [0, 1, 1, 3]
    assert [(w["stage"], w["stages"], w["pid"]) for w in shrunk["workers"]] == [
        (0, [0], first_pid[0]), (1, [1, 2], first_pid[1]), (3, [3], first_pid[3])]
    if replacement["replacement"] == "never":
        assert len(workers["placements"]) == 1 and len(workers["history"]) == 4  # no process ever started again
        assert [r["hosts"] for r in records[1:]][-1] == [0, 1, 1, 3]
    else:  # node 2 arrives: a new process (a new PID) runs stage 2 again
        back = workers["placements"][1]
        assert back["hosts"] == [0, 1, 2, 3] and back["generation"] > shrunk["generation"]
        new = [w for w in workers["history"] if w["stage"] == 2][-1]
        assert new["pid"] != first_pid[2] and len(workers["history"]) == 5
        assert [(w["stage"], w["stages"], w["pid"]) for w in back["workers"]][2] == (2, [2], new["pid"])
        assert [m["moves"] for m in records if m.get("moves")] == [[{"stage": 2, "from": 1, "to": 2}]]


@pytest.mark.parametrize("cores, threads", [(2, 1), (16, 4), (64, 16)])
def test_the_local_engine_computes_with_a_stage_process_s_threads(cores, threads, small_run, monkeypatch):
    """CPU kernels split their reductions by thread, so the local engine uses the thread count a stage process
    gets (its share of the cores: 4 stages on 16 cores, 4 each) instead of torch's default (every core): the
    engines are then alike bit for bit from the command line, not only in tests that pin one thread."""
    from checkfree import train as train_module
    from checkfree.train import build_engine, stage_threads

    monkeypatch.setattr(train_module.os, "cpu_count", lambda: cores)
    cfg = small_run()  # 4 stages
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # torch's default on such a machine
        build_engine(cfg, cfg.model.with_vocab(300), torch.device("cpu"))
        assert torch.get_num_threads() == stage_threads(4) == threads
    finally:
        torch.set_num_threads(before)
