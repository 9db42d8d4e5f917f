"""Failure models: which pipeline stages are lost, and when (docs/design.md, "Failure models").

Once per stretch of work the trainer (through ``checkfree.simulation.failures.FailureDraws``) asks
``model.events(iteration, t_start, t_end)`` for the stages lost in that window of *simulated* time; the
strategy then recovers them. Every model is a module here, named as ``failure.name`` names it:

* ``none`` — nothing fails (the no-failure baseline).
* ``poisson`` (default) — every eligible stage an independent Poisson process in simulated time.
* ``bernoulli`` — the reference simulator's per-iteration coin per stage.
* ``trace`` — replay a JSON or CSV file of events (``trace_files`` reads it).
* ``zone`` — one Poisson draw per location of the geo network loses every eligible stage there at once.

Adding a model = one module here whose ``MODEL`` is a ``base.FailureModel`` subclass (its ``reads`` name the
``failure.*`` keys it reads), ``conf/failure/<name>.yaml`` and its test; nothing else changes. The registry
is the package's modules, so no list here is kept by hand, and a key read only by some models is refused
under the others because the models say which they read.

This fixes two flaws of the reference (docs/paper.md, "Reference-code bugs we avoid", items 5, 14): failures
happen at any simulated time, not only at iteration boundaries, and one failure model is shared by every
strategy. Every arrival counts: a stage hit twice in one window is lost twice, and the second loss strikes
its replacement. Models return every event of a window, sorted by (time_s, stage).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Sequence
from dataclasses import fields
from functools import cache

from checkfree.failure_models.base import (
    ONE_NODE,
    REPLACEMENTS,
    UNITS,
    FailureConfig,
    FailureModel,
    Nodes,
    is_int,
    is_real,
    plain,
)
from checkfree.failure_models.trace_files import read_delays
from checkfree.run.config import require

MAX_ITERATION_SECONDS = 1e6
_NOT_MODELS = ("base", "trace_files", "churn_files")


@cache
def failure_models() -> tuple[str, ...]:
    """The registered model names: this package's modules (other than its shared parts), sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_MODELS))


def model_class(name: str) -> type[FailureModel]:
    require(name in failure_models(), "failure.name", name, f"allowed {', '.join(failure_models())}")
    return importlib.import_module(f"{__name__}.{name}").MODEL


def _read_only_by_some() -> dict[str, tuple[object, list[str]]]:
    """Key -> (its unset default, the models that read it), for every key whose default is None or 0 that
    some model reads: under any other model a set value would be silently ignored."""
    readers = {name: model_class(name).reads for name in failure_models()}
    out = {}
    for f in fields(FailureConfig):
        who = [name for name, reads in readers.items() if f.name in reads]
        if who and (f.default is None or f.default == 0):
            out[f.name] = (f.default, who)
    return out


def failing_stages(cfg: FailureConfig, n_stages: int) -> list[int]:
    """The sorted stage indices that may fail: "all", "intermediate" (1..S-2) or an explicit list."""
    stages = cfg.stages
    allowed = f"allowed all, intermediate (stages 1..S-2) or a list of stage indices in [0, {n_stages - 1}]"
    if isinstance(stages, str):
        require(stages in ("all", "intermediate"), "failure.stages", stages, allowed)
        return list(range(n_stages)) if stages == "all" else list(range(1, n_stages - 1))
    ok = isinstance(stages, Sequence) and all(is_int(s) and 0 <= s < n_stages for s in stages)
    require(ok, "failure.stages", plain(stages), allowed)
    # An empty list or a repeated stage is a typo more often than a wish: say so rather than guess.
    require(len(stages) > 0, "failure.stages", plain(stages),
            "an empty list lets no stage fail; allowed is a non-empty list (or failure=none for no failures)")
    require(len(set(stages)) == len(stages), "failure.stages", plain(stages), "allowed is each stage at most once")
    return sorted(int(s) for s in stages)


MAX_REPLACEMENT_H = 1e6
"""114 years: a longer mean delay is failure.replacement=never (a delay of 1e306 h overflowed to inf seconds)."""


