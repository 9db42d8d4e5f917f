"""The process engine with real processes: gloo on 127.0.0.1, one process per stage.

Every test that starts processes checks that none of them outlives it. Processes come from a forkserver
that the first test starts once (it imports torch and transformers); the forkserver and multiprocessing's
resource tracker are helpers of this pytest process, not workers, and are not counted as strays.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from checkfree.distributed.programs import gpipe_program, host_program, one_f_one_b_program, stage_program
from checkfree.distributed.rendezvous import RendezvousError
from checkfree.recovery.base import UnrecoverableFailure
from checkfree.run.runlog import deterministic_view, read_metrics
from checkfree.stage.routes import route
from checkfree.stage.schedule import InOrder, OutOfOrder
from checkfree.train import build_run, train
from tests.conftest import captured_run, hooked_run
from tests.processes import (
    assert_same_losses,
    children,
    eventually,
    listed_alive,
    losses,
    workers_file,
    write_trace,
)

DIST = {"name": "distributed", "timeout_s": 20}


# --- helpers ------------------------------------------------------------------------------------------

def stray_processes(run_dir: Path | None = None) -> list[int]:
    """Live processes this test may have left: children of pytest other than multiprocessing's helpers,
    and every worker PID the run ever listed in workers.json."""
    return sorted(set(children()) | listed_alive(run_dir))


def assert_no_strays(run_dir: Path | None = None) -> None:
    # A process that just got SIGKILL may take a moment to be reaped.
    assert eventually(lambda: stray_processes(run_dir), seconds=5) == []
    assert multiprocessing.active_children() == []


def assert_same_values(a, b, where: str = "") -> None:
    """Nested states (dicts, lists, tuples, tensors, plain values) equal, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def workers(run_dir: Path) -> list[dict]:
    return workers_file(run_dir).get("workers", [])


# --- programs: pure functions ---------------------------------------------------------------------------

def test_routes_group_consecutive_ops_and_swap_edges():
    in_order = route((0, 1, 2, 3), 4)
    assert [(v.stage, v.ops, v.prev, v.next) for v in in_order] == [
        (0, ("embed", "body"), None, 1), (1, ("body",), 0, 2), (2, ("body",), 1, 3), (3, ("body", "head"), 2, None)]
    swapped = route(OutOfOrder(4).order(1), 4)
    # The embedding still runs first on stage 0 and the head last on stage S-1.
    assert [(v.stage, v.ops) for v in swapped] == [
        (0, ("embed",)), (1, ("body",)), (0, ("body",)), (3, ("body",)), (2, ("body",)), (3, ("head",))]
    assert [(v.prev, v.next) for v in swapped] == [(None, 1), (0, 0), (1, 3), (0, 2), (3, 3), (2, None)]


def test_programs_gpipe_and_1f1b():
    gpipe = gpipe_program(1, InOrder(4), [0, 1, 2])
    assert [(p.backward, p.micro_batch) for p in gpipe] == [(False, 0), (False, 1), (False, 2),
                                                            (True, 0), (True, 1), (True, 2)]
    first = one_f_one_b_program(0, InOrder(4), [0, 1, 2, 3, 4])
    assert [("B" if p.backward else "F") + str(p.micro_batch) for p in first] == \
        ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "B2", "B3", "B4"]
    last = one_f_one_b_program(3, InOrder(4), [0, 1, 2])
    assert [("B" if p.backward else "F") + str(p.micro_batch) for p in last] == ["F0", "B0", "F1", "B1", "F2", "B2"]
    # Out-of-order routes visit stage 0 twice: GPipe it is, whatever was asked for.
    assert stage_program(0, OutOfOrder(4), [0, 1], "1f1b") == gpipe_program(0, OutOfOrder(4), [0, 1])



