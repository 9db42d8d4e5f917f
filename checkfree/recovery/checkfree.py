"""CheckFree and CheckFree+: rebuild a lost stage from its neighbours instead of a checkpoint.

* ``CheckFree`` — a lost intermediate stage becomes the gradient-norm-weighted average of its nearest
  surviving neighbours (interpolated when several adjacent stages are lost). Edge stages have a neighbour
  on one side only and cannot be averaged: ``strategy.edge_rule=copy`` copies that neighbour (as the paper's
  code does) and restores the embedding / head from a replica; otherwise see ``strategy.unrecoverable``.
* ``CheckFreePlus`` — out-of-order pipelining trains stage 1 to also do stage 0's job (and S-2 to do S-1's),
  so a lost edge stage (or its partner) is *copied* from its swap partner; the embedding and head come back
  from replicas kept on stages 1 and S-2.

Every rebuilt stage restarts on a new node: fresh random weights (from a seed of the run, the iteration and
the stage), overwritten by the rebuilt tensors, a fresh optimizer and ``lr_scale * lr``.
"""

from __future__ import annotations

from checkfree.plan import REPLICA, Held, Rebuild, RecoveryPlan, RunView, Upkeep
from checkfree.recovery.base import RecoveryStrategy, UnrecoverableFailure
from checkfree.recovery.rules import interpolation_weights, nearest_survivors, norm_weight


