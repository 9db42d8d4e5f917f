"""``copy_next``, added as the README's recipe says, runs on both engines: the recovered stage is a copy of
its right-hand neighbour, bit for bit, and the two engines train identically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from checkfree.recovery import StrategyConfig, build_strategy
from checkfree.run.runlog import deterministic_view, read_metrics
from tests.conftest import captured_run

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def test_yaml_builds_the_strategy():
    cfg = StrategyConfig(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / "copy_next.yaml")))
    assert build_strategy(cfg, 4).name == "copy_next"


def test_copy_next_on_both_engines(small_run, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 3, "stage": 1}]))
    sections = {"strategy": {"name": "copy_next"}, "failure": {"name": "trace", "path": str(trace)},
                "trainer": {"iterations": 5, "eval_every": 5}}
    sources: dict[str, dict] = {}
    runs = {}
    for engine in ("local", "distributed"):
        run = captured_run(small_run(**sections, engine={"name": engine, "timeout_s": 20}), tmp_path / engine)
        # The hand-computed answer: stage 2's blocks just before stage 1 is lost.
        run.trainer.engine.hooks["lose"] = lambda n, e, key=engine: sources.update(
            {key: {k: v.clone() for k, v in e.stage_states()[2].items() if k.startswith("layers.")}})
        assert run.run()["status"] == "completed"
        runs[engine] = run

    for engine, run in runs.items():
        rebuilt = run.trainer.engine.captured[1]
        assert sources[engine].keys() == {k for k in rebuilt if k.startswith("layers.")}
        for key, tensor in sources[engine].items():
            assert torch.equal(rebuilt[key], tensor), (engine, key)
    for key, tensor in runs["local"].trainer.engine.captured[1].items():
        assert torch.equal(runs["distributed"].trainer.engine.captured[1][key], tensor), key
    a, b = (deterministic_view(read_metrics(tmp_path / e / "metrics.jsonl")) for e in ("local", "distributed"))
    assert a == b
    [rec] = a[3]["recoveries"]
    assert (rec["stage"], rec["method"], rec["sources"], rec["coefficients"]) == (1, "copy", [2], [1.0])