def test_a_process_running_two_stages_interleaves_their_programs_in_one_deadlock_free_order():
    """After a shrink one process runs stages 1 and 2 (1F1B, S=4, M=4): each stage's passes keep their own order
    (so its gradients accumulate as when it runs alone), stage 2 runs each forward right after stage 1's, and each
    backward of stage 1 right after stage 2's — one global order of all four stages' programs, cut to these two."""
    def names(program):
        return [("B" if p.backward else "F") + f"{p.micro_batch}s{p.visit.stage}" for p in program]

    merged = host_program([1, 2], InOrder(4), [0, 1, 2, 3], "1f1b")
    assert names(merged) == ["F0s1", "F0s2", "F1s1", "F1s2", "F2s1", "B0s2", "B0s1", "F2s2", "F3s1", "B1s2",
                             "B1s1", "F3s2", "B2s2", "B2s1", "B3s2", "B3s1"]
    for k in (1, 2):
        assert [p for p in merged if p.visit.stage == k] == one_f_one_b_program(k, InOrder(4), [0, 1, 2, 3])
    # CheckFree+'s swapped route on one process running stages 0 and 1: micro-batch 1 goes 0 -> 1 -> 0.
    swapped = host_program([0, 1], OutOfOrder(4), [0, 1], "gpipe")
    assert [n + f"p{p.visit.position}" for n, p in zip(names(swapped), swapped)] == [
        "F0s0p0", "F0s1p1", "F1s0p0", "F1s1p1", "F1s0p2", "B0s1p1", "B0s0p0", "B1s0p2", "B1s1p1", "B1s0p0"]
    assert host_program([2], InOrder(4), [0, 1], "1f1b") == stage_program(2, InOrder(4), [0, 1], "1f1b")


# --- the engine against the local engine --------------------------------------------------------------

@pytest.mark.parametrize("strategy,extra", [
    ("checkfree", {}),                                          # in-order, GPipe
    ("checkfree_plus", {}),                                     # out-of-order
    ("checkfree", {"network": {"pipeline": "1f1b"}}),           # in-order, 1F1B
])
def test_no_failures_same_losses_as_local(small_run, tmp_path, strategy, extra):
    sections = {"strategy": {"name": strategy}, "trainer": {"iterations": 3, "eval_every": 3}, **extra}
    local = train(small_run(**sections), tmp_path / "local")
    summary = train(small_run(**sections, engine=DIST), tmp_path / "dist")
    assert summary["status"] == "completed" and summary["iterations"] == 3
    assert_same_losses(tmp_path / "local", tmp_path / "dist")
    assert set(summary) == set(local)  # the same summary shape
    assert summary["memory_overhead_bytes"] == local["memory_overhead_bytes"]
    a, b = read_metrics(tmp_path / "local" / "metrics.jsonl"), read_metrics(tmp_path / "dist" / "metrics.jsonl")
    assert [set(r) for r in a] == [set(r) for r in b]  # the same record fields
    assert b[-1]["grad_norm"] == a[-1]["grad_norm"]
    assert_no_strays(tmp_path / "dist")


def test_data_parallel_replicas_match_local(small_run, tmp_path):
    sections = {"strategy": {"name": "checkfree_plus"}, "trainer": {"iterations": 2, "eval_every": 2}}
    train(small_run(**sections), tmp_path / "local")
    summary = train(small_run(**sections, engine={**DIST, "replicas": 2}), tmp_path / "dist")
    assert summary["status"] == "completed"
    a, b = losses(tmp_path / "local"), losses(tmp_path / "dist")
    # Two replicas sum their gradients in another order than one process accumulates them: equal up to rounding.
    assert [x[0] for x in a] == [x[0] for x in b]
    for x, y in zip(a, b):
        assert (x[1] is None or abs(x[1] - y[1]) <= 1e-5) and (x[2] is None or abs(x[2] - y[2]) <= 1e-5)
    assert len(json.loads((tmp_path / "dist" / "workers.json").read_text())["history"]) == 8
    assert_no_strays(tmp_path / "dist")


