"""Fitting a rebuilt stage to the (input, output) pairs of its own last weights that its neighbours buffered
(checkfree.stage.fitting, checkfree.recovery.fitted): the ring, who holds what under swapped routes, the fit's math
on real Llama blocks, and the strategy's rebuilds."""

from __future__ import annotations

import copy

import pytest
import torch

from checkfree.run.config import ConfigError
from checkfree.stage.averaging import weighted_state
from checkfree.stage.fitting import IN, OUT, ActivationRing, body_mse, buffered_per_holder, fit, pairs


def pairs_of(stage, n: int, seed: int, d: int, seq: int = 16, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, seq, d, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, stage.body(x)) for x in inputs]


def test_the_ring_holds_exactly_the_last_b_micro_batches_of_committed_steps():
    ring = ActivationRing(3)
    sent = {}
    for step in range(3):  # two micro-batches a step: numbers 0..5
        for m in range(2):
            seq = 2 * step + m
            sent[seq] = torch.full((2, 2), float(seq))
            ring.note(0, 1, seq, IN, sent[seq], 2)
            ring.note(2, 1, seq, OUT, -sent[seq], 0)
        ring.commit(2 * step + 1)
    held = ring.held(0, 1)
    assert sorted(held[IN]) == [3, 4, 5] and held[OUT] == {}
    assert [held[IN][seq][0, 0].item() for seq in (3, 4, 5)] == [3.0, 4.0, 5.0]
    assert sorted(ring.held(2, 1)[OUT]) == [3, 4, 5]
    assert ring.nbytes(0) == ring.nbytes(2) == 3 * 2 * 2 * 4  # three 2 x 2 fp32 tensors each
    sent[5].fill_(99.0)
    assert ring.held(0, 1)[IN][5][0, 0].item() == 5.0  # a copy: what the pipeline does with its tensor after
    assert ring.held(2, 1, lost=(0,)) == {IN: {}, OUT: {}}  # the inputs' holder is lost: halves are no use
    ring.note(0, 1, 6, IN, sent[0], 2)
    ring.discard()  # the step was thrown away: nothing of it is kept
    ring.commit(5)
    assert sorted(ring.held(0, 1)[IN]) == [3, 4, 5]
    ring.note(2, 3, 6, IN, sent[0], 4)
    ring.note(2, 4, 6, OUT, sent[0], 0)
    ring.commit(6)
    ring.drop((0,))  # stage 0 rebuilt: the halves whose other half it held are gone with it
    assert sorted(key[1:4] for key in ring.entries) == [(1, 4, IN), (1, 5, IN), (3, 6, IN)]  # micro-batch 3 aged out
    ring.drop((3,))  # stage 3 rebuilt: its pairs were of its old function
    assert sorted(key[1:4] for key in ring.entries) == [(1, 4, IN), (1, 5, IN)]
    ring.forget(0)  # node 0 is gone, what it held with it
    assert ring.nbytes(0) == 0 and ring.held(0, 1) == {IN: {}, OUT: {}} and ring.nbytes(2) == 0
    outputs = {OUT: {4: -sent[4], 5: -sent[5]}, IN: {}}
    assert [(x[0, 0].item(), y[0, 0].item()) for x, y in pairs([outputs, {IN: {5: sent[5], 3: sent[3]}, OUT: {}}])] \
        == [(99.0, -99.0)]  # micro-batch 5 alone has both halves
    with pytest.raises(ConfigError, match="capacity=0 is invalid: allowed an integer >= 1"):
        ActivationRing(0)


