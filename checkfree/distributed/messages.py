"""What the supervisor and a stage worker say to each other on the control channel: one typed command in,
one typed reply out.

Every command is a frozen dataclass; the worker serves it by its type (``worker.HANDLERS``), so a new command
is a class here and a method there, and a misspelt one fails where it is built, not in a remote process. The
replies name their outcome by their type too: ``Failed`` (the worker's own code raised: a bug or a bad
setting, never a failure to recover from), ``Aborted`` (a peer was lost or timed out mid-command), or the
command's own result.

Only commands, token ids, plans and small replies travel here (pickled between the supervisor and its own
workers: a pipe, or Ray's calls); tensors go between the workers over ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from checkfree.plan import Held, RecoveryPlan, Transfer

# --- commands --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """Leave the old process group and join generation ``generation`` as ``rank`` of ``world_size``.

    ``ranks[k]``: the rank of the process that runs logical stage ``k`` of this worker's pipeline in this
    generation (``checkfree.simulation.placement``: after a shrink one process runs several stages). A worker builds a
    fresh stage for every stage it is given and does not have yet (rebuilt or moved to it next)."""

    generation: int
    rank: int
    world_size: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """Phase one of an iteration: run the stage's program and all-reduce its gradients; do not step."""

    inputs: dict[int, np.ndarray]
    """Token ids per micro-batch (the first stage's only)."""
    targets: dict[int, np.ndarray]
    """Next-token targets per micro-batch (the last stage's only)."""
    step: int = 0
    """Optimizer steps the pipeline has taken: micro-batch ``m`` of this one is number ``step * M + m`` (what the
    activation ring keys it by, on every process alike)."""


@dataclass(frozen=True)
class Commit:
    """Phase two: step the optimizer with the gradients of the last ``Step``."""

    last_seq: int = -1
    """The number of the step's last micro-batch: the activation ring keeps those up to it (``Step.step``)."""


@dataclass(frozen=True)
class Abort:
    """Drop the gradients of the last ``Step`` (an iteration discarded everywhere)."""


@dataclass(frozen=True)
class Eval:
    """In-order forward of held-out sequences (replica 0 of every stage)."""

    inputs: np.ndarray | None
    targets: np.ndarray | None
    n: int
    batch_size: int
    per_sequence: bool = False


@dataclass(frozen=True)
class Move:
    """Stages that change process: ``(stage, from rank, to rank)``. The sender sends the stage's weights, Adam
    state and the copies it holds, then drops them; the receiver takes them, bitwise."""

    moves: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Resync:
    """New processes of lost single replicas copy their stage from a surviving replica: ``(stage, from rank, to
    rank)``. The sender sends the stage's weights, Adam state and the copies it holds, and keeps them; the
    receiver takes them, bitwise."""

    copies: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Probe:
    """Forward one micro-batch along ``order``, reporting which op's output went non-finite first."""

    order: tuple[int, ...]
    inputs: np.ndarray | None
    size: int


@dataclass(frozen=True)
class Recover:
    """This stage's part of a recovery plan."""

    plan: RecoveryPlan


@dataclass(frozen=True)
class Upkeep:
    """Re-make held copies; write this stage's checkpoint shard into ``checkpoint`` (in the background when
    ``in_background``)."""

    refresh: list[Held]
    checkpoint: str | None
    in_background: bool = False


@dataclass(frozen=True)
class Flushed:
    """Wait for the shard being persisted in the background; reply its digest."""


@dataclass(frozen=True)
class Load:
    """Roll back to this stage's shard of ``checkpoint``; ``lost``: the stages that were lost (a process that
    keeps running one of them, beside stages it runs too, lets go of what a new node would not have)."""

    checkpoint: str
    meta_digests: dict[str, str]
    lost: tuple[int, ...] = ()


@dataclass(frozen=True)
class GetState:
    """The stage's whole state (weights, optimizer, held copies) for a resumable save or the export."""


@dataclass(frozen=True)
class SetState:
    """Take the stage's part of a saved state (``torch.save`` bytes)."""

    state: bytes = field(repr=False)


@dataclass(frozen=True)
class Die:
    """Exit at once, as a machine that is lost (no cleanup, no reply)."""

    code: int = 70


@dataclass(frozen=True)
class Stop:
    """Leave the process group and end the command loop."""