def test_node_losses_with_two_replicas_give_the_local_run_on_processes(small_run, tmp_path):
    """R = 2 on both engines under traced node losses: one replica of stage 1 (the stage lives on), the whole of
    stage 2, then both replicas of stage 3 one after the other (the second empties it). The failures, recoveries,
    node counts and simulated times are equal; the losses equal up to the replicas' reduction order (two processes
    sum their gradients in another order than one accumulates them: within 1e-5, as without failures)."""
    trace = write_trace(tmp_path / "t.json", [{"iteration": 2, "stage": 1, "replica": 0}, {"iteration": 3, "stage": 2},
                                              {"iteration": 4, "stage": 3, "replica": 1},
                                              {"iteration": 4, "stage": 3, "replica": 0}])
    sections = {"strategy": {"name": "checkfree_plus"}, "failure": {"name": "trace", "path": trace},
                "trainer": {"iterations": 5, "eval_every": 5}}
    local = train(small_run(**sections, engine={"replicas": 2}), tmp_path / "local")
    dist = train(small_run(**sections, engine={**DIST, "replicas": 2}), tmp_path / "dist")
    calm = train(small_run(**{**sections, "failure": {"name": "none"}}, engine={**DIST, "replicas": 2}),
                 tmp_path / "calm")
    assert dist["status"] == local["status"] == calm["status"] == "completed"
    # The lone replica's process really exited and its replacement copied the stage from the other replica:
    # until the stage losses (iteration 3), the run is bitwise the process engine's run without any failure.
    assert losses(tmp_path / "dist")[:3] == losses(tmp_path / "calm")[:3]
    history = json.loads((tmp_path / "dist" / "workers.json").read_text())["history"]
    started = [(h["stage"], h["replica"]) for h in history]
    assert started.count((1, 0)) == 2 and started.count((1, 1)) == 1  # stage 1's replica 0 replaced alone
    for key in ("failures", "recoveries", "node_losses", "stage_losses", "resyncs", "resync_priced_bytes",
                "total_sim_time_s", "lost_work_sim_s", "under_replicated_sim_s"):
        assert dist[key] == local[key], key
    assert (local["node_losses"], local["stage_losses"], local["n_recoveries"]) == (5, 2, 2)
    a, b = losses(tmp_path / "local"), losses(tmp_path / "dist")
    assert [x[0] for x in a] == [x[0] for x in b]
    for x, y in zip(a, b):
        assert (x[1] is None or abs(x[1] - y[1]) <= 1e-5) and (x[2] is None or abs(x[2] - y[2]) <= 1e-5)
    assert_no_strays(tmp_path / "dist")


@pytest.fixture(scope="module")
def stage2_at_5(tmp_path_factory, data_cache):
    """The local engine with a trace event killing stage 2 at iteration 5: losses and recovered weights."""
    from checkfree.run.runconfig import load_run_config
    from tests.conftest import small_run_dict

    root = tmp_path_factory.mktemp("stage2_at_5")
    trace = write_trace(root / "trace.json", [{"iteration": 5, "stage": 2}])
    sections = {"failure": {"name": "trace", "path": trace}, "trainer": {"iterations": 6, "eval_every": 3}}
    local = captured_run(load_run_config(small_run_dict(data_cache, **sections)), root / "local")
    local.run()
    return {"dir": root / "local", "state": local.trainer.engine.captured[2], "sections": sections,
            "data_cache": data_cache}


def test_trace_failure_replaces_the_process_and_recovers_like_local(stage2_at_5, tmp_path):
    from checkfree.run.runconfig import load_run_config
    from tests.conftest import small_run_dict

    cfg = load_run_config(small_run_dict(stage2_at_5["data_cache"], **stage2_at_5["sections"], engine=DIST))
    run = captured_run(cfg, tmp_path / "dist")
    summary = run.run()
    assert summary["status"] == "completed" and summary["iterations"] == 6

    records = read_metrics(tmp_path / "dist" / "metrics.jsonl")
    with_recovery = [r for r in records if r.get("recoveries")]
    assert [r["iteration"] for r in with_recovery] == [5]
    [rec] = with_recovery[0]["recoveries"]
    assert (rec["stage"], rec["method"], rec["sources"]) == (2, "average", [1, 3])
    process = rec["process"]
    assert process["new_pid"] != process["old_pid"]
    assert not psutil.pid_exists(process["old_pid"]) or psutil.Process(process["old_pid"]).status() == "zombie"
    assert all(process[k] >= 0 for k in ("detect_s", "respawn_s", "rendezvous_s", "transfer_s"))
    assert rec["bytes_moved"] > 0

    # The replacement process holds exactly what the local engine's CheckFree computes for the same inputs.
    for name, tensor in stage2_at_5["state"].items():
        assert torch.equal(run.trainer.engine.captured[2][name], tensor), name
    assert_same_losses(stage2_at_5["dir"], tmp_path / "dist")
    assert summary["recoveries"] == [{"iteration": 5, "stage": 2, "method": "average", "sources": [1, 3]}]
    assert_no_strays(tmp_path / "dist")


