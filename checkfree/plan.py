"""Recovery plans: what a strategy decides, as plain data that every engine executes the same way.

A strategy never touches tensors, modules, optimizers or processes (docs/design.md, 'Recovery plans').
Given the lost stages and a read-only ``RunView`` it returns a ``RecoveryPlan``; after each optimizer step
an ``Upkeep`` (copies to refresh, a checkpoint to save). The local engine applies plans to its modules in
process; the process engine sends them to its stage processes, which move the tensors between themselves.
Both read the same plan, so they decide identically by construction.

A held copy says what it holds, how it is kept current and where it lives (``CopyKind``); a rollback says
where the state comes back from (``STORAGE`` or ``MEMORY``). The engines and the clock read those properties
and never a strategy's or a kind's name. Held copies have one format for both engines: a nested dict of
tensors, ``{"weights": state_dict}`` for weights only and ``{"weights": state_dict, "optimizer":
optimizer_state_dict}`` for a whole state (as a checkpoint shard; see ``checkfree.stage.compute``).

Everything here is frozen and picklable, and imports nothing heavier than the standard library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- held copies: what one says about itself ---------------------------------------------------------------
# What a copy holds:
EDGES = "edges"
"""The owner's embedding or head weights (a CheckFree+ replica)."""
WEIGHTS = "weights"
"""The owner's stage weights."""
STATE = "state"
"""The owner's weights and optimizer state (moments, step count, lr): enough to restore it exactly."""
# How it is kept current:
RECOMPUTED = "recomputed"
"""The holder computes the owner's step itself: a refresh moves no bytes (its cost is that compute)."""
SENT = "sent"
"""The owner sends it: a refresh is traffic on the owner -> holder link."""
COPIED = "copied"
"""The owner copies it into its own host memory: no network traffic (the device -> host copy is priced with
the snapshot it is taken for)."""
# How it is encoded (``checkfree.stage.encoding``):
EXACT = "exact"
"""The tensors as the stage holds them."""
BF16 = "bf16"
"""Weights in bfloat16 (2 bytes a parameter)."""
INT8 = "int8"
"""Weights in int8 with one fp32 absmax scale per output channel (1 byte a parameter)."""
ENCODINGS = (EXACT, BF16, INT8)
BYTES_PER_PARAM = {EXACT: 4.0, BF16: 2.0, INT8: 1.0}
"""Bytes a parameter takes in a copy of fp32 weights in each encoding (int8's per-channel scales left out: one
fp32 per row, under 0.4 % of the codes for rows of 1,024 and more)."""
# Where it lives:
PEER_RAM = "peer_ram"
"""In the memory of another stage's node (``holder``): it is lost when that node is."""
OWN_HOST = "own_host"
"""In the owner's own host memory (``holder == owner``): it survives what the owner's device does, not the
owner's node."""


@dataclass(frozen=True)
class CopyKind:
    """A kind of held copy, as the engines and the clock read it (they never test a kind's name)."""

    name: str
    holds: str
    """EDGES | WEIGHTS | STATE."""
    kept: str
    """RECOMPUTED | SENT."""
    lives: str = PEER_RAM
    background: bool = False
    """A sent copy whose transfer overlaps training (the step waits only for the owner's device -> host copy):
    the clock charges the part of the transfer that the time until the next refresh cannot hide. Otherwise a
    sent refresh is charged in full, as the owner waits for it."""
    encoding: str = EXACT
    """EXACT | BF16 | INT8: how its tensors are stored (a restore decodes exactly this, never casts)."""

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}; allowed: {', '.join(ENCODINGS)}")
        if self.encoding != EXACT and self.holds != WEIGHTS:
            raise ValueError(f"a {self.name} is encoded {self.encoding}: only weights are encoded (an optimizer "
                             "state is kept exact)")

    @property
    def sent(self) -> bool:
        return self.kept == SENT