Command = (Rendezvous | Step | Commit | Abort | Eval | Move | Resync | Probe | Recover | Upkeep | Flushed | Load | GetState | SetState
           | Die | Stop)


def name(command: Command) -> str:
    """The command's name in errors and ``WorkersDied`` ('step', 'get_state', ...)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in type(command).__name__).lstrip("_")


# --- replies ---------------------------------------------------------------------------------------------
# A worker runs one or more logical stages: what it reports per stage is a dict keyed by the stage.


@dataclass(frozen=True)
class Failed:
    """The worker's code raised: a bug or a bad setting, not a failure (the pool raises ``WorkerError``)."""

    error: str
    traceback: str = ""


@dataclass(frozen=True)
class Aborted:
    """A peer was lost or timed out while the command ran; the worker left the group."""

    error: str


@dataclass(frozen=True)
class Hello:
    """A worker has built its stage and serves commands."""

    pid: int
    build_s: float
    node_id: str | None = None
    """The Ray node an actor runs on (None for a local process)."""
    node_ip: str | None = None


@dataclass(frozen=True)
class Joined:
    generation: int


@dataclass(frozen=True)
class Ready:
    """Phase one done: the gradients wait for ``Commit``."""

    loss_sum: float
    tokens: int
    grad_norm: dict[int, float]
    grad_norm_post: dict[int, float]


@dataclass(frozen=True)
class Committed:
    lr: dict[int, float]
    finite: dict[int, bool]
    held_bytes: dict[int, int] = field(default_factory=dict)
    """With an activation ring, what each stage holds after the step kept its micro-batches (else empty: a step
    changes no held copy)."""


@dataclass(frozen=True)
class Done:
    """A command with nothing to report (``Abort``, ``Stop``)."""


@dataclass(frozen=True)
class Evaluated:
    loss_sum: float
    count: int
    sequences: list[float]


@dataclass(frozen=True)
class Probed:
    outputs: list[tuple[int, int, bool]]
    """(op index along the route, the stage blamed for it, whether its output was finite)."""


@dataclass(frozen=True)
class Recovered:
    received: dict[int, list[Transfer]]
    """Per stage rebuilt here: what it read from its sources, piece by piece (a source in this process counts too:
    the records are the local engine's, whatever the placement)."""
    lr: dict[int, float]
    held_bytes: dict[int, int]
    fitted: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per stage fitted here: how its fit went (``StageCompute.fit``)."""


@dataclass(frozen=True)
class Moved:
    received_bytes: int


@dataclass(frozen=True)
class KeptUp:
    received: list[tuple[tuple[str, int, int], int]]
    """((kind, owner, holder) of a held copy, the bytes its holder received for it)."""
    held_bytes: dict[int, int]
    shard_bytes: dict[int, int] = field(default_factory=dict)
    digest: dict[int, str] = field(default_factory=dict)
    """Of the shards written in the step (none when none was, or when they are persisted in the background)."""


@dataclass(frozen=True)
class Persisted:
    digest: dict[int, str]


@dataclass(frozen=True)
class Loaded:
    lr: dict[int, float]
    held_bytes: dict[int, int]


@dataclass(frozen=True)
class Damaged:
    """The shard to roll back to is damaged (every stage then falls back to the checkpoint before)."""

    path: str
    cause: str


@dataclass(frozen=True)
class State:
    state: bytes = field(repr=False)
    """``torch.save`` bytes of {stage: its weights, optimizer and held copies}."""
    generation: int


@dataclass(frozen=True)
class StateSet:
    lr: dict[int, float]
    held_bytes: dict[int, int]


Reply = (Failed | Aborted | Hello | Joined | Ready | Committed | Done | Evaluated | Probed | Recovered | Moved
         | KeptUp | Persisted | Loaded | Damaged | State | StateSet)


# --- the emulated core's time (``engine.compute_time=cpu``) --------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """A command or reply with its sender's emulated time (``checkfree.transport.core_clock``): a command carries
    the latest time the supervisor has heard, which its worker catches up to before serving it; a reply, the
    worker's time when it had served it."""

    at: float
    body: Any


def troubled(reply: Any) -> bool:
    """A reply that says the command did not do its work (the pool then bounds how long the others get)."""
    return isinstance(reply, (Failed, Aborted))
