"""The distributed engine's Ray launcher (engine=ray): stage actors on a local Ray and on a fake multi-node
cluster (``ray.cluster_utils.Cluster``), all on loopback.

Runs go through the public surface, ``checkfree.distributed.train(cfg, run_dir)``, and are compared with the
local engine (``checkfree.trainer.train``) on the same failures. Each actor is a fresh interpreter that
imports torch and transformers (seconds of CPU on this 2-core machine), so the tests are few and each does a
lot: the first lets the pool start and stop a Ray of its own, the others share one three-node cluster (the
pool's failure handling, then a lost node). Every test ends with none of our actors left, and with none of
Ray's own processes where the test (or the pool) started Ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

# Before Ray is imported: a Ray started here then uses 127.0.0.1 (docs/design.md, 'Engines and launchers').
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the Ray launcher needs Ray: pip install 'checkfree[ray]'")

from checkfree.distributed import messages as msg  # noqa: E402
from checkfree.distributed.pool import WorkersDied  # noqa: E402
from checkfree.distributed.ray_pool import RayLaunchError, RayPool  # noqa: E402
from checkfree.distributed.worker import WorkerSpec  # noqa: E402
from checkfree.model.presets import preset  # noqa: E402
from checkfree.run.config import RayConfig  # noqa: E402
from checkfree.run.runlog import deterministic_view, read_metrics  # noqa: E402
from checkfree.train import train  # noqa: E402
from tests.conftest import hooked_run  # noqa: E402
from tests.processes import (  # noqa: E402
    assert_same_losses,
    children,
    eventually,
    listed_alive,
    live,
    workers_file,
    write_trace,
)

RAY = {"name": "distributed", "launcher": "ray", "timeout_s": 20}


# --- helpers ------------------------------------------------------------------------------------------

def trace(path: Path, events: list[dict]) -> dict:
    return {"name": "trace", "path": write_trace(path, events)}


def our_actors(run_dir: Path | None = None) -> list[int]:
    """Live stage-actor processes: Ray titles them ray::StageActor (standbys too), plus every PID the run
    ever listed in workers.json."""
    pids = set()
    for process in psutil.process_iter(["cmdline"]):
        if (process.info["cmdline"] or [""])[0].startswith("ray::StageActor") and live(process.pid):
            pids.add(process.pid)
    return sorted(pids | listed_alive(run_dir))


def assert_our_placement_groups_removed() -> None:
    assert {pg["state"] for pg in ray.util.placement_group_table().values()} <= {"REMOVED"}


# --- a Ray of the pool's own --------------------------------------------------------------------------

def test_an_address_with_no_cluster_is_one_clear_error_at_once(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    pool = RayPool(tiny_spec(tmp_path), 5.0, tmp_path, RayConfig(address=f"127.0.0.1:{port}"))
    with pytest.raises(RayLaunchError, match=f"engine.ray.address='127.0.0.1:{port}'.*ray start --head"):
        pool.start()
    pool.shutdown()
    assert not ray.is_initialized()


def pid_of(run_dir: Path, stage: int) -> int:
    [pid] = [w["pid"] for w in workers_file(run_dir)["workers"] if w["stage"] == stage]
    return pid


def test_traced_cascading_and_sigkilled_failures_recover_like_local(small_run, tmp_path, capfd):
    """CheckFree+ on a Ray the pool starts and stops itself. A trace kills stage 0 at iteration 2, and while
    that recovery is under way stage 3's actor is SIGKILLed from outside: it joins the recovery (a cascade).
    Then, as iteration 5's step goes out, stage 1's actor is stopped (SIGSTOP), stage 2's actor, blocked
    receiving from it, is SIGKILLed, and stage 1 goes on: that iteration is discarded everywhere, stage 2
    rebuilt on a warm standby and the iteration redone. The result is exactly the local run where a trace
    kills stages 0 and 3 at iteration 2 and stage 2 at iteration 5, losses and weights. Afterwards no Ray
    process is left. Ray's 'A worker died' warning names only the SIGKILLed actors, not the one the trace
    killed. The Ray run's links are shaped (``engine.shape``), the local one's not: shaping changes no bit.
    (Resume is the supervisor's, whatever the launcher: tests/test_distributed.py.)"""
    assert not ray.is_initialized()
    sections = {"strategy": {"name": "checkfree_plus"},
                "trainer": {"iterations": 6, "eval_every": 3}}
    local_dir, run_dir = tmp_path / "local", tmp_path / "ray"
    all_three = trace(tmp_path / "local.json", [{"iteration": 2, "stage": 0}, {"iteration": 2, "stage": 3},
                                                {"iteration": 5, "stage": 2}])
    local = train(small_run(**sections, failure=all_three), local_dir)
    killed: dict[str, int] = {}

    def cascade(n, engine):  # the first recovery (stage 0's): stage 3 dies meanwhile
        if n == 1:
            killed["cascade"] = pid_of(run_dir, 3)
            os.kill(killed["cascade"], signal.SIGKILL)

    def mid_step(n, engine):  # iteration 5's step (no step was redone before it)
        if n != 5:
            return
        stalled, killed["step"] = pid_of(run_dir, 1), pid_of(run_dir, 2)
        os.kill(stalled, signal.SIGSTOP)

        def kill_then_resume():
            time.sleep(0.5)
            os.kill(killed["step"], signal.SIGKILL)
            time.sleep(0.3)
            os.kill(stalled, signal.SIGCONT)

        threading.Thread(target=kill_then_resume, daemon=True).start()

    first = trace(tmp_path / "ray.json", [{"iteration": 2, "stage": 0}])
    # Every byte the actors send shaped to its link (engine.shape): the stamps ahead of each message and the links'
    # bookings live through the cascade and the kill mid-step, and change no bit.
    summary = hooked_run(small_run(**sections, failure=first, engine={**RAY, "shape": True}), run_dir,
                         execute=cascade, train_step=mid_step).run()

    assert summary["status"] == "completed" and summary["iterations"] == 6
    listed = workers_file(run_dir)
    assert summary["recoveries"] == local["recoveries"]
    assert [(r["stage"], r["method"]) for r in summary["recoveries"]] == [
        (0, "copy+replica"), (3, "copy+replica"), (2, "copy")]
    assert [(f["stage"], f.get("cause")) for f in summary["failures"]] == [
        (0, None), (3, "process exited during respawn"), (2, "process exited during step")]  # seen at once
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(7))  # iteration 5 logged once: redone
    assert records[2]["failed_stages"] == [0, 3]
    [rec] = records[5]["recoveries"]
    process = rec["process"]
    assert process["old_pid"] == killed["step"] != process["new_pid"]
    assert process["old_node_ip"] == process["new_node_ip"] == "127.0.0.1"
    assert_same_losses(local_dir, run_dir)
    # The weights each run leaves (read back from the actors at the end).
    x, y = (load_file(d / "model" / "model.safetensors") for d in (local_dir, run_dir))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    assert listed["launcher"] == "ray" and listed["workers"] == []  # written at shutdown: nobody left
    assert {e["node_ip"] for e in listed["history"]} == {"127.0.0.1"}
    [replacement] = [e for e in listed["history"] if e["pid"] == process["new_pid"]]
    assert replacement["placement"] == "bundle 2, standby"
    assert not ray.is_initialized()
    assert eventually(lambda: children()) == []  # Ray's own processes went with it
    assert our_actors(run_dir) == []

    # Ray prints its ~600-character warning for a death it did not expect, naming the worker's PID: the
    # SIGKILLs from outside, never the trace's failure (stage 0's first actor, ended by ray.kill).
    said = capfd.readouterr()
    died = {int(pid) for pid in re.findall(r"A worker died or was killed.*?Worker PID: (\d+)", said.out + said.err)}
    traced = next(e["pid"] for e in listed["history"] if e["stage"] == 0)
    assert traced not in died
    assert killed["cascade"] in died and died <= {killed["cascade"], killed["step"]}