REPLICA, SHADOW, SNAPSHOT, HOST_SNAPSHOT = "replica", "shadow", "snapshot", "host_snapshot"
SNAPSHOT_BF16, SNAPSHOT_INT8 = "snapshot_bf16", "snapshot_int8"
"""The kinds' names (what a ``Held`` and a resume state store). A *replica* is the owner's (de)embedding
(CheckFree+), sent, and priced as traffic. A *shadow* is the owner's whole state (Bamboo-style redundant
computation), kept identical by computing the owner's step: no bytes move (its cost is the redundant compute).
A *snapshot* is the owner's whole state at one step, sent in the background to a peer's RAM (in-memory
checkpoints); a *host snapshot* is the same state in the owner's own host memory, from which a surviving stage
rolls back without any traffic. A *compressed snapshot* (``snapshot_bf16``, ``snapshot_int8``) is the owner's
weights alone, encoded, sent in the background to a peer's RAM: a restore starts a fresh optimizer."""
KINDS: dict[str, CopyKind] = {kind.name: kind for kind in (
    CopyKind(REPLICA, holds=EDGES, kept=SENT),
    CopyKind(SHADOW, holds=STATE, kept=RECOMPUTED),
    CopyKind(SNAPSHOT, holds=STATE, kept=SENT, background=True),
    CopyKind(HOST_SNAPSHOT, holds=STATE, kept=COPIED, lives=OWN_HOST),
    CopyKind(SNAPSHOT_BF16, holds=WEIGHTS, kept=SENT, background=True, encoding=BF16),
    CopyKind(SNAPSHOT_INT8, holds=WEIGHTS, kept=SENT, background=True, encoding=INT8),
)}

# --- rollbacks: where the state comes back from ------------------------------------------------------------
STORAGE = "storage"
"""Every stage reads its shard of the latest readable checkpoint in storage (the engine's CheckpointStore)."""
MEMORY = "memory"
"""Every stage restores its in-memory snapshot from a peer (the plan's rebuilds move them); the data position,
RNG and progress come from the trainer's ``MemoryStore``."""
ROLLBACK_SOURCES = (STORAGE, MEMORY)

ZERO_DOWN_PROJ = "zero_down_proj"
"""Transform: zero every MLP ``down_proj`` weight, so each block starts as (almost) the identity."""
TRANSFORMS = (ZERO_DOWN_PROJ,)


@dataclass(frozen=True)
class Held:
    """A copy of stage ``owner``'s state that stage ``holder``'s node keeps."""

    kind: str
    """A name in ``KINDS``."""
    owner: int
    holder: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of held copy {self.kind!r}; allowed: {list(KINDS)}")
        if (self.what.lives == OWN_HOST) != (self.owner == self.holder):
            raise ValueError(f"a {self.kind} of stage {self.owner} held by stage {self.holder}: a copy lives in "
                             "its owner's own host memory exactly when its holder is its owner")

    @property
    def what(self) -> CopyKind:
        return KINDS[self.kind]


@dataclass(frozen=True)
class Fit:
    """After a rebuild: fit the stage's body to the (input, output) pairs of its last weights that its
    neighbours buffered (``checkfree.stage.fitting``), ``steps`` Adam steps at ``lr`` on ``loss``, from a fresh
    Adam dropped after (the stage trains on the rebuild's fresh optimizer)."""

    steps: int
    lr: float
    loss: str
    holders: tuple[int, ...]
    """The surviving stages that hold some of its pairs (each sends what it has, possibly nothing)."""


