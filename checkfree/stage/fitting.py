"""Fitting a rebuilt stage to its own function, from the activations its neighbours already hold.

Stage ``k`` maps what it receives to what it sends on; the stage that sent its input and the stage that received
its output both saw those tensors. Kept in a ring of the last ``B`` micro-batches they are input/output pairs
of the lost stage's last weights: a *functional* snapshot that costs no traffic while training (the bytes
crossed the link anyway), only host memory on the neighbours. After CheckFree's rule the replacement is fitted
to them for a few local steps (the mean squared error of its body's outputs) before it rejoins
(``checkfree_fit``; docs/design.md, 'Fitting to buffered activations').

* ``ActivationRing`` — what a host's stages hold of their neighbours' activations: per holder, owner, micro-batch
  and role (``IN``: the owner's body input, which the holder sent; ``OUT``: its output, which the holder
  received). Only a visit that is the owner's body alone (``routes.body_visits``) is a pair of its function.
* ``pairs`` — the pairs of one stage from what its surviving holders sent its replacement, by micro-batch.
* ``fit`` — ``N`` Adam steps of a stage body on those pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from checkfree.model.llama import Stage
from checkfree.run.config import require
from checkfree.stage.routes import body_visits

IN, OUT = "in", "out"
"""A buffered tensor's role for its owner: its body's input (held by the stage that sent it) or output (held by the
stage that received it)."""
LOSSES = ("mse", "smooth_l1")
"""What a fit minimises between the body's outputs and the buffered ones."""

Key = tuple[int, int, int, str, int]
"""(holder, owner, micro-batch sequence number, role, partner): the partner holds the pair's other half."""


class ActivationRing:
    """The buffered activations of every stage a host runs, for the last ``capacity`` micro-batches of training.

    A micro-batch's tensors are noted while its forward runs and kept only when its optimizer step is committed
    (``commit``): a discarded iteration leaves the ring as it was, on both engines alike. Micro-batches are
    numbered across the run (``seq`` = steps before it x M + its index), so every host keeps the same ones.
    Tensors are kept detached, in fp32, in host memory (what the pipeline did with its own after does not
    reach them)."""

    def __init__(self, capacity: int) -> None:
        require(isinstance(capacity, int) and capacity >= 1, "capacity", capacity, "allowed an integer >= 1")
        self.capacity = capacity
        self.entries: dict[Key, torch.Tensor] = {}
        self.noted: list[tuple[Key, torch.Tensor]] = []

    def note(self, holder: int, owner: int, seq: int, role: str, tensor: torch.Tensor, partner: int) -> None:
        self.noted.append(((holder, owner, seq, role, partner), tensor.detach().to("cpu", torch.float32, copy=True)))

    def commit(self, last_seq: int) -> None:
        """The step of the noted micro-batches stands: keep them, and only the last ``capacity`` micro-batches
        (``last_seq`` the newest)."""
        self.entries.update(self.noted)
        self.noted = []
        oldest = last_seq - self.capacity + 1
        self.entries = {key: t for key, t in self.entries.items() if key[2] >= oldest}

    def discard(self) -> None:
        self.noted = []

    def forget(self, holder: int) -> None:
        """``holder``'s node is gone, and what it held with it."""
        self.entries = {key: t for key, t in self.entries.items() if key[0] != holder}

    def drop(self, lost: tuple[int, ...] | frozenset[int]) -> None:
        """After the stages in ``lost`` were rebuilt: the halves whose other half died with them are no use, and the
        pairs of a lost stage are of its old function, not its replacement's."""
        self.entries = {key: t for key, t in self.entries.items() if key[1] not in lost and key[4] not in lost}

    def held(self, holder: int, owner: int, lost: frozenset[int] | tuple[int, ...] = ()) -> dict[str, dict[int, torch.Tensor]]:
        """What ``holder`` sends a replacement of ``owner``: ``{IN: {seq: tensor}, OUT: {seq: tensor}}``, the halves
        whose other half's holder is not ``lost`` (a half pair is no use and is not sent)."""
        out: dict[str, dict[int, torch.Tensor]] = {IN: {}, OUT: {}}
        for (h, o, seq, role, partner), tensor in sorted(self.entries.items()):
            if h == holder and o == owner and partner not in lost:
                out[role][seq] = tensor
        return out

    def nbytes(self, holder: int) -> int:
        return sum(t.numel() * t.element_size() for key, t in self.entries.items() if key[0] == holder)

    def state(self, holder: int) -> list[tuple[Key, torch.Tensor]]:
        """What ``holder`` keeps, as it moves to another process or is saved for a resume."""
        return [(key, t) for key, t in sorted(self.entries.items()) if key[0] == holder]

    def load(self, items: list[tuple[Any, torch.Tensor]]) -> None:
        self.entries.update({tuple(key): t.to("cpu") for key, t in items})