def kill_mid_step(run_dir: Path, at: int, victim_stage: int, paused_stage: int):
    """A hook for the ``at``-th step: stop ``paused_stage``'s process (SIGSTOP), so ``victim_stage``'s blocks
    mid-iteration waiting for its activations; SIGKILL the victim from outside, then let the paused one go.
    Returns (hook, killed pids)."""
    killed: list[int] = []

    def hook(n, engine):
        if n != at:
            return
        pids = {w["stage"]: w["pid"] for w in workers(run_dir)}
        os.kill(pids[paused_stage], signal.SIGSTOP)

        def strike():
            time.sleep(0.5)  # the step command is out: the victim is blocked receiving from the paused stage
            try:
                os.kill(pids[victim_stage], signal.SIGKILL)
                killed.append(pids[victim_stage])
            finally:
                os.kill(pids[paused_stage], signal.SIGCONT)

        threading.Thread(target=strike, daemon=True).start()

    return hook, killed


def test_sigkill_mid_iteration_discards_and_redoes_it(stage2_at_5, tmp_path):
    """Stage 1 is stopped inside iteration 5 (SIGSTOP from the test); meanwhile the test SIGKILLs stage 2's
    process, which is blocked receiving from stage 1. The iteration is discarded, stage 2 is rebuilt from the
    norms of iteration 4 and the iteration redone: the result is the trace run's, where stage 2 died just
    before."""
    from checkfree.run.runconfig import load_run_config
    from tests.conftest import small_run_dict

    sections = {"trainer": stage2_at_5["sections"]["trainer"], "engine": DIST}
    cfg = load_run_config(small_run_dict(stage2_at_5["data_cache"], **sections))
    run_dir = tmp_path / "dist"
    hook, killed = kill_mid_step(run_dir, at=5, victim_stage=2, paused_stage=1)
    summary = hooked_run(cfg, run_dir, train_step=hook).run()

    assert summary["status"] == "completed" and summary["iterations"] == 6
    assert [f["stage"] for f in summary["failures"]] == [2]
    assert summary["failures"][0]["cause"] == "process exited during step"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(7))  # iteration 5 logged once: redone, not repeated
    [rec] = records[5]["recoveries"]
    assert (rec["stage"], rec["method"], rec["sources"]) == (2, "average", [1, 3])
    assert killed == [rec["process"]["old_pid"]] and rec["process"]["new_pid"] not in killed
    assert records[5]["failed_stages"] == [2]
    assert_same_losses(stage2_at_5["dir"], run_dir)
    assert_no_strays(run_dir)


# --- faults of the engine itself ----------------------------------------------------------------------

def test_unrecoverable_failure_stops_with_the_error_and_no_orphans(small_run, tmp_path):
    trace = write_trace(tmp_path / "trace.json", [{"iteration": 2, "stage": 0}])
    cfg = small_run(failure={"name": "trace", "path": trace}, trainer={"iterations": 3}, engine=DIST)
    with pytest.raises(UnrecoverableFailure, match="stage 0 was lost at iteration 2"):
        train(cfg, tmp_path / "dist")
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["status"] == "error" and "stage 0 was lost" in summary["error"]
    assert [r["iteration"] for r in read_metrics(tmp_path / "dist" / "metrics.jsonl")] == [0, 1]
    assert_no_strays(tmp_path / "dist")


