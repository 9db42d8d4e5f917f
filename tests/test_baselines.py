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

from checkfree.model.llama import build_stages
from checkfree.model.presets import preset, stage_param_counts
from checkfree.pipeline import LocalEngine
from checkfree.plan import SHADOW, Held
from checkfree.recovery import StrategyConfig, build_strategy
from checkfree.recovery.base import UnrecoverableFailure
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.recovery.redundant import RedundantComputation
from tests.conftest import Driver

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


def make_ctx(tmp_path: Path, seed: int = 0, strategy: StrategyConfig | None = None) -> Driver:
    """A tiny local engine driven under ``strategy`` (default: none) over a seeded data stream."""
    engine = LocalEngine(build_stages(CFG, seed), lr=LR)
    return Driver(engine, build_strategy(strategy or StrategyConfig(name="none"), S), LR, tmp_path, data=Batches(seed))


def step(ctx: Driver):
    """One iteration as the trainer runs it: train, count the step, then the strategy's upkeep."""
    return ctx.step([ctx.data.next_batch(2) for _ in range(2)])


def snapshot(ctx: Driver) -> dict:
    p = ctx.engine
    return copy.deepcopy({"stages": [s.state_dict() for s in p.stages],
                          "optimizers": [o.state_dict() for o in p.optimizers],
                          "data": ctx.data.state_dict()})


def assert_equal_state(ctx: Driver, saved: dict, stages: range | list[int] = range(S)) -> None:
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


def n_tensors(ctx: Driver, k: int) -> int:
    return len(list(ctx.engine.stages[k].parameters()))


def shard_bytes(ctx: Driver, k: int, adam: bool = True) -> int:
    """By hand: fp32 weights (+ exp_avg + exp_avg_sq, + one fp32 step scalar per tensor once Adam stepped)."""
    params = stage_param_counts(CFG)[k]
    return 4 * params + (2 * 4 * params + 4 * n_tensors(ctx, k) if adam else 0)


def strategy_for(cls, tmp_path: Path, seed: int = 0, **cfg) -> Driver:
    return make_ctx(tmp_path, seed, StrategyConfig(name=cls.name, **cfg))


# --- checkpoint rollback ---------------------------------------------------------------------------


def test_checkpoint_rollback_is_exact_and_replays_the_same_losses(tmp_path):
    ctx = strategy_for(CheckpointRollback, tmp_path, every=3, keep=2)
    ctx.engine.computes[2].optimizer.param_groups[0]["lr"] = 0.5 * LR  # a stage at another lr (recovered earlier)
    # keeps it on rollback
    for _ in range(3):
        step(ctx)
    saved = snapshot(ctx)
    after_save = [step(ctx)[0] for _ in range(2)]  # progress 4, 5: lost by the failure below

    (report,) = ctx.recover({1})

    assert ctx.progress == 3
    assert_equal_state(ctx, saved)
    assert ctx.engine.stage_lrs() == [LR, LR, 0.5 * LR, LR]
    assert (report.stage, report.strategy, report.method) == (1, "checkpoint", "rollback")
    assert (report.sources, report.coefficients, report.from_storage) == ([], [], True)
    assert report.bytes_moved == shard_bytes(ctx, 1)
    assert report.lost_iterations == 2
    assert report.details == {"rolled_back_to": 3, "checkpoint": "ckpt_0000003", "all_stages": True,
                              "largest_shard_bytes": shard_bytes(ctx, 3),
                              "shard_bytes": [shard_bytes(ctx, k) for k in range(4)]}
    assert report.wall_s > 0
    assert [step(ctx)[0] for _ in range(2)] == after_save  # bit-for-bit the same training