def buffered_per_holder(orders: list[tuple[int, ...]], capacity: int, n_stages: int) -> list[int]:
    """Per stage: the activation tensors its node holds for its neighbours when the ring is full, at the end of an
    iteration, where ``orders`` are the bodies' orders of the iteration's M micro-batches (the last
    ``capacity`` micro-batches end with its last one): one for each body-only visit it sent to or received
    from. What the clock prices as the ring's memory (``Clock.memory_per_node``)."""
    counts = [0] * n_stages
    M = len(orders)
    for i in range(capacity):
        for visit in body_visits(orders[(i - capacity) % M], n_stages):
            counts[visit.prev] += 1
            counts[visit.next] += 1
    return counts


def pairs(pieces: list[dict[str, dict[int, torch.Tensor]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (input, output) pairs in what the holders sent, by micro-batch: those whose input and output both
    survived (a holder lost with the stage took its half of some pairs with it)."""
    inputs = {seq: t for piece in pieces for seq, t in piece[IN].items()}
    outputs = {seq: t for piece in pieces for seq, t in piece[OUT].items()}
    return [(inputs[seq], outputs[seq]) for seq in sorted(inputs.keys() & outputs.keys())]


def _error(loss: str, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((y - target) ** 2) if loss == "mse" else F.smooth_l1_loss(y, target)


def body_error(stage: Stage, pairs: list[tuple[torch.Tensor, torch.Tensor]], loss: str = "mse") -> float:
    """The mean, over ``pairs``, of ``loss`` between ``stage``'s body output and the buffered one."""
    require(len(pairs) > 0, "pairs", 0, "allowed at least one (input, output) pair")
    with torch.no_grad():
        return sum(_error(loss, stage.body(x), y).item() for x, y in pairs) / len(pairs)


def body_mse(stage: Stage, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean, over ``pairs``, of the mean squared error of ``stage``'s body output against the buffered one."""
    return body_error(stage, pairs, "mse")


def fit(stage: Stage, pairs: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
        betas: tuple[float, float] = (0.9, 0.999), loss: str = "mse") -> list[float]:
    """``steps`` Adam steps on ``stage``'s body parameters, each on ``loss`` (``LOSSES``) over every pair (full
    batch: the buffer is small), in fp32, from a fresh Adam whose moments are dropped after (the stage then
    trains on the optimizer state its strategy gives it). Returns the loss before each step and after the last
    (``steps + 1`` values); ``steps`` 0 changes nothing."""
    require(isinstance(steps, int) and steps >= 0, "steps", steps, "allowed an integer >= 0")
    require(lr > 0, "lr", lr, "allowed > 0")
    require(loss in LOSSES, "loss", loss, f"allowed {' | '.join(LOSSES)}")
    require(len(pairs) > 0, "pairs", 0, "allowed at least one (input, output) pair")
    params = [p for name, p in stage.named_parameters() if name in stage.body_state()]
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        value = sum(_error(loss, stage.body(x), y) for x, y in pairs) / len(pairs)
        value.backward()
        losses.append(value.item())
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(body_error(stage, pairs, loss))
    return losses


__all__ = ["ActivationRing", "IN", "LOSSES", "OUT", "body_error", "body_mse", "buffered_per_holder", "fit", "pairs"]