def test_a_tcp_store_on_a_port_in_use_is_a_clear_error():
    """Ray's rendezvous store (a one-machine run's is a file, on no port)."""
    from checkfree.distributed.rendezvous import open_store

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"127.0.0.1:{port}.*in use"):
            open_store("127.0.0.1", port, 5.0)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (its own processes: no root needed)."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_a_local_run_s_rendezvous_is_a_private_file_and_its_sockets_are_on_loopback(small_run, tmp_path):
    """On one machine the rendezvous store is a file in a directory only the run's user can open (mode 0700):
    the supervisor listens on no port at all (a TCPStore answers any local user, list_keys() included, and with
    the keys the run's secret), another user cannot open the store (checked as 'nobody' where this test runs as
    root), the gloo sockets of the stage processes are on loopback, the secret reaches no file of the run, and
    the store's directory is gone when the run ends."""
    before = listening(os.getpid())
    seen: dict = {}

    def snapshot(n, engine):  # the group formed and every pair connected by the first iteration
        if n == 2:
            pool = engine.pool
            path = Path(pool.spec.store_path)
            seen.update(path=path, mode=path.parent.stat().st_mode & 0o777, owner=path.parent.stat().st_uid,
                        secret=pool.spec.secret, spec=repr(pool.spec), supervisor=listening(os.getpid()) - before,
                        workers={h.pid: listening(h.pid) for h in pool.handles.values()})
            if os.geteuid() == 0:  # root opens anything: ask as an unprivileged user
                probe = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=30, user=65534,
                                       cwd="/")
                seen["other_user"] = (probe.returncode, probe.stderr.strip())

    run_dir = tmp_path / "dist"
    summary = hooked_run(small_run(trainer={"iterations": 2, "eval_every": 2}, engine=DIST), run_dir,
                         train_step=snapshot).run()
    assert summary["status"] == "completed"
    assert seen["supervisor"] == set(), seen["supervisor"]
    assert seen["mode"] == 0o700 and seen["owner"] == os.geteuid() and seen["path"].name == "store"
    if "other_user" in seen:
        assert seen["other_user"][0] != 0 and "Permission denied" in seen["other_user"][1], seen["other_user"]
    addresses = {ip for s in seen["workers"].values() for ip, _ in s}
    assert addresses == {"127.0.0.1"}, seen
    assert len(seen["workers"]) == 4
    assert len(seen["secret"]) == 32 and seen["secret"] not in seen["spec"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if seen["secret"].encode() in p.read_bytes()]
    assert not seen["path"].parent.exists()
    assert_no_strays(run_dir)


def test_a_worker_without_the_secret_cannot_join(small_run):
    from checkfree.distributed.rendezvous import generation_prefix, join_generation, new_secret, open_store

    store = open_store("127.0.0.1", 0, 5.0)
    with pytest.raises(RendezvousError, match="rank 1 has no rendezvous secret"):
        join_generation(store, 0, "gloo", 1, 2, 5.0, "")
    a, b = new_secret(), new_secret()
    assert a != b and generation_prefix(a, 3) == f"checkfree/{a}/generation3"


def test_repeated_kills_and_failures_leave_one_live_worker_per_stage(small_run, tmp_path):
    """A short distributed soak: trace failures at boundaries (two at once included) plus three SIGKILLs
    from outside at whatever point the run is in. Every loss is matched by one recovery, the run completes,
    and it ends with exactly one live worker per stage."""
    trace = write_trace(tmp_path / "trace.json", [{"iteration": 2, "stage": 1}, {"iteration": 4, "stage": 0},
                                                  {"iteration": 4, "stage": 3}])
    cfg = small_run(strategy={"name": "checkfree_plus"}, failure={"name": "trace", "path": trace},
                    trainer={"iterations": 24, "eval_every": 12}, engine=DIST)
    run_dir = tmp_path / "dist"
    final: list[tuple[int, int, bool]] = []

    def snapshot(n, engine):  # the processes alive when training ends (close stops them all right after)
        final.extend((h.stage, h.pid, h.process.is_alive()) for h in engine.pool.handles.values())

    run = hooked_run(cfg, run_dir, close=snapshot)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run.run()), daemon=True)
    thread.start()

    killed = []
    for after_lines, stage in ((7, 2), (12, 0), (17, 3)):
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir / "metrics.jsonl")) < after_lines:
            assert thread.is_alive() and time.monotonic() < deadline, "the run stopped before the kill"
            time.sleep(0.01)
        [victim] = [w["pid"] for w in workers(run_dir) if w["stage"] == stage]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        while victim in [w["pid"] for w in workers(run_dir)]:  # wait for its replacement before the next kill
            assert thread.is_alive() and time.monotonic() < deadline, "no replacement after the kill"
            time.sleep(0.01)
    thread.join(120)
    assert not thread.is_alive(), "the run hung"

    summary = result["summary"]
    assert summary["status"] == "completed" and summary["iterations"] == 24
    assert summary["n_failures"] == summary["n_recoveries"] == 3 + 3
    assert sorted((f["iteration"], f["stage"]) for f in summary["failures"]) == \
        sorted((r["iteration"], r["stage"]) for r in summary["recoveries"])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(25))
    assert all(r["train_loss"] == r["train_loss"] for r in records[1:])  # finite (not NaN)
    assert sorted(stage for stage, _, alive in final if alive) == [0, 1, 2, 3]
    assert not set(killed) & {pid for _, pid, _ in final}
    assert_no_strays(run_dir)


