"""CheckFree's rules on hand-made tensors, and every neighbour-based strategy on real stages."""

from __future__ import annotations

import pytest
import torch

from checkfree.model import build_stages
from checkfree.pipeline import LocalPipeline
from checkfree.recovery import (
    STRATEGIES,
    RecoveryContext,
    StrategyConfig,
    UnrecoverableFailure,
    build_strategy,
    interpolate,
    interpolation_weights,
    neighbour_average,
)
from checkfree.recovery.averaging import nearest_survivors
from checkfree.schedule import InOrder
from tests.conftest import random_batches


def test_neighbour_average_hand_computed():
    prev = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    nxt = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    # a = |g_next| + eps = 3.0001, b = |g_prev| + eps = 1.0001: W = (a*next + b*prev) / (a + b)
    out = neighbour_average(prev, nxt, prev_norm=1.0, next_norm=3.0, eps=1e-4)
    a, b = 3.0001, 1.0001
    assert torch.allclose(out["w"], torch.tensor([(a * 3 + b * 1) / (a + b), (a * 6 + b * 2) / (a + b)]))
    assert out["b"].item() == pytest.approx(a * 4 / (a + b), rel=1e-6)
    # Zero gradients on both sides: eps makes it a defined uniform average.
    assert torch.allclose(neighbour_average(prev, nxt, 0.0, 0.0)["w"], torch.tensor([2.0, 4.0]))


