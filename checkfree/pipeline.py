"""The local pipeline engine: every stage in one process, one optimizer per stage.

One iteration runs ``M`` micro-batches, each in the forward order its schedule gives (embedding first,
stage bodies in schedule order, head last), accumulates ``loss / M`` gradients, records each stage's
gradient L2 norm before and after clipping, clips each stage on its own (as a real pipeline must: no
stage sees another's gradients) and steps every stage's optimizer.

The engine knows nothing about failures or strategies: recovery code edits ``stages`` and
``optimizers`` through the small methods at the bottom (``reset_optimizer``, ``set_lr``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from checkfree.model import Stage
from checkfree.schedule import Schedule


@dataclass
class StepResult:
    """What one optimizer step did, per stage where it makes sense."""

    loss: float
    """Mean training cross-entropy over the micro-batches."""
    grad_norm: list[float]
    """Per-stage gradient L2 norm before clipping."""
    grad_norm_post: list[float]
    """Per-stage gradient L2 norm after clipping (the reference's CheckFree weights)."""
    tokens: int
    stepped: bool = True
    """False when the step was skipped because the loss or a gradient was non-finite (see ``train_step``)."""


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class LocalPipeline:
    """Stages + per-stage Adam, trained over micro-batches in one process."""

    def __init__(
        self,
        stages: list[Stage],
        lr: float,
        clip: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.stages = stages
        self.lr = lr
        self.clip = clip
        self.betas = betas
        self.weight_decay = weight_decay
        self.autocast_dtype = autocast_dtype
        self.optimizers = [self._new_optimizer(stage, lr) for stage in stages]

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].parameters()).device

    def _new_optimizer(self, stage: Stage, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(stage.parameters(), lr=lr, betas=self.betas, weight_decay=self.weight_decay)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
        """Logits for ``input_ids`` with the stage bodies run in ``order``."""
        with self._autocast():
            hidden = self.stages[0].embed(input_ids)
            for index in order:
                hidden = self.stages[index].body(hidden)
        # The head and the loss run outside autocast, in fp32, as in the reference.
        return self.stages[-1].head(hidden.float() if self.autocast_dtype else hidden)

    def train_step(self, micro_batches: list[torch.Tensor], schedule: Schedule,
                   skip_nonfinite: bool = False) -> StepResult:
        """One optimizer step over ``micro_batches`` (each ``[B, seq_len + 1]`` token ids).

        With ``skip_nonfinite`` no stage steps when the loss or any stage's gradient norm is non-finite
        (``StepResult.stepped`` is False): one bad stage's NaN would otherwise reach every other stage's
        weights through the backward pass and Adam's moments.
        """
        for stage in self.stages:
            stage.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for m, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            loss = causal_lm_loss(self.forward(inputs, schedule.order(m)), targets)
            (loss / len(micro_batches)).backward()
            total += loss.item()
            tokens += targets.numel()
        pre, post = self.clip_stage_gradients()
        loss = total / len(micro_batches)
        if skip_nonfinite and not (math.isfinite(loss) and all(math.isfinite(n) for n in pre)):
            return StepResult(loss, pre, post, tokens, stepped=False)
        for opt in self.optimizers:
            opt.step()
        return StepResult(loss, pre, post, tokens)

    def clip_stage_gradients(self) -> tuple[list[float], list[float]]:
        """Clip every stage to ``clip`` on its own; return pre- and post-clip norms."""
        pre, post = [], []
        for stage in self.stages:
            params = [p for p in stage.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip, foreach=True)) if params else 0.0
            pre.append(norm)
            # clip_grad_norm_ scales by clip / (norm + 1e-6) when that is below 1: the post-clip norm is exact
            # up to float rounding, so we compute it rather than taking another pass over every gradient.
            post.append(norm * min(1.0, self.clip / (norm + 1e-6)) if math.isfinite(norm) else norm)
        return pre, post

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        """Mean token cross-entropy over ``sequences`` (``[N, seq_len + 1]``), in-order, no grad."""
        for stage in self.stages:
            stage.eval()
        order = tuple(range(self.n_stages))
        total, count = 0.0, 0
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start : start + batch_size].to(self.device)
            logits = self.forward(batch[:, :-1], order)
            total += causal_lm_loss(logits, batch[:, 1:]).item() * batch.shape[0]
            count += batch.shape[0]
        return total / count

    # --- used by recovery strategies -------------------------------------------------------------

    def reset_optimizer(self, stage: int, lr: float) -> None:
        """A replacement node starts with an empty optimizer state (Adam moments, step count)."""
        self.optimizers[stage] = self._new_optimizer(self.stages[stage], lr)

    def set_lr(self, stage: int, lr: float) -> None:
        for group in self.optimizers[stage].param_groups:
            group["lr"] = lr

    def stage_lrs(self) -> list[float]:
        return [opt.param_groups[0]["lr"] for opt in self.optimizers]

    @torch.no_grad()
    def first_nonfinite_output(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> int | None:
        """The first stage, in ``order``, whose output is non-finite (embedding counted as stage 0, head
        as the last stage); None when every output is finite. A diagnosis for a non-finite loss, not a hot
        path."""
        with self._autocast():
            hidden = self.stages[0].embed(input_ids.to(self.device))
            if not torch.isfinite(hidden).all():
                return 0
            for index in order:
                hidden = self.stages[index].body(hidden)
                if not torch.isfinite(hidden).all():
                    return index
        logits = self.stages[-1].head(hidden.float() if self.autocast_dtype else hidden)
        return None if torch.isfinite(logits).all() else self.n_stages - 1

    def nonfinite_stages(self) -> list[int]:
        """Stages whose weights contain a non-finite value (empty when all are finite)."""
        return [
            i for i, stage in enumerate(self.stages)
            if not all(torch.isfinite(p).all() for p in stage.parameters())
        ]