@pytest.mark.parametrize("fuse", [False, True])
def test_the_neighbours_buffer_each_body_s_own_pairs_under_checkfree_plus_swapped_routes(tiny_stages, fuse):
    """CheckFree+ on 4 stages: odd micro-batches run the bodies in the order (1, 0, 3, 2), so stage 1's body runs
    between stage 0 and stage 0, stage 0's between 1 and 3, stage 3's between 0 and 2 and stage 2's between 3
    and 3. After one step of 4 micro-batches each holder keeps exactly those tensors, and each pair is its owner's
    function: the body of the weights before the step maps the input to the output (bit for bit unfused; fused,
    the rows of a fused batch, to float rounding)."""
    from checkfree.pipeline import LocalEngine
    from checkfree.stage.schedule import OutOfOrder

    before = copy.deepcopy(tiny_stages)
    engine = LocalEngine(tiny_stages, lr=1e-3, fuse=fuse, buffer=8)
    g = torch.Generator().manual_seed(0)
    engine.train_step([torch.randint(0, 64, (2, 33), generator=g) for _ in range(4)], OutOfOrder(4))
    odd = {(1, 0, IN), (1, 0, OUT), (0, 1, IN), (0, 3, OUT), (3, 0, IN), (3, 2, OUT), (2, 3, IN), (2, 3, OUT)}
    even = {(1, 0, IN), (1, 2, OUT), (2, 1, IN), (2, 3, OUT)}  # in order: the middle stages only
    expected = {(holder, owner, m, role) for m in range(4) for owner, holder, role in (odd if m % 2 else even)}
    assert {key[:4] for key in engine.ring.entries} == expected
    for (_, owner, m, role, partner), x in engine.ring.entries.items():
        if role != IN:
            continue
        [(y_holder, y)] = [(h, t) for (h, o, s, r, _), t in engine.ring.entries.items() if (o, s, r) == (owner, m, OUT)]
        assert y_holder == partner
        with torch.no_grad():
            out = before[owner].body(x)
        assert torch.equal(out, y) if not fuse else torch.allclose(out, y, atol=1e-6), (owner, m)
    # The clock's count of what each node holds, at the end of an iteration: the same tensors, per holder.
    counts = [sum(1 for key in expected if key[0] == k) for k in range(4)]
    assert buffered_per_holder([OutOfOrder(4).order(m) for m in range(4)], 4, 4) == counts == [8, 4, 4, 8]


def test_a_fitting_strategy_asks_the_surviving_holders_of_each_body_s_pairs():
    from checkfree.recovery.base import StrategyConfig
    from checkfree.recovery.fitted import CheckFreeFit, CheckFreePlusFit

    plain = CheckFreeFit(StrategyConfig(name="checkfree_fit"))
    plus = CheckFreePlusFit(StrategyConfig(name="checkfree_plus_fit"))
    assert [plain.holders(k, frozenset({k}), 6) for k in range(6)] == [(), (0, 2), (1, 3), (2, 4), (3, 5), ()]
    # Swapped routes (odd micro-batches, bodies 1, 0, 2, 3, 5, 4): stage 0's body runs between 1 and 2, stage 2's
    # gets its input from 0, stage 3 sends its output to 5, stage 5's body runs between 3 and 4.
    assert [plus.holders(k, frozenset({k}), 6) for k in range(6)] == [(1, 2), (0, 2), (0, 1, 3), (2, 4, 5),
                                                                       (3, 5), (3, 4)]
    assert plain.holders(2, frozenset({2, 3}), 6) == (1,)  # stage 3 held its outputs, and is lost with it


def fitting_driver(tiny_stages, tmp_path, **strategy):
    from checkfree.pipeline import LocalEngine
    from checkfree.recovery import build_strategy
    from checkfree.recovery.base import StrategyConfig
    from tests.conftest import Driver

    cfg = StrategyConfig(**{"name": "checkfree_fit", "fit_buffer": 4, "fit_steps": 10, "fit_lr": 1e-3, **strategy})
    engine = LocalEngine(tiny_stages, lr=1e-3, buffer=cfg.fit_buffer if cfg.name == "checkfree_fit" else 0)
    driver = Driver(engine, build_strategy(cfg, 4), 1e-3, tmp_path)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        driver.step([torch.randint(0, 64, (2, 33), generator=g) for _ in range(2)])
    return driver