# --- one three-node cluster on this machine -----------------------------------------------------------

@pytest.fixture(scope="module")
def three_nodes():
    """A head (2 CPUs) and two worker nodes (1 and 2 CPUs). Four one-CPU stages spread over all three, so
    the 1-CPU node holds exactly one stage, and losing it leaves room for that stage elsewhere."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        small = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=2)
        yield cluster, small
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert eventually(lambda: children()) == []


def tiny_spec(run_dir: Path, n_stages: int = 3) -> WorkerSpec:
    model = dataclasses.replace(preset("tiny"), n_stages=n_stages).with_vocab(64)
    return WorkerSpec(stage=0, replica=0, model=model, seed=0, lr=3e-3, clip=1.0, precision="fp32", device="cpu",
                      schedule="in_order", pipeline="gpipe", micro_batches=2, micro_batch_size=2, replicas=1,
                      backend="gloo", store_addr="127.0.0.1", store_port=0, timeout_s=5.0)


def test_pool_raises_stage_lost_when_an_actor_dies_in_rendezvous_or_respawn(three_nodes, tmp_path):
    """The supervisor adds stages lost during a recovery to that recovery, so ``rendezvous`` and ``respawn``
    must raise WorkersDied naming them (within engine.timeout_s + a grace), never hang or fail otherwise."""
    cluster, _ = three_nodes
    ray.init(address=cluster.address, log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    pool = RayPool(tiny_spec(tmp_path), 5.0, tmp_path, RayConfig(standby=False))
    try:
        pool.start()
        # Rendezvous: stage 2 is stalled before it can join the new generation and dies while stages 0 and
        # 1 wait for it there (they give up after engine.timeout_s).
        victim = pool.pid(2)
        os.kill(victim, signal.SIGSTOP)
        outcome: dict = {}

        def rendezvous():
            try:
                pool.rendezvous()
            except WorkersDied as lost:
                outcome["lost"] = lost

        thread = threading.Thread(target=rendezvous)
        thread.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "rendezvous hung after an actor died"
        assert (outcome["lost"].stages, outcome["lost"].command) == ({2}, "rendezvous")

        # Respawn: a survivor dies meanwhile -> it is named; the replacement stays.
        os.kill(pool.pid(0), signal.SIGKILL)
        with pytest.raises(WorkersDied) as lost:
            pool.respawn([2])
        assert lost.value.stages == {0} and pool.pid(2) != victim

        # Respawn: the replacement's process itself dies while it starts (SIGKILL as soon as Ray has made a
        # process the StageActor, before it said hello), as a crash would. Not ray.kill right after the actor
        # was created: that is no crash a machine can have, and with it the next replacement in that bundle
        # sometimes never started (Ray 2.60; 2 of 4 runs waited out engine.ray.start_timeout_s).
        known = set(our_actors())

        def kill_the_replacement():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                new = set(our_actors()) - known
                if new:
                    for pid in new:
                        os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_the_replacement)
        killer.start()
        with pytest.raises(WorkersDied) as lost:
            pool.respawn([0])
        killer.join()
        assert lost.value.stages == {0}

        # Then a clean recovery: every stage alive, in one new generation.
        pool.respawn([0])
        pool.rendezvous()
        replies = pool.broadcast(msg.GetState())
        assert sorted(reply.generation for reply in replies.values()) == [pool.generation] * 3
    finally:
        pool.shutdown()
        assert_our_placement_groups_removed()
        ray.shutdown()
    assert eventually(lambda: our_actors(tmp_path)) == []


def test_lost_node_its_stage_moves_to_another_node(three_nodes, small_run, tmp_path):
    """Plain CheckFree (edges copied from their one neighbour). The run joins the cluster by address; a trace
    loses stage 2 at iteration 2, rebuilt from its neighbours exactly as on the local engine; then the 1-CPU
    node, holding one stage, is removed. That stage is replaced on another node (its placement-group bundle
    moved there) and the run completes; the cluster, not ours, keeps running with nothing of ours on it."""
    cluster, small = three_nodes
    run_dir = tmp_path / "ray"
    engine = {**RAY, "ray": {"address": cluster.address, "standby": False}}
    sections = {"strategy": {"name": "checkfree", "edge_rule": "copy"},
                "failure": trace(tmp_path / "trace.json", [{"iteration": 2, "stage": 2}]),
                "trainer": {"iterations": 8, "eval_every": 2}}
    train(small_run(**sections), tmp_path / "local")
    cfg = small_run(**sections, engine=engine)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=train(cfg, run_dir)))
    thread.start()
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir / "metrics.jsonl")) < 3:
        assert thread.is_alive() and time.monotonic() < deadline, "the run stopped before the node loss"
        time.sleep(0.05)
    [lost_stage] = [w["stage"] for w in workers_file(run_dir)["workers"] if w["node_id"] == small.node_id]
    cluster.remove_node(small)
    thread.join(180)
    assert not thread.is_alive(), "the run hung after the node loss"

    summary = result["summary"]
    assert summary["status"] == "completed" and summary["iterations"] == 8
    assert [f["stage"] for f in summary["failures"]] == [2, lost_stage]
    assert [(r["stage"], r["method"]) for r in summary["recoveries"]][0] == (2, "average")
    assert summary["recoveries"][1]["stage"] == lost_stage
    # Up to the node loss (after iteration 2's record), bit for bit the local engine's run.
    assert deterministic_view(read_metrics(run_dir / "metrics.jsonl"))[:3] == \
        deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))[:3]
    listed = workers_file(run_dir)
    assert {e["node_ip"] for e in listed["history"]} == {"127.0.0.1"}  # loopback, three nodes
    assert len({e["node_id"] for e in listed["history"]}) == 3
    [move] = listed["moves"]
    assert move["stage"] == lost_stage and move["from"]["id"] == small.node_id != move["to"]["id"]
    assert all(r["train_loss"] == r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl")[1:])

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2 and {n["NodeManagerAddress"] for n in alive} == {"127.0.0.1"}
        assert_our_placement_groups_removed()
    finally:
        ray.shutdown()
    assert eventually(lambda: our_actors(run_dir)) == []


def test_no_free_node_the_pipeline_shrinks_onto_fewer_actors_and_an_added_node_takes_its_stage_back(
        small_run, tmp_path):
    """Three stages, one actor per one-slot node (the head has no slot for them). A trace loses stage 1 at
    iteration 3 and its replacement is 0.05 h away (``engine.no_replacement=shrink``): stage 1 is rebuilt inside
    stage 0's actor, and the run goes on with two actors. Before iteration 6 its node leaves the cluster, so no
    free node is left, and a new node is added (``Cluster.add_node``); when the replacement is due, a new actor
    there takes stage 1 back, its weights and Adam state sent from stage 0's actor. Metrics equal the local
    engine's bit for bit."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    surgery: dict = {}

    def replace_the_node(n, engine):
        if n != 6:
            return
        first = {e["stage"]: e for e in reversed(workers_file(run_dir)["history"])}
        [gone] = [node for node in cluster.worker_nodes if node.node_id == first[1]["node_id"]]
        cluster.remove_node(gone)
        assert not eventually(lambda: gone.node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}, 60)
        surgery.update(first=first, added=cluster.add_node(num_cpus=1, resources={"slot": 1}))
        cluster.wait_for_nodes()

    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"slot": 1})
        cluster.wait_for_nodes()
        run_dir = tmp_path / "ray"
        sections = {"model": {"n_stages": 3}, "strategy": {"name": "checkfree"},
                    "failure": {**trace(tmp_path / "trace.json", [{"iteration": 3, "stage": 1}]),
                                "replacement": "fixed", "replacement_mean_h": 0.05},
                    "trainer": {"iterations": 20, "eval_every": 10}}
        local = train(small_run(**sections, engine={"no_replacement": "shrink"}), tmp_path / "local")
        engine = {**RAY, "no_replacement": "shrink",
                  "ray": {"address": cluster.address, "standby": False, "resources": {"slot": 1}}}
        summary = hooked_run(small_run(**sections, engine=engine), run_dir, train_step=replace_the_node).run()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary["status"] == "completed" and summary["min_live_hosts"] == 2
    assert deterministic_view(read_metrics(run_dir / "metrics.jsonl")) == \
        deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))
    assert summary["final_val_loss"] == local["final_val_loss"]
    first, added, listed = surgery["first"], surgery["added"], workers_file(run_dir)
    shrunk, back = listed["placements"]
    assert shrunk["hosts"] == [0, 0, 2] and back["hosts"] == [0, 1, 2]
    assert [(w["stage"], w["stages"]) for w in shrunk["workers"]] == [(0, [0, 1]), (2, [2])]
    [rebuild] = [r for record in read_metrics(run_dir / "metrics.jsonl") for r in record["recoveries"]]
    assert rebuild["stage"] == 1 and rebuild["process"]["new_pid"] == first[0]["pid"]  # in stage 0's actor
    returned = [e for e in listed["history"] if e["stage"] == 1][-1]
    assert returned["node_id"] == added.node_id != first[1]["node_id"]
    assert [(m["stage"], m["from"]["id"], m["to"]["id"]) for m in listed["moves"]] == \
        [(1, first[1]["node_id"], added.node_id)]
