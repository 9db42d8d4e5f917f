"""The two baselines CheckFree is compared with: checkpoint rollback and redundant computation (shadows).

Both promise an *exact* state after recovery (the checkpointed one, or the pre-failure one), so every test
ends with ``torch.equal`` on weights, Adam moments, step counts and data positions.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from checkfree.model import build_stages, preset, stage_param_counts
from checkfree.pipeline import LocalPipeline
from checkfree.recovery import StrategyConfig, build_strategy
from checkfree.recovery.base import RecoveryContext, UnrecoverableFailure
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.recovery.redundant import RedundantComputation
from checkfree.schedule import InOrder

VOCAB, SEQ, LR = 64, 16, 1e-3
CFG = preset("tiny").with_vocab(VOCAB)
S = CFG.n_stages
CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"


class Batches:
    """Seeded random token ids; the position is the whole state, as for a real data stream."""

    def __init__(self, seed: int = 0) -> None:
        self.seed, self.position = seed, 0

    def next_batch(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        self.position += 1
        return torch.randint(0, VOCAB, (n, SEQ + 1), generator=generator)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_ctx(tmp_path: Path, seed: int = 0) -> RecoveryContext:
    pipeline = LocalPipeline(build_stages(CFG, seed), lr=LR)
    return RecoveryContext(pipeline=pipeline, base_lr=LR, run_dir=tmp_path, data=Batches(seed))


def step(ctx: RecoveryContext, strategy=None):
    """One iteration as the trainer runs it: train, count the step, then the strategy's after-step hook."""
    ctx.iteration += 1
    result = ctx.pipeline.train_step([ctx.data.next_batch(2) for _ in range(2)], InOrder(S))
    ctx.progress += 1
    ctx.grad_norm, ctx.grad_norm_post = result.grad_norm, result.grad_norm_post
    overhead = strategy.after_step(ctx) if strategy is not None else None
    return result.loss, overhead


def snapshot(ctx: RecoveryContext) -> dict:
    p = ctx.pipeline
    return copy.deepcopy({"stages": [s.state_dict() for s in p.stages],
                          "optimizers": [o.state_dict() for o in p.optimizers],
                          "data": ctx.data.state_dict()})


