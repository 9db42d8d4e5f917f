"""trainer.compile: every stage's training forward and backward through torch.compile (inductor, on the CPU
here) computes the eager math up to float rounding, and a recovery compiles nothing new.

One tiny model, one schedule, a few steps: the cost of this file is inductor compiling three graphs (embedding,
body, head) forward and backward once; everything after that runs the compiled code.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from checkfree.model.llama import build_stages
from checkfree.model.presets import preset
from checkfree.pipeline import LocalEngine
from checkfree.recovery import StrategyConfig, build_strategy
from tests.conftest import Driver, random_batches, small_run_dict

LOSS_TOL = 1e-5
"""Compiled and eager losses (about ln 64 = 4.2) may differ by this much: inductor fuses and reorders float
sums (a rounding of ~1e-7 relative per op), and five steps at lr 1e-3 cannot grow that past 1e-5. (Measured
here: equal to the last printed digit.)"""
WEIGHT_TOL = 5e-5
"""On every weight after the steps and the recovery: Adam divides by sqrt(v) + eps, so a gradient component
near zero turns its rounding difference into an update difference of up to lr * rounding / eps; 5e-5 is 5 %
of one update of lr = 1e-3, where a wrong compiled op would be off by whole updates. (Measured: 2.8e-6 on one
2-core machine, 1.25e-5 on another, whose inductor vectorises the reductions differently.)"""


def drivers(tmp_path):
    cfg = preset("tiny").with_vocab(64)
    made = {}
    for compiled in (False, True):
        engine = LocalEngine(build_stages(cfg, seed=0), lr=1e-3, compile=compiled)
        made[compiled] = Driver(engine, build_strategy(StrategyConfig(name="checkfree"), cfg.n_stages), 1e-3,
                                tmp_path / str(compiled))
    return cfg, made[False], made[True]


def test_compiled_stages_equal_eager_and_a_recovery_compiles_nothing(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    cfg, eager, compiled = drivers(tmp_path)
    batches = [random_batches(2, 2, cfg.seq_len, cfg.vocab_size, seed=s) for s in range(5)]
    for b in batches[:3]:
        (a, _), (c, _) = eager.step(b), compiled.step(b)
        assert abs(a - c) <= LOSS_TOL, (a, c)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3  # embedding, body (one graph for all four stages), head

    eager.iteration += 1
    compiled.iteration += 1
    [report] = compiled.recover({2})
    # The gradient norms that weight the average differ by the sums' rounding (~1e-7 relative; exactly equal on
    # one machine, not on another whose inductor vectorises the reductions differently): so do the weights.
    assert eager.recover({2})[0].coefficients == pytest.approx(report.coefficients, rel=1e-5, abs=0)
    # Nothing may compile from here on: a recompile raises, and the graph count must stay where it was.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in batches[3:]:
            (a, _), (c, _) = eager.step(b), compiled.step(b)
            assert abs(a - c) <= LOSS_TOL, (a, c)
    assert counters["stats"]["unique_graphs"] == graphs
    for k, (x, y) in enumerate(zip(eager.engine.stages, compiled.engine.stages)):
        for (name, u), v in zip(x.state_dict().items(), y.state_dict().values()):
            assert (u - v).abs().max().item() <= WEIGHT_TOL, (k, name)
    assert all(c.compiled for c in compiled.engine.computes.values()) and not any(c.compiled for c in eager.engine.computes.values())


def test_trainer_compile_reaches_every_stage(data_cache):
    """trainer.compile=true from the config to each StageCompute (the local engine; the process engine hands
    it on in its WorkerSpec)."""
    from checkfree.run.runconfig import load_run_config
    from checkfree.train import build_engine

    def engine(**sections):
        cfg = load_run_config(small_run_dict(data_cache, **sections))
        return build_engine(cfg, cfg.model.with_vocab(300), torch.device("cpu"))

    for flag in (True, False):
        assert [c.compiled for c in engine(trainer={"compile": flag}).computes.values()] == [flag] * 4
    spec = engine(trainer={"compile": True}, engine={"name": "distributed"}).spec
    assert spec.compile is True and spec.backend == "gloo"
