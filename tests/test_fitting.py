"""Fitting a stage body to buffered (input, output) pairs of its own last weights (checkfree.stage.fitting):
the math on real Llama blocks, before it is wired into a strategy."""

from __future__ import annotations

import copy

import pytest
import torch

from checkfree.run.config import ConfigError
from checkfree.stage.averaging import weighted_state
from checkfree.stage.fitting import ActivationBuffer, body_mse, fit


def pairs_of(stage, n: int, seed: int, d: int, seq: int = 16, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, seq, d, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, stage.body(x)) for x in inputs]


def test_the_buffer_holds_exactly_the_last_b_micro_batches():
    buffer = ActivationBuffer(3)
    sent = [(torch.full((2, 2), float(i)), torch.full((2, 2), -float(i))) for i in range(5)]
    for x, y in sent:
        buffer.add(x, y)
    assert len(buffer) == 3
    assert [(x[0, 0].item(), y[0, 0].item()) for x, y in buffer.pairs()] == [(2.0, -2.0), (3.0, -3.0), (4.0, -4.0)]
    assert buffer.nbytes() == 3 * 2 * 4 * 4  # three pairs of 2 x 2 fp32 tensors
    sent[4][0].fill_(99.0)
    assert buffer.pairs()[-1][0][0, 0].item() == 4.0  # a copy: what the pipeline does with its tensor after
    with pytest.raises(ConfigError, match="capacity=0 is invalid: allowed an integer >= 1"):
        ActivationBuffer(0)


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