def test_interpolation_rule_hand_computed():
    # Survivors L=1, R=4, lost k=2: W_2 = ((4-2) b W_1 + (2-1) a W_4) / ((4-2) b + (2-1) a)
    a, b = 2.0 + 1e-4, 1.0 + 1e-4  # |g_R| = 2, |g_L| = 1
    cl, cr = interpolation_weights(1, 4, 2, left_weight=b, right_weight=a)
    assert cl == pytest.approx(2 * b / (2 * b + a))
    assert cr == pytest.approx(a / (2 * b + a))
    left, right = {"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}
    out2 = interpolate(left, right, 1, 4, 2, left_norm=1.0, right_norm=2.0)
    out3 = interpolate(left, right, 1, 4, 3, left_norm=1.0, right_norm=2.0)
    assert out2["w"].item() == pytest.approx(10 * a / (2 * b + a), rel=1e-6)  # 4.99975...
    assert out3["w"].item() == pytest.approx(10 * 2 * a / (b + 2 * a), rel=1e-6)
    # R - L = 2 reduces to the neighbour average.
    two = interpolate(left, right, 1, 3, 2, left_norm=1.0, right_norm=2.0)
    assert two["w"].item() == pytest.approx(neighbour_average(left, right, 1.0, 2.0)["w"].item())


def test_nearest_survivors_skip_failed():
    assert nearest_survivors(2, {2, 3}, 6) == (1, 4)
    assert nearest_survivors(3, {2, 3}, 6) == (1, 4)
    assert nearest_survivors(0, {0}, 6) == (None, 1)
    assert nearest_survivors(5, {4, 5}, 6) == (3, None)


def make_pipeline(cfg, lr=1e-3, steps=2, schedule=None):
    stages = build_stages(cfg, seed=0)
    pipe = LocalPipeline(stages, lr=lr)
    last = None
    for step in range(steps):
        last = pipe.train_step(random_batches(2, 2, cfg.seq_len, cfg.vocab_size, seed=step),
                               schedule or InOrder(cfg.n_stages))
    ctx = RecoveryContext(pipe, base_lr=lr, iteration=steps + 1, progress=steps,
                          grad_norm=last.grad_norm, grad_norm_post=last.grad_norm_post)
    return pipe, ctx


def bodies(pipe):
    return [{k: v.clone() for k, v in s.body_state().items()} for s in pipe.stages]


def test_checkfree_recovers_stage_from_neighbours_with_grad_norm_weights(tiny_cfg):
    cfg = tiny_cfg.__class__(**{**tiny_cfg.to_dict(), "n_stages": 5})
    pipe, ctx = make_pipeline(cfg)
    before = bodies(pipe)
    strategy = build_strategy(StrategyConfig(name="checkfree", lr_scale=1.1), cfg.n_stages)
    strategy.setup(ctx)
    [report] = strategy.recover({2}, ctx)
    a, b = ctx.grad_norm_post[3] + 1e-4, ctx.grad_norm_post[1] + 1e-4
    expected = neighbour_average(before[1], before[3], ctx.grad_norm_post[1], ctx.grad_norm_post[3])
    for key, value in pipe.stages[2].body_state().items():
        assert torch.allclose(value, expected[key], atol=1e-7), key
    assert report.sources == [1, 3] and report.method == "average"
    assert report.coefficients == pytest.approx([b / (a + b), a / (a + b)])
    assert report.bytes_moved == 2 * sum(v.numel() * 4 for v in before[1].values())
    # Fresh optimizer state and lr_scale * lr on the recovered stage only.
    assert pipe.optimizers[2].state == {}
    assert pipe.stage_lrs() == pytest.approx([1e-3, 1e-3, 1.1e-3, 1e-3, 1e-3])
    assert all(len(pipe.optimizers[i].state) > 0 for i in (0, 1, 3, 4))


def test_pre_clip_norm_source_and_power(tiny_cfg):
    pipe, ctx = make_pipeline(tiny_cfg, lr=1e-2)
    ctx.grad_norm = [0.0, 4.0, 9.0, 0.0]
    ctx.grad_norm_post = [0.0, 1.0, 1.0, 0.0]
    strategy = build_strategy(StrategyConfig(name="checkfree", norm_source="pre", norm_power=2.0), 4)
    strategy.setup(ctx)
    [report] = strategy.recover({2}, ctx)
    # weights: stage 1 -> 4^2 + eps, stage 3 -> 0 + eps... stage 2's neighbours are 1 and 3
    w1, w3 = 16 + 1e-4, 0 + 1e-4
    assert report.coefficients == pytest.approx([w1 / (w1 + w3), w3 / (w1 + w3)])


def test_two_adjacent_failures_never_use_a_failed_stage(tiny_cfg):
    cfg = tiny_cfg.__class__(**{**tiny_cfg.to_dict(), "n_stages": 6})
    pipe, ctx = make_pipeline(cfg)
    before = bodies(pipe)
    strategy = build_strategy(StrategyConfig(name="checkfree"), cfg.n_stages)
    strategy.setup(ctx)
    reports = strategy.recover({2, 3}, ctx)
    assert [r.sources for r in reports] == [[1, 4], [1, 4]]
    assert [r.method for r in reports] == ["interpolate", "interpolate"]
    n = ctx.grad_norm_post
    for k, report in zip((2, 3), reports):
        cl, cr = interpolation_weights(1, 4, k, n[1] + 1e-4, n[4] + 1e-4)
        assert report.coefficients == pytest.approx([cl, cr])
        key = "layers.0.mlp.up_proj.weight"
        assert torch.allclose(pipe.stages[k].body_state()[key], cl * before[1][key] + cr * before[4][key], atol=1e-6)


def test_lost_first_stage_under_checkfree_errors_or_reinits(tiny_cfg):
    pipe, ctx = make_pipeline(tiny_cfg)
    emb = pipe.stages[0].embed_tokens.weight.clone()
    strategy = build_strategy(StrategyConfig(name="checkfree"), 4)
    with pytest.raises(UnrecoverableFailure, match=r"stage 0 .*checkfree_plus.*unrecoverable=reinit"):
        strategy.recover({0}, ctx)
    reinit = build_strategy(StrategyConfig(name="checkfree", unrecoverable="reinit"), 4)
    [report] = reinit.recover({0}, ctx)
    assert report.method == "reinit" and report.sources == []
    assert not torch.equal(pipe.stages[0].embed_tokens.weight, emb)


def test_checkfree_plus_copies_swap_partners_and_restores_replicas(tiny_cfg):
    from checkfree.schedule import OutOfOrder

    cfg = tiny_cfg.__class__(**{**tiny_cfg.to_dict(), "n_stages": 5})
    pipe, ctx = make_pipeline(cfg, schedule=OutOfOrder(5))
    strategy = build_strategy(StrategyConfig(name="checkfree_plus", replica_sync_every=2), 5)
    strategy.setup(ctx)  # replicas synced at progress 2
    embedding, head = pipe.stages[0].embed_tokens.weight.clone(), pipe.stages[4].lm_head.weight.clone()
    pipe.train_step(random_batches(2, 2, cfg.seq_len, cfg.vocab_size, seed=9), OutOfOrder(5))
    ctx.progress += 1  # progress 3: replicas are one step stale
    before = bodies(pipe)
    reports = {r.stage: r for r in strategy.recover({0, 4}, ctx)}
    assert reports[0].sources == [1] and reports[4].sources == [3]
    assert reports[0].details["replica_staleness"] == 1
    for k, src in ((0, 1), (4, 3)):
        for key, value in pipe.stages[k].body_state().items():
            assert torch.equal(value, before[src][key])
    assert torch.equal(pipe.stages[0].embed_tokens.weight, embedding)  # the (stale) replica
    assert torch.equal(pipe.stages[4].lm_head.weight, head)
    # Middle stage still by averaging; both swap partners lost together cannot be rebuilt.
    [mid] = strategy.recover({2}, ctx)
    assert mid.sources == [1, 3] and mid.method == "average"
    with pytest.raises(UnrecoverableFailure, match="stage 0"):
        strategy.recover({0, 1}, ctx)


def test_checkfree_plus_replica_sync_every(tiny_cfg):
    pipe, ctx = make_pipeline(tiny_cfg)
    strategy = build_strategy(StrategyConfig(name="checkfree_plus", replica_sync_every=3), 4)
    strategy.setup(ctx)
    synced = []
    for progress in range(3, 10):
        ctx.progress = progress
        overhead = strategy.after_step(ctx)
        if overhead.replica_sync_bytes:
            synced.append(progress)
            emb_bytes = pipe.stages[0].embed_tokens.weight.numel() * 4
            assert overhead.replica_sync_bytes[(0, 1)] == emb_bytes
    assert synced == [3, 6, 9]
    assert strategy.staleness(ctx) == {1: 0, 2: 0}


def test_ablations(tiny_cfg):
    cfg = tiny_cfg.__class__(**{**tiny_cfg.to_dict(), "n_stages": 5})
    pipe, ctx = make_pipeline(cfg)
    before = bodies(pipe)
    key = "layers.0.self_attn.q_proj.weight"

    [r] = build_strategy(StrategyConfig(name="uniform"), 5).recover({2}, ctx)
    assert r.coefficients == pytest.approx([0.5, 0.5])
    assert torch.allclose(pipe.stages[2].body_state()[key], 0.5 * (before[1][key] + before[3][key]))

    [r] = build_strategy(StrategyConfig(name="copy"), 5).recover({2}, ctx)
    assert r.sources == [1] and torch.equal(pipe.stages[2].body_state()[key], before[1][key])

    [r] = build_strategy(StrategyConfig(name="zero"), 5).recover({2}, ctx)
    assert torch.equal(pipe.stages[2].body_state()[key], before[1][key])
    assert pipe.stages[2].layers[0].mlp.down_proj.weight.abs().sum().item() == 0.0

    [r] = build_strategy(StrategyConfig(name="random"), 5).recover({2}, ctx)
    assert r.sources == [] and r.bytes_moved == 0
    w = pipe.stages[2].body_state()[key]
    assert not torch.equal(w, before[1][key]) and abs(w.std().item() - 0.02) < 0.005


def test_registry_covers_every_strategy_yaml():
    from pathlib import Path

    names = {p.stem for p in (Path(__file__).parent.parent / "conf" / "strategy").glob("*.yaml")}
    assert names == set(STRATEGIES)


def test_checkfree_plus_needs_four_stages():
    from checkfree.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.n_stages=3 .*checkfree_plus.*at least 4"):
        build_strategy(StrategyConfig(name="checkfree_plus"), 3)
    with pytest.raises(ConfigError, match=r"model.n_stages=2 .*checkfree.*at least 3"):
        build_strategy(StrategyConfig(name="checkfree"), 2)
