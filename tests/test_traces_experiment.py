"""experiments/traces.py without training: its traces and their controls, the grid's indices, the labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.scripts import assert_refused, experiment

ROOT = Path(__file__).resolve().parent.parent


def test_a_point_keeps_its_directory_whatever_subset_is_run():
    traces = experiment("traces")
    rates = {(t.name, r): 0.5 for t in traces.TRACES for r in traces.REPLICAS}
    whole = {i: o for pts, _ in traces.points(traces.TRACES, list(traces.sources_of(traces.TRACES)),
                                              list(traces.STRATEGIES), 2, rates) for _, i, o in pts}
    assert sorted(whole) == list(range(2 * 4 * 2 * 4))  # seeds x sources x R x strategies
    part = traces.points(traces.TRACES, ["g4dn_iid"], ["checkpoint"], 2, rates)
    [(points, extra)] = part
    assert extra == []  # a control reads no trace
    assert [(i, o) for _, i, o in points] == [(i, whole[i]) for i in (27, 31, 59, 63)]  # R = 1, 2 at seeds 0, 1
    assert points[1][2] == ["failure.unit=node", f"failure.hourly_rate={1 - math.exp(-0.5):.6f}",
                            "engine.replicas=2", "strategy=checkpoint", "seed=0"]
    [(points, extra)] = traces.points(traces.TRACES, ["p3"], ["checkfree"], 1, rates)
    assert extra == [f"failure.path={ROOT / 'conf/failure/traces/bamboo/p3-trace.csv'}", "failure.hourly_rate=0.16"]
    assert [o for _, _, o in points][0][:3] == ["failure=churn", "failure.name=churn", "failure.format=bamboo"]


def test_a_run_is_labelled_by_its_trace_or_by_the_trace_whose_rate_its_control_has():
    traces = experiment("traces")
    rates = {("p3", 1): 0.588, ("p3", 2): 0.585, ("g4dn", 1): 0.483, ("g4dn", 2): 0.502}
    churn = {"config": {"failure": {"name": "churn", "path": "/elsewhere/g4dn-trace.csv"}, "engine": {"replicas": 2}}}
    iid = {"config": {"failure": {"name": "poisson", "hourly_rate": 1 - math.exp(-0.585)}, "engine": {"replicas": 2}}}
    other = {"config": {"failure": {"name": "poisson", "hourly_rate": 0.16}, "engine": {"replicas": 1}}}
    assert traces.source_of(churn, traces.TRACES, rates) == "g4dn"
    assert traces.source_of(iid, traces.TRACES, rates) == "p3_iid"
    assert traces.source_of(other, traces.TRACES, rates) == "poisson 0.16"


@pytest.mark.parametrize("flag, message", [
    (["--traces", "a_iid=x.csv"], "NAME=PATH[@FORMAT] with NAME a word not ending in _iid"),
    (["--traces", "a=conf/failure/traces/example.json@events"], "its trace cannot be replayed here"),
    (["--traces", "a=conf/failure/traces/bamboo/p3-trace.csv,a=conf/failure/traces/bamboo/g4dn-trace.csv"],
     "each name and each file name once"),
    (["--sources", "p3,p3"], "a comma-separated list of p3, g4dn, p3_iid, g4dn_iid, each once"),
    (["--strategies", "redundant"], "a comma-separated list of checkfree, checkfree_plus, snapshot_restore"),
])
def test_bad_flags_are_one_sentence_before_any_work(tmp_path, flag, message):
    assert_refused("traces", tmp_path / "out", flag, message)
