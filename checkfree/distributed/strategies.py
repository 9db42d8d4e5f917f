"""Recovery strategies on stage processes: the local strategies' rules, carried out with real transfers.

The *rules* (which survivors are sources, with which coefficients, what is unrecoverable and the message
that says so) come from the local strategy objects and the pure functions of ``checkfree.recovery``, so
both engines decide identically. Only the execution differs: instead of editing modules in one process,
the supervisor sends each replacement process a ``Rebuild`` and the survivors send it their tensors over
the new process group. The replacement then applies the same ``weighted_state`` the local engine uses.

* CheckFree (and the ``uniform``/``copy``/``zero``/``random`` ablations): both neighbours' body weights,
  weighted by the gradient norms the supervisor collected from the last committed step.
* CheckFree+: the swap partner's body weights, plus the embedding / head replica that stage 1 / S-2 holds
  (refreshed over p2p every ``replica_sync_every`` steps); a replaced replica holder gets a fresh replica.
* checkpoint: every stage writes its own shard (weights + Adam) to ``run_dir/checkpoints``; on any loss all
  stages, the replacement included, load theirs back from storage and the data stream rewinds.
* redundant: stage k-1 holds stage k's weights + Adam state (refreshed over p2p after every step) and sends
  them to k's replacement, which is then exactly the lost stage.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkfree.config import ConfigError
from checkfree.cost import StepOverhead
from checkfree.distributed.cluster import WorkerPool
from checkfree.distributed.worker import rank_of
from checkfree.recovery import build_strategy
from checkfree.recovery.averaging import interpolation_weights, nearest_survivors
from checkfree.recovery.base import RecoveryContext, RecoveryReport, StrategyConfig, UnrecoverableFailure
from checkfree.recovery.checkfree import CheckFreePlus, NeighbourRecovery

NEIGHBOUR_RULES = ("checkfree", "checkfree_plus", "uniform", "copy", "zero", "random")


@dataclass
class Rebuild:
    """What one replacement stage receives, and the report it will produce."""

    stage: int
    method: str
    seed: int
    """Fresh weights first (a new node), from the same seed as the local engine's recovery."""
    lr: float
    """The replacement's lr: a fresh Adam at this lr, or the lost stage's own lr with its shadowed Adam state."""
    body: list[tuple[int, float]] = field(default_factory=list)
    """(source stage, coefficient): the replacement loads weighted_state of the sources' body weights."""
    edge: int | None = None
    """Stage that sends its (de)embedding replica (CheckFree+ edge stages)."""
    shadow: int | None = None
    """Stage that sends its shadow (weights + Adam state + lr) of this stage (redundant)."""
    zero_mlp: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def message(self) -> dict:
        return {"seed": self.seed, "lr": self.lr, "body": self.body, "edge": self.edge, "shadow": self.shadow,
                "zero_mlp": self.zero_mlp}


