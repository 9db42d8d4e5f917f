"""CheckFree's rules on hand-made tensors, and every neighbour-based strategy on real stages."""

from __future__ import annotations

import pytest
import torch

from checkfree.model.llama import build_stages
from checkfree.pipeline import LocalEngine
from checkfree.recovery import (
    STRATEGIES,
    StrategyConfig,
    UnrecoverableFailure,
    build_strategy,
    validate_strategy_config,
)
from checkfree.recovery.rules import interpolation_weights, nearest_survivors, norm_weight
from checkfree.stage.averaging import weighted_state
from tests.conftest import Driver, random_batches


def neighbour_average(prev, nxt, prev_norm, next_norm, eps=1e-4):
    """What a CheckFree rebuild computes: the rule's coefficients (a strategy's), then the weighted state (an
    engine's), exactly as ``CheckFree.plan`` and ``StageCompute.apply`` do it."""
    return interpolate(prev, nxt, 0, 2, 1, prev_norm, next_norm, eps=eps)


def interpolate(left_state, right_state, left, right, k, left_norm, right_norm, power=1.0, eps=1e-4):
    coefficients = interpolation_weights(left, right, k, norm_weight(left_norm, power, eps),
                                         norm_weight(right_norm, power, eps))
    return weighted_state([left_state, right_state], list(coefficients))


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


@pytest.fixture
def drive(tmp_path):
    """``drive(cfg, strategy)``: a local engine trained ``steps`` steps under ``strategy`` (its upkeep included),
    ready for a failure at the next iteration."""

    def make(cfg, strategy: StrategyConfig, lr=1e-3, steps=2):
        pipe = LocalEngine(build_stages(cfg, seed=0), lr=lr)
        driver = Driver(pipe, build_strategy(strategy, cfg.n_stages), lr, tmp_path)
        for step in range(steps):
            driver.step(random_batches(2, 2, cfg.seq_len, cfg.vocab_size, seed=step))
        driver.iteration += 1  # the failures strike in the next iteration, before its step
        return pipe, driver

    return make


def bodies(pipe):
    return [{k: v.clone() for k, v in s.body_state().items()} for s in pipe.stages]


def five(cfg):
    return cfg.__class__(**{**cfg.to_dict(), "n_stages": 5})


def test_checkfree_recovers_stage_from_neighbours_with_grad_norm_weights(tiny_cfg, drive):
    cfg = five(tiny_cfg)
    pipe, driver = drive(cfg, StrategyConfig(name="checkfree", lr_scale=1.1))
    before = bodies(pipe)
    [report] = driver.recover({2})
    post = driver.grad_norm_post
    a, b = post[3] + 1e-4, post[1] + 1e-4
    expected = neighbour_average(before[1], before[3], post[1], post[3])
    for key, value in pipe.stages[2].body_state().items():
        assert torch.allclose(value, expected[key], atol=1e-7), key
    assert report.sources == [1, 3] and report.method == "average"
    assert report.coefficients == pytest.approx([b / (a + b), a / (a + b)])
    assert report.bytes_moved == 2 * sum(v.numel() * 4 for v in before[1].values())
    # Fresh optimizer state and lr_scale * lr on the recovered stage only.
    assert pipe.optimizers[2].state == {}
    assert pipe.stage_lrs() == pytest.approx([1e-3, 1e-3, 1.1e-3, 1e-3, 1e-3])
    assert all(len(pipe.optimizers[i].state) > 0 for i in (0, 1, 3, 4))


def test_the_plan_is_data_and_reads_only_survivors(tiny_cfg, drive):
    """The strategy decides without touching a tensor: the plan names sources, coefficients, the fresh seed and
    the new lr, and never reads a lost stage."""
    pipe, driver = drive(five(tiny_cfg), StrategyConfig(name="checkfree"))
    plan = driver.plan({2, 3})
    assert plan.lost == (2, 3) and not plan.rollback and plan.sources == {1, 4}
    assert [(r.stage, r.method, [s for s, _ in r.sources], r.lr) for r in plan.rebuilds] == [
        (2, "interpolate", [1, 4], pytest.approx(1.1e-3)), (3, "interpolate", [1, 4], pytest.approx(1.1e-3))]
    assert plan.rebuilds[0].fresh_seed != plan.rebuilds[1].fresh_seed
    assert plan == driver.plan({2, 3})  # a pure function of (lost, view)


