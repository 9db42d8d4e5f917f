"""The time ledger (``checkfree.simulation.ledger.Work``) on hand-made times: what an interruption throws away, what a
rollback does, where a node's arrival stops the work, and what a new placement's price does to kept work."""

from __future__ import annotations

import pytest

from checkfree.simulation.ledger import Work


def test_work_uninterrupted_is_its_price():
    work = Work(t=1000.0, work_s=100.0, sub_s=10.0)
    assert work.end == 1100.0 and work.stop(None) == 1100.0 and work.kept_s == 100.0


def test_an_interruption_loses_the_sub_iteration_under_way_and_the_work_goes_on_after_the_recovery():
    work = Work(t=1000.0, work_s=100.0, sub_s=10.0)
    lost = work.interrupt(at=1037.0, rolled_back=False, recovery_s=30.0)
    assert lost == pytest.approx(7.0)  # 37 s ran: three whole sub-iterations kept, 7 s of the fourth lost
    assert work.done == pytest.approx(30.0) and work.t == 1067.0
    assert work.end == pytest.approx(1137.0)  # the 70 s left, after the recovery
    lost = work.interrupt(at=1077.0, rolled_back=False, recovery_s=5.0)  # 10 s more: exactly a sub-iteration
    assert lost == pytest.approx(0.0) and work.done == pytest.approx(40.0) and work.end == pytest.approx(1142.0)
    assert work.kept_s == 100.0  # whatever was lost is charged apart: the work itself costs its price


def test_a_rollback_throws_away_everything_the_iteration_did_its_earlier_prices_included():
    work = Work(t=0.0, work_s=100.0, sub_s=10.0, done=40.0, paid=-15.0)
    lost = work.interrupt(at=25.0, rolled_back=True, recovery_s=60.0)
    # the 65 s it ran, counted at the current price, less the 15 s its earlier (cheaper) price saved
    assert lost == pytest.approx(50.0)
    assert (work.done, work.paid, work.t) == (0.0, 0.0, 85.0)
    assert work.end == 185.0 and work.kept_s == 100.0


def test_an_arrival_stops_the_work_at_the_end_of_the_sub_iteration_under_way():
    work = Work(t=1000.0, work_s=100.0, sub_s=10.0, done=5.0)  # 5 s into its first sub-iteration
    assert work.stop(arrival=1023.0) == pytest.approx(1025.0)  # the sub-iteration ending 30 s into the work
    assert work.stop(arrival=990.0) == 1000.0  # arrived already: at once (no sub-iteration is under way yet)
    assert work.stop(arrival=2000.0) == work.end == 1095.0  # after the work: it runs to its end
    work.reach(1025.0)
    assert work.done == pytest.approx(30.0) and work.t == 1025.0
    work.wait(12.5)  # the stage moves back meanwhile
    assert work.t == 1037.5 and work.end == pytest.approx(1107.5)


def test_a_new_price_counts_kept_work_at_it_and_remembers_what_it_really_cost():
    work = Work(t=0.0, work_s=100.0, sub_s=10.0, done=30.0)
    work.reprice(work_s=150.0, sub_s=15.0)  # a shrink: fewer hosts, each iteration dearer
    assert (work.work_s, work.sub_s) == (150.0, 15.0)
    assert work.done == pytest.approx(45.0) and work.paid == pytest.approx(-15.0)
    # 30 s at the old price and the remaining 70 % at the new one: 30 + 105
    assert work.kept_s == pytest.approx(135.0) and work.end == pytest.approx(105.0)
    work.reprice(work_s=150.0, sub_s=15.0)  # the same price: nothing changes
    assert work.done == pytest.approx(45.0) and work.paid == pytest.approx(-15.0)
    work.reprice(work_s=100.0, sub_s=10.0)  # the node is back: the rest at the old price again
    assert work.done == pytest.approx(30.0) and work.paid == pytest.approx(0.0)  # all it kept ran at this price
    assert work.kept_s == pytest.approx(100.0)
