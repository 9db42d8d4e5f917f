"""One stage's compute and state: its module, its Adam, the precision rule — shared by every engine.

The local engine holds S of these and chains their visits in one process; a stage process holds one and
sends its outputs to the next stage. Either way the same code runs a visit's ops (embedding and bodies
under autocast, the head and the loss outside it in fp32, as the reference), scales a micro-batch's loss
by 1/M, clips the stage's gradient on its own (no stage sees another's gradients), steps, probes for
non-finite outputs and applies a recovery plan's ``Rebuild``. That is what keeps the engines bit-for-bit
equal: there is only one copy of each of these rules. With ``trainer.compile`` a training visit's ops run
through ``torch.compile`` instead (``compiled_ops``): the same math up to float rounding, compiled once.

State travels in one nested format (see ``checkfree.plan``): ``{"weights": state_dict}`` for weights only (a
(de)embedding replica), ``{"weights": ..., "optimizer": ...}`` for a whole state (a shadow, a snapshot, a
checkpoint shard).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from checkfree.model.llama import Stage
from checkfree.plan import EDGES, EXACT, WEIGHTS, ZERO_DOWN_PROJ, Fit, Held, Rebuild
from checkfree.stage.averaging import weighted_state
from checkfree.stage.encoding import decode, encode
from checkfree.stage.fitting import fit
from checkfree.stage.routes import BODY, EMBED, HEAD

State = dict[str, Any]
"""A nested dict whose leaves are tensors or plain values (a held copy, a checkpoint shard)."""


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: each sequence's mean token cross-entropy."""
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return tokens.view(targets.shape).mean(dim=1)


def _autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to ``dtype``, or explicitly off: a caller's own autocast never changes a stage's precision."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


# A visit's three kinds of op, as functions of (stage, input). Eager runs them as they are; trainer.compile wraps
# each in torch.compile. Three functions, not one: dynamo keeps compiled graphs per code object (at most
# torch._dynamo.config.recompile_limit of them), and its guards check tensor shapes, not which module it is,
# so one body graph serves every stage of a model, and the embedding and head never take the body's places.


def embed_op(stage: Stage, ids: torch.Tensor, device_type: str, dtype: torch.dtype | None) -> torch.Tensor:
    with _autocast(device_type, dtype):
        return stage.embed(ids)


def body_op(stage: Stage, hidden: torch.Tensor, device_type: str, dtype: torch.dtype | None) -> torch.Tensor:
    with _autocast(device_type, dtype):
        return stage.body(hidden)


def head_op(stage: Stage, hidden: torch.Tensor, device_type: str, dtype: torch.dtype | None) -> torch.Tensor:
    """The final norm and LM head in fp32, autocast off (as the reference: the logits and the loss stay fp32)."""
    with torch.autocast(device_type, enabled=False):
        return stage.head(hidden.float() if dtype is not None else hidden)


Op = Callable[[Stage, torch.Tensor, str, torch.dtype | None], torch.Tensor]
EAGER_OPS: dict[str, Op] = {EMBED: embed_op, BODY: body_op, HEAD: head_op}


def compiled_ops() -> dict[str, Op]:
    """``EAGER_OPS`` through ``torch.compile`` (the forward, and the backward through AOTAutograd). Static
    shapes: a run's micro-batches share one shape (a fused group has one per route), so each op compiles once
    or twice, and no graph is re-specialised mid-run as a dynamic one would be."""
    return {op: torch.compile(fn, dynamic=False) for op, fn in EAGER_OPS.items()}


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
    """False when the step was skipped because the loss or a gradient was non-finite."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and all(math.isfinite(n) for n in self.grad_norm)


@torch.no_grad()
def refresh_into(held: State | None, live: State) -> State:
    """A copy of ``live`` that reuses ``held``'s tensors where shapes match (one memcpy each, no allocation:
    a shadow is refreshed after every step). Plain values are deep-copied."""
    if torch.is_tensor(live):
        if torch.is_tensor(held) and held.shape == live.shape and held.dtype == live.dtype \
                and held.device == live.device:
            return held.copy_(live)
        return live.detach().clone()
    if isinstance(live, dict):
        old = held if isinstance(held, dict) else {}
        return {k: refresh_into(old.get(k), v) for k, v in live.items()}
    return copy.deepcopy(live)


def clone_state(state: State) -> State:
    return refresh_into(None, state)


@torch.no_grad()
def host_copy(state: State) -> State:
    """A copy of ``state`` in host memory (what a snapshot or an asynchronous checkpoint waits for before the
    step goes on); plain values are deep-copied."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    return copy.deepcopy(state)