def test_pre_clip_norm_source_and_power(tiny_cfg, drive):
    pipe, driver = drive(tiny_cfg, StrategyConfig(name="checkfree", norm_source="pre", norm_power=2.0), lr=1e-2)
    driver.grad_norm = [0.0, 4.0, 9.0, 0.0]
    driver.grad_norm_post = [0.0, 1.0, 1.0, 0.0]
    [report] = driver.recover({2})
    # weights: stage 1 -> 4^2 + eps, stage 3 -> 0 + eps... stage 2's neighbours are 1 and 3
    w1, w3 = 16 + 1e-4, 0 + 1e-4
    assert report.coefficients == pytest.approx([w1 / (w1 + w3), w3 / (w1 + w3)])


def test_two_adjacent_failures_never_use_a_failed_stage(tiny_cfg, drive):
    cfg = tiny_cfg.__class__(**{**tiny_cfg.to_dict(), "n_stages": 6})
    pipe, driver = drive(cfg, StrategyConfig(name="checkfree"))
    before = bodies(pipe)
    reports = driver.recover({2, 3})
    assert [r.sources for r in reports] == [[1, 4], [1, 4]]
    assert [r.method for r in reports] == ["interpolate", "interpolate"]
    n = driver.grad_norm_post
    for k, report in zip((2, 3), reports):
        cl, cr = interpolation_weights(1, 4, k, n[1] + 1e-4, n[4] + 1e-4)
        assert report.coefficients == pytest.approx([cl, cr])
        key = "layers.0.mlp.up_proj.weight"
        assert torch.allclose(pipe.stages[k].body_state()[key], cl * before[1][key] + cr * before[4][key], atol=1e-6)


def test_lost_first_stage_under_checkfree_errors_or_reinits(tiny_cfg, drive):
    pipe, driver = drive(tiny_cfg, StrategyConfig(name="checkfree"))
    emb = pipe.stages[0].embed_tokens.weight.clone()
    with pytest.raises(UnrecoverableFailure, match=r"stage 0 .*checkfree_plus.*unrecoverable=reinit"):
        driver.plan({0})
    driver.strategy = build_strategy(StrategyConfig(name="checkfree", unrecoverable="reinit"), 4)
    [report] = driver.recover({0})
    assert report.method == "reinit" and report.sources == []
    assert not torch.equal(pipe.stages[0].embed_tokens.weight, emb)


def test_edge_rule_copy_copies_the_one_neighbour_and_restores_the_replica(tiny_cfg, drive):
    """Plain CheckFree with strategy.edge_rule=copy: a lost edge copies its one neighbour's blocks (the paper's
    code) and takes its embedding / head from the replica on that neighbour (as CheckFree+ does)."""
    pipe, driver = drive(five(tiny_cfg), StrategyConfig(name="checkfree", edge_rule="copy", replica_sync_every=1))
    embedding, head = pipe.stages[0].embed_tokens.weight.clone(), pipe.stages[4].lm_head.weight.clone()
    before = bodies(pipe)
    reports = {r.stage: r for r in driver.recover({0, 2, 4})}
    assert [(r.method, r.sources) for r in reports.values()] == [
        ("copy+replica", [1]), ("average", [1, 3]), ("copy+replica", [3])]
    for k, src in ((0, 1), (4, 3)):
        assert all(torch.equal(v, before[src][n]) for n, v in pipe.stages[k].body_state().items())
    assert torch.equal(pipe.stages[0].embed_tokens.weight, embedding)
    assert torch.equal(pipe.stages[4].lm_head.weight, head)
    assert reports[0].details["replica_staleness"] == 0
    with pytest.raises(UnrecoverableFailure, match="stage 0"):
        driver.plan({0, 1})


