"""CheckFree (and CheckFree+) with the rebuilt stage fitted to the activations its neighbours buffered.

Stage ``k``'s body maps what it receives to what it sends; the stages either side of it saw both, every
micro-batch. Each stage keeps the last ``fit_buffer`` micro-batches of what it sent to and received from its
neighbours' bodies (``checkfree.stage.fitting.ActivationRing``): input/output pairs of their last weights that
cost no traffic while training, only host memory. On a loss the replacement starts from the parent strategy's
rule (CheckFree's gradient-norm-weighted average; CheckFree+'s copy from the swap partner at the edges), receives
the pairs from the surviving stages that hold them (``Fit.holders``: the stages on either side of its body's
visits, which under CheckFree+'s swapped routes are other stages on odd micro-batches), and takes ``fit_steps``
Adam steps of its body on ``fit_loss`` at ``fit_lr`` (a fresh Adam, dropped after); it then trains on the
parent's fresh Adam at ``lr_scale * lr``.

Several adjacent stages lost together are each fitted to the pairs whose both halves survived: a pair's input
or output held by a stage lost with it is gone, so the middle of a run of three lost stages fits on nothing and
keeps its interpolated weights (its record says ``fit_pairs: 0``). Edge stages fit only where their body runs
alone between two stages (CheckFree+'s odd micro-batches); under CheckFree the edges' bodies run with the
(de)embedding and are never fitted.
"""

from __future__ import annotations

from dataclasses import replace

from checkfree.plan import Fit, RecoveryPlan, RunView
from checkfree.recovery.checkfree import CheckFree, CheckFreePlus
from checkfree.stage.routes import body_visits
from checkfree.stage.schedule import build_schedule

READS = ("fit_buffer", "fit_steps", "fit_lr", "fit_loss")


class Fitted:
    """Adds the fit to every rebuild of a neighbour strategy's plan that has something to fit from (not a
    re-initialised stage). Mixed in before the parent, whose plan it takes and adds to."""

    fits = True

    def holders(self, k: int, lost: frozenset[int], n_stages: int) -> tuple[int, ...]:
        """The surviving stages on either side of stage ``k``'s body in the schedule's routes (even and odd
        micro-batches): the ones that hold some of its pairs."""
        schedule = build_schedule(self.schedule_name, n_stages)
        sides = {s for m in (0, 1) for v in body_visits(schedule.order(m), n_stages) if v.stage == k
                 for s in (v.prev, v.next)}
        return tuple(sorted(sides - lost))

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        plan = super().plan(lost, view)
        cfg = self.cfg
        rebuilds = tuple(r if r.method == "reinit" else
                         replace(r, fit=Fit(cfg.fit_steps, cfg.fit_lr, cfg.fit_loss,
                                            self.holders(r.stage, frozenset(lost), view.n_stages)))
                         for r in plan.rebuilds)
        return replace(plan, rebuilds=rebuilds)


class CheckFreeFit(Fitted, CheckFree):
    name = "checkfree_fit"
    reads = (*CheckFree.reads, *READS)


class CheckFreePlusFit(Fitted, CheckFreePlus):
    name = "checkfree_plus_fit"
    reads = (*CheckFreePlus.reads, *READS)