def assert_equal_state(ctx: RecoveryContext, saved: dict, stages: range | list[int] = range(S)) -> None:
    now = snapshot(ctx)
    assert now["data"] == saved["data"]
    for k in stages:
        for name, tensor in saved["stages"][k].items():
            assert torch.equal(now["stages"][k][name], tensor), (k, name)
        old, new = saved["optimizers"][k], now["optimizers"][k]
        assert new["param_groups"] == old["param_groups"]
        assert new["state"].keys() == old["state"].keys()
        for index, slots in old["state"].items():
            assert slots.keys() == new["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for name, tensor in slots.items():
                assert torch.equal(new["state"][index][name], tensor), (k, index, name)


def n_tensors(ctx: RecoveryContext, k: int) -> int:
    return len(list(ctx.pipeline.stages[k].parameters()))


def shard_bytes(ctx: RecoveryContext, k: int, adam: bool = True) -> int:
    """By hand: fp32 weights (+ exp_avg + exp_avg_sq, + one fp32 step scalar per tensor once Adam stepped)."""
    params = stage_param_counts(CFG)[k]
    return 4 * params + (2 * 4 * params + 4 * n_tensors(ctx, k) if adam else 0)


def strategy_for(cls, ctx: RecoveryContext, **cfg):
    strategy = cls(StrategyConfig(name=cls.name, **cfg))
    strategy.setup(ctx)
    return strategy


# --- checkpoint rollback ---------------------------------------------------------------------------


def test_checkpoint_rollback_is_exact_and_replays_the_same_losses(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.pipeline.set_lr(2, 0.5 * LR)  # a stage at another lr (e.g. recovered earlier) keeps it on rollback
    strategy = strategy_for(CheckpointRollback, ctx, every=3, keep=2)
    for _ in range(3):
        step(ctx, strategy)
    saved = snapshot(ctx)
    after_save = [step(ctx, strategy)[0] for _ in range(2)]  # progress 4, 5: lost by the failure below
    ctx.pipeline.stages[1].reset_parameters()  # the lost stage's node is gone
    ctx.pipeline.reset_optimizer(1, 7.0)

    (report,) = strategy.recover({1}, ctx)

    assert ctx.progress == 3
    assert_equal_state(ctx, saved)
    assert ctx.pipeline.stage_lrs() == [LR, LR, 0.5 * LR, LR]
    assert (report.stage, report.strategy, report.method) == (1, "checkpoint", "rollback")
    assert (report.sources, report.coefficients, report.from_storage) == ([], [], True)
    assert report.bytes_moved == shard_bytes(ctx, 1)
    assert report.lost_iterations == 2
    assert report.details == {"rolled_back_to": 3, "all_stages": True, "largest_shard_bytes": shard_bytes(ctx, 3)}
    assert report.wall_s > 0
    assert [step(ctx, strategy)[0] for _ in range(2)] == after_save  # bit-for-bit the same training


def test_checkpoint_files_rotation_and_upload_bytes(tmp_path):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(CheckpointRollback, ctx, every=2, keep=2)
    overheads = [step(ctx, strategy)[1] for _ in range(7)]

    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["ckpt_0000004.pt", "ckpt_0000006.pt"]  # 0 (setup) and 2 were deleted
    assert strategy.storage_bytes == (tmp_path / "checkpoints" / "ckpt_0000006.pt").stat().st_size
    assert strategy.saves == 4
    assert [o.storage_upload_bytes for o in overheads] == [0, shard_bytes(ctx, S - 1)] * 3 + [0]
    assert max(range(S), key=lambda k: shard_bytes(ctx, k)) == S - 1  # the head stage bounds the upload
    assert strategy.memory_overhead_bytes() == 0


def test_loss_before_the_first_save_rolls_back_to_the_initial_weights(tmp_path):
    ctx = make_ctx(tmp_path)
    initial = snapshot(ctx)
    strategy = strategy_for(CheckpointRollback, ctx, every=50)
    step(ctx, strategy)
    step(ctx, strategy)

    reports = strategy.recover({0, 2}, ctx)

    assert ctx.progress == 0 and ctx.data.position == 0
    assert_equal_state(ctx, initial)
    assert all(not opt.state for opt in ctx.pipeline.optimizers)  # Adam starts from scratch, as at step 0
    assert [(r.stage, r.lost_iterations, r.bytes_moved) for r in reports] == [
        (0, 2, shard_bytes(ctx, 0, adam=False)), (2, 2, shard_bytes(ctx, 2, adam=False))]
    assert all(r.details["rolled_back_to"] == 0 for r in reports)


def test_a_kill_mid_save_leaves_the_latest_checkpoint_usable(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(CheckpointRollback, ctx, every=1)
    step(ctx, strategy)
    saved = snapshot(ctx)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        step(ctx, strategy)
    monkeypatch.undo()
    (report,) = strategy.recover({3}, ctx)
    assert report.details["rolled_back_to"] == 1 and ctx.progress == 1
    assert_equal_state(ctx, saved)
    strategy_for(CheckpointRollback, ctx)  # a restart clears the half-written file
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# --- redundant computation ---------------------------------------------------------------------------


def test_redundant_restores_a_lost_stage_exactly_and_training_goes_on_unchanged(tmp_path):
    reference, ctx = make_ctx(tmp_path), make_ctx(tmp_path)
    strategy = strategy_for(RedundantComputation, ctx)
    reference_losses = [step(reference)[0] for _ in range(5)]
    losses = [step(ctx, strategy)[0] for _ in range(3)]
    before = snapshot(ctx)
    for k in (0, 2):  # not adjacent (stage 0's shadow is on stage 3): both come back from shadows
        ctx.pipeline.stages[k].reset_parameters()
        ctx.pipeline.reset_optimizer(k, 7.0)

    reports = strategy.recover({0, 2}, ctx)

    assert_equal_state(ctx, before)
    assert [(r.stage, r.method, r.sources, r.coefficients) for r in reports] == [
        (0, "shadow", [3], [1.0]), (2, "shadow", [1], [1.0])]
    assert [r.bytes_moved for r in reports] == [shard_bytes(ctx, 0), shard_bytes(ctx, 2)]
    assert all(r.lost_iterations == 0 and not r.from_storage and r.strategy == "redundant" for r in reports)
    shadow = strategy.shadows[2].optimizer[0]["exp_avg"].clone()
    losses += [step(ctx)[0]]  # no after_step: the restored optimizer must not write into the shadow
    assert torch.equal(strategy.shadows[2].optimizer[0]["exp_avg"], shadow)
    strategy.after_step(ctx)
    losses += [step(ctx, strategy)[0]]
    assert losses == reference_losses
    assert_equal_state(ctx, snapshot(reference))


def test_redundant_rebuilds_the_shadow_the_lost_stage_held(tmp_path):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(RedundantComputation, ctx)
    step(ctx, strategy)
    strategy.recover({1}, ctx)  # stage 1's node held stage 2's shadow: it is rebuilt from live stage 2
    step(ctx, strategy)
    before = snapshot(ctx)
    ctx.pipeline.stages[2].reset_parameters()
    ctx.pipeline.reset_optimizer(2, 7.0)
    strategy.recover({2}, ctx)
    assert_equal_state(ctx, before)


@pytest.mark.parametrize(("failed", "orphan", "holder"), [({1, 2}, 2, 1), ({0, 3}, 0, 3)])
def test_adjacent_losses_are_unrecoverable_by_default(tmp_path, failed, orphan, holder):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(RedundantComputation, ctx)
    step(ctx, strategy)
    with pytest.raises(UnrecoverableFailure) as error:
        strategy.recover(failed, ctx)
    message = str(error.value)
    assert f"stages {sorted(failed)} were lost at iteration 1" in message
    assert f"stage {orphan}'s only copy was its shadow on stage {holder}, lost too" in message
    assert "strategy.unrecoverable=reinit" in message


def test_adjacent_losses_reinit_when_asked(tmp_path):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(RedundantComputation, ctx, unrecoverable="reinit")
    step(ctx, strategy)
    before = snapshot(ctx)
    reports = strategy.recover({1, 2}, ctx)
    assert [(r.stage, r.method, r.sources) for r in reports] == [(1, "shadow", [0]), (2, "reinit", [])]
    assert_equal_state(ctx, before, stages=[0, 1, 3])
    assert not ctx.pipeline.optimizers[2].state and ctx.pipeline.stage_lrs()[2] == LR
    live = ctx.pipeline.stages[2].state_dict()  # stage 2's new shadow (on the new stage 1) is the new stage 2
    assert all(torch.equal(strategy.shadows[2].weights[n], t) for n, t in live.items())


def test_redundant_memory_is_one_more_model_and_optimizer(tmp_path):
    ctx = make_ctx(tmp_path)
    strategy = strategy_for(RedundantComputation, ctx)
    assert strategy.memory_overhead_bytes() == sum(shard_bytes(ctx, k, adam=False) for k in range(S))
    overhead = step(ctx, strategy)[1]
    assert overhead.storage_upload_bytes == 0 and overhead.replica_sync_bytes == {}
    model = sum(stage_param_counts(CFG))
    steps = sum(n_tensors(ctx, k) for k in range(S))
    assert strategy.memory_overhead_bytes() == 3 * 4 * model + 4 * steps


# --- registry and YAML -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"),
                         [("checkpoint", CheckpointRollback), ("redundant", RedundantComputation)])
def test_yaml_builds_the_strategy(name, cls):
    cfg = StrategyConfig(**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))
    assert cfg.name == name
    strategy = build_strategy(cfg, S)
    assert isinstance(strategy, cls) and strategy.schedule_name == "in_order"
