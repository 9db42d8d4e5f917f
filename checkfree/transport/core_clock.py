"""The time of a stage process as if it had a core to itself (``engine.compute_time=cpu``).

On a machine with fewer cores than stage processes, stages that a real cluster runs at once take turns here, and
the wall clock times their turns, not their work: six stage processes on 2 cores made an emulated iteration on one
cluster about twice what a core a stage would take (docs/results.md, 'The clock checked against emulated runs').
This clock times the work instead. A process's time advances with the CPU seconds of the thread that serves its
commands (torch computes there: one intra-op thread a stage process) and jumps, rather than sleeps, over every wait
the shaper asks for: a message's arrival, a link still sending, the all-reduce's ring, storage
(``checkfree.transport.shaper``). Processes meet at every message, whose arrival time the sender stamps in its own
clock, and at every command, which carries the latest time the supervisor has heard (``msg.Timed``): no process
can then run ahead of what it waits for, as in a conservative discrete-event simulation.

What it leaves out, by construction: time a process spends blocked without a message to say when (none in a step,
where every wait is for a stamped message), the CPU of threads other than the serving one (gloo's own copies; a
checkpoint's background writer, which books its bytes on the storage link all the same: ``background``), and the
supervisor's own work between commands. Its CPU seconds are those of a thread that shares its core with others: a
cache that another process has just emptied is counted, a wait for the core is not.
"""

from __future__ import annotations

import threading
import time


class CoreClock:
    """Seconds since the clock was made, in the serving thread's CPU time plus every wait jumped over."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self._cpu = time.pthread_getcpuclockid(self.thread)
        self._lock = threading.Lock()
        self._offset = -time.clock_gettime(self._cpu)
        self.background = 0.0
        """The latest time a background thread (a checkpoint's writer) waited until: ``settle`` catches up to it."""

    def now(self) -> float:
        return self._offset + time.clock_gettime(self._cpu)

    def sleep(self, seconds: float) -> None:
        """Jump over ``seconds`` of waiting. From another thread, only note until when it waited: a background
        thread's wait overlaps the serving thread's work, as on a real node."""
        if seconds <= 0:
            return
        with self._lock:
            if threading.get_ident() == self.thread:
                self._offset += seconds
            else:
                self.background = max(self.background, self.now() + seconds)

    def catch_up(self, at: float) -> None:
        """This process learns that it is at least ``at`` (a command sent after replies of that time)."""
        with self._lock:
            self._offset += max(0.0, at - self.now())

    def settle(self) -> None:
        """Wait for what the background threads waited for (a checkpoint flush joined)."""
        self.catch_up(self.background)


__all__ = ["CoreClock"]