@dataclass(frozen=True)
class Rebuild:
    """How one lost stage comes back, on a new node, in this order:

    1. fresh random weights from ``fresh_seed`` (nothing of the lost stage survives by accident);
    2. its decoder blocks := ``sum(c * W_src)`` over ``sources`` (survivors' block weights), if any;
    3. the held copy ``restore`` loaded over it (a replica: the embedding or head; a shadow: everything,
       optimizer included), if any;
    4. the ``transforms``, in order;
    5. a fresh optimizer at ``lr`` — unless ``lr`` is None, when the restored shadow's optimizer (and its
       lr) is kept;
    6. fitted to its buffered activations (``fit``), if any;
    7. the held copies in ``fetch`` are made anew on this stage (it held them; they were lost with it).
    """

    stage: int
    method: str
    """average | interpolate | copy | copy+replica | zero | random | reinit | shadow | ... (for the records)."""
    fresh_seed: int
    sources: tuple[tuple[int, float], ...] = ()
    """(surviving stage, coefficient); coefficients sum to 1."""
    restore: Held | None = None
    transforms: tuple[str, ...] = ()
    lr: float | None = None
    fetch: tuple[Held, ...] = ()
    """Copies this stage holds, re-made as part of its rebuild: their bytes count towards its recovery, except
    those of copies kept in the background (``CopyKind.background``: a snapshot is re-sent off the recovery's
    critical path, as it is refreshed)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the strategy wants recorded (neighbour weights, replica staleness, the new lr, ...)."""
    fit: Fit | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transform(s) {unknown}; allowed: {list(TRANSFORMS)}")
        if self.lr is None and (self.restore is None or self.restore.what.holds != STATE):
            raise ValueError(f"stage {self.stage}: lr=None keeps a restored optimizer, which needs a held copy "
                             "of the whole state")

    @property
    def record_sources(self) -> list[int]:
        """The stages a report names as sources: the averaged survivors, else the holder of the copy."""
        if self.sources:
            return [s for s, _ in self.sources]
        return [self.restore.holder] if self.restore is not None else []

    @property
    def record_coefficients(self) -> list[float]:
        if self.sources:
            return [c for _, c in self.sources]
        return [1.0] if self.restore is not None else []


@dataclass(frozen=True)
class RecoveryPlan:
    """What to do about the stages lost at one point of the run (all of them at once)."""

    strategy: str
    lost: tuple[int, ...]
    rebuilds: tuple[Rebuild, ...] = ()
    """One per lost stage; none for a rollback from storage (the checkpoint restores every stage); one per
    stage, survivors included, for a rollback from memory (each restores its snapshot)."""
    refresh: tuple[Held, ...] = ()
    """Copies re-made after every rebuild (bookkeeping of the replaced nodes, not counted in any report)."""
    rollback: str | None = None
    """None, or where every stage (and the data position, RNG and progress) is rolled back from: STORAGE or
    MEMORY."""
    unpersisted: int | None = None
    """With a rollback from storage: the progress of a checkpoint whose background flush had not finished when
    the stages were lost. The rollback goes to the checkpoint before it, and forgets it."""

    def __post_init__(self) -> None:
        if self.rollback is not None and self.rollback not in ROLLBACK_SOURCES:
            raise ValueError(f"rollback={self.rollback!r}; allowed: None, {', '.join(ROLLBACK_SOURCES)}")
        if self.rollback == STORAGE and self.rebuilds:
            raise ValueError("a rollback from storage restores every stage from the checkpoint: no rebuilds")

    @property
    def reads_storage(self) -> bool:
        """Every stage is restored from the checkpoint in storage (not by rebuilds)."""
        return self.rollback == STORAGE

    @property
    def sources(self) -> set[int]:
        """Stages whose state the plan reads: never a lost one (a failed stage is never a source)."""
        used = {s for r in self.rebuilds for s, _ in r.sources}
        used |= {r.restore.holder for r in self.rebuilds if r.restore is not None}
        return used


@dataclass(frozen=True)
class Upkeep:
    """Work after an optimizer step (or at the start of a run): refresh held copies, save a checkpoint."""

    refresh: tuple[Held, ...] = ()
    checkpoint: bool = False
    keep: int = 2
    """With ``checkpoint``: how many checkpoints storage keeps (older ones are deleted)."""
    in_background: bool = False
    """With ``checkpoint``: each stage copies its shard to host memory (the step waits only for that) and a
    background writer persists it while training goes on; it counts once every shard is persisted."""
    snapshot: bool = False
    """The copies refreshed here are an in-memory checkpoint of every stage: the trainer keeps the run's
    progress, data position and RNG for them (its ``MemoryStore``)."""
    period: int = 1
    """Iterations until these copies are refreshed again: the time a background transfer has to finish
    before it stalls the next one (``CopyKind.background``)."""

    def __bool__(self) -> bool:
        return bool(self.refresh) or self.checkpoint


