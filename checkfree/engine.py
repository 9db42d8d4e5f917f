"""What the trainer asks of an engine, whichever runs the stages (docs/design.md, 'Engines and launchers').

* ``engine=local`` (``checkfree.pipeline.LocalEngine``): every stage in this process.
* the process engine (``checkfree.distributed.engine.ProcessEngine``): one OS process per stage x replica (per
  node slot after a shrink, which may run several stages),
  started as local processes or as Ray actors; a failure is real (the processes exit) and recovery moves
  tensors between processes.

Both execute the same ``RecoveryPlan`` and ``Upkeep`` (``checkfree.plan``) with the same per-stage compute
(``checkfree.stage.compute``), so at a seed they write the same metrics, bit for bit. The trainer holds an
``Engine`` and never asks which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from checkfree.plan import RecoveryPlan, RecoveryReport, Traffic, Upkeep
from checkfree.simulation.placement import Placement
from checkfree.stage.compute import StepResult
from checkfree.stage.schedule import Schedule


class StagesLost(RuntimeError):
    """Stage processes died while a command was in flight (a failure from outside the failure model).

    The engine has already made the survivors drop what the command was doing; the trainer recovers
    ``stages`` with the run's strategy and redoes the command. ``result`` is set when the loss came
    during the optimizer step's commit: the survivors stepped, so the step stands.
    """

    def __init__(self, stages: set[int], command: str, detect_s: float = 0.0,
                 result: StepResult | None = None) -> None:
        self.stages, self.command, self.detect_s, self.result = set(stages), command, detect_s, result
        super().__init__(f"stage(s) {sorted(stages)} lost during '{command}'")


@dataclass
class Outcome:
    """What executing a recovery plan did."""

    reports: list[RecoveryReport]
    restored: dict[str, Any] | None = None
    """A rollback: the checkpoint's meta (progress, data position, RNG) for the trainer to restore."""


class Engine(Protocol):
    n_stages: int

    def start(self, run_dir: Path, fresh: bool) -> None:
        """Bring the stages up (``fresh``: a new run, no checkpoints of an earlier run count)."""

    def close(self) -> None:
        """Stop everything the engine started (however the run ended)."""

    def train_step(self, batches: list[torch.Tensor], schedule: Schedule, skip_nonfinite: bool = True) -> StepResult:
        """One optimizer step over ``batches`` (M micro-batches); may raise ``StagesLost``. With
        ``skip_nonfinite`` (what the trainer always passes; ``LocalEngine``'s own default is False) no stage
        steps when the loss or a gradient norm is non-finite."""

    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        """Mean token cross-entropy, in order, no gradients; may raise ``StagesLost``."""

    def sequence_losses(self, sequences: torch.Tensor, batch_size: int) -> list[float]:
        """Each sequence's mean token cross-entropy, in order (the validation loss's standard error)."""

    def lose(self, stages: list[int]) -> None:
        """The failure model lost ``stages``: their state is gone (processes exit). Returns nothing: the process
        engine keeps the seconds until it saw them gone for the next recovery's report."""

    def lose_nodes(self, nodes: list[tuple[int, int]]) -> None:
        """Single nodes ``(stage, replica)`` lost while their stages keep a live replica (``engine.replicas`` > 1):
        no weight changes; an engine that runs replicas replaces their processes from a surviving replica."""

    def place(self, placement: Placement) -> None:
        """Run the logical stages on the hosts ``placement`` says (``checkfree.simulation.elastic``). Called right after
        ``lose`` when a loss changes the placement (the ``execute`` that follows puts the lost stages where it
        says), and on its own when a node arrives (the stages move to it)."""

    def execute(self, plan: RecoveryPlan, progress: int) -> Outcome:
        """Carry out a recovery plan; may raise ``StagesLost`` (a cascade: lost while recovering)."""

    def upkeep(self, upkeep: Upkeep, meta: dict[str, Any]) -> Traffic:
        """Refresh held copies / save a checkpoint (``meta``: progress, data position, RNG)."""

    def stage_lrs(self) -> list[float]: ...
    def nonfinite_stages(self) -> list[int]: ...
    def first_nonfinite_output(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> int | None: ...
    def held_bytes(self) -> int: ...
    def held_bytes_per_node(self) -> list[int]: ...

    def core_seconds(self) -> float | None:
        """``engine.compute_time=cpu``: the emulated seconds the stage processes have reached (each one's own
        core: ``checkfree.transport.core_clock``); None: the run's time is the wall clock's."""

    def stage_states(self) -> list[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
