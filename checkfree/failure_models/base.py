"""What every failure model shares: its event, its configuration, its protocol (``FailureModel``).

A model module under ``checkfree.failure_models`` imports from here and nothing of the registry above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, ClassVar


@dataclass(frozen=True, order=True)
class FailureEvent:
    """Every replica of ``stage`` is lost (weights and optimizer state) -- or, with ``replica`` set, the one node
    that runs that replica of it (``engine.replicas`` > 1: the stage is lost only when its last replica goes).

    Trace records carry exactly one of ``iteration`` / ``time_s``. Events returned by ``events()`` carry
    both: the iteration being processed, and the simulated time of the loss (the window start for the
    per-iteration models).
    """

    stage: int
    """Index of the lost stage, 0..S-1."""
    iteration: int | None = None
    """1-based iteration in which the stage is lost."""
    time_s: float | None = None
    """Simulated time of the loss, in seconds."""
    replica: int | None = None
    """The replica (0..R-1) whose node is lost; None: the whole stage, every replica at once."""

    def to_dict(self) -> dict[str, Any]:
        """The set fields only, e.g. ``{"stage": 2, "iteration": 5}`` (a trace record)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class FailureConfig:
    """Hydra group ``failure`` (``conf/failure/*.yaml``).

    A key whose default is None or 0 (``p``, ``preset``, ``path``) is unset unless a model reads it: one that
    only some models read (their ``reads``) is refused under any other model, which would silently ignore it.
    """

    name: str = "poisson"
    """Failure model: a module of ``checkfree.failure_models`` (none | poisson | bernoulli | trace | ...)."""
    hourly_rate: float = 0.10
    """poisson: per-stage probability h of failing within one simulated hour; rate = -ln(1-h)/3600 per s."""
    p: float = 0.0
    """bernoulli: per-stage per-iteration failure probability."""
    preset: str | None = None
    """bernoulli: a key of BERNOULLI_PRESETS (the reference's table); overrides p."""
    path: str | None = None
    """trace: JSON or CSV file of events."""
    stages: Any = "all"
    """Stages that may fail: "all", "intermediate" (1..S-2) or a list of stage indices."""
    iteration_seconds: float = 60.0
    """Fixed simulated seconds per iteration, used only until a cost model sets the clock."""
    seed_offset: int = 1000
    """The failure RNG is seeded with run seed + seed_offset: its own stream, the same for every strategy."""
    replacement: str = "immediate"
    """When a lost node's replacement arrives (``checkfree.simulation.replacements``): immediate (after the recovery's own
    time, as every run so far) | fixed | exponential (``replacement_mean_h``) | never | trace
    (``replacement_path``)."""
    replacement_mean_h: float = 0.0
    """fixed / exponential: the replacement delay (its mean), in simulated hours."""
    replacement_path: str | None = None
    """replacement=trace: a JSON or CSV file of ``{stage, delay_h}`` records (``trace_files.read_delays``)."""
    unit: str = "stage"
    """poisson: what one arrival strikes -- ``stage`` (every replica of it at once, the paper's setting) or
    ``node`` (one of its ``engine.replicas`` nodes, each its own process at ``hourly_rate`` per node-hour)."""
    format: str = "events"
    """churn: the pool trace's format -- ``events`` (ours), ``bamboo`` or ``skypilot`` (``churn_files``)."""


@dataclass(frozen=True)
class Nodes:
    """The run's nodes as a failure model sees them: ``replicas`` (R) a stage (``engine.replicas``), and whether
    a stage's replicas run at different locations of the geo network (``engine.replica_placement=spread``) or
    at the stage's own (``same_zone``)."""

    replicas: int = 1
    spread: bool = False


ONE_NODE = Nodes()
"""One node a stage: every run before nodes were the unit of failure."""

REPLACEMENTS = ("immediate", "fixed", "exponential", "never", "trace")
UNITS = ("stage", "node")
"""The allowed ``failure.replacement`` values."""


class FailureModel:
    """Which stages are lost, and when. A model is one class in a module of its own under
    ``checkfree.failure_models`` (the module's name is the ``failure.name`` that picks it), registered by the
    module's ``MODEL = <class>``; its ``conf/failure/<name>.yaml`` and its test complete it."""

    reads: ClassVar[tuple[str, ...]] = ()
    """The ``failure.*`` keys of its own it reads (beyond stages, iteration_seconds and seed_offset)."""

    @classmethod
    def check(cls, cfg: FailureConfig, n_stages: int, eligible: list[int], horizon: int | None,
              nodes: Nodes = ONE_NODE) -> None:
        """Refuse what only this model can judge (a trace's events), with a one-sentence ConfigError."""

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int,
              nodes: Nodes = ONE_NODE) -> FailureModel:
        """The model for a checked ``cfg``: ``stages`` may fail, ``seed`` = run seed + ``failure.seed_offset``,
        ``nodes`` the run's nodes (a model that strikes whole stages ignores them)."""
        raise NotImplementedError

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        """Stages lost in 1-based ``iteration``, whose simulated time lies in ``[t_start, t_end)``.

        Every event, sorted by (time_s, stage); a stage may appear more than once. Timed events are reported
        exactly once: an arrival in a gap between two windows comes with the next window (with its true
        ``time_s``) rather than being lost, and a window overlapping an earlier one reports only what is new.
        One iteration may be asked for several windows (one per stretch of work between incidents): its
        per-iteration events (bernoulli, a trace's ``iteration`` records) come with the first of them only.
        """
        raise NotImplementedError

    def pool(self) -> Callable[[int, float], float] | None:
        """For a model whose nodes come from a pool (``churn``): (node slot, time its node was lost) -> when the
        pool fills the vacancy. None (every other model): ``failure.replacement`` says when."""
        return None

    def counts(self) -> dict[str, Any]:
        """The model's own tallies for the summary (a pool's spares used, a trace's passes); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the model has drawn or replayed so far (plain values), for an exact ``trainer.resume``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A model whose events depend only on its arguments has nothing to restore."""


def by_time(event: FailureEvent) -> tuple[float, int, int]:
    return (event.time_s if event.time_s is not None else -math.inf, event.stage,
            -1 if event.replica is None else event.replica)


def check_window(t_start: float, t_end: float) -> None:
    if not t_start <= t_end:
        raise ValueError(f"failure window [{t_start}, {t_end}) is empty or reversed: t_end must be >= t_start.")


def is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def plain(value: Any) -> Any:
    """Hydra hands lists over as ListConfig; show them as plain lists in messages."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
