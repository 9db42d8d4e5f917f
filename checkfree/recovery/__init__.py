"""Recovery strategies: one small protocol (``base.RecoveryStrategy``), a registry, one YAML each.

Adding a strategy = one class here + ``conf/strategy/<name>.yaml`` + tests; nothing else changes.
"""

from __future__ import annotations

from checkfree.config import ConfigError
from checkfree.recovery.ablations import Copy, Random, Uniform, Zero
from checkfree.recovery.averaging import interpolate, interpolation_weights, neighbour_average, weighted_state
from checkfree.recovery.base import (
    RecoveryContext,
    RecoveryReport,
    RecoveryStrategy,
    StrategyConfig,
    UnrecoverableFailure,
)
from checkfree.recovery.checkfree import CheckFree, CheckFreePlus
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.recovery.redundant import RedundantComputation

STRATEGIES: dict[str, type[RecoveryStrategy]] = {
    cls.name: cls
    for cls in (RecoveryStrategy, CheckFree, CheckFreePlus, CheckpointRollback, RedundantComputation,
                Copy, Uniform, Random, Zero)
}


def validate_strategy_config(cfg: StrategyConfig, n_stages: int) -> None:
    if cfg.name not in STRATEGIES:
        raise ConfigError(f"strategy.name={cfg.name!r} is unknown; allowed: {', '.join(sorted(STRATEGIES))}.")
    checks = [
        (cfg.lr_scale > 0, "lr_scale", "a positive factor"),
        (cfg.norm_source in ("pre", "post"), "norm_source", "'pre' or 'post'"),
        (cfg.norm_power >= 0, "norm_power", "a non-negative exponent"),
        (cfg.eps > 0, "eps", "a positive number"),
        (cfg.unrecoverable in ("error", "reinit"), "unrecoverable", "'error' or 'reinit'"),
        (cfg.replica_sync_every >= 1, "replica_sync_every", "an integer >= 1"),
        (cfg.every >= 1, "every", "an integer >= 1"),
        (cfg.keep >= 1, "keep", "an integer >= 1"),
    ]
    for ok, key, allowed in checks:
        if not ok:
            raise ConfigError(f"strategy.{key}={getattr(cfg, key)!r} is invalid: allowed is {allowed}.")
    STRATEGIES[cfg.name](cfg).validate(n_stages)


def build_strategy(cfg: StrategyConfig, n_stages: int) -> RecoveryStrategy:
    validate_strategy_config(cfg, n_stages)
    return STRATEGIES[cfg.name](cfg)


__all__ = [
    "STRATEGIES", "StrategyConfig", "RecoveryContext", "RecoveryReport", "RecoveryStrategy",
    "UnrecoverableFailure", "build_strategy", "validate_strategy_config", "neighbour_average", "interpolate",
    "interpolation_weights", "weighted_state",
]
