"""experiments/crossover.py's statistics on hand-made runs: paired speed-ups, the crossover bandwidth and its
uncertainty (each seed's own crossing)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from tests.scripts import experiment

ROOT = Path(__file__).resolve().parent.parent

# Paper hours to target: CheckFree 100 everywhere, CheckFree+ 120 (so CheckFree is the faster variant), and the
# baseline's hours per seed at 10 / 100 / 1000 Mb/s (speed-ups 2.0 / 0.8 / 0.5, 1.5 / 1.2 / 0.5, 3.0 / 0.9 / 0.6).
BASELINE_HOURS = {0: (200, 80, 50), 1: (150, 120, 50), 2: (300, 90, 60)}
BANDWIDTHS = (10, 100, 1000)


def frame(missed: set[tuple[int, float]] = frozenset()) -> pd.DataFrame:
    """One row per run; ``missed``: (seed, bandwidth) points where the baseline did not reach the target."""
    rows = []
    for seed, hours in BASELINE_HOURS.items():
        for b, h in zip(BANDWIDTHS, hours):
            reached = (seed, b) not in missed
            rows += [{"strategy": "async_checkpoint", "bandwidth_mbps": b, "seed": seed, "reached": reached,
                      "hours_to_target": h if reached else None},
                     {"strategy": "checkfree", "bandwidth_mbps": b, "seed": seed, "reached": True,
                      "hours_to_target": 100.0},
                     {"strategy": "checkfree_plus", "bandwidth_mbps": b, "seed": seed, "reached": True,
                      "hours_to_target": 120.0}]
    return pd.DataFrame(rows)


def log_interpolated(b0: float, m0: float, b1: float, m1: float) -> float:
    return b0 * (b1 / b0) ** ((1 - m0) / (m1 - m0))


def test_speedups_are_paired_by_seed_against_the_faster_checkfree_variant():
    xo = experiment("crossover")
    assert xo.paired_by_seed(frame(), "async_checkpoint", 10) == {0: 2.0, 1: 1.5, 2: 3.0}
    assert xo.paired_by_seed(frame({(0, 100)}), "async_checkpoint", 100) == {1: 1.2, 2: 0.9}


def test_the_crossover_and_each_seed_s_own_crossing_give_its_uncertainty():
    xo = experiment("crossover")
    assert xo.log_crossing([(10, 2.0), (100, 0.8), (1000, 0.5)]) == pytest.approx(
        (log_interpolated(10, 2.0, 100, 0.8), 10, 100))
    assert xo.log_crossing([(10, 2.0), (100, math.nan), (1000, 0.5)])[0] == pytest.approx(
        log_interpolated(10, 2.0, 1000, 0.5))  # a missing point is skipped
    assert xo.log_crossing([(10, 2.0), (100, 1.5)]) is None
    assert xo.log_crossing([(10, 2.0), (100, 1.0), (1000, 0.5)]) == pytest.approx((100, 10, 100))  # exact 1: a crossing

    seeds = xo.seed_crossings(frame(), "async_checkpoint")
    expected = [log_interpolated(10, 2.0, 100, 0.8), log_interpolated(100, 1.2, 1000, 0.5),
                log_interpolated(10, 3.0, 100, 0.9)]
    assert list(seeds) == [0, 1, 2] and list(seeds.values()) == pytest.approx(expected)

    mean = log_interpolated(10, 6.5 / 3, 100, 2.9 / 3)  # the mean speed-ups 2.167 and 0.967
    logs = [math.log(b) for b in expected]
    half = 4.303 * pd.Series(logs).std() / math.sqrt(3)
    centre = sum(logs) / 3
    text = xo.crossover(frame(), "async_checkpoint")
    assert text == (f"~{mean:.0f} Mb/s (the mean speed-up's, between 10 and 100); the seeds' own: 68 / 193 / 90 Mb/s "
                    f"(geometric mean {math.exp(centre):.0f}, 95 % CI of the mean log {math.exp(centre - half):.0f} to "
                    f"{math.exp(centre + half):.0f}); the 95 % CI of the speed-up contains 1 at 10, 100 Mb/s")
    assert text.startswith("~94 Mb/s")


def test_a_seed_that_never_crosses_is_named_and_left_out_of_no_mean():
    """Seed 1's baseline stays behind at every bandwidth (speed-ups 1.5 / 1.2 / 1.1): no crossing of its own, so
    no geometric mean or CI of the seeds' crossings is given (the others alone would look surer than they are)."""
    xo = experiment("crossover")
    data = frame()
    slower = (data.strategy == "async_checkpoint") & (data.seed == 1) & (data.bandwidth_mbps == 1000)
    data.loc[slower, "hours_to_target"] = 110.0
    assert xo.seed_crossings(data, "async_checkpoint")[1] is None
    text = xo.crossover(data, "async_checkpoint")
    assert "; the seeds' own: 68 / none / 90 Mb/s (2 of 3 seeds cross);" in text and "geometric" not in text


def test_a_baseline_that_wins_everywhere_has_no_crossover():
    xo = experiment("crossover")
    data = frame()
    data.loc[data.strategy == "async_checkpoint", "hours_to_target"] = 50.0
    assert xo.crossover(data, "async_checkpoint") == "async_checkpoint reaches the target first at every bandwidth tried"
    assert set(xo.seed_crossings(data, "async_checkpoint").values()) == {None}


@pytest.mark.parametrize("argv, message", [
    (["--bandwidths", "10,0"], "--bandwidths=10,0 is invalid: positive numbers of Mb/s."),
    (["--rate", "1.5"], "--rate=1.5 is invalid: hourly failure rates per stage in (0, 1]."),
    (["--strategies", "checkpointing"], "--strategies=checkpointing is invalid: names of ["),
    (["--seeds", "0"], "--seeds=0 is invalid: at least 1."),
])
def test_the_crossover_s_flags_are_checked_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment("crossover").main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
