"""The numeric guard: after a step, is everything finite — and if not, which stage did it come from?

A non-finite loss or gradient makes the engine skip the optimizer step for every stage (one stage's NaN
would otherwise reach the others through the backward pass and Adam's moments). This module names the
stage to blame, most specific first: stages with non-finite weights; else the first stage whose forward
output is non-finite (a NaN spreads to every later output and to every stage's gradient, so only its
origin means anything); else the stages whose gradient norm is non-finite.
"""

from __future__ import annotations

import math

import torch

from checkfree.engine import Engine
from checkfree.stage.compute import StepResult
from checkfree.stage.schedule import Schedule


class NonFiniteError(RuntimeError):
    """A non-finite loss or weight, with the iteration and stage in the message."""


def diagnose(engine: Engine, result: StepResult, batches: list[torch.Tensor],
             schedule: Schedule) -> tuple[list[int], str] | None:
    """None when the step and every weight are finite; else (stages to blame, why)."""
    bad_weights = engine.nonfinite_stages()
    if result.stepped and math.isfinite(result.loss) and not bad_weights:
        return None
    if bad_weights:
        return bad_weights, "non-finite weights"
    if not math.isfinite(result.loss):
        for m, batch in enumerate(batches):
            origin = engine.first_nonfinite_output(batch[:, :-1], schedule.order(m))
            if origin is not None:
                return [origin], "the first non-finite output of the forward pass"
    return [i for i, n in enumerate(result.grad_norm) if not math.isfinite(n)], "non-finite gradients"


def check(engine: Engine, result: StepResult, batches: list[torch.Tensor], schedule: Schedule, iteration: int,
          on_nonfinite: str, strategy: str) -> list[int]:
    """The stages a non-finite loss, gradient or weight came from (empty when all is finite).
    ``on_nonfinite=error`` (or no stage to blame) raises NonFiniteError naming them; ``recover`` returns
    them, to be failed (and rebuilt with the run's strategy) at the next iteration."""
    found = diagnose(engine, result, batches, schedule)
    if found is None:
        return []
    stages, why = found
    if on_nonfinite == "recover" and stages:
        return stages
    what = f"stage(s) {stages} ({why})" if stages else "no one stage (all weights and outputs are finite)"
    step = ("the optimizer step had already run" if result.stepped
            else "the optimizer step was skipped, so no other stage took in the NaN")
    raise NonFiniteError(f"non-finite values at iteration {iteration} (loss={result.loss}) in {what}; {step}. "
                         "Lower trainer.lr, or set trainer.on_nonfinite=recover to rebuild the stage with "
                         f"strategy={strategy}.")