class RemoteRecovery:
    """The strategy object the trainer sees (same hooks as ``RecoveryStrategy``), executing on processes."""

    def __init__(self, cfg: StrategyConfig, n_stages: int) -> None:
        self.cfg = cfg
        self.rules = build_strategy(cfg, n_stages)  # validation, schedule, norms and messages: the local ones
        self.name, self.schedule_name = self.rules.name, self.rules.schedule_name
        self.n_stages = n_stages
        self.pool: WorkerPool | None = None
        self.held_bytes: dict[int, int] = {}
        """Bytes of replicas / shadows each stage holds (memory overhead)."""
        self.synced_at: dict[int, int] = {}
        self.latest: Path | None = None
        self.detect_s = 0.0
        """Set by the supervisor before ``recover``: seconds from the failure to seeing every process gone."""

    # --- set-up and after-step ----------------------------------------------------------------------

    def setup(self, ctx: RecoveryContext) -> None:
        self.pool = ctx.pipeline.pool
        s = self.n_stages
        if self.name == "checkfree_plus":
            self.partner = {0: 1, 1: 0, s - 2: s - 1, s - 1: s - 2}
            self._refresh(replicas=[(0, 1), (s - 1, s - 2)], ctx=ctx)
        elif self.name == "redundant":
            self._refresh(shadows=[(k, (k - 1) % s) for k in range(s)], ctx=ctx)
        elif self.name == "checkpoint":
            if ctx.run_dir is None:
                raise ConfigError("strategy=checkpoint needs a run directory to write checkpoints into.")
            self.directory = Path(ctx.run_dir) / "checkpoints"
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):  # left by a run killed mid-save: never a checkpoint
                shutil.rmtree(stale, ignore_errors=True)
            self._save(ctx)

    def after_step(self, ctx: RecoveryContext) -> StepOverhead:
        s = self.n_stages
        if self.name == "checkfree_plus" and ctx.progress % self.cfg.replica_sync_every == 0:
            received = self._refresh(replicas=[(0, 1), (s - 1, s - 2)], ctx=ctx)
            return StepOverhead(replica_sync_bytes={(0, 1): received[1], (s - 1, s - 2): received[s - 2]})
        if self.name == "redundant":
            # No traffic charged: in the modelled system the holder computes the same step itself.
            self._refresh(shadows=[(k, (k - 1) % s) for k in range(s)], ctx=ctx)
        if self.name == "checkpoint" and ctx.progress % self.cfg.every == 0:
            return StepOverhead(storage_upload_bytes=max(self._save(ctx)))
        return StepOverhead()

    def _refresh(self, ctx: RecoveryContext, replicas: list | None = None, shadows: list | None = None) -> dict:
        """Owners send edge replicas / shadows to holders; returns bytes received per holder stage."""
        replies = self.pool.broadcast("refresh", replicas=replicas or [], shadows=shadows or [])
        return self._note_refresh(replies, replicas or [], ctx)

    def _note_refresh(self, replies: dict[int, dict], replicas: list, ctx: RecoveryContext) -> dict[int, int]:
        received = {}
        for rank, reply in replies.items():
            handle = self.pool.handles[rank]
            if handle.replica == 0:
                received[handle.stage] = reply.get("received", 0)
                self.held_bytes[handle.stage] = reply["held_bytes"]
        for _, holder in replicas:
            self.synced_at[holder] = ctx.progress
        return received

    def memory_overhead_bytes(self) -> int:
        return sum(self.held_bytes.values())

    # --- recovery ----------------------------------------------------------------------------------

    def recover(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        """Plan (may raise UnrecoverableFailure), start replacements, re-form the group, move the tensors."""
        start = time.perf_counter()
        rebuilds, refresh = self.plan(failed, ctx)
        old_pids = {k: self.pool.pid(k) for k in failed}
        respawn_s = self.pool.respawn(sorted(failed))
        rendezvous_s = self.pool.rendezvous()
        t = time.perf_counter()
        if self.name == "checkpoint":
            reports = self._rollback(failed, ctx)
        else:
            replies = self.pool.broadcast("recover", rebuild={k: r.message() for k, r in rebuilds.items()},
                                          refresh=refresh)
            self._note_refresh(replies, refresh["replicas"], ctx)
            for rank, reply in replies.items():
                ctx.pipeline.lrs[self.pool.handles[rank].stage] = reply["lr"]
            reports = [self._report(rebuilds[k], replies) for k in sorted(failed)]
        transfer_s = time.perf_counter() - t
        wall = time.perf_counter() - start
        for report in reports:
            report.wall_s = wall
            report.details.update(detect_s=self.detect_s, respawn_s=respawn_s, rendezvous_s=rendezvous_s,
                                  transfer_s=transfer_s, old_pid=old_pids[report.stage],
                                  new_pid=self.pool.pid(report.stage), generation=self.pool.generation)
        return reports

    def _report(self, rebuild: Rebuild, replies: dict[int, dict]) -> RecoveryReport:
        received = replies[rank_of(rebuild.stage, 0, self.n_stages)]["received_bytes"]
        sources = [src for src, _ in rebuild.body] or ([rebuild.shadow] if rebuild.shadow is not None else [])
        coefficients = [c for _, c in rebuild.body] or ([1.0] if rebuild.shadow is not None else [])
        return RecoveryReport(rebuild.stage, self.name, rebuild.method, sources, coefficients, received,
                              details=dict(rebuild.details))

    def plan(self, failed: set[int], ctx: RecoveryContext) -> tuple[dict[int, Rebuild], dict]:
        if self.name in NEIGHBOUR_RULES:
            return self._plan_neighbours(failed, ctx)
        if self.name == "redundant":
            return self._plan_shadows(failed, ctx)
        if self.name == "checkpoint":
            return {}, {"replicas": [], "shadows": []}
        return self.rules.recover(failed, ctx), {}  # strategy=none: raises UnrecoverableFailure

    def _plan_neighbours(self, failed: set[int], ctx: RecoveryContext) -> tuple[dict[int, Rebuild], dict]:
        rules: NeighbourRecovery = self.rules  # type: ignore[assignment]
        lr = self.cfg.lr_scale * ctx.base_lr
        rebuilds, refresh = {}, []
        for k in sorted(failed):
            r = Rebuild(k, "", rules._generator(ctx, k).initial_seed(), lr)
            partner = self.partner.get(k) if self.name == "checkfree_plus" else None
            if partner is not None and partner not in failed:
                r.method, r.body = "copy", [(partner, 1.0)]
                if k in (0, self.n_stages - 1):  # the edge's replica lives on its swap partner
                    r.method, r.edge = "copy+replica", partner
                    r.details["replica_staleness"] = ctx.progress - self.synced_at[partner]
                else:  # the replica this stage held is gone with it: the replacement fetches a fresh one
                    refresh.append((partner, k))
                    r.details["replica_resynced"] = True
            else:
                left, right = nearest_survivors(k, failed, self.n_stages)
                if partner is not None or left is None or right is None:
                    # Raises with the local engine's message unless strategy.unrecoverable=reinit.
                    NeighbourRecovery.unrecoverable(rules, k, failed, ctx)
                    r.method = "reinit"
                    if isinstance(rules, CheckFreePlus) and k in (1, self.n_stages - 2):
                        refresh.append((0 if k == 1 else self.n_stages - 1, k))
                else:
                    self._combine(r, left, right, ctx)
            r.details["lr"] = lr
            rebuilds[k] = r
        return rebuilds, {"replicas": refresh, "shadows": []}

    def _combine(self, r: Rebuild, left: int, right: int, ctx: RecoveryContext) -> None:
        k = r.stage
        if self.name in ("copy", "zero"):
            source = left if k - left <= right - k else right
            r.method, r.body, r.zero_mlp = self.name, [(source, 1.0)], self.name == "zero"
        elif self.name == "random":
            r.method = "random"  # the fresh weights are the recovery
        else:
            w_left, w_right = self.rules.neighbour_weights(left, right, ctx)
            c_left, c_right = interpolation_weights(left, right, k, w_left, w_right)
            r.method = "average" if right - left == 2 else "interpolate"
            r.body = [(left, c_left), (right, c_right)]
            r.details["weights"] = [w_left, w_right]

    def _plan_shadows(self, failed: set[int], ctx: RecoveryContext) -> tuple[dict[int, Rebuild], dict]:
        s = self.n_stages
        holder = {k: (k - 1) % s for k in failed}
        orphans = sorted(k for k in failed if holder[k] in failed)
        if orphans and self.cfg.unrecoverable != "reinit":
            why = "; ".join(f"stage {k}'s only copy was its shadow on stage {holder[k]}, lost too" for k in orphans)
            raise UnrecoverableFailure(
                f"stages {sorted(failed)} were lost at iteration {ctx.iteration} and strategy=redundant cannot "
                f"restore them: {why}. Use strategy.unrecoverable=reinit (fresh weights for those stages), "
                "strategy=checkpoint, or a failure model that never loses adjacent stages together.")
        rebuilds = {}
        for k in sorted(failed):
            seed = 1_000_003 * ctx.iteration + k
            if k in orphans:
                rebuilds[k] = Rebuild(k, "reinit", seed, ctx.base_lr)
            else:
                # The lr is the supervisor's bookkeeping (it changes only at recoveries), not the lost state.
                rebuilds[k] = Rebuild(k, "shadow", seed, ctx.pipeline.lrs[k], shadow=holder[k])
        # Each replacement held the shadow of its successor, lost with it: rebuilt from the live successor.
        return rebuilds, {"replicas": [], "shadows": [((k + 1) % s, k) for k in sorted(failed)]}

    # --- checkpoints -------------------------------------------------------------------------------

    def _save(self, ctx: RecoveryContext) -> list[int]:
        """Every stage writes its shard into a temporary directory; it becomes a checkpoint only when complete."""
        final = self.directory / f"ckpt_{ctx.progress:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        replies = self.pool.broadcast("save", directory=str(tmp))
        shards = [0] * self.n_stages
        for rank, reply in replies.items():
            shards[self.pool.handles[rank].stage] = reply["shard_bytes"]
        torch.save({"progress": ctx.progress, "data": ctx.data.state_dict() if ctx.data is not None else None,
                    "rng": torch.get_rng_state(), "shard_bytes": shards}, tmp / "meta.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.latest = final
        for old in sorted(self.directory.glob("ckpt_*[0-9]"))[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return shards

    def _rollback(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        assert self.latest is not None, "setup() writes the first checkpoint"
        meta = torch.load(self.latest / "meta.pt", weights_only=False)  # this run's own file: trusted
        replies = self.pool.broadcast("load", directory=str(self.latest))
        for rank, reply in replies.items():
            ctx.pipeline.lrs[self.pool.handles[rank].stage] = reply["lr"]
        if ctx.data is not None:
            ctx.data.load_state_dict(meta["data"])
        torch.set_rng_state(meta["rng"])
        before, saved = ctx.progress, meta["progress"]
        ctx.progress = saved
        shards = meta["shard_bytes"]
        details = {"rolled_back_to": saved, "all_stages": True, "largest_shard_bytes": max(shards)}
        return [RecoveryReport(k, self.name, "rollback", [], [], shards[k], lost_iterations=before - saved,
                               from_storage=True, details=dict(details)) for k in sorted(failed)]
