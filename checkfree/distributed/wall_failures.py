"""A failure model's losses executed on the wall clock (``engine.failure_clock=wall``): the process engine as an
emulation testbed.

On the simulated clock a loss strikes between the pieces of work the clock prices. Here the same model, with
the same seed, is asked for its losses in *wall* seconds since training began, and a thread of the supervisor
kills the lost stage's process at that moment — mid-step, mid-upkeep or mid-recovery, wherever it falls, with
SIGKILL, as a preemption would. The engine then finds the process gone as it finds any process killed from
outside (its peers' receives fail, the step aborts, the trainer recovers the stage and redoes the step), and the
replacement process starts after ``network.replacement_delay_s`` of real time
(``ProcessEngine.respawn_delay_s``). Every kill is logged with the time it was due and the time it landed, and
the kills are written as a ``trace`` (``wall_failures.json``) in wall seconds: a simulated run whose seconds stand
for the wall's (a clock pricing the trained model itself) meets them at the same moments.

Only models whose losses have times can be executed so (``poisson``, a ``trace`` of ``time_s`` records):
per-iteration draws have no wall time. One process a stage (``engine.replicas`` 1).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from checkfree.simulation.failures import FailureDraws

WINDOW_S = 0.25
"""How far ahead the thread asks the model at a time (a loss is killed at its own time, whatever the window)."""
MODELS = ("none", "poisson", "trace")
"""The failure models whose losses have times."""


class WallFailures:
    """The thread that kills each lost stage's process when the failure model says, and the log of the kills."""

    def __init__(self, draws: FailureDraws, pid_of: Callable[[int], int | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.draws, self.pid_of, self.clock = draws, pid_of, clock
        self.kills: list[dict] = []
        """Per loss: the stage, when it was due and when it landed (seconds since ``start``), the process killed
        (None: the stage had no process at that moment, e.g. it was being replaced)."""
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Training begins now: losses at their times from here on."""
        self.t0 = self.clock()
        self._thread = threading.Thread(target=self._run, name="wall-failures", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _until(self, t: float) -> bool:
        """Wait until ``t`` seconds after the start; False when stopped meanwhile."""
        return not self._stop.wait(max(0.0, self.t0 + t - self.clock()))

    def _run(self) -> None:
        t = 0.0
        while not self._stop.is_set():
            incident = self.draws.next_incident(1, t, t + WINDOW_S)
            if incident is None:
                t += WINDOW_S
                if not self._until(t):
                    return
                continue
            if not self._until(incident.time_s):
                return
            for stage in incident.stages:
                self.kill(stage, incident.time_s)
            t = incident.time_s

    def kill(self, stage: int, due_s: float) -> None:
        pid = self.pid_of(stage)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pid = None  # gone already (an earlier loss of it not yet replaced)
        self.kills.append({"stage": stage, "due_s": due_s, "killed_s": self.clock() - self.t0, "pid": pid})

    def write_trace(self, path: Path) -> Path:
        """The kills that landed, as a ``failure=trace`` file: the same losses for the simulated clock."""
        events = [{"time_s": k["killed_s"], "stage": k["stage"]} for k in self.kills if k["pid"] is not None]
        Path(path).write_text(json.dumps(events, indent=1) + "\n")
        return Path(path)


__all__ = ["MODELS", "WallFailures"]