@dataclass(frozen=True)
class RunView:
    """What a strategy may read about the run (a snapshot; changing it changes nothing)."""

    n_stages: int
    iteration: int
    """The wall iteration about to run (1-based), or just run (in ``after_step``)."""
    progress: int
    """Optimizer steps the model has kept (a rollback lowers it)."""
    seed: int
    base_lr: float
    lrs: tuple[float, ...]
    grad_norm: tuple[float, ...] | None = None
    """Per-stage pre-clip gradient norms of the last step (None before the first step)."""
    grad_norm_post: tuple[float, ...] | None = None
    held_since: dict[Held, int] = field(default_factory=dict)
    """Progress at which each held copy was last refreshed."""
    snapshot_progress: int | None = None
    """Progress of the latest in-memory checkpoint (``Upkeep.snapshot``), or None when there is none."""
    flushing: int | None = None
    """Progress of a checkpoint whose background flush (``Upkeep.in_background``) is still under way in
    simulated time, or None."""


@dataclass
class RecoveryReport:
    """One recovered stage, as it goes to metrics.jsonl."""

    stage: int
    strategy: str
    method: str
    sources: list[int]
    coefficients: list[float]
    bytes_moved: int
    """Bytes a real system moves to the replacement node (weights, copies, optimizer state)."""
    wall_s: float = 0.0
    """Seconds the recovery took on this machine."""
    sim_seconds: float = 0.0
    """Simulated seconds charged by the clock."""
    lost_iterations: int = 0
    from_storage: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    process: dict[str, Any] = field(default_factory=dict)
    """Process engine only: pids, nodes and the recovery's phases (detect, respawn, rendezvous, transfer)."""
    transfers: list[Transfer] = field(default_factory=list)
    """A rebuild: what the replacement received, piece by piece (``rebuild_report``); the clock prices each
    piece at its own stage's size on its own link. None for a rollback."""

    def to_dict(self) -> dict:
        record = asdict(self)
        if not self.process:
            del record["process"]
        if not self.transfers:
            del record["transfers"]
        return record


BODY = "body"
"""What a CheckFree source sends: its decoder blocks (``Transfer.holds``; the held copies' are ``CopyKind.holds``)."""
ACTIVATIONS = "activations"
"""What a holder of buffered activations sends a fitted rebuild (``Fit``): micro-batches of the owner's body
inputs and outputs, priced at the priced model's activation size."""


@dataclass(frozen=True)
class Transfer:
    """One piece of what a rebuilt stage's node receives: ``n_bytes`` of stage ``owner``'s ``holds`` (BODY, or
    a held copy's EDGES / WEIGHTS / STATE) from ``src``'s node over their link. The clock prices each piece at
    its own stage's size on its own link (pieces from different nodes arrive in parallel)."""

    src: int
    owner: int
    holds: str
    n_bytes: int


def rebuild_transfers(rebuild: Rebuild, body_bytes: list[int], restored_bytes: int) -> list[Transfer]:
    """What ``rebuild``'s replacement receives before it computes: each source's blocks, and the held copy it
    restores unless that lives in its own host memory (then nothing moves)."""
    pieces = [Transfer(src, src, BODY, n) for (src, _), n in zip(rebuild.sources, body_bytes)]
    if rebuild.restore is not None and rebuild.restore.holder != rebuild.stage:
        held = rebuild.restore
        pieces.append(Transfer(held.holder, held.owner, held.what.holds, restored_bytes))
    return pieces


def fetch_transfer(held: Held, n_bytes: int) -> Transfer | None:
    """A copy the rebuilt stage held, made anew from its owner (none for one kept in the background: a snapshot
    is re-sent off the recovery's critical path, as it is refreshed)."""
    return None if held.what.background else Transfer(held.owner, held.owner, held.what.holds, n_bytes)


def rebuild_report(plan: RecoveryPlan, rebuild: Rebuild, transfers: list[Transfer],
                   fitted: dict[str, Any] | None = None) -> RecoveryReport:
    """The record of one rebuild, as both engines write it: its bytes are the sum of what its node received;
    a fitted one's details say how many pairs it fitted on, in how many steps, and the error before and after
    (``fit_pairs``, ``fit_steps``, ``fit_loss_before``, ``fit_loss_after``)."""
    return RecoveryReport(rebuild.stage, plan.strategy, rebuild.method, rebuild.record_sources,
                          rebuild.record_coefficients, sum(t.n_bytes for t in transfers),
                          details={**rebuild.details, **(fitted or {})}, transfers=list(transfers))


