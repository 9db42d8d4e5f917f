"""The local engine and the schedules: orders, swapped forward/backward, accumulation, clipping."""

from __future__ import annotations

import copy

import pytest
import torch

from checkfree.model.llama import build_stages
from checkfree.pipeline import LocalEngine
from checkfree.stage.compute import causal_lm_loss
from checkfree.stage.schedule import InOrder, OutOfOrder, build_schedule, swapped_order
from tests.conftest import random_batches


def test_schedule_orders():
    assert InOrder(5).order(1) == (0, 1, 2, 3, 4)
    assert swapped_order(6) == (1, 0, 2, 3, 5, 4)
    ooo = OutOfOrder(4)
    assert [ooo.order(m) for m in range(4)] == [(0, 1, 2, 3), (1, 0, 3, 2), (0, 1, 2, 3), (1, 0, 3, 2)]
    with pytest.raises(ValueError, match="n_stages=3"):
        OutOfOrder(3)
    with pytest.raises(ValueError, match="allowed"):
        build_schedule("zigzag", 4)


def test_out_of_order_step_equals_hand_composed_swapped_model(tiny_cfg):
    """Odd micro-batches: embed -> body1 -> body0 -> body3 -> body2 -> head; gradients follow autograd."""
    stages = build_stages(tiny_cfg, seed=0)
    hand = copy.deepcopy(stages)
    pipe = LocalEngine(stages, lr=1e-3, clip=1e9)
    batches = random_batches(2, 3, tiny_cfg.seq_len, tiny_cfg.vocab_size, seed=1)
    result = pipe.train_step(batches, OutOfOrder(4))

    losses = []
    for m, batch in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]
        h = hand[0].embed(x)
        for i in ((0, 1, 2, 3) if m == 0 else (1, 0, 3, 2)):
            h = hand[i].body(h)
        loss = causal_lm_loss(hand[3].head(h), y)
        (loss / 2).backward()
        losses.append(loss.item())
    assert result.loss == pytest.approx(sum(losses) / 2, rel=1e-6)
    for s_pipe, s_hand in zip(pipe.stages, hand):
        grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in s_hand.parameters())).item()
        assert result.grad_norm[s_pipe.index] == pytest.approx(grad_norm, rel=1e-5)
        # Adam's first step moves every weight by lr * sign(grad) (up to eps): compare to the hand grads.
        for (name, p), q in zip(s_pipe.named_parameters(), s_hand.parameters()):
            moved = (q.detach() - p.detach())
            mask = q.grad.abs() > 1e-6
            assert torch.allclose(moved[mask], 1e-3 * torch.sign(q.grad[mask]), rtol=1e-2, atol=1e-6), name


def test_in_order_step_matches_single_module_loop(tiny_cfg):
    stages = build_stages(tiny_cfg, seed=0)
    plain = torch.nn.ModuleList(copy.deepcopy(stages))
    pipe = LocalEngine(stages, lr=1e-3, clip=1e9)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    for step in range(3):
        batches = random_batches(4, 2, tiny_cfg.seq_len, tiny_cfg.vocab_size, seed=step)
        result = pipe.train_step(batches, InOrder(4))
        opt.zero_grad()
        total = 0.0
        for batch in batches:
            h = plain[0].embed(batch[:, :-1])
            for s in plain:
                h = s.body(h)
            loss = causal_lm_loss(plain[-1].head(h), batch[:, 1:])
            (loss / 4).backward()
            total += loss.item()
        opt.step()
        assert result.loss == pytest.approx(total / 4, rel=1e-6)
    for a, b in zip((p for s in pipe.stages for p in s.parameters()), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_per_stage_clipping_and_norms(tiny_cfg):
    pipe = LocalEngine(build_stages(tiny_cfg, seed=0), lr=1e-3, clip=0.05)
    result = pipe.train_step(random_batches(2, 2, tiny_cfg.seq_len, tiny_cfg.vocab_size, seed=0), InOrder(4))
    for i, stage in enumerate(pipe.stages):
        after = torch.sqrt(sum((p.grad**2).sum() for p in stage.parameters())).item()
        assert after == pytest.approx(result.grad_norm_post[i], rel=1e-4)
        assert result.grad_norm_post[i] == pytest.approx(min(result.grad_norm[i], 0.05), rel=1e-4)
    assert result.tokens == 2 * 2 * tiny_cfg.seq_len


def test_reset_optimizer_and_lr(tiny_cfg):
    pipe = LocalEngine(build_stages(tiny_cfg, seed=0), lr=1e-3)
    pipe.train_step(random_batches(1, 2, tiny_cfg.seq_len, tiny_cfg.vocab_size, seed=0), InOrder(4))
    pipe.computes[1].reset_optimizer(2e-3)
    assert pipe.optimizers[1].state == {} and pipe.stage_lrs() == [1e-3, 2e-3, 1e-3, 1e-3]
    assert pipe.nonfinite_stages() == []
    with torch.no_grad():
        pipe.stages[2].layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    assert pipe.nonfinite_stages() == [2]


@pytest.mark.parametrize("schedule", [InOrder(4), OutOfOrder(4)])
def test_fused_micro_batches_are_the_same_math(tiny_cfg, schedule):
    """With fuse, micro-batches that take the same route run as one batch: equal loss, gradients and steps
    up to float rounding (CheckFree+'s odd micro-batches form their own group)."""
    plain = LocalEngine(build_stages(tiny_cfg, seed=0), lr=1e-3)
    fused = LocalEngine(build_stages(tiny_cfg, seed=0), lr=1e-3, fuse=True)
    assert len(fused._groups([torch.zeros(1)] * 4, schedule)) == (1 if schedule.name == "in_order" else 2)
    for step in range(3):
        batches = random_batches(4, 3, tiny_cfg.seq_len, tiny_cfg.vocab_size, seed=step)
        a, b = plain.train_step(batches, schedule), fused.train_step(batches, schedule)
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.tokens == a.tokens
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    for p, q in zip((p for s in plain.stages for p in s.parameters()), (q for s in fused.stages for q in s.parameters())):
        assert torch.allclose(p, q, atol=1e-5)
