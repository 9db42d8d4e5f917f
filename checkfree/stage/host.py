"""The stage host: the logical stages one process runs, the copies their nodes hold, and the plan executor.

Both engines are stage hosts. A stage process (``distributed.worker``) hosts one stage, or several consecutive
ones after a shrink; the local engine (``pipeline``) hosts every stage of the pipeline in one process. What a
stage sends another goes through the host's ``Courier``: over the process group when another process hosts
the receiver, handed over in memory when this one does (the local engine's courier places every stage here,
so it never touches a process group). So the recovery executor — sources send their blocks and held copies,
replacements receive and apply ``StageCompute.apply``, owners re-make the copies the plan asks for — and the
bookkeeping of held copies and staging buffers are written once, here, for both engines: a new mechanism that
executes (a kind of held copy, buffered activations, replicas) changes this class, not two engines.

A host's part of a plan is decided by where stages are: a source sends only if it is here, a replacement
receives only if it is here. Survivors only send and replacements only receive, every send posted before any
receive, in a fixed order, so a recovery between processes cannot deadlock.
"""

from __future__ import annotations

from typing import Any

import torch

from checkfree.plan import ACTIVATIONS, Held, RecoveryPlan, Transfer, fetch_transfer, rebuild_transfers
from checkfree.stage.compute import StageCompute, host_copy, refresh_into
from checkfree.stage.fitting import IN, OUT, ActivationRing, pairs
from checkfree.stage.routes import BODY, Visit
from checkfree.storage.checkpoints import nbytes, shard_bytes
from checkfree.transport.courier import Courier
from checkfree.transport.transfer import Pending

# Kinds of whole-state transfers; ``Courier.state_tag`` makes a kind and the (sender, receiver) stage pair one
# tag (activation tags come from programs.message_tag and never meet these: each kind of traffic runs in its
# own command).
TAG_BODY, TAG_RESTORE, TAG_REFRESH, TAG_MOVE, TAG_PAIRS = 0, 1, 2, 3, 4


