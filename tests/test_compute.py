"""checkfree.stage.compute: one stage's rules (loss scaling, clipping, a rebuild, held copies), in exact numbers."""

from __future__ import annotations

import pytest
import torch

from checkfree.plan import ZERO_DOWN_PROJ, Rebuild
from checkfree.stage.compute import StageCompute, refresh_into


def test_a_micro_batch_counts_one_over_m_and_a_fused_group_n_over_m(tiny_stages):
    compute = StageCompute(tiny_stages[1], lr=1e-3)
    weight = compute.stage.layers[0].mlp.up_proj.weight
    StageCompute.backward_loss(weight.sum(), micro_batches=4)
    assert torch.equal(weight.grad, torch.full_like(weight, 0.25))
    StageCompute.backward_loss(weight.sum(), micro_batches=4, fused=2)
    assert torch.equal(weight.grad, torch.full_like(weight, 0.75))


def test_clip_returns_the_norm_before_and_after(tiny_stages):
    compute = StageCompute(tiny_stages[1], lr=1e-3, clip=1.0)
    params = list(compute.stage.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad.view(-1)[:2] = torch.tensor([3.0, 4.0])
    pre, post = compute.clip()
    assert pre == 5.0 and post == 5.0 * (1.0 / (5.0 + 1e-6))
    assert params[0].grad.view(-1)[:2].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    assert StageCompute(tiny_stages[2], lr=1e-3).clip() == (0.0, 0.0)  # no gradient at all


def test_a_rebuild_averages_the_sources_zeroes_down_proj_and_starts_adam_afresh(tiny_stages):
    target = StageCompute(tiny_stages[2], lr=1e-3)
    bodies = [tiny_stages[1].body_state(), tiny_stages[3].body_state()]
    rebuild = Rebuild(2, "zero", fresh_seed=5, sources=((1, 0.25), (3, 0.75)), transforms=(ZERO_DOWN_PROJ,), lr=0.5)
    target.apply(rebuild, bodies, None)
    key = "layers.0.mlp.up_proj.weight"
    assert torch.allclose(target.stage.body_state()[key], 0.25 * bodies[0][key] + 0.75 * bodies[1][key], atol=1e-7)
    assert torch.count_nonzero(target.stage.layers[0].mlp.down_proj.weight) == 0
    assert target.lr == 0.5 and target.optimizer.state == {}


def test_refresh_into_reuses_the_held_tensors_and_copies_plain_values():
    held = {"weights": {"w": torch.zeros(3)}, "step": [1]}
    live = {"weights": {"w": torch.tensor([1.0, 2.0, 3.0])}, "step": [2]}
    out = refresh_into(held, live)
    assert out["weights"]["w"] is held["weights"]["w"] and out["weights"]["w"].tolist() == [1.0, 2.0, 3.0]
    assert out["step"] == [2] and out["step"] is not live["step"]
    grown = refresh_into(held, {"weights": {"w": torch.ones(4)}})
    assert grown["weights"]["w"] is not held["weights"]["w"] and grown["weights"]["w"].shape == (4,)