class StageCompute:
    """One stage: its module, its optimizer (Adam, constant lr) and the rules every engine shares."""

    def __init__(self, stage: Stage, lr: float, clip: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, autocast_dtype: torch.dtype | None = None,
                 compile: bool = False) -> None:
        self.stage = stage
        self.clip_norm = clip
        self.betas, self.weight_decay = betas, weight_decay
        self.autocast_dtype = autocast_dtype
        self.compiled = compile
        # Compiled once, here: a recovery only writes into this stage's existing tensors (load_state_dict,
        # in-place init), so the compiled graphs stay valid and nothing is compiled again.
        self._ops = compiled_ops() if compile else EAGER_OPS
        self.optimizer = self._adam(lr)

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def device(self) -> torch.device:
        return next(self.stage.parameters()).device

    def _adam(self, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(self.stage.parameters(), lr=lr, betas=self.betas, weight_decay=self.weight_decay)

    # --- compute -------------------------------------------------------------------------------------

    def forward(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """A visit's ops on ``x``: embedding and bodies under autocast; the head outside it, in fp32. With grad
        enabled (a training visit) and ``compile`` they run compiled; validation and probes run eager (their
        batch shapes vary, and a compiled graph per shape would cost more than it saves)."""
        table = self._ops if torch.is_grad_enabled() else EAGER_OPS
        device_type = self.device.type
        for op in ops:
            x = table[op](self.stage, x, device_type, self.autocast_dtype)
        return x

    @staticmethod
    def backward_loss(loss: torch.Tensor, micro_batches: int, fused: int = 1) -> None:
        """Accumulate one micro-batch's share of the iteration's mean loss: ``loss / M``; a fused group of
        ``n`` equal micro-batches (its loss is their mean) counts ``n / M``."""
        (loss / micro_batches if fused == 1 else loss * (fused / micro_batches)).backward()

    def train(self) -> None:
        self.stage.train()
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self) -> tuple[float, float]:
        """Clip this stage's gradient to ``clip_norm`` on its own; return its pre- and post-clip norms."""
        params = [p for p in self.stage.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)) if params else 0.0
        # clip_grad_norm_ scales by clip / (norm + 1e-6) when that is below 1: the post-clip norm is exact up
        # to float rounding, so it is computed rather than taken in another pass over every gradient.
        post = norm * min(1.0, self.clip_norm / (norm + 1e-6)) if math.isfinite(norm) else norm
        return norm, post

    def step(self) -> None:
        self.optimizer.step()

    def drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finite(self) -> bool:
        # One device-to-host read for the whole stage: on a GPU, a read per parameter waits for each in turn.
        checks = [torch.isfinite(p).all() for p in self.stage.parameters()]
        return bool(torch.stack(checks).all()) if checks else True

    @torch.no_grad()
    def probe(self, ops: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, bool]]]:
        """Run ``ops`` one at a time; say for each whether its output is finite (a non-finite loss's origin)."""
        outputs = []
        for op in ops:
            x = self.forward((op,), x)
            outputs.append((op, bool(torch.isfinite(x).all())))
        return x, outputs

    # --- optimizer and state ---------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def reset_optimizer(self, lr: float) -> None:
        """A new node starts with an empty optimizer state (Adam moments, step count)."""
        self.optimizer = self._adam(lr)

    def state(self) -> State:
        """Weights and optimizer state (a shadow, a checkpoint shard, a resume)."""
        return {"weights": self.stage.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: State) -> None:
        """Restore weights and optimizer exactly (the optimizer's lr included). The tensors are copied in,
        so the optimizer never writes into a held copy it was restored from."""
        device = self.device
        self.stage.load_state_dict({k: v.to(device) for k, v in state["weights"].items()})
        self.optimizer = self._adam(self.lr)
        self.optimizer.load_state_dict(clone_state(state["optimizer"]))

    def held_copy(self, held: Held) -> State:
        """What ``held``'s holder keeps of this stage: its (de)embedding, its weights, or its whole state."""
        holds = held.what.holds
        if holds == EDGES:
            return {"weights": self.stage.edge_state()}
        if held.what.encoding != EXACT:
            return encode(self.stage.state_dict(), held.what.encoding)
        return {"weights": self.stage.state_dict()} if holds == WEIGHTS else self.state()

    @torch.no_grad()
    def apply(self, rebuild: Rebuild, bodies: list[dict[str, torch.Tensor]], restored: State | None) -> None:
        """Rebuild this stage as ``rebuild`` says (see ``checkfree.plan.Rebuild`` for the order), from the
        sources' block weights ``bodies`` (in ``rebuild.sources`` order) and the restored held copy."""
        self.stage.reset_parameters(torch.Generator().manual_seed(rebuild.fresh_seed))
        if bodies:
            coefficients = [c for _, c in rebuild.sources]
            device = self.device
            self.stage.load_state_dict({k: v.to(device) for k, v in weighted_state(bodies, coefficients).items()},
                                       strict=False)
        if restored is not None and "optimizer" in restored:
            self.load_state(restored)  # a shadow: weights, Adam moments, step count and lr, exactly
        elif restored is not None:
            weights = decode(restored, rebuild.restore.what.encoding) if rebuild.restore.what.encoding != EXACT \
                else restored["weights"]
            self.stage.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=False)
        for transform in rebuild.transforms:
            if transform == ZERO_DOWN_PROJ:
                for layer in self.stage.layers:
                    layer.mlp.down_proj.weight.zero_()
        if rebuild.lr is not None:
            self.reset_optimizer(rebuild.lr)

    def fit(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], spec: Fit) -> dict[str, Any]:
        """Fit this stage's body to ``pairs`` as ``spec`` says (``checkfree.stage.fitting.fit``: in fp32, its own
        Adam, dropped after: the stage's optimizer is the rebuild's). What the record says of it: the pairs, the
        steps taken (none without pairs: a stage whose holders were all lost keeps its rebuilt weights) and the
        error before and after."""
        if not pairs or spec.steps == 0:
            return {"fit_pairs": len(pairs), "fit_steps": 0}
        device = self.device
        on_device = [(x.to(device), y.to(device)) for x, y in pairs]
        was_training = self.stage.training
        self.stage.train()
        with torch.enable_grad():
            losses = fit(self.stage, on_device, spec.steps, spec.lr, loss=spec.loss)
        self.stage.train(was_training)
        return {"fit_pairs": len(pairs), "fit_steps": spec.steps, "fit_loss_before": losses[0],
                "fit_loss_after": losses[-1]}
