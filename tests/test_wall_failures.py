"""Losses executed on the wall clock (``engine.failure_clock=wall``, ``checkfree.distributed.wall_failures``): a kill
lands at its time, and a process-engine run meets its losses mid-training, waits for its replacements for real,
and leaves the losses as a trace the simulated clock replays."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from checkfree.distributed.wall_failures import WallFailures
from checkfree.failure_models.base import FailureConfig
from checkfree.run.config import ConfigError
from checkfree.simulation.failures import FailureDraws
from tests.processes import write_trace

LATE_S = 0.1
"""How late a kill may land: the thread wakes from a timed wait (a millisecond on an idle machine; tens under the
test suite's other workers) and then sends one signal. Never early: it waits until the loss's time."""


def test_a_kill_lands_at_its_wall_time_and_only_then(tmp_path):
    trace = write_trace(tmp_path / "t.json", [{"time_s": 0.4, "stage": 1}, {"time_s": 60.0, "stage": 0}])
    draws = FailureDraws(FailureConfig(name="trace", path=trace), 2, seed=0)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    wall = WallFailures(draws, {1: victim.pid, 0: bystander.pid}.get)
    try:
        wall.start()
        assert victim.wait(timeout=10) == -9  # SIGKILL
        wall.stop()  # long before the second loss's time: it never lands
        assert bystander.poll() is None
        [kill] = wall.kills
        assert kill["stage"] == 1 and kill["due_s"] == 0.4 and kill["pid"] == victim.pid
        assert 0.4 <= kill["killed_s"] <= 0.4 + LATE_S, kill
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()
    wall.write_trace(tmp_path / "replay.json")
    assert json.loads((tmp_path / "replay.json").read_text()) == [{"time_s": kill["killed_s"], "stage": 1}]


def test_a_stage_without_a_process_at_its_loss_is_logged_and_not_replayed(tmp_path):
    trace = write_trace(tmp_path / "t.json", [{"time_s": 0.05, "stage": 0}])
    wall = WallFailures(FailureDraws(FailureConfig(name="trace", path=trace), 1, seed=0), lambda stage: None)
    wall.start()
    deadline = time.monotonic() + 10
    while not wall.kills and time.monotonic() < deadline:
        time.sleep(0.01)
    wall.stop()
    assert [k["pid"] for k in wall.kills] == [None]
    assert json.loads(wall.write_trace(tmp_path / "replay.json").read_text()) == []


def test_a_process_run_meets_its_losses_on_the_wall_clock_and_replays_them(small_run, tmp_path):
    """Stage 2's process is killed 1.5 s after training began (mid-iteration: a tiny model's iteration is tens of
    ms), its replacement starts 0.3 s later; the run completes with one recovery whose record carries the real
    seconds of each phase beside the clock's price, and its trace replays on the local engine."""
    from checkfree.run.runlog import read_metrics
    from checkfree.train import train

    trace = write_trace(tmp_path / "t.json", [{"time_s": 1.5, "stage": 2}])
    sections = {"failure": {"name": "trace", "path": trace}, "network": {"replacement_delay_s": 0.3},
                "trainer": {"iterations": 60, "eval_every": 30}}
    summary = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20, "failure_clock": "wall"}),
                    tmp_path / "wall")
    assert summary["status"] == "completed" and summary["n_recoveries"] == 1
    [kill] = summary["wall_failures"]
    assert kill["stage"] == 2 and 1.5 <= kill["killed_s"] <= 1.5 + LATE_S
    [failure] = summary["failures"]
    assert failure["stage"] == 2 and failure["cause"].startswith("process exited during")
    [recovery] = [r for rec in read_metrics(tmp_path / "wall" / "metrics.jsonl") for r in rec["recoveries"]]
    assert recovery["process"]["replacement_delay_s"] == 0.3 and recovery["process"]["start"] == "forkserver"
    assert recovery["wall_s"] >= 0.3 and recovery["sim_seconds"] > 0  # real seconds beside the clock's
    replay = tmp_path / "wall" / "wall_failures.json"
    assert json.loads(replay.read_text()) == [{"time_s": kill["killed_s"], "stage": 2}]
    simulated = train(small_run(failure={"name": "trace", "path": str(replay)}, trainer=sections["trainer"]),
                      tmp_path / "replayed")
    assert simulated["status"] == "completed" and [f["stage"] for f in simulated["failures"]] == [2]


@pytest.mark.parametrize("sections, message", [
    ({"engine": {"failure_clock": "wall"}}, r"engine.failure_clock='wall' is invalid: wall kills stage processes"),
    ({"engine": {"name": "distributed", "failure_clock": "wall", "replicas": 2}},
     r"engine.replicas=2 is simulated \(wall needs engine=distributed, its processes launcher and engine.replicas=1\)"),
    ({"engine": {"name": "distributed", "failure_clock": "wall", "launcher": "ray"}},
     r"engine.launcher='ray' and engine.replicas=1 is simulated"),
    ({"engine": {"name": "distributed", "failure_clock": "wall"}, "failure": {"name": "trace", "path": "ITERATIONS"}},
     r"failure.path=.* is invalid: engine.failure_clock=wall kills at wall times, and its record 1 has an iteration"),
    ({"engine": {"name": "distributed", "shape": True, "no_replacement": "shrink"}},
     r"engine.shape=True is invalid: a shrunk pipeline renumbers its processes"),
    ({"engine": {"name": "distributed", "failure_clock": "wall"}, "failure": {"name": "bernoulli", "p": 0.1}},
     r"failure='bernoulli' is invalid: engine.failure_clock=wall kills processes at the wall times"),
    ({"engine": {"failure_clock": "sometimes"}}, r"engine.failure_clock='sometimes' is invalid: allowed is simulated"),
])
def test_bad_wall_clock_settings_are_one_sentence(small_run, sections, message, tmp_path):
    if sections.get("failure", {}).get("path") == "ITERATIONS":
        trace = write_trace(tmp_path / "t.json", [{"time_s": 1.0, "stage": 1}, {"iteration": 3, "stage": 2}])
        sections = {**sections, "failure": {"name": "trace", "path": trace}}
    with pytest.raises(ConfigError, match=message):
        small_run(**sections)


def test_a_resumed_run_keeps_its_failures_clock():
    from checkfree.run.resume import check_same_config
    from checkfree.run.runconfig import RunConfig

    saved = RunConfig().to_dict()
    wall = {**saved, "engine": {**saved["engine"], "failure_clock": "wall"}}
    with pytest.raises(ConfigError, match=r"engine.failure_clock='wall': the saved run has engine.failure_clock="
                                          r"'simulated'"):
        check_same_config(saved, wall, "run")
    check_same_config(saved, {**saved, "engine": {**saved["engine"], "timeout_s": 5.0}}, "run")  # may change
    # Nor the compute time: a resumed run's wall_time_s goes on in the seconds the saved one counted.
    with pytest.raises(ConfigError, match=r"engine.compute_time='cpu': the saved run has engine.compute_time='wall'"):
        check_same_config(saved, {**saved, "engine": {**saved["engine"], "compute_time": "cpu"}}, "run")