class NeighbourRecovery(RecoveryStrategy):
    """Every lost stage is rebuilt from surviving stages only, all in one plan (a stage rebuilt in the same
    plan never feeds another one: the reference leaked weights this way)."""

    min_stages = 3
    reads = ("lr_scale", "unrecoverable", "edge_rule", "replica_sync_every")

    @property
    def keeps_replicas(self) -> bool:
        return self.cfg.edge_rule == "copy"

    def replicas(self, n_stages: int) -> tuple[Held, ...]:
        """The (de)embedding replicas: stage 0's embedding on stage 1, stage S-1's head on stage S-2."""
        if not self.keeps_replicas:
            return ()
        return Held(REPLICA, 0, 1), Held(REPLICA, n_stages - 1, n_stages - 2)

    def held_by(self, k: int, n_stages: int) -> tuple[Held, ...]:
        return tuple(h for h in self.replicas(n_stages) if h.holder == k)

    # --- the plan ------------------------------------------------------------------------------------

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep(refresh=self.replicas(view.n_stages))

    def after_step(self, view: RunView) -> Upkeep:
        if view.progress % self.cfg.replica_sync_every != 0:
            return Upkeep()
        return Upkeep(refresh=self.replicas(view.n_stages))

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        rebuilds = tuple(self.rebuild(k, frozenset(lost), view) for k in sorted(lost))
        # A re-initialised holder holds a fresh replica again (not part of its recovery's traffic: nothing
        # of it was recovered).
        refresh = tuple(h for r in rebuilds if r.method == "reinit" for h in self.held_by(r.stage, view.n_stages))
        return RecoveryPlan(self.name, tuple(sorted(lost)), rebuilds, refresh=refresh)

    def rebuild(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        left, right = nearest_survivors(k, lost, view.n_stages)
        if left is None or right is None:
            return self.edge(k, lost, view)
        return self.combine(k, left, right, view)

    def combine(self, k: int, left: int, right: int, view: RunView) -> Rebuild:
        """Interpolate between the surviving neighbours with ``neighbour_weights`` (CheckFree: grad norms)."""
        w_left, w_right = self.neighbour_weights(left, right, view)
        c_left, c_right = interpolation_weights(left, right, k, w_left, w_right)
        method = "average" if right - left == 2 else "interpolate"
        return self.make(k, view, method, sources=((left, c_left), (right, c_right)), weights=[w_left, w_right])

    def neighbour_weights(self, left: int, right: int, view: RunView) -> tuple[float, float]:
        """|g|^power + eps of each neighbour's own gradient from the last step."""
        norms = view.grad_norm_post if self.cfg.norm_source == "post" else view.grad_norm
        # Before the first step there are no gradients yet; the reference starts from 1 for every stage.
        norms = norms if norms is not None else (1.0,) * view.n_stages
        return (norm_weight(norms[left], self.cfg.norm_power, self.cfg.eps),
                norm_weight(norms[right], self.cfg.norm_power, self.cfg.eps))

    def edge(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        """A stage with no survivor on one side: copy the edge's one neighbour (``edge_rule=copy``)."""
        n = view.n_stages
        neighbour = {0: 1, n - 1: n - 2}.get(k)
        if self.keeps_replicas and neighbour is not None and neighbour not in lost:
            return self.copy_with_replica(k, neighbour, view)
        return self.unrecoverable(k, lost, view)

    def copy_with_replica(self, k: int, neighbour: int, view: RunView) -> Rebuild:
        """Edge stage ``k``: the neighbour's blocks, and its embedding or head from the replica there."""
        held = Held(REPLICA, k, neighbour)
        return self.make(k, view, "copy+replica", sources=((neighbour, 1.0),), restore=held,
                         replica_staleness=view.progress - view.held_since[held])

    def unrecoverable(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        if self.cfg.unrecoverable == "reinit":
            return self.make(k, view, "reinit")
        side = "left" if nearest_survivors(k, lost, view.n_stages)[0] is None else "right"
        raise UnrecoverableFailure(
            f"stage {k} was lost at iteration {view.iteration} and strategy={self.name} cannot rebuild it: "
            f"with lost stages {sorted(lost)} it has no surviving neighbour on its {side} to average with; "
            f"{self.way_out(k, view.n_stages)}"
        )

    def way_out(self, k: int, n_stages: int) -> str:
        """What would have survived this loss (the end of the unrecoverable message)."""
        if k in (0, n_stages - 1):
            return ("strategy=checkfree_plus (or strategy.edge_rule=copy) would have copied it from its one "
                    "neighbour, failure.stages=intermediate never loses an edge, and strategy.unrecoverable=reinit "
                    "restarts it from fresh weights.")
        return ("a run of lost stages that reaches an edge leaves nothing to average from; "
                "strategy.unrecoverable=reinit restarts such stages from fresh weights.")

    # --- building blocks -----------------------------------------------------------------------------

    def make(self, k: int, view: RunView, method: str, sources: tuple = (), restore: Held | None = None,
             transforms: tuple[str, ...] = (), **details: object) -> Rebuild:
        """A rebuild on a new node: fresh optimizer at lr_scale * lr; a rebuilt holder of a replica also
        fetches a fresh replica (it was lost with the node)."""
        lr = self.cfg.lr_scale * view.base_lr
        fetch = () if method == "reinit" else self.held_by(k, view.n_stages)
        extra = {"replica_resynced": True} if fetch else {}
        return Rebuild(k, method, self.fresh_seed(view, k), tuple(sources), restore, tuple(transforms), lr, fetch,
                       {**details, **extra, "lr": lr})

    @staticmethod
    def fresh_seed(view: RunView, k: int) -> int:
        """The replacement node's fresh weights: reproducible at (run seed, iteration, stage)."""
        return hash((view.seed, view.iteration, k)) % 2**63


class CheckFree(NeighbourRecovery):
    name = "checkfree"
    reads = (*NeighbourRecovery.reads, "norm_source", "norm_power", "eps")


class CheckFreePlus(CheckFree):
    """CheckFree + out-of-order pipelining + (de)embedding replicas on stages 1 and S-2."""

    name = "checkfree_plus"
    schedule_name = "out_of_order"
    min_stages = 4
    # Its edges are always copied from their swap partner: edge_rule means nothing to it.
    reads = tuple(key for key in CheckFree.reads if key != "edge_rule")

    @property
    def keeps_replicas(self) -> bool:
        return True

    @staticmethod
    def partner(k: int, n_stages: int) -> int | None:
        """The swap partner: 0 <-> 1 and S-2 <-> S-1; None for the stages in between."""
        return {0: 1, 1: 0, n_stages - 2: n_stages - 1, n_stages - 1: n_stages - 2}.get(k)

    def rebuild(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        n = view.n_stages
        partner = self.partner(k, n)
        if partner is None:
            return super().rebuild(k, lost, view)
        if partner in lost:
            return self.unrecoverable(k, lost, view)
        if k in (0, n - 1):
            return self.copy_with_replica(k, partner, view)  # the edge's replica lives on its swap partner
        return self.make(k, view, "copy", sources=((partner, 1.0),))

    def unrecoverable(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        partner = self.partner(k, view.n_stages)
        if self.cfg.unrecoverable == "reinit" or partner is None or partner not in lost:
            return super().unrecoverable(k, lost, view)
        edge = min(k, partner) if min(k, partner) == 0 else max(k, partner)
        raise UnrecoverableFailure(
            f"stages {k} and {partner} were lost together at iteration {view.iteration}: under "
            f"strategy={self.name} each is the other's swap partner, the only stage trained to do its job, and "
            f"the replica of stage {edge}'s {'embedding' if edge == 0 else 'head'} was lost with them; had either "
            f"survived, the other would have been copied from it (strategy.unrecoverable=reinit restarts both "
            f"from fresh weights, strategy=checkpoint rolls back instead)."
        )
