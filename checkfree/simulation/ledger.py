"""The time ledger of one iteration's work on the simulated clock: started, interrupted, repriced, kept.

An iteration's work costs ``work_s`` simulated seconds (``Clock.iteration_s``) and stands for whole paper
iterations of ``sub_s`` seconds each (``Clock.sub_iteration_s``). It starts at the current simulated time and
runs until it is done — unless an incident interrupts it: the sub-iteration under way is lost (the kept work
is the whole sub-iterations finished before the incident), or, when the recovery rolled back, all of the
iteration's work so far is. The recovery's seconds pass, and the work goes on from where it was kept. A
placement change (nodes missing, or arriving) re-prices the rest of the work: what was kept counts at the
new price, and ``paid`` remembers what it really cost beyond that, so the iteration's kept seconds are what
its pieces cost at the prices they ran at.

The trainer drives the ledger (``Trainer.strike``: which incidents, which recovery, which placement); the
ledger only does the arithmetic, so it is tested on hand-made times (``tests/test_ledger.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Work:
    """One iteration's work: where it (re)starts on the clock (``t``), its price, and how much is kept."""

    t: float
    """The simulated time the work (re)starts at: now, or after the latest recovery or wait."""
    work_s: float
    """The iteration's price at the current placement."""
    sub_s: float
    """The price of one of the paper iterations it stands for: the granularity of lost work."""
    done: float = 0.0
    """Seconds of the work kept so far, at the current price."""
    paid: float = 0.0
    """What the kept work cost at earlier prices beyond what it counts for at the current one."""

    @property
    def end(self) -> float:
        """When the work is done if nothing interrupts it."""
        return self.t + self.work_s - self.done

    @property
    def kept_s(self) -> float:
        """The simulated seconds of the finished work, each piece at the price it ran at."""
        return self.work_s + self.paid

    def stop(self, arrival: float | None) -> float:
        """Where the work runs to uninterrupted: its end, or — when a node arrives at ``arrival`` — the end of the
        sub-iteration under way then (a stage moves back only between sub-iterations), whichever is first."""
        end = self.end
        if arrival is None:
            return end
        boundary = self.t + math.ceil((self.done + arrival - self.t) / self.sub_s - 1e-9) * self.sub_s - self.done
        return min(end, max(self.t, boundary))

    def reach(self, stop: float) -> None:
        """The work ran, uninterrupted, up to ``stop`` (never before where it is: time does not run back)."""
        if stop < self.t:
            raise ValueError(f"the work is at {self.t} s and cannot run back to {stop} s")
        self.done += stop - self.t
        self.t = stop

    def wait(self, seconds: float) -> None:
        """The pipeline stands still for ``seconds`` (a wait for nodes, stages moving): the work resumes after."""
        self.t += seconds

    def interrupt(self, at: float, rolled_back: bool, recovery_s: float) -> float:
        """An incident at ``at`` stopped the work and its recovery took ``recovery_s``; returns the seconds of work
        it threw away: the unfinished sub-iteration, or with ``rolled_back`` everything this iteration had done
        (its earlier prices included), which the rollback discards with the rest since the checkpoint."""
        ran = self.done + (at - self.t)
        self.done = 0.0 if rolled_back else math.floor(ran / self.sub_s + 1e-9) * self.sub_s
        lost = ran - self.done + (self.paid if rolled_back else 0.0)
        self.paid = 0.0 if rolled_back else self.paid
        self.t = at + recovery_s
        return lost

    def reprice(self, work_s: float, sub_s: float) -> None:
        """The placement changed: the work now costs ``work_s`` (sub-iterations ``sub_s``). The kept seconds
        count at the new price; ``paid`` keeps what they really cost beyond that."""
        if work_s != self.work_s:
            scaled = self.done * work_s / self.work_s
            self.work_s, self.done, self.paid = work_s, scaled, self.paid + self.done - scaled
        self.sub_s = sub_s


__all__ = ["Work"]