def test_a_second_stage_lost_during_a_recovery_joins_it(small_run, tmp_path):
    """Stage 2 fails (trace) at iteration 4; while its recovery is under way (its replacement starting), stage
    1's process is SIGKILLed from outside. The rendezvous finds it gone, the recovery is re-planned for both
    (interpolated between stages 0 and 3) and the run goes on — exactly as a run that lost both at once."""
    both = write_trace(tmp_path / "both.json", [{"iteration": 4, "stage": 1}, {"iteration": 4, "stage": 2}])
    one = write_trace(tmp_path / "one.json", [{"iteration": 4, "stage": 2}])
    sections = {"trainer": {"iterations": 6, "eval_every": 3}}
    train(small_run(**sections, failure={"name": "trace", "path": both}), tmp_path / "local")
    run_dir = tmp_path / "dist"
    killed: list[int] = []

    def kill_stage_1(n, engine):
        if n == 1:
            [pid] = [w["pid"] for w in workers(run_dir) if w["stage"] == 1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    cfg = small_run(**sections, failure={"name": "trace", "path": one}, engine=DIST)
    summary = hooked_run(cfg, run_dir, execute=kill_stage_1).run()

    assert summary["status"] == "completed"
    assert [(f["stage"], f.get("cause")) for f in summary["failures"]] == [
        (2, None), (1, "process exited during rendezvous")]
    assert summary["recoveries"] == [{"iteration": 4, "stage": 1, "method": "interpolate", "sources": [0, 3]},
                                     {"iteration": 4, "stage": 2, "method": "interpolate", "sources": [0, 3]}]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[4]["failed_stages"] == [1, 2]
    assert killed == [records[4]["recoveries"][0]["process"]["old_pid"]]
    assert_same_losses(tmp_path / "local", run_dir)
    assert_no_strays(run_dir)


def test_a_stage_lost_during_another_s_rendezvous_does_not_wait_out_the_timeout(small_run, tmp_path):
    """Stage 2 fails (trace) at iteration 3. As its recovery's rendezvous starts, stage 1 is stopped (SIGSTOP),
    so the others wait for it to join, and 1 s later SIGKILLed. The supervisor calls that generation off at
    once: the iteration takes about the kill's delay plus two respawns, far from engine.timeout_s (60 s; it
    used to wait all of it), and the recovery record's wall_s counts the aborted attempt too."""
    trace = write_trace(tmp_path / "trace.json", [{"iteration": 3, "stage": 2}])
    run_dir = tmp_path / "dist"
    timeout_s, delay_s = 60.0, 1.0
    killed: list[int] = []

    def stall_stage_1(n, engine):
        if n != 1:
            return
        pool, rendezvous = engine.pool, engine.pool.rendezvous

        def rendezvous_with_a_loss():
            pool.rendezvous = rendezvous  # once
            pid = pool.pid(1)
            os.kill(pid, signal.SIGSTOP)  # it will never answer the roll call
            timer = threading.Timer(delay_s, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
            timer.start()
            try:
                return rendezvous()
            finally:
                timer.join()

        pool.rendezvous = rendezvous_with_a_loss

    cfg = small_run(trainer={"iterations": 4, "eval_every": 4}, failure={"name": "trace", "path": trace},
                    engine={**DIST, "timeout_s": timeout_s})
    summary = hooked_run(cfg, run_dir, execute=stall_stage_1).run()

    assert summary["status"] == "completed"
    assert [(f["stage"], f.get("cause")) for f in summary["failures"]] == [
        (2, None), (1, "process exited during rendezvous")]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[3]["failed_stages"] == [1, 2]
    assert len(killed) == 1 and killed[0] == records[3]["recoveries"][0]["process"]["old_pid"]
    took = records[3]["wall_time_s"] - records[2]["wall_time_s"]
    for rec in records[3]["recoveries"]:
        assert rec["process"]["attempts"] == 2
        assert delay_s <= rec["wall_s"] <= took  # the wall time really spent, the aborted attempt included
    assert took < timeout_s / 2
    assert_no_strays(run_dir)


def test_a_stage_lost_while_the_state_is_saved_is_recovered_and_the_save_redone(small_run, tmp_path):
    """save_every=1 on processes: stage 2's process is SIGKILLed as the state after iteration 3 is gathered
    (``get_state``). The loss is recovered like one at the start of iteration 4 and the save redone; the state
    saved before stays whole meanwhile. The run ends with the losses, weights, optimizer states and held copies
    of a local run whose trace fails stage 2 at iteration 4, bit for bit."""
    from checkfree.run.resume import load_state

    trace = write_trace(tmp_path / "trace.json", [{"iteration": 4, "stage": 2}])
    sections = {"trainer": {"iterations": 6, "eval_every": 3, "save_every": 1}}
    build_run(small_run(**sections, failure={"name": "trace", "path": trace}), tmp_path / "local").run()
    run_dir = tmp_path / "dist"
    killed: list[int] = []
    on_disk_while_recovering: list[int] = []

    def kill_stage_2(n, engine):
        if n == 3:  # the third save: after iteration 3
            killed.append(engine.pool.pid(2))
            os.kill(killed[-1], signal.SIGKILL)

    def look_at_the_saved_state(n, engine):
        on_disk_while_recovering.append(load_state(run_dir)["iteration"])

    summary = hooked_run(small_run(**sections, engine=DIST), run_dir, state_dict=kill_stage_2,
                         execute=look_at_the_saved_state).run()

    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["failures"] == [{"iteration": 4, "stage": 2, "time_s": summary["failures"][0]["time_s"],
                                     "cause": "process exited during get_state"}]
    assert summary["recoveries"] == [{"iteration": 4, "stage": 2, "method": "average", "sources": [1, 3]}]
    assert on_disk_while_recovering == [2]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert killed == [records[4]["recoveries"][0]["process"]["old_pid"]]

    # A trace failure also notes its simulated time in the record; otherwise the runs are the same.
    def view(d):
        return [{k: v for k, v in r.items() if k != "failure_times_s"}
                for r in deterministic_view(read_metrics(tmp_path / d / "metrics.jsonl"))]

    assert view("local") == view("dist")
    expected, got = load_state(tmp_path / "local"), load_state(run_dir)
    assert got["iteration"] == 6 and got["carried"] is None
    for key in ("stages", "optimizers", "held", "data", "progress", "grad_norm", "grad_norm_post", "held_since"):
        assert_same_values(expected[key], got[key], key)
    for key in ("sim_time_s", "recovery_sim_s", "recoveries", "lost_iterations", "final_val_loss"):
        assert expected["totals"][key] == got["totals"][key], key
    assert_no_strays(run_dir)


def test_resume_on_processes_gives_the_uninterrupted_local_run(small_run, tmp_path):
    """trainer.save_every / trainer.resume with the process engine: a run on stage processes interrupted at
    iteration 6 and resumed (on new processes) ends with exactly the metrics and weights of an uninterrupted
    run on the local engine (the engines are bit-for-bit equal, so the engine may even change on resume)."""
    import torch

    trace = write_trace(tmp_path / "trace.json", [{"iteration": 3, "stage": 0}, {"iteration": 8, "stage": 2}])
    sections = {"strategy": {"name": "checkfree_plus", "replica_sync_every": 3},
                "failure": {"name": "trace", "path": trace}, "trainer": {"iterations": 10, "save_every": 2}}
    full = build_run(small_run(**sections), tmp_path / "full")
    full.run()

    def interrupt(n, engine):
        if n == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hooked_run(small_run(**sections, engine=DIST), tmp_path / "run", train_step=interrupt).run()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumable_from_iteration"] == 4
    resumed_cfg = small_run(**{**sections, "trainer": {**sections["trainer"], "resume": str(tmp_path / "run")}},
                            engine=DIST)
    assert train(resumed_cfg, tmp_path / "elsewhere")["resumed_at_iterations"] == [4]
    a, b = (deterministic_view(read_metrics(tmp_path / d / "metrics.jsonl")) for d in ("full", "run"))
    assert a == b
    # The weights: each run leaves its model (read back from the stage processes at the end).
    from safetensors.torch import load_file

    x, y = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("full", "run"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert_no_strays(tmp_path / "run")


def test_a_process_lost_while_a_stage_moves_back_is_recovered_like_any_loss(small_run, tmp_path):
    """Node 2 is lost at iteration 3 with its replacement 0.02 h away: node 1's process runs stages 1 and 2.
    Just as node 2 arrives, node 1's process is SIGKILLed from outside: both its stages are lost with it, the
    trainer recovers them (rebuilt from stages 0 and 3) and the stages take their places on the new processes;
    the run goes on to its end on four processes."""
    trace = write_trace(tmp_path / "trace.json", [{"iteration": 3, "stage": 2}])
    run_dir = tmp_path / "dist"
    killed: list[int] = []

    def kill_node_1(n, engine):
        if n == 3:  # the arrival (calls 1 and 2 came with the loss: before its recovery and after it)
            pid = engine.pool.handles[1].pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            assert not eventually(lambda: not engine.pool.handles[1].gone())

    cfg = small_run(strategy={"name": "checkfree", "unrecoverable": "reinit"},
                    failure={"name": "trace", "path": trace, "replacement": "fixed", "replacement_mean_h": 0.02},
                    engine={**DIST, "no_replacement": "shrink"}, trainer={"iterations": 12, "eval_every": 4})
    summary = hooked_run(cfg, run_dir, place=kill_node_1).run()

    assert summary["status"] == "completed" and killed
    assert [(f["stage"], f.get("cause")) for f in summary["failures"]] == [
        (2, None), (1, "process exited during rendezvous"), (2, "process exited during rendezvous")]
    assert [(r["stage"], r["method"]) for r in summary["recoveries"][1:]] == [(1, "interpolate"), (2, "interpolate")]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in records[1:]) and records[-1]["hosts"] == [0, 1, 2, 3]
    listed = json.loads((run_dir / "workers.json").read_text())
    assert [p["hosts"] for p in listed["placements"]] == [[0, 1, 1, 3], [0, 1, 2, 3]]
    assert killed[0] not in [w["pid"] for w in listed["placements"][1]["workers"]]
    assert_no_strays(run_dir)


def test_a_stage_paused_past_the_timeout_is_lost_and_recovered_with_its_detection_in_the_record(small_run,
                                                                                                 tmp_path):
    """Stage 1's process is stopped (SIGSTOP) inside iteration 3's step for twice engine.timeout_s, then let go:
    its peers time out and abort, it answers late, and every process is alive. A hung stage is a loss whenever
    it is noticed: stage 1 (the last to answer) is killed, rebuilt and the iteration redone -- the run completes
    -- and the recovery's wall_s counts the wait that detected it."""
    timeout_s, pause_s = 4.0, 8.0
    run_dir = tmp_path / "dist"
    paused: list[int] = []

    def pause_stage_1(n, engine):
        if n != 3:
            return
        pid = engine.pool.pid(1)
        os.kill(pid, signal.SIGSTOP)
        paused.append(pid)
        threading.Timer(pause_s, lambda: os.kill(pid, signal.SIGCONT)).start()

    cfg = small_run(trainer={"iterations": 4, "eval_every": 4}, engine={**DIST, "timeout_s": timeout_s})
    summary = hooked_run(cfg, run_dir, train_step=pause_stage_1).run()
    assert summary["status"] == "completed" and summary["iterations"] == 4
    assert [(f["stage"], f["cause"]) for f in summary["failures"]] == [(1, "process exited during step")]
    [rec] = read_metrics(run_dir / "metrics.jsonl")[3]["recoveries"]
    assert rec["stage"] == 1 and rec["process"]["old_pid"] == paused[0]
    assert rec["process"]["detect_s"] >= timeout_s / 2 and rec["wall_s"] >= rec["process"]["detect_s"]
    assert_no_strays(run_dir)
