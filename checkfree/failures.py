"""Failure models: which pipeline stages are lost, and when (docs/design.md, "Failure models").

Once per iteration the trainer asks ``model.events(iteration, t_start, t_end)`` for the stages lost in that
iteration's window of *simulated* time; the strategy then recovers them before the step (docs/design.md, "One iteration").

* ``none`` — nothing fails (the no-failure baseline).
* ``poisson`` (default) — every eligible stage is an independent Poisson process in simulated time with
  rate ``-ln(1 - h) / 3600`` per second, ``h`` = probability that a stage fails within one hour. Each stage
  draws its arrival times lazily from its own RNG stream, so they do not depend on how the caller slices
  time: a slow strategy (long iterations) and a fast one lose the same stages at the same simulated
  times, only in different iterations.
* ``bernoulli`` — the reference simulator's model: each eligible stage fails with probability ``p`` per
  iteration (its table is ``BERNOULLI_PRESETS``, from the reference's ``simulate_training`` configs). The draw for an iteration depends only on
  (seed, iteration), never on what was asked before.
* ``trace`` — replay a JSON or CSV file of events, each by ``iteration`` or by ``time_s``.

This fixes two flaws of the reference (docs/paper.md, "Reference-code bugs we avoid", items 5, 14): failures happen at any simulated time, not
only at iteration boundaries, and one failure model is shared by every strategy.

Every arrival counts: a stage hit twice in one window (one CPU iteration can stand for many paper
iterations) is lost twice, and the second loss strikes its replacement. Models return every event of a
window, sorted by (time_s, stage); ``FailureDraws`` turns them into incidents, one after another.

Shipped traces: ``conf/failure/traces/example.json`` (stage 2 lost at iteration 5) and
``conf/failure/traces/reference_33.json``, the reference throughput testbed's 33 %/h events (gensyn-ai/CheckFree ``failure_p_configs/33.json``).
The latter keeps the reference's stage ids 1..6, the body stages of its 7-stage layout whose stage 0 never
fails, so it validates only with ``model.n_stages=7``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from checkfree.config import ConfigError, require

FAILURE_MODELS = ("none", "poisson", "bernoulli", "trace")

# Per-stage per-iteration probabilities of the reference configs, keyed "<model>_<hourly %>" (the reference's simulate_training configs).
BERNOULLI_PRESETS: dict[str, float] = {
    "500m_5": 0.0009, "500m_10": 0.002, "500m_16": 0.004, "500m_33": 0.01,
    "124m_10": 0.0006, "124m_16": 0.001, "1_5b_10": 0.004, "1_5b_16": 0.008,
}

_TRACE_FIELDS = ("stage", "iteration", "time_s")
MAX_ITERATION_SECONDS = 1e6
# Tags in the RNG seed so the two random models never share a stream, even if a future run mixes them.
_POISSON_STREAM, _BERNOULLI_STREAM = 0, 1


@dataclass(frozen=True, order=True)
class FailureEvent:
    """Every replica of ``stage`` is lost (weights and optimizer state).

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

    def to_dict(self) -> dict[str, Any]:
        """The set fields only, e.g. ``{"stage": 2, "iteration": 5}`` (a trace record)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class FailureConfig:
    """Hydra group ``failure`` (``conf/failure/*.yaml``)."""

    name: str = "poisson"
    """Failure model: none | poisson | bernoulli | trace."""
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


class FailureModel(Protocol):
    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        """Stages lost in 1-based ``iteration``, whose simulated time lies in ``[t_start, t_end)``.

        Every event, sorted by (time_s, stage); a stage may appear more than once. Timed events are reported
        exactly once: an arrival in a gap between two windows comes with the next window (with its true
        ``time_s``) rather than being lost, and a window overlapping an earlier one reports only what is new.
        One iteration may be asked for several windows (one per stretch of work between incidents): its
        per-iteration events (bernoulli, a trace's ``iteration`` records) come with the first of them only.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the model has drawn or replayed so far (plain values), for an exact ``trainer.resume``."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def hourly_rate_to_rate(hourly_rate: float) -> float:
    """Poisson rate per second under which a stage fails within one hour with probability ``hourly_rate``."""
    return -math.log1p(-hourly_rate) / 3600.0


def per_iteration_probability(hourly_rate: float, iteration_seconds: float) -> float:
    """The same hazard per iteration of ``iteration_seconds``: ``1 - (1 - h) ** (T / 3600)``."""
    return 1.0 - (1.0 - hourly_rate) ** (iteration_seconds / 3600.0)


class Stateless:
    """A model whose events depend only on its arguments has nothing to save for a resume."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NoFailures(Stateless):
    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        return []


class PoissonFailures:
    """Independent Poisson processes in simulated time, one per eligible stage, drawn lazily."""

    def __init__(self, stages: Sequence[int], rate_per_s: float, seed: int) -> None:
        self.rate_per_s = rate_per_s
        # One stream per stage index: which other stages are eligible never shifts a stage's arrivals.
        self._rngs = {s: np.random.default_rng([seed, _POISSON_STREAM, s]) for s in stages}
        self._next = {s: self._after(s, 0.0) for s in stages}

    def _after(self, stage: int, t: float) -> float:
        if self.rate_per_s == 0.0:
            return math.inf
        return t + float(self._rngs[stage].exponential(1.0 / self.rate_per_s))

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        _check_window(t_start, t_end)
        out = []
        for stage, t in self._next.items():
            while t < t_end:  # every arrival: a second one hits the stage's replacement
                out.append(FailureEvent(stage, iteration, t))
                t = self._after(stage, t)
            self._next[stage] = t
        return sorted(out, key=_by_time)

    def state_dict(self) -> dict[str, Any]:
        # The lazily drawn arrivals live in the generators' states: without them a resumed run would redraw.
        return {"next": dict(self._next),
                "rngs": {stage: rng.bit_generator.state for stage, rng in self._rngs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["rngs"]) != set(self._rngs):
            raise ValueError(f"cannot resume: the saved Poisson model drew for stages "
                             f"{sorted(state['rngs'])}, this one for {sorted(self._rngs)} "
                             "(other failure.stages)")
        for stage, rng_state in state["rngs"].items():
            self._rngs[stage].bit_generator.state = rng_state
        self._next = {int(s): float(t) for s, t in state["next"].items()}


class BernoulliFailures(Stateless):
    """Each eligible stage fails with probability ``p`` in every iteration, independently.

    Stateless for a resume (which happens between iterations): it only remembers the iteration it last
    answered, so that a second window of that iteration draws nothing new."""

    def __init__(self, stages: Sequence[int], n_stages: int, p: float, seed: int) -> None:
        self.stages, self.n_stages, self.p, self.seed = sorted(stages), n_stages, p, seed
        self._answered = 0

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        _check_window(t_start, t_end)
        if iteration == self._answered:
            return []
        self._answered = iteration
        # Seeded by the iteration alone, so the events do not depend on which iterations were asked before.
        rng = np.random.default_rng([self.seed, _BERNOULLI_STREAM, iteration])
        draws = rng.random(self.n_stages)  # one draw per stage, eligible or not, so masks never shift draws
        return [FailureEvent(s, iteration, float(t_start)) for s in self.stages if draws[s] < self.p]


class TraceFailures:
    """Replays trace events: by iteration when that iteration is processed, by time in their window."""

    def __init__(self, events: Sequence[FailureEvent]) -> None:
        self._by_iteration: dict[int, set[int]] = {}
        for e in events:
            if e.iteration is not None:
                self._by_iteration.setdefault(e.iteration, set()).add(e.stage)
        self._timed = sorted((e.time_s, e.stage) for e in events if e.time_s is not None)
        self._next = 0  # the first timed event not reported yet
        self._answered = 0  # the last iteration whose by-iteration events were reported

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        _check_window(t_start, t_end)
        lost = []
        if iteration != self._answered:
            lost = [(float(t_start), stage) for stage in self._by_iteration.get(iteration, ())]
            self._answered = iteration
        while self._next < len(self._timed) and self._timed[self._next][0] < t_end:
            lost.append(self._timed[self._next])
            self._next += 1
        return sorted((FailureEvent(s, iteration, t) for t, s in lost), key=_by_time)

    def state_dict(self) -> dict[str, Any]:
        return {"next": self._next, "answered": self._answered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next, self._answered = int(state["next"]), int(state.get("answered", 0))


def _by_time(event: FailureEvent) -> tuple[float, int]:
    return (event.time_s if event.time_s is not None else -math.inf, event.stage)


def _check_window(t_start: float, t_end: float) -> None:
    if not t_start <= t_end:
        raise ValueError(f"failure window [{t_start}, {t_end}) is empty or reversed: t_end must be >= t_start.")


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _plain(value: Any) -> Any:
    """Hydra hands lists over as ListConfig; show them as plain lists in messages."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def failing_stages(cfg: FailureConfig, n_stages: int) -> list[int]:
    """The sorted stage indices that may fail: "all", "intermediate" (1..S-2) or an explicit list."""
    stages = cfg.stages
    allowed = f"allowed all, intermediate (stages 1..S-2) or a list of stage indices in [0, {n_stages - 1}]"
    if isinstance(stages, str):
        require(stages in ("all", "intermediate"), "failure.stages", stages, allowed)
        return list(range(n_stages)) if stages == "all" else list(range(1, n_stages - 1))
    ok = isinstance(stages, Sequence) and all(_is_int(s) and 0 <= s < n_stages for s in stages)
    require(ok, "failure.stages", _plain(stages), allowed)
    # An empty list or a repeated stage is a typo more often than a wish: say so rather than guess.
    require(len(stages) > 0, "failure.stages", _plain(stages),
            "an empty list lets no stage fail; allowed is a non-empty list (or failure=none for no failures)")
    require(len(set(stages)) == len(stages), "failure.stages", _plain(stages), "allowed is each stage at most once")
    return sorted(int(s) for s in stages)


def validate_failure_config(cfg: FailureConfig, n_stages: int, horizon: int | None = None) -> None:
    """Check every field (and read a trace) before any work starts; raise a one-sentence ConfigError.
    ``horizon``: the run's last iteration (trainer.iterations), after which no trace event may fall."""
    require(cfg.name in FAILURE_MODELS, "failure.name", cfg.name, f"allowed {', '.join(FAILURE_MODELS)}")
    require(_is_real(cfg.hourly_rate) and 0 <= cfg.hourly_rate < 1, "failure.hourly_rate", cfg.hourly_rate,
            "it is a per-stage probability of failing within an hour, allowed [0, 1)")
    require(_is_real(cfg.p) and 0 <= cfg.p < 1, "failure.p", cfg.p,
            "it is a per-stage per-iteration probability, allowed [0, 1)")
    require(cfg.preset is None or cfg.preset in BERNOULLI_PRESETS, "failure.preset", cfg.preset,
            f"allowed null or one of {', '.join(BERNOULLI_PRESETS)}")
    # The Poisson model draws every arrival inside an iteration's window: an absurd window is a hang.
    require(_is_real(cfg.iteration_seconds) and 0 < cfg.iteration_seconds <= MAX_ITERATION_SECONDS,
            "failure.iteration_seconds", cfg.iteration_seconds,
            f"allowed a number of seconds > 0 and at most {MAX_ITERATION_SECONDS:.0e} (11.6 days)")
    require(_is_int(cfg.seed_offset), "failure.seed_offset", cfg.seed_offset, "allowed an integer")
    # Settings of one model given to another are silently ignored: a trace path under failure=poisson
    # would run Poisson failures while the user believes the trace is replayed.
    for key, model, unset in (("path", "trace", None), ("preset", "bernoulli", None), ("p", "bernoulli", 0.0)):
        value = getattr(cfg, key)
        require(cfg.name == model or value == unset, f"failure.{key}", value,
                f"only failure={model} reads it, and this run has failure={cfg.name}; use failure={model} or "
                f"set failure.{key}={'null' if unset is None else unset}")
    eligible = failing_stages(cfg, n_stages)
    if cfg.name != "trace":
        return
    require(isinstance(cfg.path, (str, Path)) and str(cfg.path) not in ("", "???"), "failure.path", cfg.path,
            "the trace model needs a JSON or CSV file of events, e.g. conf/failure/traces/example.json")
    records = _read_trace_records(cfg.path)
    require(len(records) > 0, "failure.path", str(cfg.path),
            "the trace holds no event, so nothing would fail; allowed is a trace of at least one event "
            "(or failure=none for no failures)")
    seen: dict[tuple, str] = {}
    for where, event in records:
        # The same loss twice is a slip in the trace, not two losses: the second would meet a stage that is
        # already being recovered (per-iteration events) or repeat one moment.
        key = (event.stage, event.iteration, event.time_s)
        if key in seen:
            raise ConfigError(f"failure.path={cfg.path} {where} repeats the event of {seen[key]} (stage "
                              f"{event.stage} at {_moment(event)}); allowed is each loss once.")
        seen[key] = where
        if horizon is not None and event.iteration is not None and event.iteration > horizon:
            raise ConfigError(f"failure.path={cfg.path} {where} is at iteration {event.iteration}, after the run's "
                              f"last (trainer.iterations={horizon}), so it would never happen; allowed are "
                              f"iterations 1..{horizon}.")
        if event.stage >= n_stages:
            raise ConfigError(f"failure.path={cfg.path} {where} has stage {event.stage}, which is out of range: "
                              f"allowed 0..{n_stages - 1} (model.n_stages={n_stages}).")
        if event.stage not in eligible:
            raise ConfigError(f"failure.path={cfg.path} {where} has stage {event.stage}, which may not fail under "
                              f"failure.stages={_plain(cfg.stages)!r}: allowed {eligible}.")


def build_failure_model(cfg: FailureConfig, n_stages: int, seed: int) -> FailureModel:
    """Validate ``cfg`` and build its model; the RNG is seeded with ``seed + cfg.seed_offset``."""
    validate_failure_config(cfg, n_stages)
    require(_is_int(seed) and seed + cfg.seed_offset >= 0, "seed", seed,
            f"the failure RNG is seeded with seed + failure.seed_offset ({cfg.seed_offset}), which must be >= 0")
    stages, root = failing_stages(cfg, n_stages), int(seed) + int(cfg.seed_offset)
    if cfg.name == "poisson":
        return PoissonFailures(stages, hourly_rate_to_rate(cfg.hourly_rate), root)
    if cfg.name == "bernoulli":
        p = BERNOULLI_PRESETS[cfg.preset] if cfg.preset is not None else float(cfg.p)
        return BernoulliFailures(stages, n_stages, p, root)
    if cfg.name == "trace":
        return TraceFailures(read_trace(cfg.path))
    return NoFailures()


def _moment(event: FailureEvent) -> str:
    return f"iteration {event.iteration}" if event.iteration is not None else f"time_s {event.time_s}"


def read_trace(path: str | Path) -> list[FailureEvent]:
    """Read a trace file into events, in file order; a malformed file raises a ConfigError naming the record.

    JSON: a list of objects, ``[{"iteration": 5, "stage": 2}, {"time_s": 30.5, "stage": 1}]``; records are
    numbered from 0 as in the list. CSV: a header ``stage,iteration`` / ``stage,time_s`` / both, then one
    event per line (empty cells allowed); lines are numbered from 1, the header being line 1. Each event
    has a stage >= 0 and exactly one of an iteration >= 1 or a time_s >= 0.
    """
    return [event for _, event in _read_trace_records(path)]


def _read_trace_records(path: str | Path) -> list[tuple[str, FailureEvent]]:
    """(location in the file, event) pairs, so later checks can point at the offending record."""
    path = Path(path)
    where = f"failure.path={path}"
    if path.is_dir():
        raise ConfigError(f"{where} is invalid: it is a directory; point failure.path at a JSON or CSV trace file.")
    if not path.exists():
        raise ConfigError(f"{where} is invalid: no such file; point failure.path at a JSON or CSV trace.")
    if not path.is_file():  # a device or a FIFO: reading it would never end
        raise ConfigError(f"{where} is invalid: it is not a regular file; point failure.path at a JSON or CSV "
                          "trace file.")
    if path.suffix.lower() == ".json":
        return _read_json(_read_text(path, where, "utf-8"), where)
    if path.suffix.lower() == ".csv":
        return _read_csv(_read_text(path, where, "utf-8-sig"), where)  # -sig: spreadsheets often prepend a BOM
    raise ConfigError(f"{where} is invalid: unknown extension {path.suffix!r}, allowed .json or .csv.")


def _read_text(path: Path, where: str, encoding: str) -> str:
    """The file as text, or a ConfigError saying why it is not a text trace (unreadable, binary, not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} is invalid: it cannot be read ({e.strerror or e}).") from None
    nul = data.find(b"\0")
    if nul >= 0:  # UTF-8 text never holds a NUL byte; a binary file (or UTF-16 text) does
        raise ConfigError(f"{where} is invalid: it is a binary file (byte {nul} is NUL); allowed is a JSON or CSV "
                          "text file of events.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is invalid: it is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                          "allowed is a JSON or CSV file of events in UTF-8.") from None


def _read_json(text: str, where: str) -> list[tuple[str, FailureEvent]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    if not isinstance(records, list):
        raise ConfigError(f'{where} must hold a JSON list of events such as [{{"iteration": 5, "stage": 2}}], '
                          f"not a {type(records).__name__}.")
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(f"{where} record {i} is {_short(record)}, not an object with 'stage' and 'iteration' "
                              "or 'time_s'.")
        out.append((f"record {i}", _event(record, where, f"record {i}")))
    return out


def _read_csv(text: str, where: str) -> list[tuple[str, FailureEvent]]:
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if ("stage" not in header or not {"iteration", "time_s"} & set(header)
                or not set(header) <= set(_TRACE_FIELDS) or len(set(header)) != len(header)):
            raise ConfigError(f"{where} line 1 has header {_short(','.join(header))}; allowed 'stage' plus "
                              "'iteration' and/or 'time_s', e.g. 'stage,iteration'.")
        for row in reader:
            loc = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ConfigError(f"{where} {loc} has {len(row)} fields but the header has {len(header)}.")
            record: dict[str, Any] = {}
            for key, cell in zip(header, (c.strip() for c in row)):
                if not cell:
                    continue  # an empty cell is an absent field
                try:
                    record[key] = float(cell) if key == "time_s" else int(cell)
                except ValueError:
                    kind = "a number" if key == "time_s" else "an integer"
                    raise ConfigError(f"{where} {loc} has {key}={_short(cell)}, which is not {kind}.") from None
            out.append((loc, _event(record, where, loc)))
    except csv.Error as e:  # e.g. a field over the csv module's size limit
        raise ConfigError(f"{where} line {reader.line_num} is not valid CSV ({e}).") from None
    return out


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a record, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _event(record: dict[str, Any], where: str, loc: str) -> FailureEvent:
    unknown = sorted(set(record) - set(_TRACE_FIELDS))
    if unknown:
        raise ConfigError(f"{where} {loc} has unknown field(s) {_short(unknown)}; allowed {list(_TRACE_FIELDS)}.")
    stage, iteration, time_s = record.get("stage"), record.get("iteration"), record.get("time_s")
    if stage is None:
        raise ConfigError(f"{where} {loc} has no 'stage'; each event needs a stage and an iteration or time_s.")
    if not _is_int(stage) or stage < 0:
        raise ConfigError(f"{where} {loc} has stage={_short(stage)}; allowed a stage index >= 0.")
    if iteration is not None and time_s is not None:
        raise ConfigError(f"{where} {loc} has both 'iteration' and 'time_s'; allowed exactly one of them.")
    if iteration is None and time_s is None:
        raise ConfigError(f"{where} {loc} has neither 'iteration' nor 'time_s'; allowed exactly one of them.")
    if iteration is not None and not (_is_int(iteration) and iteration >= 1):
        raise ConfigError(f"{where} {loc} has iteration={_short(iteration)}; allowed an integer >= 1 (1-based).")
    if time_s is not None and not (_is_real(time_s) and 0 <= time_s < math.inf):
        raise ConfigError(f"{where} {loc} has time_s={_short(time_s)}; allowed finite simulated seconds >= 0.")
    return FailureEvent(int(stage), None if iteration is None else int(iteration),
                        None if time_s is None else float(time_s))


@dataclass
class Incident:
    """Stages lost together at ``time_s``: the losses of one incident are recovered in parallel."""

    time_s: float
    stages: list[int]
    """Sorted, each once."""
    events: list[FailureEvent]
    """The failure model's events behind it (none for a numeric-guard loss)."""
    records: list[dict]
    """The failure records that go to the summary, one per loss."""


class FailureDraws:
    """The failures of one run, met one incident at a time as the run's simulated time goes on.

    The trainer asks ``next_incident(iteration, t, t_end)`` for the first incident in ``[t, t_end)``, the
    stretch of work it has still to do; after recovering from it, it asks again from the end of that
    recovery. Every simulated second is drawn exactly once, including time spent recovering, so a slower
    strategy meets more failures (as in reality) and every strategy meets the same events: an arrival during
    a recovery strikes when that recovery ends, if it did not join the incident. Stages the numeric guard
    marked (``trainer.on_nonfinite=recover``) fail at the next call, with cause "nonfinite".

    An incident gathers losses less than ``window_s`` apart (the time a recovery takes), chained: they
    strike together and are recovered together. A stage hit again within an incident ends it, and the second
    hit is an incident of its own (it strikes the stage's replacement). Without this grouping, when one
    iteration stands for many real ones (a CPU run priced in paper hours) pairs of losses that are minutes
    apart in reality — a stage and its shadow holder, both swap partners — would look simultaneous and
    unrecoverable far more often than they are; without the chaining, every loss would be its own incident."""

    def __init__(self, cfg: FailureConfig, n_stages: int, seed: int) -> None:
        self.model = build_failure_model(cfg, n_stages, seed)
        self.may_fail = set(failing_stages(cfg, n_stages))
        self.horizon = 0.0
        """Simulated time up to which the model has been drawn."""
        self.queued: list[FailureEvent] = []
        """Drawn but not yet struck, in order of time."""
        self.pending: set[int] = set()
        self._iteration = 0

    def _draw_until(self, iteration: int, t_end: float) -> None:
        # A new iteration is always asked once, even for an empty window: its per-iteration events come then.
        if t_end > self.horizon or iteration != self._iteration:
            end = max(t_end, self.horizon)
            new = [e for e in self.model.events(iteration, self.horizon, end) if e.stage in self.may_fail]
            self.queued = sorted(self.queued + new, key=_by_time)
            self.horizon, self._iteration = end, iteration

    def next_incident(self, iteration: int, t: float, t_end: float, window_s: float = 0.0) -> Incident | None:
        """The first incident of ``iteration`` that strikes in ``[t, t_end)`` (an arrival before ``t``, during
        a recovery, strikes at ``t``), or None when the stretch of work ends before any loss."""
        self._draw_until(iteration, t_end)
        nonfinite = sorted(self.pending)
        self.pending = set()
        if not nonfinite and not (self.queued and self.queued[0].time_s < t_end):
            return None
        events: list[FailureEvent] = []
        stages = set(nonfinite)
        last = t if nonfinite else self.queued[0].time_s
        while True:
            self._draw_until(iteration, math.nextafter(last + window_s, math.inf))
            if not self.queued or self.queued[0].time_s - last > window_s or self.queued[0].stage in stages:
                break
            event = self.queued.pop(0)
            events.append(event)
            stages.add(event.stage)
            last = event.time_s
        at = max(t, events[0].time_s if not nonfinite else t)
        records = [{"iteration": iteration, "stage": e.stage, "time_s": e.time_s} for e in events]
        records += [{"iteration": iteration, "stage": k, "time_s": t, "cause": "nonfinite"} for k in nonfinite]
        return Incident(at, sorted(stages), events, records)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "horizon": self.horizon, "pending": sorted(self.pending),
                "queued": [e.to_dict() for e in self.queued]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.horizon, self.pending = state["horizon"], set(state["pending"])
        self.queued = [FailureEvent(**e) for e in state.get("queued", [])]
