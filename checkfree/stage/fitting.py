"""Fitting a rebuilt stage to its own function, from the activations its neighbours already hold.

Stage ``k`` maps what stage ``k - 1`` sends it to what it sends stage ``k + 1``; both neighbours see those tensors
every micro-batch. Kept in a small ring buffer they are input/output pairs of the lost stage's last weights: a
*functional* snapshot that costs no traffic while training (the bytes crossed the link anyway), only some host
memory. After CheckFree's average, the replacement can be fitted to them for a few local steps (the mean squared
error of its body's outputs) before it rejoins (docs/design.md, 'Fitting to buffered activations').

This module is that math on one stage body: the buffer (``ActivationBuffer``) and the fit (``fit``). The
strategy that uses it, the buffers kept on the neighbours of both engines and the clock's price for the pairs'
transfer and the steps' compute are the next step (issue "Beyond neighbour averaging", item 1).
"""

from __future__ import annotations

from collections import deque

import torch

from checkfree.model.llama import Stage
from checkfree.run.config import require


class ActivationBuffer:
    """The last ``capacity`` micro-batches' (input, output) pairs of one stage body, oldest first: a ring, so
    the ``capacity + 1``-th pair pushes the oldest out. Stored detached and copied (the training graph and the
    tensors it reuses are not kept alive)."""

    def __init__(self, capacity: int) -> None:
        require(isinstance(capacity, int) and capacity >= 1, "capacity", capacity, "allowed an integer >= 1")
        self.capacity = capacity
        self._pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=capacity)

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        self._pairs.append((inputs.detach().clone(), outputs.detach().clone()))

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def nbytes(self) -> int:
        """Host memory the buffer holds: what its holders keep for the stage (``memory_overhead_bytes``)."""
        return sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in self._pairs)


def body_mse(stage: Stage, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean, over ``pairs``, of the mean squared error of ``stage``'s body output against the buffered one."""
    require(len(pairs) > 0, "pairs", 0, "allowed at least one (input, output) pair")
    with torch.no_grad():
        return sum(torch.mean((stage.body(x) - y) ** 2).item() for x, y in pairs) / len(pairs)


def fit(stage: Stage, pairs: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
        betas: tuple[float, float] = (0.9, 0.999)) -> list[float]:
    """``steps`` Adam steps on ``stage``'s body parameters, each on the mean squared error over every pair (full
    batch: the buffer is small), from a fresh Adam whose moments are dropped after (the stage then trains on
    the optimizer state its strategy gives it). Returns the loss before each step and after the last
    (``steps + 1`` values); ``steps`` 0 changes nothing."""
    require(isinstance(steps, int) and steps >= 0, "steps", steps, "allowed an integer >= 0")
    require(lr > 0, "lr", lr, "allowed > 0")
    require(len(pairs) > 0, "pairs", 0, "allowed at least one (input, output) pair")
    params = [p for name, p in stage.named_parameters() if name in stage.body_state()]
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(torch.mean((stage.body(x) - y) ** 2) for x, y in pairs) / len(pairs)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(body_mse(stage, pairs))
    return losses


__all__ = ["ActivationBuffer", "body_mse", "fit"]
