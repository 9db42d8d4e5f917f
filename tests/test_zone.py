"""failure=zone: one draw loses every eligible stage at one location of the geo network, reproducibly, and the
local and process engines run it bit for bit alike."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from checkfree.failure_models import build_failure_model, validate_failure_config
from checkfree.failure_models.base import FailureConfig
from checkfree.run.config import ConfigError
from checkfree.run.runlog import deterministic_view, read_metrics
from checkfree.simulation.failures import FailureDraws
from checkfree.train import train


def zone(n_stages: int = 14, seed: int = 0, **cfg):
    return build_failure_model(FailureConfig(name="zone", **{"hourly_rate": 0.5, **cfg}), n_stages, seed)


def moments(events) -> dict[float, list[int]]:
    """time_s -> the stages lost at that moment."""
    out: dict[float, list[int]] = {}
    for e in events:
        out.setdefault(e.time_s, []).append(e.stage)
    return out


def test_one_draw_loses_a_whole_location():
    events = zone().events(1, 0.0, 3 * 3600.0)
    assert [(e.stage, round(e.time_s, 1)) for e in events[:6]] == [(2, 1271.1), (9, 1271.1), (5, 1945.4),
                                                                    (12, 1945.4), (5, 4396.9), (12, 4396.9)]
    assert len(events) == 16
    # Stage k is at location k % 7: every moment loses exactly the stages of one location, all of them.
    assert all(len(stages) == 2 and stages[1] == stages[0] + 7 for stages in moments(events).values())
    # Only eligible stages: under "intermediate" location 0 holds stage 7 alone, location 6 stage 6 alone.
    lone = zone(stages="intermediate").events(1, 0.0, 10 * 3600.0)
    assert {tuple(s) for s in moments(lone).values()} <= {(7,), (6,), (1, 8), (2, 9), (3, 10), (4, 11), (5, 12)}
    assert {0, 13}.isdisjoint(e.stage for e in lone)


def test_first_arrival_is_the_locations_own_exponential_draw():
    """Location z draws from default_rng([seed + seed_offset, 2, z]) with mean 1 / rate, rate = -ln(1-h)/3600."""
    rate = -math.log1p(-0.5) / 3600.0
    expected = float(np.random.default_rng([0 + 1000, 2, 0]).exponential(1.0 / rate))
    [first, *_] = zone(n_stages=8, stages=[0, 7]).events(1, 0.0, 1e6)
    assert first.time_s == expected and first.stage == 0


def test_reproducible_at_a_seed_and_independent_of_the_windows():
    whole = zone(seed=3).events(1, 0.0, 7200.0)
    assert whole == zone(seed=3).events(1, 0.0, 7200.0)
    assert [(e.stage, e.time_s) for e in whole] != [(e.stage, e.time_s) for e in zone(seed=4).events(1, 0.0, 7200.0)]
    sliced, model = [], zone(seed=3)
    for i in range(72):
        sliced += model.events(i + 1, 100.0 * i, 100.0 * (i + 1))
    assert [(e.stage, e.time_s) for e in sliced] == [(e.stage, e.time_s) for e in whole]


def test_resume_continues_the_same_draws():
    model = zone(seed=1)
    model.events(1, 0.0, 3600.0)
    state = model.state_dict()
    rest = model.events(2, 3600.0, 20000.0)
    again = zone(seed=1)
    again.load_state_dict(state)
    assert again.events(2, 3600.0, 20000.0) == rest
    with pytest.raises(ValueError, match="saved zone model drew for locations"):
        zone(n_stages=3, seed=1).load_state_dict(state)


def test_the_yaml_is_a_valid_zone_config():
    yaml = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/failure/zone.yaml"))
    validate_failure_config(FailureConfig(**yaml), 14)
    assert yaml["name"] == "zone" and yaml["hourly_rate"] == 0.10


def test_a_location_is_one_incident_and_other_models_keys_are_refused():
    draws = FailureDraws(FailureConfig(name="zone", hourly_rate=0.99, stages=[0, 7], seed_offset=1024), 8, 0)
    incident = draws.next_incident(1, 0.0, 100.0)
    assert incident.stages == [0, 7] and incident.time_s == pytest.approx(11.5, abs=0.05)
    with pytest.raises(ConfigError, match=r"^failure.p=0.1 is invalid: only failure=bernoulli reads it"):
        validate_failure_config(FailureConfig(name="zone", p=0.1), 8)


def test_zone_losses_are_bitwise_equal_on_both_engines(small_run, tmp_path):
    """Stages 0 and 7 share Australia: seed_offset 1024 loses both at 11.5 s and again at 185.1 s (simulated)."""
    sections = {"model": {"n_stages": 8}, "strategy": {"name": "checkfree_plus"},
                "failure": {"name": "zone", "hourly_rate": 0.99, "stages": [0, 7], "seed_offset": 1024},
                "trainer": {"iterations": 6, "eval_every": 3}}
    local = train(small_run(**sections), tmp_path / "local")
    process = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20}), tmp_path / "process")
    assert local["status"] == process["status"] == "completed"
    assert [(f["stage"], round(f["time_s"], 1)) for f in local["failures"]] == [(0, 11.5), (7, 11.5), (0, 185.1),
                                                                               (7, 185.1)]
    a = deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))
    b = deterministic_view(read_metrics(tmp_path / "process" / "metrics.jsonl"))
    assert a == b
    for key in ("failures", "recoveries", "lost_iterations", "memory_overhead_bytes", "final_val_loss"):
        assert process[key] == local[key], key
