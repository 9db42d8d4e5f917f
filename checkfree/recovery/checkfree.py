"""CheckFree and CheckFree+: rebuild a lost stage from its neighbours instead of a checkpoint.

* ``CheckFree`` — a lost intermediate stage becomes the gradient-norm-weighted average of its nearest
  surviving neighbours (interpolated when several adjacent stages are lost). Edge stages have a
  neighbour on one side only and cannot be rebuilt by averaging: see ``StrategyConfig.unrecoverable``.
* ``CheckFreePlus`` — out-of-order pipelining trains stage 1 to also do stage 0's job (and S-2 to do
  S-1's), so a lost edge stage (or its partner) is *copied* from its swap partner; the embedding and
  head come back from replicas kept on stages 1 and S-2.

Every recovered stage restarts on a new node: fresh random weights are overwritten by the rebuilt
tensors (so nothing of the lost stage silently survives), a fresh optimizer, and ``lr_scale * lr``.
"""

from __future__ import annotations

import torch

from checkfree.cost import StepOverhead
from checkfree.recovery.averaging import interpolation_weights, nearest_survivors, norm_weight, weighted_state
from checkfree.recovery.base import (
    RecoveryContext,
    RecoveryReport,
    RecoveryStrategy,
    Stopwatch,
    UnrecoverableFailure,
    state_bytes,
)