def test_a_fitted_rebuild_starts_from_checkfree_s_and_lowers_its_error_on_the_buffered_pairs(tiny_stages, tmp_path):
    """Stage 1 of 4 lost after 3 steps of 2 micro-batches: 4 pairs buffered (numbers 2..5). With 0 steps the
    rebuild is CheckFree's exactly; with 10 its error on those pairs falls and the weights differ. Two adjacent
    stages lost together: each has lost the holder of half its pairs, so neither fits (0 pairs, 0 steps)."""
    states = {}
    for name, steps in (("checkfree", 0), ("checkfree_fit", 0), ("checkfree_fit", 10)):
        driver = fitting_driver(copy.deepcopy(tiny_stages), tmp_path / f"{name}{steps}", name=name, fit_steps=steps)
        [report] = driver.recover({1})
        states[(name, steps)] = {k: v.clone() for k, v in driver.engine.computes[1].stage.state_dict().items()}
        if name == "checkfree_fit":
            assert report.details["fit_pairs"] == 4 and report.details["fit_steps"] == steps
            assert [(t.src, t.holds) for t in report.transfers] == [(0, "body"), (2, "body"), (0, "activations"),
                                                                    (2, "activations")]
            assert [t.n_bytes for t in report.transfers[2:]] == [4 * 2 * 32 * 32 * 4] * 2  # 4 micro-batches each
            assert driver.engine.computes[1].lr == pytest.approx(1.1e-3)  # CheckFree's fresh Adam, lr_scale * lr
    assert all(torch.equal(a, b) for a, b in zip(states[("checkfree", 0)].values(),
                                                 states[("checkfree_fit", 0)].values()))
    assert not all(torch.equal(a, b) for a, b in zip(states[("checkfree", 0)].values(),
                                                     states[("checkfree_fit", 10)].values()))
    driver = fitting_driver(copy.deepcopy(tiny_stages), tmp_path / "fit", fit_steps=10)
    [report] = driver.recover({1})
    assert report.details["fit_loss_after"] < report.details["fit_loss_before"]
    adjacent = fitting_driver(copy.deepcopy(tiny_stages), tmp_path / "adjacent")
    reports = adjacent.recover({1, 2})
    assert [(r.details["fit_pairs"], r.details["fit_steps"]) for r in reports] == [(0, 0), (0, 0)]
    assert all(t.holds == "body" for r in reports for t in r.transfers)  # halves of lost pairs are not sent


def test_fitting_from_the_average_lowers_the_error_on_held_pairs_step_by_step(tiny_stages, tiny_cfg):
    """Stage 1 of a tiny pipeline, lost: CheckFree's rule averages stages 0 and 2's bodies (equal weights); the
    buffer holds 8 micro-batches of stage 1's true (input, output) pairs. From the average, more fitting steps
    give a lower error on 4 pairs the fit never saw -- and from the true weights there is nothing to fit."""
    true = tiny_stages[1]
    d = tiny_cfg.d_model
    buffered, held = pairs_of(true, 8, seed=0, d=d), pairs_of(true, 4, seed=1, d=d)
    start = copy.deepcopy(true)
    start.load_state_dict({**true.state_dict(), **weighted_state([tiny_stages[0].body_state(),
                                                                   tiny_stages[2].body_state()], [0.5, 0.5])})
    errors = []
    for steps in (0, 5, 10, 20, 40):
        stage = copy.deepcopy(start)
        trajectory = fit(stage, buffered, steps, lr=1e-3)
        assert len(trajectory) == steps + 1
        errors.append(body_mse(stage, held))
    assert errors[0] > 0 and all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    exact = copy.deepcopy(true)
    assert fit(exact, buffered, 10, lr=1e-3) == [0.0] * 11  # zero error, zero gradient: Adam does not move
    assert all(torch.equal(a, b) for a, b in zip(exact.state_dict().values(), true.state_dict().values()))


def test_fitting_touches_the_body_alone(tiny_stages, tiny_cfg):
    edge = copy.deepcopy(tiny_stages[0])  # stage 0: embedding + body
    before = {k: v.clone() for k, v in edge.edge_state().items()}
    fit(edge, pairs_of(tiny_stages[1], 2, seed=3, d=tiny_cfg.d_model), 3, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in edge.edge_state().items())
    assert not all(torch.equal(a, b) for a, b in zip(edge.body_state().values(),
                                                      tiny_stages[0].body_state().values()))
