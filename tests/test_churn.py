"""Node churn from real pool traces: the readers and importers (checkfree.failure_models.churn_files), the pool's
rules (checkfree.failure_models.churn), their refusals, and a run that meets them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkfree.failure_models.base import FailureConfig, Nodes
from checkfree.failure_models.churn import ChurnFailures
from checkfree.failure_models.churn_files import Change, main, read_pool_trace, write_events
from checkfree.run.config import ConfigError
from checkfree.train import build_run

BAMBOO = Path(__file__).resolve().parents[1] / "conf" / "failure" / "traces" / "bamboo"


def pool_file(path: Path, rows: list[tuple[float, str, str]]) -> str:
    path.write_text("time_s,node,event\n" + "".join(f"{t},{n},{e}\n" for t, n, e in rows))
    return str(path)


def test_bamboo_s_traces_are_read_as_published():
    p3 = read_pool_trace(BAMBOO / "p3-trace.csv", "bamboo")
    assert len(p3) == 344 and p3[0] == Change(0.0, "node1", True)
    assert p3[18] == Change(60.0, "node19", True)  # "60000,add,node19": milliseconds
    assert p3[-1] == Change(40920.0, "node172", False)
    assert sum(not c.up for c in p3) == 167
    g4dn = read_pool_trace(BAMBOO / "g4dn-trace.csv", "bamboo")
    assert len(g4dn) == 153 and g4dn[0] == Change(480.0, "node1", True)  # the pool is still coming up
    assert g4dn[-1] == Change(38760.0, "node76", False)


def test_skypilot_counts_become_nodes_the_latest_started_going_first(tmp_path):
    trace = tmp_path / "sky.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [2, 3, 1, 1, 2]}))
    assert read_pool_trace(trace, "skypilot") == [
        Change(0.0, "sky0", True), Change(0.0, "sky1", True), Change(600.0, "sky2", True),
        Change(1200.0, "sky2", False), Change(1200.0, "sky1", False), Change(2400.0, "sky3", True)]


def test_an_imported_trace_round_trips_through_our_format(tmp_path, capsys):
    out = tmp_path / "p3.csv"
    assert main(["bamboo", str(BAMBOO / "p3-trace.csv"), str(out)]) == 0
    assert "344 changes of 177 nodes" in capsys.readouterr().out
    assert read_pool_trace(out, "events") == read_pool_trace(BAMBOO / "p3-trace.csv", "bamboo")
    write_events([Change(1.5, "a", True)], tmp_path / "one.csv")
    assert (tmp_path / "one.csv").read_text() == "time_s,node,event\n1.5,a,up\n"


@pytest.mark.parametrize("fmt, text, message", [
    ("events", "time,node,event\n0,a,up\n", r"line 1 has header 'time,node,event'; allowed 'time_s,node,event'"),
    ("events", "time_s,node,event\n0,a,up\n5,a,sideways\n", r"line 3 has event 'sideways'; allowed up or down"),
    ("events", "time_s,node,event\n10,a,up\n5,b,up\n", r"line 3 is at 5 s, before the line before it \(10 s\)"),
    ("events", "time_s,node,event\n0,a,up\n5,b,down\n", r"line 3 takes node 'b' down, but it was never added"),
    ("events", "time_s,node,event\n0,a,up\n5,a,down\n6,a,down\n", r"line 4 takes node 'a' down, but it has gone "
                                                                   r"down already"),
    ("events", "time_s,node,event\n0,a,up\n5,a,up\n", r"line 3 brings node 'a' up, but it is up already"),
    ("events", "time_s,node,event\n", r"holds no change, so there is no pool to train on"),
    ("bamboo", "0,add\n", r"line 1 has 2 field\(s\) \('0,add'\); allowed 3: time_ms,add\|remove,nodeN"),
    ("bamboo", "0,join,node1\n", r"line 1 has action 'join'; allowed add or remove"),
    ("bamboo", "-5,add,node1\n", r"line 1 has time '-5'; allowed finite milliseconds >= 0"),
])
def test_a_bad_pool_trace_is_refused_in_one_sentence(tmp_path, fmt, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_pool_trace(path, fmt)


def test_a_bad_skypilot_file_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": [1, 2]}))
    with pytest.raises(ConfigError, match=r'must be \{"metadata": \{"gap_seconds": G > 0\}'):
        read_pool_trace(path, "skypilot")
    path.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, -2]}))
    with pytest.raises(ConfigError, match=r"data\[1\] is -2; allowed a count of live instances >= 0"):
        read_pool_trace(path, "skypilot")


# 2 slots, a pool of exactly two nodes at the start (both in slots, whatever the seeded order), then:
POOL = [(0, "a", "up"), (0, "b", "up"),
        (100, "a", "down"),            # a's slot waits: no spare
        (150, "c", "up"),              # ... and c fills it
        (200, "b", "down"),            # b's slot waits
        (300, "d", "up"),              # ... d fills it
        (400, "e", "up"),              # a spare
        (450, "c", "down"),            # c's slot (a's before) is filled by the spare e at once
        (1000, "f", "up")]             # the end of the trace


def churn(tmp_path, rows=POOL, n_stages=2, replicas=1, seed=0) -> ChurnFailures:
    path = pool_file(tmp_path / "pool.csv", rows)
    return ChurnFailures.build(FailureConfig(name="churn", path=path), n_stages, [0, 1], seed, Nodes(replicas))


def test_the_pool_fills_a_vacancy_with_a_spare_at_once_or_with_the_next_node_to_come(tmp_path):
    model = churn(tmp_path)
    events = model.events(1, 0.0, 999.0)
    assert [e.time_s for e in events] == [100.0, 200.0, 450.0]
    slot = [e.replica * 2 + e.stage for e in events]
    assert slot[0] != slot[1] and slot[2] == slot[0]  # c took a's slot, and e took it from c
    assert model.filled_at(slot[0], 100.0) == 150.0
    assert model.filled_at(slot[1], 200.0) == 300.0
    assert model.filled_at(slot[2], 450.0) == 450.0
    assert model.counts() == {"trace_passes": 1, "spares_used": 1, "vacancies_waited": 2}
    with pytest.raises(ValueError, match="the pool lost no node of slot"):
        model.filled_at(slot[1], 100.0)


def test_a_spare_that_goes_down_in_the_same_moment_fills_no_slot(tmp_path):
    """a and b hold the 2 slots, c waits as a spare; at 100 s a and c go down together (a first in the file): c
    never fills a's slot (it would be lost at once, a second loss of the slot at 100 s), the vacancy waits for d."""
    rows = [(0, "a", "up"), (0, "b", "up"), (50, "c", "up"), (100, "a", "down"), (100, "c", "down"),
            (200, "d", "up"), (1000, "e", "up")]
    model = churn(tmp_path, rows)
    events = model.events(1, 0.0, 999.0)
    assert [e.time_s for e in events] == [100.0]
    assert model.filled_at(events[0].replica * 2 + events[0].stage, 100.0) == 200.0
    assert model.counts() == {"trace_passes": 1, "spares_used": 0, "vacancies_waited": 1}