def rebuild_reports(plan: RecoveryPlan, received: dict[int, list[Transfer]],
                    fitted: dict[int, dict[str, Any]] | None = None) -> list[RecoveryReport]:
    """The records of a plan's rebuilds from what each rebuilt stage received (``StageHost.recover``) and how
    each fitted one's fit went. A rollback from memory rebuilds the survivors too (each from its snapshot): only
    the lost stages are reported."""
    fitted = fitted or {}
    return [rebuild_report(plan, r, received[r.stage], fitted.get(r.stage)) for r in plan.rebuilds
            if r.stage in plan.lost]


def rollback_reports(plan: RecoveryPlan, progress_before: int, restored: dict[str, Any]) -> list[RecoveryReport]:
    """The records of a rollback: one per lost stage; every stage downloads its own shard in parallel.

    ``restored`` is what the checkpoint store read: its ``progress``, each stage's ``shard_bytes`` and the
    ``damaged`` checkpoints it skipped to get there."""
    shards = restored["shard_bytes"]
    # The checkpoint by its directory name (not its path: the records of two engines' runs must be equal).
    details: dict[str, Any] = {"rolled_back_to": restored["progress"], "checkpoint": Path(restored["path"]).name,
                               "all_stages": True, "largest_shard_bytes": max(shards), "shard_bytes": list(shards)}
    if restored.get("damaged"):
        details["damaged"] = list(restored["damaged"])
    return [RecoveryReport(k, plan.strategy, "rollback", [], [], shards[k],
                           lost_iterations=progress_before - restored["progress"], from_storage=True,
                           details=dict(details))
            for k in plan.lost]


def rolled_back_in_memory(reports: list[RecoveryReport], progress_before: int, progress: int) -> None:
    """Mark the reports of a rollback from memory (the lost stages' rebuilds): every stage went back to the
    snapshots at ``progress``, and the steps since are lost work."""
    for report in reports:
        report.details = {"rolled_back_to": progress, "all_stages": True, **report.details}
        report.lost_iterations = progress_before - progress


@dataclass
class Traffic:
    """What an ``Upkeep`` moved, for the clock to price."""

    sent: dict[tuple[int, int], int] = field(default_factory=dict)
    """(owner, holder) -> bytes of each refreshed copy whose owner waits for the send (recomputed copies move
    nothing: see RECOMPUTED)."""
    background: dict[tuple[int, int], int] = field(default_factory=dict)
    """(owner, holder) -> bytes of each refreshed copy sent while training goes on (``CopyKind.background``)."""
    shard_bytes: list[int] = field(default_factory=list)
    """Each stage's checkpoint shard, when a checkpoint was saved (stages upload in parallel)."""
    shards_in_background: bool = False
    """The shards were copied to host memory and are being flushed to storage in the background."""
    holds: dict[tuple[int, int], str] = field(default_factory=dict)
    """(owner, holder) -> what each sent copy holds (``CopyKind.holds``): the clock prices a replica at the size
    of the owner's (de)embedding, anything else at the owner's stage's."""
    encodings: dict[tuple[int, int], str] = field(default_factory=dict)
    """(owner, holder) -> how each sent copy is encoded, where not EXACT: the clock prices it at its encoding's
    bytes a parameter of the owner's priced stage."""


def sent_into(traffic: Traffic, held: Held, n_bytes: int) -> None:
    """Count one refreshed copy's bytes as the traffic its kind makes (none for a recomputed one)."""
    if held.what.sent:
        (traffic.background if held.what.background else traffic.sent)[(held.owner, held.holder)] = n_bytes
        traffic.holds[(held.owner, held.holder)] = held.what.holds
        if held.what.encoding != EXACT:
            traffic.encodings[(held.owner, held.holder)] = held.what.encoding
