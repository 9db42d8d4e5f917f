"""Redundant computation baseline (Bamboo-style): every stage also holds its successor's stage.

Stage ``i`` keeps a *shadow* of stage ``(i + 1) mod S`` — weights and optimizer state — that a real
system keeps identical by running the successor's forward/backward redundantly on every micro-batch.
Here the shadow is refreshed by copying after each optimizer step (into tensors allocated once, so it
costs one memcpy), which gives the same state; the redundant compute itself is charged by the cost model.

A lost stage ``k`` comes back *exactly* (bit for bit, no lost work) from the shadow on ``k - 1``. The
price: twice the weight + optimizer memory, and no answer when ``k`` and ``k - 1`` are lost together,
since the only copy of ``k`` died with ``k - 1`` (see ``StrategyConfig.unrecoverable``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from checkfree.cost import StepOverhead
from checkfree.recovery.base import (
    RecoveryContext,
    RecoveryReport,
    RecoveryStrategy,
    Stopwatch,
    StrategyConfig,
    UnrecoverableFailure,
    state_bytes,
)


class Shadow:
    """A copy of one stage's weights and optimizer state, refreshed in place."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.optimizer: dict[int, dict[str, torch.Tensor]] = {}
        self.param_groups: list[dict[str, Any]] = []

    @torch.no_grad()
    def sync(self, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for name, tensor in stage.state_dict().items():
            self._copy(self.weights, name, tensor)
        live = optimizer.state_dict()
        # Adam's state appears lazily at its first step, and a replaced optimizer starts empty again:
        # the shadow follows the live state's keys, allocating only what it has not seen.
        for key in set(self.optimizer) - set(live["state"]):
            del self.optimizer[key]
        for index, per_param in live["state"].items():
            slots = self.optimizer.setdefault(index, {})
            for name, value in per_param.items():
                self._copy(slots, name, value)
        self.param_groups = copy.deepcopy(live["param_groups"])  # lr, betas, ...: a few scalars

    @staticmethod
    def _copy(into: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
        held = into.get(name)
        if held is None or held.shape != tensor.shape or held.dtype != tensor.dtype:
            into[name] = tensor.detach().clone()
        else:
            held.copy_(tensor)

    def restore(self, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        stage.load_state_dict(self.weights)
        # Clones: the restored optimizer updates its state in place and must not write into the shadow.
        state = {i: {n: t.clone() for n, t in slots.items()} for i, slots in self.optimizer.items()}
        optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(self.param_groups)})

    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def nbytes(self) -> int:
        return state_bytes(self.weights) + sum(state_bytes(slots) for slots in self.optimizer.values())


class RedundantComputation(RecoveryStrategy):
    """Stage ``k``'s shadow lives on stage ``k - 1 (mod S)``; a lost stage is restored from it exactly."""

    name = "redundant"
    schedule_name = "in_order"
    min_stages = 2  # with one stage there is no other node to hold the shadow

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.shadows: list[Shadow] = []  # shadows[k] is held by stage k - 1 (mod S); filled by setup

    def setup(self, ctx: RecoveryContext) -> None:
        self.n_stages = ctx.pipeline.n_stages
        self.shadows = [Shadow() for _ in range(self.n_stages)]
        self._sync_all(ctx)

    def holder(self, k: int) -> int:
        return (k - 1) % self.n_stages

    def _sync(self, k: int, ctx: RecoveryContext) -> None:
        self.shadows[k].sync(ctx.pipeline.stages[k], ctx.pipeline.optimizers[k])

    def _sync_all(self, ctx: RecoveryContext) -> None:
        for k in range(self.n_stages):
            self._sync(k, ctx)

    def after_step(self, ctx: RecoveryContext) -> StepOverhead:
        # No traffic: the holder computed the same step itself. Its cost is the redundant compute,
        # charged by the cost model, not bytes on the wire.
        self._sync_all(ctx)
        return StepOverhead()

    def recover(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        pipeline = ctx.pipeline
        orphans = sorted(k for k in failed if self.holder(k) in failed)
        if orphans and self.cfg.unrecoverable != "reinit":
            why = "; ".join(f"stage {k}'s only copy was its shadow on stage {self.holder(k)}, lost too"
                            for k in orphans)
            raise UnrecoverableFailure(
                f"stages {sorted(failed)} were lost at iteration {ctx.iteration} and strategy=redundant cannot "
                f"restore them: {why}. Use strategy.unrecoverable=reinit (fresh weights for those stages), "
                "strategy=checkpoint, or a failure model that never loses adjacent stages together."
            )
        reports = []
        for k in sorted(failed):
            with Stopwatch() as watch:
                # A new node: the lost weights are gone. A dedicated generator leaves the global RNG alone.
                pipeline.stages[k].reset_parameters(torch.Generator().manual_seed(1_000_003 * ctx.iteration + k))
                if k in orphans:
                    pipeline.reset_optimizer(k, ctx.base_lr)
                    report = RecoveryReport(k, self.name, "reinit", [], [], 0)
                else:
                    shadow = self.shadows[k]
                    pipeline.reset_optimizer(k, shadow.lr())
                    shadow.restore(pipeline.stages[k], pipeline.optimizers[k])
                    n_bytes = shadow.nbytes()  # weights + optimizer state, all sent from the holder
                    report = RecoveryReport(k, self.name, "shadow", [self.holder(k)], [1.0], n_bytes)
            report.wall_s = watch.seconds
            reports.append(report)
        # Each replacement node held the shadow of its successor, lost with it: rebuild it from the live
        # successor (survivor or just restored). Done after every restore so no shadow copies a stale stage.
        for k in sorted(failed):
            self.shadows[(k + 1) % self.n_stages] = Shadow()
            self._sync((k + 1) % self.n_stages, ctx)
        return reports

    def memory_overhead_bytes(self) -> int:
        """All shadows (weights + optimizer state): about one more model + optimizer, i.e. 2x in total."""
        return sum(shadow.nbytes() for shadow in self.shadows)

    def state_dict(self) -> dict:
        # The shadows are this strategy's whole state (what a resumed run must restore from, bit for bit).
        return {"shadows": [{"weights": s.weights, "optimizer": s.optimizer, "param_groups": s.param_groups}
                            for s in self.shadows]}

    def load_state_dict(self, state: dict) -> None:
        self.shadows = []
        for saved in state["shadows"]:
            shadow = Shadow()
            shadow.weights = dict(saved["weights"])
            shadow.optimizer = {int(i): dict(slots) for i, slots in saved["optimizer"].items()}
            shadow.param_groups = copy.deepcopy(saved["param_groups"])
            self.shadows.append(shadow)
