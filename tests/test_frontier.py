"""experiments/frontier.py on hand-made runs: the Pareto frontier, each run's figures and the report's rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import experiment

ROOT = Path(__file__).resolve().parent.parent
NO_FAILURE_H = 92.12 * 10_000 / 3600  # the paper's CheckFree iteration at 16 %/h, 10,000 iterations: 255.9 h


def summary(strategy: str, seed: int, hours: float | None, memory: list[float], moved: float, mbps: float = 56,
            encoding: str = "int8") -> dict:
    return {"strategy": strategy, "seed": seed, "status": "completed", "total_wall_time_s": 60.0,
            "config": {"strategy": {"name": strategy, "encoding": encoding},
                       "network": {"bandwidth_Bps": mbps * 1e6 / 8}},
            "time_to_target_interp_s": hours * 3600 if hours is not None else None,
            "iterations_to_target_interp": 500.0 if hours is not None else None,
            "total_sim_time_s": (hours or 400.0) * 3600, "memory_overhead_priced_bytes_per_node": memory,
            "moved_priced_bytes": moved, "n_failures": 10}


def test_the_frontier_keeps_what_nothing_beats_on_both_memory_and_hours():
    frontier = experiment("frontier")
    points = [("none", 0.0, 2.0), ("tie", 0.0, 2.5), ("small", 0.1, 1.5), ("worse", 0.5, 1.6), ("big", 1.0, 1.1),
              ("as_big_slower", 1.0, 1.2)]
    assert frontier.pareto(points) == ["none", "small", "big"]
    assert frontier.pareto([*points, ("big_twin", 1.0, 1.1), ("unknown", float("nan"), 0.5)]) == [
        "none", "small", "big", "big_twin"]


def test_each_run_s_figures_and_the_report_rows(tmp_path):
    frontier = experiment("frontier")
    runs = [summary("checkfree", s, h, [0.131e9, 0.0], 0.5e9 * h) for s, h in enumerate((400.0, 420.0))]
    runs += [summary("compressed_snapshot", s, h, [0.067e9, 0.1e9], 2e9 * h) for s, h in enumerate((281.5, 300.0))]
    runs += [summary("snapshot_restore", 0, 270.0, [1.2e9, 0.8e9], 20e9 * 270.0),
             summary("snapshot_restore", 1, None, [1.2e9, 0.8e9], 20e9 * 400.0)]
    frame = frontier.records(runs, T=1000)
    int8 = frame[frame.recovery == "compressed_int8"].iloc[0]
    assert int8.memory_gb_per_node == pytest.approx(0.1) and int8.moved_gb_per_hour == pytest.approx(2.0)
    assert int8.hours_to_target == pytest.approx(281.5) and int8.iterations_to_target_over_T == pytest.approx(0.5)
    rows = {r["recovery"]: r for r in frontier.summary_rows(frame)}
    assert rows["compressed_int8"]["over_T"] == pytest.approx([281.5 / NO_FAILURE_H, 300.0 / NO_FAILURE_H])
    assert (rows["snapshot_restore"]["runs"], rows["snapshot_restore"]["reached"]) == (2, 1)
    text = frontier.report(frame, 1000, 3.671, tmp_path, None, 2)
    # CheckFree (0.131 GB, 1.60 T) and the int8 snapshot (0.100 GB, 1.14 T) are on the frontier: the latter has
    # less memory and fewer hours, so CheckFree is not; snapshot restore (1.2 GB, 1.06 T) is.
    assert "| checkfree | 410 ± 127 | 1.60 ± 0.50 | 0.131 | 0.50 |  |" in text
    assert "| compressed_int8 | 291 ± 118 | 1.14 ± 0.46 | 0.100 | 2.00 | yes |" in text
    assert "| snapshot_restore | 270 | 1.06 (1/2) | 1.200 | 20.00 | yes |" in text
    assert (tmp_path / "frontier.md").read_text() == text


def test_every_frontier_point_keeps_its_run_directory_number_when_recoveries_are_added():
    """The first six recoveries keep the numbers their committed runs were made under (seed-major, two bandwidths,
    six a block); the fitted rebuilds added after them are numbered from 1000, 20 a block, whatever ``--recoveries``
    selects."""
    frontier = experiment("frontier")
    grid = frontier.points(list(frontier.RECOVERIES), [56, 1778], 3)
    assert len(grid) == len({i for _, i, _ in grid}) == 3 * 2 * 8
    assert sorted(i for _, i, _ in grid if i < 1000) == list(range(36))
    by = {" ".join(o): i for _, i, o in grid}
    # as committed: results/frontier/runs/table2/013_checkfree_plus_7e+06_7e+06_1
    assert by["strategy=checkfree_plus network.bandwidth_Bps=7e+06 network.storage_bandwidth_Bps=7e+06 seed=1"] == 13
    fit = [i for _, i, o in grid if o[0] == "strategy=checkfree_fit"]
    assert fit == [1000 + 20 * block + j for block in range(6) for j in range(2)]
    assert [i for _, i, _ in frontier.points(["checkfree_fit_b8_n50"], [56, 1778], 2)] == [1001, 1021, 1041, 1061]
    assert [i for _, i, _ in frontier.points(["checkfree_fit_b8_n50", "snapshot_restore"], [56], 2)] == [
        1001, 4, 1041, 16]  # one bandwidth of the two: the same directories