def validate_failure_config(cfg: FailureConfig, n_stages: int, horizon: int | None = None,
                            nodes: Nodes = ONE_NODE) -> None:
    """Check every field (and read a trace) before any work starts; raise a one-sentence ConfigError.
    ``horizon``: the run's last iteration (trainer.iterations), after which no trace event may fall;
    ``nodes``: the run's nodes (``engine.replicas``, ``engine.replica_placement``)."""
    cls = model_class(cfg.name)
    require(is_real(cfg.hourly_rate) and 0 <= cfg.hourly_rate < 1, "failure.hourly_rate", cfg.hourly_rate,
            "it is a per-stage (per-node with failure.unit=node) probability of failing within an hour, allowed [0, 1)")
    require(is_real(cfg.p) and 0 <= cfg.p < 1, "failure.p", cfg.p,
            "it is a per-stage per-iteration probability, allowed [0, 1)")
    # The Poisson model draws every arrival inside an iteration's window: an absurd window is a hang.
    require(is_real(cfg.iteration_seconds) and 0 < cfg.iteration_seconds <= MAX_ITERATION_SECONDS,
            "failure.iteration_seconds", cfg.iteration_seconds,
            f"allowed a number of seconds > 0 and at most {MAX_ITERATION_SECONDS:.0e} (11.6 days)")
    require(is_int(cfg.seed_offset), "failure.seed_offset", cfg.seed_offset, "allowed an integer")
    require(cfg.replacement in REPLACEMENTS, "failure.replacement", cfg.replacement,
            f"allowed {', '.join(REPLACEMENTS)}")
    drawn = cfg.replacement in ("fixed", "exponential")
    require(is_real(cfg.replacement_mean_h) and math.isfinite(cfg.replacement_mean_h)
            and (0 < cfg.replacement_mean_h <= MAX_REPLACEMENT_H if drawn else cfg.replacement_mean_h == 0),
            "failure.replacement_mean_h", cfg.replacement_mean_h,
            f"allowed a number of simulated hours > 0 and at most {MAX_REPLACEMENT_H:.0e} (the delay, or its mean; "
            "failure.replacement=never is the one that never comes)" if drawn else
            f"only failure.replacement=fixed|exponential reads it, and this run has {cfg.replacement}; set it to 0")
    require((cfg.replacement_path is not None) == (cfg.replacement == "trace"), "failure.replacement_path",
            cfg.replacement_path, "failure.replacement=trace needs it (a JSON or CSV file of {stage, delay_h})"
            if cfg.replacement == "trace" else f"only failure.replacement=trace reads it, and this run has "
            f"{cfg.replacement}; set it to null")
    if cfg.replacement == "trace":
        read_delays(cfg.replacement_path, n_stages)
    # Settings of one model given to another are silently ignored: a trace path under failure=poisson
    # would run Poisson failures while the user believes the trace is replayed.
    for key, (unset, readers) in _read_only_by_some().items():
        value, model = getattr(cfg, key), "|".join(readers)
        require(cfg.name in readers or value == unset, f"failure.{key}", value,
                f"only failure={model} reads it, and this run has failure={cfg.name}; use failure={model} or "
                f"set failure.{key}={'null' if unset is None else unset}")
    # Keys with a default that is not "unset" (None or 0), read by one model only: refused under the others too.
    require(cfg.unit in UNITS, "failure.unit", cfg.unit, f"allowed {', '.join(UNITS)}")
    require(cfg.unit == "stage" or "unit" in cls.reads, "failure.unit", cfg.unit,
            f"only failure=poisson draws per node, and this run has failure={cfg.name}; set failure.unit=stage")
    require(cfg.format == "events" or "format" in cls.reads, "failure.format", cfg.format,
            f"only failure=churn reads a pool trace's format, and this run has failure={cfg.name}; set "
            "failure.format=events")
    cls.check(cfg, n_stages, failing_stages(cfg, n_stages), horizon, nodes)


def build_failure_model(cfg: FailureConfig, n_stages: int, seed: int, nodes: Nodes = ONE_NODE) -> FailureModel:
    """The model of a validated ``cfg`` (``validate_failure_config``, run by ``validate_run_config``, the one
    gate, with the seed); its RNG is seeded with ``seed + cfg.seed_offset``; ``nodes`` the run's nodes."""
    return model_class(cfg.name).build(cfg, n_stages, failing_stages(cfg, n_stages), int(seed) + int(cfg.seed_offset),
                                       nodes)


__all__ = ["failure_models", "model_class", "failing_stages",
           "validate_failure_config", "build_failure_model"]
