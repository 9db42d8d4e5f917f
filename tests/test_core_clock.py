"""A stage process's own core clock (``engine.compute_time=cpu``, ``checkfree.transport.core_clock``): it counts the
serving thread's CPU seconds, jumps over waits, leaves a background thread's waits for ``settle``; and a run on core
clocks trains exactly as the wall-clock run, its iterations no faster than its links allow."""

from __future__ import annotations

import threading
import time

import pytest

from checkfree.transport.core_clock import CoreClock


def spin(cpu_seconds: float) -> None:
    """Busy work in this thread until it has used ``cpu_seconds`` of CPU."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def test_the_clock_counts_this_threads_work_not_its_idle_time():
    clock = CoreClock()
    t0 = clock.now()
    spin(0.05)
    worked = clock.now() - t0
    time.sleep(0.2)  # idle: a core that waits for nothing would not spend it (a machine with fewer cores sleeps)
    idle = clock.now() - t0 - worked
    assert worked >= 0.05 and idle < 0.02, (worked, idle)


def test_another_threads_work_is_not_this_processs_time_and_it_reads_the_serving_threads():
    """The clock belongs to the thread that made it (the one that serves commands and computes): a checkpoint
    writer spinning in another thread adds nothing, and reads the serving thread's time when it books."""
    clock = CoreClock()
    seen = []

    def writer() -> None:
        spin(0.1)
        seen.append(clock.now())

    t0 = clock.now()
    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert clock.now() - t0 < 0.02 and seen[0] - t0 < 0.02, (clock.now() - t0, seen)


def test_a_wait_jumps_the_clock_and_a_later_command_catches_it_up_never_back():
    clock = CoreClock()
    t0 = clock.now()
    clock.sleep(2.5)  # a message arriving 2.5 s from now: no real waiting
    assert clock.now() - t0 == pytest.approx(2.5, abs=0.01)
    clock.catch_up(t0 + 1.0)  # an earlier time than this process has reached: nothing changes
    assert clock.now() - t0 == pytest.approx(2.5, abs=0.01)
    clock.catch_up(t0 + 7.0)  # a command sent after replies at t0 + 7
    assert clock.now() - t0 == pytest.approx(7.0, abs=0.01)
    clock.sleep(-1.0)  # a wait already over
    assert clock.now() - t0 == pytest.approx(7.0, abs=0.01)


def test_a_background_threads_wait_overlaps_the_serving_thread_until_settled():
    """A checkpoint's writer thread waits for its bytes on the storage link while the stage trains on: the serving
    thread's clock does not move; joining the writer (``settle``) catches it up to when the bytes were there."""
    clock = CoreClock()
    t0 = clock.now()
    writer = threading.Thread(target=clock.sleep, args=(4.0,))
    writer.start()
    writer.join()
    assert clock.now() - t0 < 0.01
    assert clock.background - t0 == pytest.approx(4.0, abs=0.01)
    clock.settle()
    assert clock.now() - t0 == pytest.approx(4.0, abs=0.01)


def test_a_run_on_core_clocks_trains_as_on_the_wall_clock_and_no_faster_than_its_links(small_run, tmp_path,
                                                                                        monkeypatch):
    """The same shaped run (4 stages on the geo network, CheckFree, a stage lost at iteration 2 and rebuilt from its
    neighbours) timed by the wall and by each process's core: the same metrics bit for bit (both with one torch
    thread a stage process, as a core clock computes: the wall run would take its share of a larger machine's
    cores), and every core-clock iteration at least the link floor (the micro-batch's hops 0 -> 1 -> 2 -> 3 and
    back, 428 ms of latency: tests/test_shaper.py)."""
    import checkfree.train as entry
    from checkfree.run.runlog import deterministic_view, read_metrics
    from checkfree.train import train
    from tests.processes import write_trace

    monkeypatch.setattr(entry, "stage_threads", lambda world: 1)
    trace = write_trace(tmp_path / "t.json", [{"iteration": 2, "stage": 1}])
    sections = {"failure": {"name": "trace", "path": trace}, "trainer": {"iterations": 5, "eval_every": 5}}
    engine = {"name": "distributed", "timeout_s": 20, "shape": True}
    wall = train(small_run(**sections, engine=engine), tmp_path / "wall")
    core = train(small_run(**sections, engine={**engine, "compute_time": "cpu"}), tmp_path / "core")
    assert wall["status"] == core["status"] == "completed" and len(core["recoveries"]) == 1
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("wall", "core"))
    assert deterministic_view(a) == deterministic_view(b)
    trained = [r["wall_time_s"] for r in b if "train_loss" in r]
    assert len(trained) == 5
    assert all(later - earlier >= 0.428 for earlier, later in zip(trained, trained[1:])), trained
    # The replacement's delay (the geo preset's 30 s) passes in the processes' time, not the wall's: the recovery
    # and the iteration it began take at least that there; the wall run, whose failures are simulated, waits none.
    delay = small_run(**sections, engine=engine).network.replacement_delay_s
    recovered = [next(x for r in records for x in r["recoveries"]) for records in (a, b)]
    assert delay >= 1 and recovered[1]["wall_s"] >= delay > recovered[0]["wall_s"]
    at = {r["iteration"]: r["wall_time_s"] for r in b if "train_loss" in r}
    assert at[2] - at[1] >= delay + 0.428, at


def test_a_command_carries_the_supervisors_time_and_its_reply_the_workers():
    """The meeting at every command: a worker catches its clock up to the time its command carries before serving it
    (never back), and its reply carries its own time, which the supervisor keeps the latest of."""
    import types

    from checkfree.distributed import messages as msg
    from checkfree.distributed.pool import Supervisor
    from checkfree.distributed.worker import serve

    class Worker:  # the command loop's view of a stage worker: its clock, and a reply per command
        def start_clock(self) -> CoreClock:
            self.core = CoreClock()
            return self.core

        def handle(self, command):
            return msg.Done()

        def close(self) -> None:
            pass

    class Channel:
        def __init__(self, commands: list) -> None:
            self.commands, self.sent = list(commands), []

        def recv(self):
            if not self.commands:
                raise EOFError  # the supervisor is gone: the loop ends
            return self.commands.pop(0)

        def send(self, reply) -> None:
            self.sent.append(reply)

    channel = Channel([msg.Timed(5.0, msg.Abort()), msg.Timed(1.0, msg.Abort())])
    serve(channel, Worker())
    first, second = channel.sent
    assert isinstance(first.body, msg.Done) and isinstance(second.body, msg.Done)
    assert 5.0 <= first.at < 5.05 and first.at <= second.at < 5.05  # the later, earlier time moved nothing back
    supervisor = types.SimpleNamespace(core_now=2.0)
    assert Supervisor._untimed(supervisor, msg.Timed(7.0, msg.Done())) == msg.Done() and supervisor.core_now == 7.0
    Supervisor._untimed(supervisor, msg.Timed(3.0, msg.Done()))
    assert supervisor.core_now == 7.0
    assert Supervisor._untimed(supervisor, msg.Done()) == msg.Done()  # a wall-clock run's reply, untouched
