"""Failure models: same events for every strategy, the right rates, and traces replayed or rejected exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from omegaconf import ListConfig, OmegaConf

from checkfree.failure_models import build_failure_model, failing_stages, validate_failure_config
from checkfree.failure_models.base import FailureConfig, FailureEvent
from checkfree.failure_models.bernoulli import BERNOULLI_PRESETS
from checkfree.failure_models.trace_files import read_trace
from checkfree.run.config import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "failure"
S = 6


def run(model, iteration_seconds, horizon_s: float) -> list[FailureEvent]:
    """Drive ``model`` with fixed-length iterations until simulated time ``horizon_s``."""
    out, t, it = [], 0.0, 0
    while t < horizon_s:
        it += 1
        out += model.events(it, t, t + iteration_seconds)
        t += iteration_seconds
    return out


def poisson(h: float = 0.10, seed: int = 0, stages="all", n_stages: int = S):
    return build_failure_model(FailureConfig(name="poisson", hourly_rate=h, stages=stages), n_stages, seed)


def test_poisson_times_do_not_depend_on_how_time_is_sliced():
    horizon = 100 * 3600.0
    a = [e for e in run(poisson(seed=3), 60.0, horizon) if e.time_s < horizon]
    b = [e for e in run(poisson(seed=3), 97.0, horizon) if e.time_s < horizon]
    # Every arrival is reported, so any slicing gives the same list (it once kept one loss per stage per
    # window, and slicings agreed only where no two arrivals of a stage shared a window).
    assert len(a) > 20
    one_window = poisson(seed=3).events(1, 0.0, horizon)
    assert [(e.time_s, e.stage) for e in one_window] == [(e.time_s, e.stage) for e in a]
    assert [(e.time_s, e.stage) for e in a] == [(e.time_s, e.stage) for e in b]
    assert [e.iteration for e in a] == [math.floor(e.time_s / 60.0) + 1 for e in a]
    assert [e.iteration for e in b] == [math.floor(e.time_s / 97.0) + 1 for e in b]
    assert [e.iteration for e in a] != [e.iteration for e in b]
    assert poisson(seed=4).events(1, 0.0, horizon) != poisson(seed=3).events(1, 0.0, horizon)


def test_poisson_empirical_rate_matches_hourly_probability():
    hours = 2000
    expected = S * hours * -math.log(1 - 0.33)  # rate * time = -ln(0.67) per stage-hour = 0.4005 -> 4806
    for seed, window in ((1, 60.0), (2, 3600.0)):  # however long the windows: every arrival counts
        events = run(poisson(h=0.33, seed=seed), window, hours * 3600.0)
        assert abs(len(events) - expected) < 0.05 * expected
    # With one-hour windows the fraction of stage-hours with at least one loss is h itself.
    hit = {(e.stage, math.floor(e.time_s / 3600.0)) for e in events}
    assert abs(len(hit) - 0.33 * S * hours) < 0.05 * 0.33 * S * hours  # 3960 expected


def test_poisson_edge_cases():
    assert run(poisson(h=0.0), 3600.0, 1000 * 3600.0) == []
    events = run(poisson(h=0.9, stages="intermediate"), 60.0, 200 * 3600.0)
    assert {e.stage for e in events} == set(range(1, S - 1))
    # A stage that fails several times in one window is lost each time; events come sorted by (time, stage).
    events = poisson(h=0.9).events(1, 0.0, 50 * 3600.0)
    assert {e.stage for e in events} == set(range(S))
    assert abs(len(events) - S * 50 * -math.log(0.1)) < 0.2 * S * 50 * -math.log(0.1)  # 691 expected
    assert events == sorted(events, key=lambda e: (e.time_s, e.stage))
    # An arrival in a gap between windows is reported with the next window, never lost.
    model, reference = poisson(h=0.5, seed=7), run(poisson(h=0.5, seed=7), 10.0, 3600.0 * 50)
    first = reference[0]
    assert model.events(1, first.time_s + 1.0, first.time_s + 2.0)[0].time_s == first.time_s


def bernoulli(p: float = 0.05, seed: int = 0, **kw):
    return build_failure_model(FailureConfig(name="bernoulli", p=p, **kw), S, seed)


def test_bernoulli_events_depend_only_on_the_iteration():
    in_order = {it: bernoulli().events(it, 60.0 * it, 60.0 * it + 60.0) for it in range(1, 401)}
    model = bernoulli()
    for it in [*range(400, 0, -3), 7, 399]:  # backwards, strided, revisited, on one model
        assert [(e.stage, e.iteration) for e in model.events(it, 0.0, 1.0)] == [
            (e.stage, e.iteration) for e in in_order[it]]
    # A second window of the iteration just answered (the work resumed after an incident) draws nothing new.
    hit = next(it for it in in_order if in_order[it])
    assert model.events(hit, 0.0, 1.0) and model.events(hit, 1.0, 2.0) == []
    assert sum(map(len, in_order.values())) > 0
    assert in_order[5] == [FailureEvent(e.stage, 5, 300.0) for e in in_order[5]]
    other = bernoulli(seed=1)
    assert any(other.events(it, 60.0 * it, 60.0 * it + 60.0) != in_order[it] for it in in_order)


def test_bernoulli_empirical_rate_presets_and_masks():
    n_iter = 20_000
    model = bernoulli(p=0.05, seed=3)
    n = sum(len(model.events(it, 0.0, 1.0)) for it in range(1, n_iter + 1))
    assert abs(n - 0.05 * S * n_iter) < 0.05 * 0.05 * S * n_iter  # 6000 expected
    # The preset overrides p; restricting the stages keeps exactly the other stages' draws.
    preset = bernoulli(p=0.5, preset="500m_33", seed=3)
    assert BERNOULLI_PRESETS["500m_33"] == 0.01
    assert sum(len(preset.events(it, 0.0, 1.0)) for it in range(1, 2001)) < 0.02 * S * 2000
    masked = bernoulli(p=0.05, seed=3, stages=[1, 4])
    for it in range(1, 500):
        assert masked.events(it, 0, 1) == [e for e in model.events(it, 0, 1) if e.stage in (1, 4)]


def test_failing_stages_resolves_all_intermediate_and_lists():
    assert failing_stages(FailureConfig(stages="all"), 4) == [0, 1, 2, 3]
    assert failing_stages(FailureConfig(stages="intermediate"), 4) == [1, 2]
    assert failing_stages(FailureConfig(stages=ListConfig([3, 1])), 4) == [1, 3]  # a repeat is refused: test_config


def trace_model(path: Path, n_stages: int = S):
    return build_failure_model(FailureConfig(name="trace", path=str(path)), n_stages, seed=0)


def test_trace_json_and_csv_round_trip(tmp_path: Path):
    events = [FailureEvent(2, iteration=5), FailureEvent(1, time_s=130.5), FailureEvent(4, iteration=5),
              FailureEvent(2, iteration=9)]
    (tmp_path / "t.json").write_text(json.dumps([e.to_dict() for e in events]))
    (tmp_path / "t.csv").write_text("stage,iteration,time_s\n2,5,\n1,,130.5\n\n4,5,\n2,9,\n")
    assert read_trace(tmp_path / "t.json") == events
    assert read_trace(tmp_path / "t.csv") == events
    for name in ("t.json", "t.csv"):
        fired = run(trace_model(tmp_path / name), 60.0, 20 * 60.0)
        assert fired == [FailureEvent(1, 3, 130.5), FailureEvent(2, 5, 240.0), FailureEvent(4, 5, 240.0),
                         FailureEvent(2, 9, 480.0)]


def test_shipped_configs_and_traces_build():
    fields = {f.name for f in dataclasses.fields(FailureConfig)}
    for name in ("none", "poisson", "bernoulli", "trace"):
        raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        assert set(raw) == fields and raw["name"] == name
        if name == "trace":
            assert raw["path"] == "???"
            raw["path"] = str(CONF / "traces" / "reference_33.json")
        build_failure_model(FailureConfig(**raw), 7, seed=0)
    assert OmegaConf.load(CONF / "poisson.yaml").hourly_rate == 0.10
    assert read_trace(CONF / "traces" / "example.json") == [FailureEvent(2, iteration=5)]
    reference = [(39, 1), (128, 1), (148, 6), (176, 4), (395, 1), (481, 4), (482, 2)]
    assert [(e.iteration, e.stage) for e in read_trace(CONF / "traces" / "reference_33.json")] == reference


MALFORMED = [
    ("t.json", '[{"stage": 1,\n "iteration": }]', "line 2"),
    ("t.json", '{"stage": 1, "iteration": 2}', "JSON list"),
    ("t.json", "[1]", "record 0"),
    ("t.json", '[{"stage": 1, "iteration": 2}, {"iteration": 5}]', "record 1 has no 'stage'"),
    ("t.json", '[{"stage": 1, "iteration": 2, "time_s": 3.0}]', "record 0 has both"),
    ("t.json", '[{"stage": 1}]', "record 0 has neither"),
    ("t.json", '[{"stage": 1, "iteration": -1}]', "record 0 has iteration=-1"),
    ("t.json", '[{"stage": 1, "iteration": 0}]', "record 0 has iteration=0"),
    ("t.json", '[{"stage": 1, "time_s": -2.5}]', "record 0 has time_s=-2.5"),
    ("t.json", '[{"stage": 1, "time_s": NaN}]', "record 0 has time_s=nan"),
    ("t.json", '[{"stage": "two", "iteration": 1}]', "record 0 has stage='two'"),
    ("t.json", '[{"stage": 1.5, "iteration": 1}]', "record 0 has stage=1.5"),
    ("t.json", '[{"stage": -1, "iteration": 1}]', "record 0 has stage=-1"),
    ("t.json", '[{"stage": 1, "time": 3}]', "record 0 has unknown field"),
    ("t.csv", "", "line 1"),
    ("t.csv", "iteration\n5\n", "line 1"),
    ("t.csv", "stage,iteration,when\n1,2,3\n", "line 1"),
    ("t.csv", "stage,iteration\n1,5\nx,6\n", "line 3 has stage='x'"),
    ("t.csv", "stage,iteration\n1,5\n\n1,2,7\n", "line 4 has 3 fields"),
    ("t.csv", "stage,iteration,time_s\n1,5,3.0\n", "line 2 has both"),
    ("t.csv", "stage,iteration,time_s\n1,,\n", "line 2 has neither"),
    ("t.csv", "stage,time_s\n1,-4\n", "line 2 has time_s=-4.0"),
    ("t.csv", "stage,iteration\n,4\n", "line 2 has no 'stage'"),
    ("t.txt", "stage,iteration\n1,4\n", "extension '.txt'"),
]


@pytest.mark.parametrize("name,text,where", MALFORMED)
def test_malformed_trace_names_file_and_record(tmp_path: Path, name: str, text: str, where: str):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        validate_failure_config(FailureConfig(name="trace", path=str(path)), S)
    assert f"failure.path={path}" in str(err.value) and where in str(err.value)


@pytest.mark.parametrize("text,stages,where", [
    ('[{"stage": 1, "iteration": 2}, {"stage": 6, "iteration": 3}]', "all", "record 1 has stage 6"),
    ('[{"stage": 0, "time_s": 3.0}]', "intermediate", "record 0 has stage 0"),
    ('[{"stage": 2, "time_s": 3.0}]', [1, 3], "record 0 has stage 2"),
])
def test_trace_stages_outside_range_or_failing_stages_are_rejected(tmp_path: Path, text, stages, where):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        validate_failure_config(FailureConfig(name="trace", path=str(path), stages=stages), S)
    assert f"failure.path={path}" in str(err.value) and where in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    ({"name": "weibull"}, "failure.name='weibull'"),
    ({"hourly_rate": 1.5}, "failure.hourly_rate=1.5 is invalid: it is a per-stage (per-node with failure.unit=node) "
                           "probability of failing within an hour, allowed [0, 1)."),
    ({"hourly_rate": -0.1}, "failure.hourly_rate=-0.1"),
    ({"hourly_rate": "high"}, "failure.hourly_rate='high'"),
    ({"p": 1.0}, "failure.p=1.0"),
    ({"preset": "500m_7"}, "failure.preset='500m_7'"),
    ({"name": "trace"}, "failure.path=None"),
    ({"name": "trace", "path": "???"}, "failure.path='???'"),
    ({"name": "trace", "path": "/nonexistent/t.json"}, "failure.path=/nonexistent/t.json"),
    ({"iteration_seconds": 0}, "failure.iteration_seconds=0"),
    ({"stages": "edges"}, "failure.stages='edges'"),
    ({"stages": ListConfig([0, 9])}, "failure.stages=[0, 9] is invalid: allowed all, intermediate"),
    ({"stages": [1.5]}, "failure.stages=[1.5]"),
])
def test_validation_messages_name_key_and_value(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_failure_config(FailureConfig(**overrides), S)
    assert needle in str(err.value)


def test_a_failure_seed_below_zero_is_refused_at_the_gate_not_by_the_builder():
    """The one gate (validate_run_config) refuses seed + failure.seed_offset < 0 (test_config.py has its
    message); the builder trusts a validated config and builds."""
    from checkfree.run.runconfig import RunConfig, validate_run_config

    with pytest.raises(ConfigError, match=r"^failure.seed_offset=-1001 is invalid"):
        validate_run_config(RunConfig(seed=1000, failure=FailureConfig(seed_offset=-1001)))
    validate_run_config(RunConfig(seed=1001, failure=FailureConfig(seed_offset=-1001)))
    assert build_failure_model(FailureConfig(name="none"), S, seed=0).events(1, 0.0, 1e9) == []


def test_losses_far_apart_within_one_iteration_are_separate_incidents(tmp_path):
    """Losses less than a recovery's time apart strike together (chained); later ones strike a recovered
    pipeline; a stage hit again strikes again (its replacement), and an arrival during a recovery strikes
    when the recovery ends."""
    from checkfree.failure_models.base import FailureConfig
    from checkfree.simulation.failures import FailureDraws

    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"time_s": 50.0, "stage": 1}, {"time_s": 75.0, "stage": 2},
                                 {"time_s": 150.0, "stage": 3}, {"time_s": 170.0, "stage": 1},
                                 {"time_s": 185.0, "stage": 1}, {"time_s": 260.0, "stage": 4}]))
    draws = FailureDraws(FailureConfig(name="trace", path=str(trace)), 6, seed=0)
    draws.pending = {4}  # the numeric guard's stage: first, at the work's start

    def strike(t, end):
        incident = draws.next_incident(1, t, end, window_s=30.0)
        return None if incident is None else (incident.time_s, incident.stages, [r["stage"] for r in incident.records])

    assert strike(0.0, 300.0) == (0.0, [4], [4])
    assert strike(30.0, 300.0) == (50.0, [1, 2], [1, 2])       # 75 - 50 <= 30: chained
    assert strike(80.0, 300.0) == (150.0, [1, 3], [3, 1])      # 170 - 150 <= 30
    assert strike(180.0, 300.0) == (185.0, [1], [1])           # stage 1 again: its replacement is lost
    assert strike(215.0, 250.0) is None                        # the work ends before 260
    assert strike(280.0, 400.0) == (280.0, [4], [4])           # drawn at 260, during a recovery: strikes at 280
    assert strike(400.0, 900.0) is None
    # A stage hit twice within one window of 30 s: two incidents, the second one at once after the first.
    trace.write_text(json.dumps([{"time_s": 10.0, "stage": 2}, {"time_s": 20.0, "stage": 2}]))
    draws = FailureDraws(FailureConfig(name="trace", path=str(trace)), 6, seed=0)
    assert strike(0.0, 100.0) == (10.0, [2], [2])
    assert strike(40.0, 100.0) == (40.0, [2], [2])
    # A window of 0 s: every loss at a distinct time is its own incident.
    trace.write_text(json.dumps([{"time_s": 10.0, "stage": 2}, {"time_s": 10.0, "stage": 3},
                                 {"time_s": 11.0, "stage": 4}]))
    draws = FailureDraws(FailureConfig(name="trace", path=str(trace)), 6, seed=0)
    assert draws.next_incident(1, 0.0, 100.0, 0.0).stages == [2, 3]
    assert draws.next_incident(1, 10.0, 100.0, 0.0).stages == [4]
