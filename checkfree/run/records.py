"""An iteration's metrics record, gathered where things happen and written in one place.

Losses, recoveries and their seconds arrive while the iteration runs (``Trainer.strike``, ``survive``), and
sometimes after its step (a stage lost during the validation that follows it) or before it starts (a stage
lost between two iterations, carried into the next). Each of those says what happened with a method of the
record; ``to_dict`` writes the line of ``metrics.jsonl``, always with the same keys in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from checkfree.plan import RecoveryReport


@dataclass
class IterationRecord:
    iteration: int
    failed_stages: set[int] = field(default_factory=set)
    recoveries: list[dict] = field(default_factory=list)
    recovery_sim_s: float = 0.0
    lost_work_sim_s: float = 0.0
    """Simulated seconds of this iteration's work that its losses threw away."""
    failure_times_s: list[float] = field(default_factory=list)
    """When the failure model's losses struck (simulated seconds)."""
    lr: list[float] | None = None
    """The stages' learning rates after a recovery before the step (the step's outcome has its own)."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """The step's results (progress, time, loss, norms, ...), once the step has run."""
    val_loss: float | None = None
    hosts: list[int] | None = None
    """The host of each logical stage after the step; set (and written) only in runs whose nodes may be missing
    (``failure.replacement`` other than immediate), with the three fields below."""
    waiting_sim_s: float = 0.0
    """Simulated seconds the pipeline stood still waiting for replacement nodes."""
    moving_sim_s: float = 0.0
    """Simulated seconds it stood still while stages moved between hosts."""
    moves: list[dict] = field(default_factory=list)
    staff: list[int] | None = None
    """Live nodes per stage after the step; set (and written) only in runs of several nodes a stage
    (``engine.replicas`` > 1), with the two fields below."""
    lost_nodes: list[list[int]] = field(default_factory=list)
    """[stage, replica] of each node lost in this iteration."""
    joined_nodes: list[list[int]] = field(default_factory=list)
    """[stage, replica] of each replacement node that copied its stage's state and joined in this iteration."""

    def struck(self, times: list[float], lost_work_s: float) -> None:
        """Losses drawn by the failure model struck at ``times``, throwing away ``lost_work_s`` of work."""
        self.failure_times_s += times
        self.lost_work_sim_s += lost_work_s

    def recovered(self, reports: list[RecoveryReport], seconds: float, now_s: float,
                  lr: list[float] | None = None) -> None:
        """Recoveries (one per lost stage, cascades included) that took ``seconds``; the run's simulated time is
        ``now_s`` after them, and the stages' learning rates ``lr`` (when the caller knows them)."""
        self.failed_stages |= {r.stage for r in reports}
        self.recoveries += [r.to_dict() for r in reports]
        self.recovery_sim_s += seconds
        if "sim_time_s" in self.outcome:  # recovered after the step (in the validation): the time moves on
            self.outcome["sim_time_s"] = now_s
        if lr is not None and "lr" in self.outcome:
            self.outcome["lr"] = lr
        elif lr is not None:
            self.lr = lr

    def placed(self, wait_s: float, move_s: float, moves: dict[int, tuple[int, int]]) -> None:
        """The pipeline waited ``wait_s`` for nodes, then ``moves`` (stage -> (from, to) host) took ``move_s``."""
        self.waiting_sim_s += wait_s
        self.moving_sim_s += move_s
        self.moves += [{"stage": k, "from": a, "to": b} for k, (a, b) in sorted(moves.items())]

    def stepped(self, **outcome: Any) -> None:
        """The step's results (``lr`` among them), in the order ``to_dict`` writes them."""
        self.outcome, self.lr = dict(outcome), None

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line."""
        record = {"iteration": self.iteration, "failed_stages": sorted(self.failed_stages),
                  "recoveries": list(self.recoveries), "recovery_sim_s": self.recovery_sim_s,
                  "lost_work_sim_s": self.lost_work_sim_s, "failure_times_s": list(self.failure_times_s)}
        if self.lr is not None:
            record["lr"] = self.lr
        record.update(self.outcome)
        if self.hosts is not None:
            record.update(hosts=list(self.hosts), waiting_sim_s=self.waiting_sim_s, moving_sim_s=self.moving_sim_s,
                          moves=list(self.moves))
        if self.staff is not None:
            record.update(staff=list(self.staff), lost_nodes=list(self.lost_nodes), joined_nodes=list(self.joined_nodes))
        if self.val_loss is not None:
            record["val_loss"] = self.val_loss
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> IterationRecord:
        """A record carried in a resume state (written by ``to_dict`` before its step ran)."""
        return cls(record["iteration"], set(record["failed_stages"]), list(record["recoveries"]),
                   record["recovery_sim_s"], record["lost_work_sim_s"], list(record["failure_times_s"]),
                   record.get("lr"))