def test_checkpoint_files_rotation_and_upload_bytes(tmp_path):
    ctx = strategy_for(CheckpointRollback, tmp_path, every=2, keep=2)
    overheads = [step(ctx)[1] for _ in range(7)]

    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt_0000004", "ckpt_0000006"]  # 0 and 2 deleted
    assert sorted(p.name for p in (checkpoints / "ckpt_0000006").iterdir()) == \
        ["meta.pt"] + [f"stage{k}.pt" for k in range(S)]  # one shard per stage: the process engine's format
    assert ctx.engine.store.saves == 4
    assert [max(o.shard_bytes, default=0) for o in overheads] == [0, shard_bytes(ctx, S - 1)] * 3 + [0]
    assert max(range(S), key=lambda k: shard_bytes(ctx, k)) == S - 1  # the head stage bounds the upload
    assert ctx.engine.held_bytes() == 0


def test_loss_before_the_first_save_rolls_back_to_the_initial_weights(tmp_path):
    ctx = strategy_for(CheckpointRollback, tmp_path, every=50)
    initial = snapshot(ctx)
    step(ctx)
    step(ctx)

    reports = ctx.recover({0, 2})

    assert ctx.progress == 0 and ctx.data.position == 0
    assert_equal_state(ctx, initial)
    assert all(not opt.state for opt in ctx.engine.optimizers)  # Adam starts from scratch, as at step 0
    assert [(r.stage, r.lost_iterations, r.bytes_moved) for r in reports] == [
        (0, 2, shard_bytes(ctx, 0, adam=False)), (2, 2, shard_bytes(ctx, 2, adam=False))]
    assert all(r.details["rolled_back_to"] == 0 for r in reports)


def test_a_kill_mid_save_leaves_the_latest_checkpoint_usable(tmp_path, monkeypatch):
    ctx = strategy_for(CheckpointRollback, tmp_path, every=1)
    step(ctx)
    saved = snapshot(ctx)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        step(ctx)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "ckpt_0000002").exists()  # the interrupted save was never published
    (report,) = ctx.recover({3})
    assert report.details["rolled_back_to"] == 1 and ctx.progress == 1
    assert_equal_state(ctx, saved)
    strategy_for(CheckpointRollback, tmp_path)  # a restart clears the half-written file
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_latest_checkpoint_rolls_back_to_the_older_one(tmp_path, damage):
    """The latest checkpoint cannot be read (torn, a flipped byte, a missing shard): the rollback falls back to
    the older one that keep retained, says so in the record and names the damaged file; with none readable it
    fails with one sentence."""
    from checkfree.storage.checkpoints import NoReadableCheckpoint

    ctx = strategy_for(CheckpointRollback, tmp_path, every=2, keep=2)
    step(ctx)
    step(ctx)
    older = snapshot(ctx)
    step(ctx)
    step(ctx)  # checkpoints at progress 2 and 4
    shard = tmp_path / "checkpoints" / "ckpt_0000004" / "stage2.pt"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        shard.unlink()
    step(ctx)

    (report,) = ctx.recover({1})

    assert report.details["rolled_back_to"] == 2 and ctx.progress == 2 and report.lost_iterations == 3
    [damaged] = report.details["damaged"]
    assert damaged.startswith(str(shard))
    assert_equal_state(ctx, older)
    for checkpoint in (tmp_path / "checkpoints").iterdir():
        (checkpoint / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NoReadableCheckpoint, match=r"no checkpoint in .* is readable.*ckpt_0000004.*ckpt_0000002"):
        ctx.recover({1})


# --- redundant computation ---------------------------------------------------------------------------


def shadow(ctx: Driver, k: int) -> dict:
    return ctx.engine.held[Held(SHADOW, k, (k - 1) % S)]