def test_a_short_trace_repeats_from_seeded_moments_with_enough_nodes(tmp_path):
    model = churn(tmp_path)
    events = model.events(1, 0.0, 10_000.0)
    assert model.counts()["trace_passes"] >= 10  # passes are at most 1000 s long
    # Each further pass starts where at least 2 nodes are up and the trace goes on: 0, 150, 300, 400 or 450 s;
    # its losses fall at the trace's own gaps from there.
    starts = model.pass_starts[1:]
    assert starts[0] == 1000.0 and all(b > a for a, b in zip(starts, starts[1:]))
    for e in events:
        slot = e.replica * 2 + e.stage
        assert model.filled_at(slot, e.time_s) >= e.time_s
    again = churn(tmp_path).events(1, 0.0, 10_000.0)
    assert again == events  # a function of the trace and the seed
    other = churn(tmp_path, seed=1).events(1, 0.0, 10_000.0)
    assert [e.time_s for e in other] != [e.time_s for e in events] or \
        [e.stage for e in other] != [e.stage for e in events]


def test_a_pool_too_small_for_the_run_is_refused_before_any_work(small_run, tmp_path):
    path = pool_file(tmp_path / "p.csv", [(0, "a", "up"), (0, "b", "up"), (10, "c", "up"), (20, "a", "down")])
    with pytest.raises(ConfigError, match=r"never has more than 3 node\(s\) up, fewer than the run's 4 node slots "
                                          r"\(model.n_stages=4 x engine.replicas=1\)"):
        small_run(failure={"name": "churn", "path": path})
    with pytest.raises(ConfigError, match=r"failure.stages='intermediate' is invalid: a pool trace strikes"):
        small_run(failure={"name": "churn", "path": path, "stages": "intermediate"})


def test_a_bad_trace_on_the_command_line_is_one_sentence_and_writes_nothing(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("time_s,node,event\n0,a,up\n5,b,down\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "checkfree.train", f"hydra.run.dir={tmp_path / 'run'}",
                           "failure=churn", f"failure.path={path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - start < 30
    assert "line 3 takes node 'b' down, but it was never added" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_stage_whose_node_has_no_spare_waits_for_the_next_node_of_the_pool(small_run, tmp_path):
    """4 stages on a pool of exactly 4 nodes: one goes down at 100 s and the next comes at 2100 s, so the pipeline
    stands still (engine.no_replacement=wait) from the end of the 30 s recovery until then: 1,970 s."""
    rows = [(0, n, "up") for n in "abcd"] + [(100, "b", "down"), (2100, "e", "up"), (90000, "f", "up")]
    cfg = small_run(failure={"name": "churn", "path": pool_file(tmp_path / "p.csv", rows)},
                    strategy={"name": "checkfree_plus"},  # the lost node may hold an edge stage
                    network={"name": "single_cluster", "bandwidth_Bps": 1e12},
                    trainer={"clock": "paper_table2", "paper_T": 500, "iterations": 4, "eval_every": 4})
    summary = build_run(cfg, tmp_path / "run").run()
    assert (summary["node_losses"], summary["stage_losses"], summary["n_recoveries"]) == (1, 1, 1)
    assert summary["waiting_sim_s"] == pytest.approx(2100.0 - 100.0 - 30.0)
    assert (summary["vacancies_waited"], summary["spares_used"], summary["trace_passes"]) == (1, 0, 1)
    assert summary["failures"][0]["replaced_at_s"] == 2100.0