class NeighbourRecovery(RecoveryStrategy):
    """The shared loop: every lost stage is rebuilt from surviving stages only, in one pass."""

    min_stages = 3

    def recover(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        # Sources are always survivors (never in ``failed``): a stage rebuilt earlier in this loop never
        # feeds another one, whatever the order (the reference leaked weights this way).
        pipeline = ctx.pipeline
        reports = []
        for k in sorted(failed):
            with Stopwatch() as watch:
                stage = pipeline.stages[k]
                stage.reset_parameters(self._generator(ctx, k))  # a new node: the lost weights are gone
                report = self.rebuild(k, failed, ctx)
                lr = self.cfg.lr_scale * ctx.base_lr
                pipeline.reset_optimizer(k, lr)
                report.details["lr"] = lr
            report.wall_s = watch.seconds
            reports.append(report)
        return reports

    def rebuild(self, k: int, failed: set[int], ctx: RecoveryContext) -> RecoveryReport:
        left, right = nearest_survivors(k, failed, ctx.pipeline.n_stages)
        if left is None or right is None:
            return self.unrecoverable(k, failed, ctx)
        return self.combine(k, left, right, ctx)

    def combine(self, k: int, left: int, right: int, ctx: RecoveryContext) -> RecoveryReport:
        """Interpolate between the surviving neighbours with ``neighbour_weights`` (CheckFree: grad norms)."""
        stages = ctx.pipeline.stages
        left_state, right_state = stages[left].body_state(), stages[right].body_state()
        w_left, w_right = self.neighbour_weights(left, right, ctx)
        coefficients = interpolation_weights(left, right, k, w_left, w_right)
        stages[k].load_state_dict(weighted_state([left_state, right_state], list(coefficients)), strict=False)
        method = "average" if right - left == 2 else "interpolate"
        return self._report(k, method, [left, right], list(coefficients),
                            state_bytes(left_state) + state_bytes(right_state), weights=[w_left, w_right])

    def neighbour_weights(self, left: int, right: int, ctx: RecoveryContext) -> tuple[float, float]:
        """|g|^power + eps of each neighbour's own gradient from the last step."""
        norms = self._norms(ctx)
        return (norm_weight(norms[left], self.cfg.norm_power, self.cfg.eps),
                norm_weight(norms[right], self.cfg.norm_power, self.cfg.eps))

    def unrecoverable(self, k: int, failed: set[int], ctx: RecoveryContext) -> RecoveryReport:
        if self.cfg.unrecoverable == "reinit":
            return self._report(k, "reinit", [], [], 0)
        raise UnrecoverableFailure(
            f"stage {k} was lost at iteration {ctx.iteration} and strategy={self.name} cannot rebuild it "
            f"(lost stages {sorted(failed)}: no surviving neighbour on one side). Use strategy=checkfree_plus "
            "for edge stages, failure.stages=intermediate, or strategy.unrecoverable=reinit."
        )

    def _norms(self, ctx: RecoveryContext) -> list[float]:
        norms = ctx.grad_norm_post if self.cfg.norm_source == "post" else ctx.grad_norm
        # Before the first step there are no gradients yet; the reference starts from 1 for every stage.
        return list(norms) if norms is not None else [1.0] * ctx.pipeline.n_stages

    def _generator(self, ctx: RecoveryContext, k: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((ctx.seed, ctx.iteration, k)) % 2**63)

    def _report(self, k: int, method: str, sources: list[int], coefficients: list[float], n_bytes: int,
                **details: object) -> RecoveryReport:
        return RecoveryReport(k, self.name, method, sources, coefficients, n_bytes, details=dict(details))


class CheckFree(NeighbourRecovery):
    name = "checkfree"


class CheckFreePlus(CheckFree):
    """CheckFree + out-of-order pipelining + (de)embedding replicas on stages 1 and S-2."""

    name = "checkfree_plus"
    schedule_name = "out_of_order"
    min_stages = 4

    def setup(self, ctx: RecoveryContext) -> None:
        self.n_stages = ctx.pipeline.n_stages
        self.partner = {0: 1, 1: 0, self.n_stages - 2: self.n_stages - 1, self.n_stages - 1: self.n_stages - 2}
        self.replicas: dict[int, dict[str, torch.Tensor]] = {}
        self.synced_at: dict[int, int] = {}
        for holder in (1, self.n_stages - 2):
            self._sync_replica(holder, ctx)

    def _owner(self, holder: int) -> int:
        """Stage 1 holds stage 0's embedding; stage S-2 holds stage S-1's head."""
        return 0 if holder == 1 else self.n_stages - 1

    def _sync_replica(self, holder: int, ctx: RecoveryContext) -> int:
        owner = ctx.pipeline.stages[self._owner(holder)]
        self.replicas[holder] = {k: v.detach().clone() for k, v in owner.edge_state().items()}
        self.synced_at[holder] = ctx.progress
        return state_bytes(self.replicas[holder])

    def staleness(self, ctx: RecoveryContext) -> dict[int, int]:
        """Optimizer steps since each replica was refreshed."""
        return {holder: ctx.progress - at for holder, at in self.synced_at.items()}

    def rebuild(self, k: int, failed: set[int], ctx: RecoveryContext) -> RecoveryReport:
        partner = self.partner.get(k)
        if partner is None:
            return super().rebuild(k, failed, ctx)
        if partner in failed:
            return self.unrecoverable(k, failed, ctx)
        stages = ctx.pipeline.stages
        body = stages[partner].body_state()
        stages[k].load_state_dict(body, strict=False)
        n_bytes, details = state_bytes(body), {}
        if k in (0, self.n_stages - 1):
            holder = partner  # the replica of this edge lives on the swap partner
            details["replica_staleness"] = self.staleness(ctx)[holder]
            stages[k].load_state_dict(self.replicas[holder], strict=False)
            n_bytes += state_bytes(self.replicas[holder])
            method = "copy+replica"
        else:
            # The replica held by the lost stage is gone with it: the replacement fetches a fresh one.
            n_bytes += self._sync_replica(k, ctx)
            details["replica_resynced"] = True
            method = "copy"
        return self._report(k, method, [partner], [1.0], n_bytes, **details)

    def unrecoverable(self, k: int, failed: set[int], ctx: RecoveryContext) -> RecoveryReport:
        report = super().unrecoverable(k, failed, ctx)
        if k in self.replicas:  # a re-initialised replica holder holds a fresh replica again
            self._sync_replica(k, ctx)
        return report

    def after_step(self, ctx: RecoveryContext) -> StepOverhead:
        if ctx.progress % self.cfg.replica_sync_every != 0:
            return StepOverhead()
        sync = {(self._owner(h), h): self._sync_replica(h, ctx) for h in (1, self.n_stages - 2)}
        return StepOverhead(replica_sync_bytes=sync)

    def memory_overhead_bytes(self) -> int:
        return sum(state_bytes(r) for r in self.replicas.values())

    def state_dict(self) -> dict:
        return {"replicas": self.replicas, "synced_at": self.synced_at}

    def load_state_dict(self, state: dict) -> None:
        self.replicas, self.synced_at = state["replicas"], state["synced_at"]