def test_redundant_restores_a_lost_stage_exactly_and_training_goes_on_unchanged(tmp_path):
    reference, ctx = make_ctx(tmp_path / "reference"), strategy_for(RedundantComputation, tmp_path)
    reference_losses = [step(reference)[0] for _ in range(5)]
    losses = [step(ctx)[0] for _ in range(3)]
    before = snapshot(ctx)

    reports = ctx.recover({0, 2})  # not adjacent (stage 0's shadow is on stage 3): both come back from shadows

    assert_equal_state(ctx, before)
    assert [(r.stage, r.method, r.sources, r.coefficients) for r in reports] == [
        (0, "shadow", [3], [1.0]), (2, "shadow", [1], [1.0])]
    assert [r.bytes_moved for r in reports] == [shard_bytes(ctx, 0), shard_bytes(ctx, 2)]
    assert all(r.lost_iterations == 0 and not r.from_storage and r.strategy == "redundant" for r in reports)
    held = shadow(ctx, 2)["optimizer"]["state"][0]["exp_avg"].clone()
    losses += [ctx.step([ctx.data.next_batch(2) for _ in range(2)], upkeep=False)[0]]
    # No upkeep ran: the restored optimizer must not have written into the shadow it came from.
    assert torch.equal(shadow(ctx, 2)["optimizer"]["state"][0]["exp_avg"], held)
    ctx.upkeep(ctx.strategy.after_step(ctx.view()))
    losses += [step(ctx)[0]]
    assert losses == reference_losses
    assert_equal_state(ctx, snapshot(reference))


def test_redundant_rebuilds_the_shadow_the_lost_stage_held(tmp_path):
    ctx = strategy_for(RedundantComputation, tmp_path)
    step(ctx)
    ctx.recover({1})  # stage 1's node held stage 2's shadow: it is rebuilt from live stage 2
    step(ctx)
    before = snapshot(ctx)
    ctx.recover({2})
    assert_equal_state(ctx, before)


@pytest.mark.parametrize(("failed", "orphan", "holder"), [({1, 2}, 2, 1), ({0, 3}, 0, 3)])
def test_adjacent_losses_are_unrecoverable_by_default(tmp_path, failed, orphan, holder):
    ctx = strategy_for(RedundantComputation, tmp_path)
    step(ctx)
    ctx.iteration += 1
    with pytest.raises(UnrecoverableFailure) as error:
        ctx.plan(failed)
    message = str(error.value)
    assert f"stages {sorted(failed)} were lost at iteration 2" in message
    assert f"stage {orphan}'s only copy was its shadow on stage {holder}, lost too" in message
    assert "strategy.unrecoverable=reinit" in message


def test_adjacent_losses_reinit_when_asked(tmp_path):
    ctx = strategy_for(RedundantComputation, tmp_path, unrecoverable="reinit")
    step(ctx)
    before = snapshot(ctx)
    reports = ctx.recover({1, 2})
    assert [(r.stage, r.method, r.sources) for r in reports] == [(1, "shadow", [0]), (2, "reinit", [])]
    assert_equal_state(ctx, before, stages=[0, 1, 3])
    assert not ctx.engine.optimizers[2].state and ctx.engine.stage_lrs()[2] == LR
    live = ctx.engine.stages[2].state_dict()  # stage 2's new shadow (on the new stage 1) is the new stage 2
    assert all(torch.equal(shadow(ctx, 2)["weights"][n], t) for n, t in live.items())


def test_redundant_memory_is_one_more_model_and_optimizer(tmp_path):
    ctx = strategy_for(RedundantComputation, tmp_path)
    assert ctx.engine.held_bytes() == sum(shard_bytes(ctx, k, adam=False) for k in range(S))
    traffic = step(ctx)[1]
    assert traffic.shard_bytes == [] and traffic.sent == {}  # shadows are kept by computing, not sending
    model = sum(stage_param_counts(CFG))
    steps = sum(n_tensors(ctx, k) for k in range(S))
    assert ctx.engine.held_bytes() == 3 * 4 * model + 4 * steps


# --- registry and YAML -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"),
                         [("checkpoint", CheckpointRollback), ("redundant", RedundantComputation)])
def test_yaml_builds_the_strategy(name, cls):
    cfg = StrategyConfig(**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))
    assert cfg.name == name
    strategy = build_strategy(cfg, S)
    assert isinstance(strategy, cls) and strategy.schedule_name == "in_order"