class StageHost:
    """The stages this process runs (``computes``), the copies their nodes keep (``held``), each stage's staging
    buffer for asynchronous checkpoints (``staged``), and what a recovery plan asks of them."""

    def __init__(self, n_stages: int, courier: Courier, buffer: int = 0) -> None:
        self.n = n_stages
        self.courier = courier
        self.ring = ActivationRing(buffer) if buffer else None
        """The activations this process's stages buffer for their neighbours' fitted rebuilds (``buffer``
        micro-batches; ``checkfree.stage.fitting``), or None: the run's strategy fits nothing."""
        self.computes: dict[int, StageCompute] = {}
        """The logical stages this process runs, by stage index."""
        self.held: dict[Held, dict[str, Any]] = {}
        """Copies that this process's stages keep (``Held.holder``): a replica of the embedding / head, a
        shadow, snapshots. In a real system each lives on its holder's node."""
        self.staged: dict[int, int] = {}
        """Per stage: bytes of the host-memory buffer its asynchronous checkpoints are copied into before they
        are persisted. A real system keeps this (pinned) buffer for the whole run and reuses it (CheckFreq,
        DataStates-LLM), so it counts as held memory from the first background checkpoint on; 0 or absent:
        none yet."""

    @property
    def mine(self) -> list[int]:
        """The stages this process runs in this generation, in pipeline order."""
        return [k for k in range(self.n) if self.courier.here(k)]

    def held_by(self, stage: int) -> dict[Held, dict[str, Any]]:
        return {h: copy for h, copy in self.held.items() if h.holder == stage}

    def held_bytes_of(self) -> dict[int, int]:
        """Per stage of this process: the bytes its node keeps beyond its own state (held copies, staging,
        buffered activations)."""
        return {k: self.staged.get(k, 0) + sum(nbytes(copy) for copy in self.held_by(k).values())
                + (self.ring.nbytes(k) if self.ring is not None else 0) for k in self.mine}

    def lrs(self) -> dict[int, float]:
        return {k: self.computes[k].lr for k in self.mine}

    def forget(self, stage: int) -> None:
        """What ``stage``'s node held (copies, the staging buffer) is gone: a lost stage's replacement holds, like
        any new node, nothing until the plan's fetch / refresh or its next background checkpoint."""
        self.held = {h: copy for h, copy in self.held.items() if h.holder != stage}
        self.staged.pop(stage, None)
        if self.ring is not None:
            self.ring.forget(stage)

    def note_received(self, visit: Visit, previous: Visit | None, seq: int, x: torch.Tensor) -> None:
        """``visit``'s stage received ``x`` from ``previous``: buffered when that was its owner's body alone (its
        output)."""
        if self.ring is not None and previous is not None and previous.ops == (BODY,) and previous.prev is not None:
            self.ring.note(visit.stage, previous.stage, seq, OUT, x, previous.prev)

    def note_sent(self, visit: Visit, following: Visit | None, seq: int, out: torch.Tensor) -> None:
        """``visit``'s stage sent ``out`` to ``following``: buffered when that is its owner's body alone (its
        input)."""
        if self.ring is not None and following is not None and following.ops == (BODY,) \
                and following.next is not None:
            self.ring.note(visit.stage, following.stage, seq, IN, out, following.next)

    def stage_for_background(self, stage: int) -> dict[str, Any]:
        """``stage``'s state copied to host memory (what an asynchronous checkpoint's step waits for), its
        staging buffer counted from now on."""
        state = host_copy(self.computes[stage].state())
        self.staged[stage] = shard_bytes(state)
        return state

    # --- recovery --------------------------------------------------------------------------------

    def recover(self, plan: RecoveryPlan) -> tuple[dict[int, list[Transfer]], dict[int, dict[str, Any]]]:
        """This host's part of ``plan``: its stages send what they are a source of (blocks, held copies,
        buffered activations), the ones it rebuilds receive, are rebuilt and fitted, then they take part in
        re-making held copies (after every rebuild, so none copies a stage still to be rebuilt). Returns, per
        stage rebuilt or fetching here, what it read, and per fitted stage how its fit went."""
        courier, pending = self.courier, Pending()
        for rebuild in plan.rebuilds:
            for src, _ in rebuild.sources:
                if courier.here(src):
                    courier.send_state(self.computes[src].stage.body_state(), src, rebuild.stage, TAG_BODY, pending)
            holder = rebuild.restore.holder if rebuild.restore is not None else None
            if holder is not None and holder != rebuild.stage and courier.here(holder):
                courier.send_state(self.held[rebuild.restore], holder, rebuild.stage, TAG_RESTORE, pending)
            for holder in rebuild.fit.holders if rebuild.fit is not None else ():
                if courier.here(holder):
                    held = self.ring.held(holder, rebuild.stage, plan.lost) if self.ring is not None \
                        else {IN: {}, OUT: {}}
                    courier.send_state(held, holder, rebuild.stage, TAG_PAIRS, pending)
        received: dict[int, list[Transfer]] = {}
        fitted: dict[int, dict[str, Any]] = {}
        to_fit: list[tuple[int, list, Any]] = []
        for rebuild in plan.rebuilds:
            stage = rebuild.stage
            if not courier.here(stage):
                continue
            bodies, body_bytes = [], []
            for src, _ in rebuild.sources:
                body, n_bytes = courier.recv_state(src, stage, TAG_BODY)
                bodies.append(body)
                body_bytes.append(n_bytes)
            restored, restored_bytes = None, 0
            if rebuild.restore is not None and rebuild.restore.holder == stage:
                restored = self.held[rebuild.restore]  # in this node's own host memory: nothing moves
            elif rebuild.restore is not None:
                restored, restored_bytes = courier.recv_state(rebuild.restore.holder, stage, TAG_RESTORE)
            received[stage] = rebuild_transfers(rebuild, body_bytes, restored_bytes)
            self.computes[stage].apply(rebuild, bodies, restored)
            if rebuild.fit is not None:
                pieces = []
                for holder in rebuild.fit.holders:
                    piece, n_bytes = courier.recv_state(holder, stage, TAG_PAIRS)
                    pieces.append(piece)
                    if n_bytes:
                        received[stage].append(Transfer(holder, stage, ACTIVATIONS, n_bytes))
                to_fit.append((stage, pairs(pieces), rebuild.fit))
            if stage in plan.lost:  # a new node holds nothing until the plan's fetch / refresh
                self.forget(stage)
        # The fits run once everything is received: a process rebuilding two stages does not keep the senders of
        # the second waiting (past the group's timeout) while it fits the first.
        for stage, stage_pairs, spec in to_fit:
            fitted[stage] = self.computes[stage].fit(stage_pairs, spec)
        if self.ring is not None:
            self.ring.drop(plan.lost)
        pending.wait()
        fetched = [h for r in plan.rebuilds for h in r.fetch]
        for held, n_bytes in self.refresh([*fetched, *plan.refresh]).items():
            piece = fetch_transfer(held, n_bytes) if held in fetched else None
            if piece is not None:
                received.setdefault(held.holder, []).append(piece)
        return received, fitted

    def refresh(self, copies: list[Held]) -> dict[Held, int]:
        """Re-make ``copies``: owners send, holders receive (every send posted before any receive, so a ring of
        shadows cannot deadlock). A copy whose owner and holder are both here is refreshed in place (one memcpy
        per tensor: a shadow is refreshed after every step). Returns the bytes received per copy held here (a
        copy between two stages of this process counts its bytes: it crossed from one logical node to another;
        a copy in its owner's own host memory counts none)."""
        courier, pending, received = self.courier, Pending(), {}
        for held in copies:
            if courier.here(held.owner) and courier.here(held.holder):
                self.held[held] = refresh_into(self.held.get(held), self.computes[held.owner].held_copy(held))
                received[held] = nbytes(self.held[held]) if held.holder != held.owner else 0
            elif courier.here(held.owner):
                courier.send_state(self.computes[held.owner].held_copy(held), held.owner, held.holder, TAG_REFRESH,
                                   pending)
        for held in copies:
            if not courier.here(held.owner) and courier.here(held.holder):
                self.held[held], received[held] = courier.recv_state(held.owner, held.holder, TAG_REFRESH)
        pending.wait()
        return received

    # --- a stage whole: moving it, saving it -----------------------------------------------------

    def pack(self, stage: int) -> dict[str, Any]:
        """``stage`` whole, as it moves to another process or is saved for a resume: weights, Adam, lr, the copies
        its node holds and its staging buffer's size."""
        return {**self.computes[stage].state(), "staged": self.staged.get(stage, 0),
                "held": [((h.kind, h.owner, h.holder), copy) for h, copy in self.held_by(stage).items()],
                "buffered": self.ring.state(stage) if self.ring is not None else []}

    def unpack(self, stage: int, packed: dict[str, Any], staged: bool = True) -> None:
        """``stage`` as ``pack`` gave it, bitwise (``staged`` False: this process keeps no staging buffer)."""
        self.computes[stage].load_state(packed)
        self.forget(stage)
        self.held.update({Held(*key): copy for key, copy in packed["held"]})
        self.staged[stage] = packed.get("staged", 0) if staged else 0
        if self.ring is not None:
            self.ring.load(packed.get("buffered", []))


__all__ = ["StageHost", "TAG_BODY", "TAG_MOVE", "TAG_PAIRS", "TAG_REFRESH", "TAG_RESTORE"]