def test_checkfree_plus_copies_swap_partners_and_restores_replicas(tiny_cfg, drive):
    from checkfree.stage.schedule import OutOfOrder

    cfg = five(tiny_cfg)
    pipe, driver = drive(cfg, StrategyConfig(name="checkfree_plus", replica_sync_every=2))  # synced at progress 2
    embedding, head = pipe.stages[0].embed_tokens.weight.clone(), pipe.stages[4].lm_head.weight.clone()
    driver.step(random_batches(2, 2, cfg.seq_len, cfg.vocab_size, seed=9))  # progress 3: replicas one step stale
    assert isinstance(driver.schedule, OutOfOrder)
    before = bodies(pipe)
    reports = {r.stage: r for r in driver.recover({0, 4})}
    assert reports[0].sources == [1] and reports[4].sources == [3]
    assert reports[0].details["replica_staleness"] == 1
    for k, src in ((0, 1), (4, 3)):
        for key, value in pipe.stages[k].body_state().items():
            assert torch.equal(value, before[src][key])
    assert torch.equal(pipe.stages[0].embed_tokens.weight, embedding)  # the (stale) replica
    assert torch.equal(pipe.stages[4].lm_head.weight, head)
    # Middle stage still by averaging; a lost replica holder fetches a fresh replica (counted in its bytes).
    [mid] = driver.recover({2})
    assert mid.sources == [1, 3] and mid.method == "average"
    [holder] = driver.recover({1})
    assert (holder.method, holder.sources, holder.details["replica_resynced"]) == ("copy", [0], True)
    assert holder.bytes_moved == sum(v.numel() * 4 for v in before[0].values()) + embedding.numel() * 4
    # Both swap partners lost together cannot be rebuilt; the message says what would have survived it.
    with pytest.raises(UnrecoverableFailure, match=r"stages 0 and 1 were lost together.*had either survived"):
        driver.plan({0, 1})


def test_checkfree_plus_replica_sync_every(tiny_cfg, drive):
    pipe, driver = drive(tiny_cfg, StrategyConfig(name="checkfree_plus", replica_sync_every=3), steps=0)
    synced = []
    for progress in range(3, 10):
        driver.progress = progress
        traffic = driver.upkeep(driver.strategy.after_step(driver.view()))
        if traffic.sent:
            synced.append(progress)
            emb_bytes = pipe.stages[0].embed_tokens.weight.numel() * 4
            assert traffic.sent[(0, 1)] == emb_bytes
    assert synced == [3, 6, 9]
    assert {h.holder: driver.progress - p for h, p in driver.held_since.items()} == {1: 0, 2: 0}


def test_ablations(tiny_cfg, drive):
    cfg = five(tiny_cfg)
    pipe, driver = drive(cfg, StrategyConfig(name="uniform"))
    before = bodies(pipe)
    key = "layers.0.self_attn.q_proj.weight"

    [r] = driver.recover({2})
    assert r.coefficients == pytest.approx([0.5, 0.5])
    assert torch.allclose(pipe.stages[2].body_state()[key], 0.5 * (before[1][key] + before[3][key]))

    driver.strategy = build_strategy(StrategyConfig(name="copy"), 5)
    [r] = driver.recover({2})
    assert r.sources == [1] and torch.equal(pipe.stages[2].body_state()[key], before[1][key])

    driver.strategy = build_strategy(StrategyConfig(name="zero"), 5)
    [r] = driver.recover({2})
    assert torch.equal(pipe.stages[2].body_state()[key], before[1][key])
    assert pipe.stages[2].layers[0].mlp.down_proj.weight.abs().sum().item() == 0.0

    driver.strategy = build_strategy(StrategyConfig(name="random"), 5)
    [r] = driver.recover({2})
    assert r.sources == [] and r.bytes_moved == 0
    w = pipe.stages[2].body_state()[key]
    assert not torch.equal(w, before[1][key]) and abs(w.std().item() - 0.02) < 0.005


def test_strategies_import_no_tensor_code():
    """Strategies decide, engines execute: a strategy module never imports torch (or any engine)."""
    import subprocess
    import sys

    code = ("import sys, checkfree.recovery as r\n"
            "[r.strategy_class(n) for n in r.STRATEGIES]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')"
            " or m.startswith(('checkfree.pipeline', 'checkfree.distributed', 'checkfree.stage.compute'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registry_covers_every_strategy_yaml():
    from pathlib import Path

    names = {p.stem for p in (Path(__file__).parent.parent / "conf" / "strategy").glob("*.yaml")}
    assert names == set(STRATEGIES)


def test_checkfree_plus_needs_four_stages():
    from checkfree.run.config import ConfigError

    # Refused at the gate (validate_run_config runs validate_strategy_config), before any strategy is built.
    with pytest.raises(ConfigError, match=r"model.n_stages=3 .*checkfree_plus.*at least 4"):
        validate_strategy_config(StrategyConfig(name="checkfree_plus"), 3)
    with pytest.raises(ConfigError, match=r"model.n_stages=2 .*checkfree.*at least 3"):
        validate_strategy_config(StrategyConfig(name="checkfree"), 2)
