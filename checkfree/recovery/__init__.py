"""Recovery strategies: one small protocol (``base.RecoveryStrategy``), a registry, one YAML each.

Adding a strategy = one module here (a class whose ``plan`` returns a ``checkfree.plan.RecoveryPlan``), one
line in ``STRATEGIES`` below, ``conf/strategy/<name>.yaml`` and its test. The engines execute plans, so
nothing else changes: the local engine and the process engine both run it as they run every other.

Nothing here imports torch: a config is validated without loading any tensor library. Strategies decide
(the scalar rules are ``checkfree.recovery.rules``); the engines compute (``checkfree.stage.averaging``).
"""

from __future__ import annotations

import importlib

from checkfree.recovery.base import RecoveryStrategy, StrategyConfig, UnrecoverableFailure
from checkfree.run.config import ConfigError, finite

STRATEGIES: dict[str, str] = {
    "none": "checkfree.recovery.base:RecoveryStrategy",
    "checkfree": "checkfree.recovery.checkfree:CheckFree",
    "checkfree_plus": "checkfree.recovery.checkfree:CheckFreePlus",
    "checkpoint": "checkfree.recovery.checkpoint:CheckpointRollback",
    "redundant": "checkfree.recovery.redundant:RedundantComputation",
    "copy": "checkfree.recovery.ablations:Copy",
    "uniform": "checkfree.recovery.ablations:Uniform",
    "random": "checkfree.recovery.ablations:Random",
    "zero": "checkfree.recovery.ablations:Zero",
    "copy_next": "checkfree.recovery.copy_next:CopyNext",
    "snapshot_restore": "checkfree.recovery.snapshot_restore:SnapshotRestore",
    "memory_checkpoint": "checkfree.recovery.memory_checkpoint:MemoryCheckpoint",
    "async_checkpoint": "checkfree.recovery.async_checkpoint:AsyncCheckpoint",
    "compressed_snapshot": "checkfree.recovery.compressed_snapshot:CompressedSnapshot",
    "checkfree_fit": "checkfree.recovery.fitted:CheckFreeFit",
    "checkfree_plus_fit": "checkfree.recovery.fitted:CheckFreePlusFit",
}
"""Strategy name -> "module:Class" (imported when a run asks for it)."""


def strategy_class(name: str) -> type[RecoveryStrategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name={name!r} is unknown; allowed: {', '.join(sorted(STRATEGIES))}.")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_strategy_config(cfg: StrategyConfig, n_stages: int) -> None:
    strategy_class(cfg.name)
    checks = [
        (finite(cfg.lr_scale) and cfg.lr_scale > 0, "lr_scale", "a finite positive factor"),
        (cfg.norm_source in ("pre", "post"), "norm_source", "'pre' or 'post'"),
        (finite(cfg.norm_power) and cfg.norm_power >= 0, "norm_power", "a finite non-negative exponent"),
        (finite(cfg.eps) and cfg.eps > 0, "eps", "a finite positive number"),
        (cfg.unrecoverable in ("error", "reinit"), "unrecoverable", "'error' or 'reinit'"),
        (cfg.edge_rule in ("none", "copy"), "edge_rule", "'none' or 'copy'"),
        (cfg.replica_sync_every >= 1, "replica_sync_every", "an integer >= 1"),
        (cfg.every == "auto" or (isinstance(cfg.every, int) and cfg.every >= 1), "every",
         "an integer >= 1, or 'auto' (async_checkpoint, memory_checkpoint, snapshot_restore, compressed_snapshot)"),
        (cfg.keep >= 1, "keep", "an integer >= 1"),
        (cfg.copies >= 1, "copies", "an integer >= 1 (and below model.n_stages)"),
        (cfg.storage_every >= 1, "storage_every", "an integer >= 1"),
        (cfg.encoding in ("bf16", "int8"), "encoding", "'bf16' or 'int8'"),
        (isinstance(cfg.fit_buffer, int) and cfg.fit_buffer >= 1, "fit_buffer", "an integer >= 1 (micro-batches)"),
        (isinstance(cfg.fit_steps, int) and cfg.fit_steps >= 0, "fit_steps", "an integer >= 0"),
        (finite(cfg.fit_lr) and cfg.fit_lr > 0, "fit_lr", "a finite positive learning rate"),
        (cfg.fit_loss in ("mse", "smooth_l1"), "fit_loss", "'mse' or 'smooth_l1'"),
    ]
    for ok, key, allowed in checks:
        if not ok:
            raise ConfigError(f"strategy.{key}={getattr(cfg, key)!r} is invalid: allowed is {allowed}.")
    cls = strategy_class(cfg.name)
    if cfg.every == "auto" and cls.sends_in_background is None:
        raise ConfigError(f"strategy.every='auto' is invalid for strategy={cfg.name}: only strategies that save in "
                          "the background (async_checkpoint, memory_checkpoint, snapshot_restore, compressed_snapshot) can pick "
                          "their "
                          "period from the bandwidth; allowed is an integer >= 1.")
    cls(cfg).validate(n_stages)


def check_strategy_overrides(name: str, overrides: list[str]) -> None:
    """Refuse a ``strategy.*`` key given on the command line that strategy ``name`` does not read: with
    ``+strategy.every=5 strategy=checkfree_plus`` the user believes checkpoints are taken every 5 iterations
    while nothing reads the key. (Keys a sweep file sets for all of its strategies are not refused: the file
    says once what each strategy that reads them should use.)"""
    cls = strategy_class(name)
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue  # a deletion, or a flag
        key, value = override.lstrip("+").split("=", 1)
        if not key.startswith("strategy.") or key in ("strategy.name", "strategy"):
            continue
        leaf = key.split(".", 1)[1]
        if leaf in cls.reads or leaf not in StrategyConfig.__dataclass_fields__:
            continue  # read; or not a key at all, which the config's conversion refuses with its own sentence
        readers = sorted(n for n in STRATEGIES if leaf in strategy_class(n).reads)
        who = f"it is read only by strategy={'|'.join(readers)}" if readers else "no strategy reads it"
        raise ConfigError(f"{key}={value} is not read by strategy={name}: {who}, so it would be ignored; drop it "
                          f"(strategy={name} reads {', '.join(cls.reads) or 'no strategy.* key'}).")


def build_strategy(cfg: StrategyConfig, n_stages: int) -> RecoveryStrategy:
    """The strategy of a validated ``cfg`` (``validate_strategy_config``, which ``validate_run_config`` runs: the
    one gate for bad input)."""
    return strategy_class(cfg.name)(cfg)


__all__ = [
    "STRATEGIES", "StrategyConfig", "RecoveryStrategy", "UnrecoverableFailure", "build_strategy",
    "strategy_class", "validate_strategy_config", "check_strategy_overrides",
]
