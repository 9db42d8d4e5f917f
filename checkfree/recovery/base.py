"""The recovery protocol every strategy follows, and the records it produces.

A strategy is a small object with four hooks, called by the trainer in this order each iteration:

* ``recover(failed, ctx)`` — the stages in ``failed`` were lost (weights and optimizer state). Rebuild
  *all* of them at once, using only surviving stages as sources; return one ``RecoveryReport`` each.
* (the pipeline runs the iteration with ``schedule``)
* ``after_step(ctx)`` — bookkeeping a real system would do after the optimizer step (checkpoint upload,
  replica/shadow sync); returns the traffic it caused as a ``StepOverhead`` for the cost model.

Strategies never import the trainer; they see the pipeline and the run state through ``RecoveryContext``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkfree.config import ConfigError
from checkfree.cost import StepOverhead
from checkfree.pipeline import LocalPipeline


@dataclass(frozen=True)
class StrategyConfig:
    """Hydra group ``strategy``: one YAML per strategy; keys a strategy does not use are ignored."""

    name: str = "checkfree_plus"
    """none | checkfree | checkfree_plus | checkpoint | redundant | copy | uniform | random | zero"""
    lr_scale: float = 1.1
    """The recovered stage trains at lr_scale * lr (the reference: 1.1 for 124M/1.5B, 1.2 for 500M)."""
    norm_source: str = "post"
    """Which gradient norm weights the neighbours: 'post' (after clipping, as the reference) or 'pre'."""
    norm_power: float = 1.0
    """Weights are |g|^power + eps (the reference uses 1; one secondary source says 2)."""
    eps: float = 1e-4
    """Added to each neighbour's weight so that zero gradients still give a defined average."""
    unrecoverable: str = "error"
    """A lost stage the strategy cannot rebuild (no survivor on one side, both swap partners or a stage and
    its shadow holder lost together): 'error' (stop, say why) or 'reinit' (fresh weights, logged)."""
    replica_sync_every: int = 10
    """CheckFree+: refresh the (de)embedding replicas on stages 1 and S-2 every this many iterations."""
    every: int = 50
    """checkpoint: save all stages + optimizers + data position + RNG every this many iterations."""
    keep: int = 2
    """checkpoint: how many checkpoints to keep on disk."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryReport:
    """One recovered stage, as it goes to metrics.jsonl."""

    stage: int
    strategy: str
    method: str
    """average | interpolate | copy | replica | reinit | random | zero | rollback | shadow"""
    sources: list[int]
    coefficients: list[float]
    bytes_moved: int
    """Bytes a real system would move to the replacement node (weights, replicas, optimizer state)."""
    wall_s: float = 0.0
    """Seconds the recovery took on this machine."""
    sim_seconds: float = 0.0
    """Simulated seconds charged by the cost model (filled by the trainer)."""
    lost_iterations: int = 0
    from_storage: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryContext:
    """What a strategy may read and change."""

    pipeline: LocalPipeline
    base_lr: float
    iteration: int = 0
    """The wall iteration about to run (1-based) or just run (in after_step)."""
    progress: int = 0
    """Optimizer steps the model has actually kept; a rollback lowers it."""
    grad_norm: list[float] | None = None
    """Per-stage pre-clip gradient norms of the last step (None before the first step)."""
    grad_norm_post: list[float] | None = None
    run_dir: Path | None = None
    data: Any = None
    """The training batch stream (state_dict/load_state_dict), for checkpoint rollback."""
    seed: int = 0
    """The run seed: fresh weights of a replacement node are reproducible at a seed."""


class UnrecoverableFailure(RuntimeError):
    """A lost stage that the strategy cannot rebuild, with the way out in the message."""


class RecoveryStrategy:
    """Base class: no recovery, in-order schedule, no after-step work."""

    name = "none"
    schedule_name = "in_order"
    min_stages = 1

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    def validate(self, n_stages: int) -> None:
        if n_stages < self.min_stages:
            raise ConfigError(
                f"model.n_stages={n_stages} is invalid for strategy={self.name}: "
                f"it needs at least {self.min_stages} stages."
            )

    def setup(self, ctx: RecoveryContext) -> None:
        """Called once before the first iteration."""

    def recover(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        raise UnrecoverableFailure(
            f"stages {sorted(failed)} failed but strategy=none recovers nothing; "
            "use failure=none with strategy=none, or pick a recovery strategy."
        )

    def after_step(self, ctx: RecoveryContext) -> StepOverhead:
        return StepOverhead()

    def memory_overhead_bytes(self) -> int:
        """Extra bytes this strategy keeps resident (shadows, replicas)."""
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def optimizer_state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in an ``Optimizer.state_dict()`` (Adam: exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for per_param in state["state"].values()
               for v in per_param.values() if torch.is_tensor(v))


class Stopwatch:
    """Times a block of recovery work on this machine."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
