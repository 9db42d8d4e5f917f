"""Which stage process does what, in which order: per-stage programs built from the routes.

A micro-batch's route (``checkfree.stage.routes``) says which stages visit it and in which order. A stage's
*program* is its visits' forward and backward passes in execution order. Every program follows one global order of all passes (GPipe: forwards by (micro-batch, position), then backwards by
(micro-batch, reverse position); 1F1B: the classic warm-up / one-forward-one-backward / cool-down), every
pass needs only passes earlier in that order, and sends never block: so no schedule can deadlock.
Backwards run in ascending micro-batch order, as the local engine accumulates them, which keeps the
gradients bit-for-bit equal to the local engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

from checkfree.stage.routes import Visit, route
from checkfree.stage.schedule import Schedule


@dataclass(frozen=True)
class Pass:
    """One forward or backward pass of a visit for one micro-batch."""

    backward: bool
    micro_batch: int
    visit: Visit


def replica_micro_batches(n_micro_batches: int, replicas: int, replica: int) -> list[int]:
    """Data parallelism: replica ``r`` runs the micro-batches ``m`` with ``m % W == r`` (global indices, so
    the schedule's odd/even swap and the loss scale 1/M are exactly the local engine's)."""
    return [m for m in range(n_micro_batches) if m % replicas == replica]


def gpipe_program(stage: int, schedule: Schedule, micro_batches: list[int]) -> list[Pass]:
    """All forwards (micro-batch by micro-batch), then all backwards in the same micro-batch order."""
    n = schedule.n_stages
    forwards = [Pass(False, m, v) for m in micro_batches for v in route(schedule.order(m), n) if v.stage == stage]
    backwards = [Pass(True, m, v) for m in micro_batches
                 for v in reversed(route(schedule.order(m), n)) if v.stage == stage]
    return forwards + backwards


def one_f_one_b_program(stage: int, schedule: Schedule, micro_batches: list[int]) -> list[Pass]:
    """1F1B: ``S - 1 - k`` warm-up forwards, then one forward / one backward, then the remaining backwards.

    Needs one visit per stage and micro-batch, i.e. the in-order schedule.
    """
    n = schedule.n_stages
    visits = {m: [v for v in route(schedule.order(m), n) if v.stage == stage] for m in micro_batches}
    if any(len(v) != 1 for v in visits.values()):
        raise ValueError("1F1B needs every stage to visit each micro-batch once (the in-order schedule); "
                         "out-of-order pipelining runs GPipe.")
    warmup = min(n - 1 - stage, len(micro_batches))
    program = [Pass(False, m, visits[m][0]) for m in micro_batches[:warmup]]
    pending = list(micro_batches[:warmup])
    for m in micro_batches[warmup:]:
        program.append(Pass(False, m, visits[m][0]))
        pending.append(m)
        oldest = pending.pop(0)
        program.append(Pass(True, oldest, visits[oldest][0]))
    program += [Pass(True, m, visits[m][0]) for m in pending]
    return program


def stage_program(stage: int, schedule: Schedule, micro_batches: list[int], pipeline: str) -> list[Pass]:
    """The program for ``pipeline`` ('gpipe' or '1f1b'); out-of-order schedules always run GPipe."""
    if pipeline == "1f1b" and schedule.name == "in_order":
        return one_f_one_b_program(stage, schedule, micro_batches)
    return gpipe_program(stage, schedule, micro_batches)


def host_program(stages: list[int], schedule: Schedule, micro_batches: list[int], pipeline: str) -> list[Pass]:
    """The passes of a process that runs several consecutive stages (a shrunk pipeline), in one order.

    Every stage's program is run in order, and the stages are interleaved as one global run of every stage's
    program would interleave them (each step, each stage runs its next pass if what it needs is done). So each
    stage's passes stay in their own order (its gradients bitwise as when it runs alone) and the process's
    order is a subsequence of one valid global order: with sends that never block, no set of processes can
    deadlock. One stage: its program, unchanged."""
    if len(stages) == 1:
        return stage_program(stages[0], schedule, micro_batches, pipeline)
    programs = [stage_program(k, schedule, micro_batches, pipeline) for k in range(schedule.n_stages)]
    done: set[tuple[bool, int, int]] = set()
    cursor = [0] * len(programs)
    order: list[Pass] = []
    while any(c < len(p) for c, p in zip(cursor, programs)):
        progressed = False
        for k, program in enumerate(programs):
            if cursor[k] == len(program):
                continue
            p = program[cursor[k]]
            pos = p.visit.position
            need = ((True, p.micro_batch, pos + 1) if p.visit.next is not None else (False, p.micro_batch, pos)) \
                if p.backward else ((False, p.micro_batch, pos - 1) if p.visit.prev is not None else None)
            if need is None or need in done:
                done.add((p.backward, p.micro_batch, pos))
                cursor[k] += 1
                progressed = True
                if k in stages:
                    order.append(p)
        if not progressed:
            raise RuntimeError(f"the stage programs of {pipeline} deadlock")  # no schedule we build does
    return order


def message_tag(micro_batch: int, position: int, backward: bool, n_stages: int) -> int:
    """A tag unique to one activation or gradient message of an iteration (routes have <= S + 2 visits)."""
    return (micro_batch * (n_stages + 2) + position) * 2 + int(backward)
