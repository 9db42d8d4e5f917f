"""Emulated links (``checkfree.transport.shaper``): the booking arithmetic on a hand-made clock, exactly; then two
real processes (gloo on 127.0.0.1) whose shaped sends arrive when the link says — never sooner, and late by no
more than the stated bound.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from checkfree.model.presets import PRESETS
from checkfree.simulation.cost import CostModel, ring_allreduce_seconds
from checkfree.simulation.networks import GiB, Link, NetworkConfig, replica_link, stage_link, storage_link
from checkfree.transport.shaper import Shaper
from tests.processes import two_peers

TIMEOUT_S = 60.0


class FakeClock:
    """A wall clock the test moves: ``sleep`` advances it, so a wait is exact and takes no time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def shaper(network: NetworkConfig, n_stages: int = 4, spread: bool = False) -> tuple[Shaper, FakeClock]:
    clock = FakeClock()
    return Shaper(network, n_stages, spread, clock=clock, sleep=clock.sleep), clock


LINK = NetworkConfig(latency_s=0.05, bandwidth_Bps=1e6, storage_latency_s=0.5, storage_bandwidth_Bps=2e5)


def test_a_message_arrives_latency_plus_bytes_over_bandwidth_after_it_enters_an_idle_link():
    s, clock = shaper(LINK)
    left, arrival = s.send_to(0, 1, 100_000)
    assert (left - 100.0, arrival - 100.0) == pytest.approx((0.1, 0.15), abs=1e-12)
    s.wait_until(arrival)
    assert clock.now == arrival


def test_sends_on_one_link_share_its_rate_and_other_links_do_not_wait():
    s, clock = shaper(LINK)
    first = s.send_to(0, 1, 100_000)[1]
    second = s.send_to(0, 1, 300_000)[1]  # booked at the same instant: waits for the first to leave
    other = s.send_to(0, 2, 100_000)[1]   # another peer, another link
    assert [t - 100.0 for t in (first, second, other)] == pytest.approx([0.15, 0.45, 0.15], abs=1e-12)
    clock.now = 110.0  # long after: the link is idle again, nothing queues
    assert s.send_to(0, 1, 100_000)[1] - 110.0 == pytest.approx(0.15, abs=1e-12)


def test_storage_has_its_own_link_per_node_and_the_allreduce_is_the_clocks_ring():
    s, _ = shaper(LINK)
    s.send_to(0, 1, 1_000_000)  # a busy peer link does not delay storage
    assert s.storage(100_000) - 100.0 == pytest.approx(0.5 + 0.5, abs=1e-12)
    assert s.storage(100_000) - 100.0 == pytest.approx(0.5 + 1.0, abs=1e-12)  # behind the first shard
    n = 4 * 1_000_000
    assert s.allreduce_seconds(n, stage=1, replicas=2) == ring_allreduce_seconds(n, 2, Link(0.05, 1e6))
    assert s.allreduce_seconds(n, stage=1, replicas=2) == pytest.approx(2 * 0.5 * n / 1e6 + 2 * 0.05)


def test_geo_links_follow_each_process_site_and_spread_replicas_move_it():
    geo = NetworkConfig(name="geo_distributed")
    s, _ = shaper(geo, n_stages=4)
    # Rank 1 is stage 1 (Belgium), rank 2 stage 2 (Canada): Belgium-Canada is 41 ms, 0.0199 GiB/s.
    assert s.peer_link(1, 2) == Link(0.041, 0.0198974609375 * GiB)
    # Replica 1 of stage 1 (rank 5) at the same zone talks to replica 1 of stage 2 (rank 6) over the same link;
    # spread, they run at stage 2's and stage 3's sites (Canada-Germany: 44 ms).
    assert s.peer_link(5, 6) == s.peer_link(1, 2)
    spread, _ = shaper(geo, n_stages=4, spread=True)
    assert spread.peer_link(5, 6) == stage_link(geo, 2, 3) == Link(0.044, 0.0318603515625 * GiB)


def test_link_scale_slows_every_link_and_at_one_changes_no_bit():
    base = NetworkConfig(name="geo_distributed")
    slow = NetworkConfig(name="geo_distributed", link_scale=10.0)
    for a, b in [(0, 0), (1, 2), (0, 6)]:
        assert stage_link(slow, a, b) == Link(stage_link(base, a, b).latency_s * 10,
                                              stage_link(base, a, b).bandwidth_Bps / 10)
    assert storage_link(slow) == Link(0.5, 500e6 / 8 / 10)
    assert replica_link(slow, 1, 3, spread=True).bandwidth_Bps == replica_link(base, 1, 3, True).bandwidth_Bps / 10
    # The clock reads the same links: its storage transfer is 10x the unscaled one.
    model = PRESETS["cpu_small"]
    fast, ten = CostModel(model, 4, 8, base), CostModel(model, 4, 8, slow)
    assert ten.storage_seconds(1e6) == pytest.approx(10 * fast.storage_seconds(1e6))
    # link_scale 1 is the identity, bit for bit: the committed runs price as before.
    unscaled = NetworkConfig(name="geo_distributed", link_scale=1.0)
    assert all(stage_link(unscaled, a, b) == stage_link(base, a, b) for a in range(7) for b in range(7))


# --- two real processes ---------------------------------------------------------------------------------

REAL = NetworkConfig(name="single_cluster", latency_s=0.05, bandwidth_Bps=2e6)
"""2 MB/s, 50 ms: a 1 MB tensor takes 0.55 s; slow enough that loopback's own time (~1 ms a MB) is noise."""
MB = 1 << 20
LATE_S = 0.3
"""How late an arrival may be: the sender books a message a little after the time it records (a tensor copy),
and a process woken from its sleep on 2 busy cores can wait for the scheduler (tens of ms, more under the test
suite's other workers). Early is never allowed: the receiver sleeps until the stamped arrival."""


def _peer(rank: int, port: int, secret: str, conn) -> None:
    """Rank 0 (stage 0) sends two 1 MB tensors and a 0.5 MB state to stage 1, back to back; rank 1 records the
    wall time each arrives. Both report their times (rank 0: when it started sending, when its sends left)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from checkfree.distributed.rendezvous import connect_store, join_generation
    from checkfree.transport.courier import Courier
    from checkfree.transport.transfer import Pending

    cpu = torch.device("cpu")
    try:
        store = connect_store("127.0.0.1", port, TIMEOUT_S, f"rank {rank}")
        join_generation(store, 0, "gloo", rank, 2, TIMEOUT_S, secret)
        courier = Courier(2, cpu, cpu, Shaper(REAL, 2))
        courier.place((0, 1), rank)
        a, b = torch.ones(MB // 4), torch.full((MB // 4,), 2.0)
        state = {"weights": torch.arange(MB // 8, dtype=torch.float32)}
        dist.barrier()
        if rank == 0:
            pending = Pending()
            start = time.time()
            courier.send(a, 0, 1, tag=1, pending=pending)
            courier.send(b, 0, 1, tag=2, pending=pending)
            courier.send_state(state, 0, 1, kind=3, pending=pending)
            pending.wait()
            conn.send({"ok": True, "start": start, "left": time.time()})
        else:
            got = []
            x = courier.recv((MB // 4,), 0, 1, tag=1)
            got.append(time.time())
            y = courier.recv((MB // 4,), 0, 1, tag=2)
            got.append(time.time())
            s, n_bytes = courier.recv_state(0, 1, kind=3)
            got.append(time.time())
            exact = torch.equal(x, a) and torch.equal(y, b) and torch.equal(s["weights"], state["weights"])
            conn.send({"ok": True, "arrived": got, "exact": exact, "n_bytes": n_bytes})
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # reported to the test, which fails with it
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def test_shaped_sends_between_two_processes_arrive_when_the_link_says():
    replies, exits = two_peers(_peer, timeout_s=TIMEOUT_S)
    assert all(r["ok"] for r in replies) and exits == [0, 0], replies
    sender, receiver = replies
    assert receiver["exact"] and receiver["n_bytes"] == MB // 2
    # One link, three messages booked at once: each leaves when the one before it has (they share the rate).
    expected = [0.05 + MB / 2e6, 0.05 + 2 * MB / 2e6, 0.05 + 2.5 * MB / 2e6]  # 0.574, 1.099, 1.361 s
    measured = [t - sender["start"] for t in receiver["arrived"]]
    for seconds, should in zip(measured, expected):
        assert should <= seconds <= should + LATE_S, (measured, expected)
    # The sender's sends complete when its bytes have left the link (not when they arrive: no latency).
    assert 2.5 * MB / 2e6 <= sender["left"] - sender["start"] <= 2.5 * MB / 2e6 + LATE_S
    assert multiprocessing.active_children() == []


# --- a shaped run ---------------------------------------------------------------------------------------

def test_a_shaped_run_trains_exactly_as_the_unshaped_one_and_never_faster_than_its_links(small_run, tmp_path):
    """R = 2 on the geo network, checkpointing every 3 iterations (shards to storage and back), a lone replica lost
    (its replacement copies the stage from the other) and then a whole stage (every stage rolls back; the stage's
    second replacement copies it from the first): shaped, the run writes the unshaped run's metrics, bit for bit —
    shaping delays bytes, it changes none. And no iteration is faster than its links allow: a micro-batch crosses
    stages 0 -> 1 -> 2 -> 3 and its gradient back, each hop at least its link's latency (Australia-Belgium 129 ms,
    Belgium-Canada 41, Canada-Germany 44: 428 ms)."""
    from checkfree.run.runlog import deterministic_view, read_metrics
    from checkfree.train import train
    from tests.processes import write_trace

    trace = write_trace(tmp_path / "t.json", [{"iteration": 2, "stage": 1, "replica": 0}, {"iteration": 4, "stage": 2}])
    sections = {"strategy": {"name": "checkpoint", "every": 3}, "failure": {"name": "trace", "path": trace},
                "trainer": {"iterations": 6, "eval_every": 3}}
    engine = {"name": "distributed", "timeout_s": 20, "replicas": 2}
    plain = train(small_run(**sections, engine=engine), tmp_path / "plain")
    shaped = train(small_run(**sections, engine={**engine, "shape": True}), tmp_path / "shaped")
    assert plain["status"] == shaped["status"] == "completed"
    a = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    b = read_metrics(tmp_path / "shaped" / "metrics.jsonl")
    assert deterministic_view(a) == deterministic_view(b)
    for key in ("failures", "recoveries", "node_losses", "stage_losses", "resyncs", "lost_iterations",
                "total_sim_time_s", "final_val_loss"):
        assert plain[key] == shaped[key], key
    assert (shaped["node_losses"], shaped["stage_losses"], shaped["resyncs"]) == (3, 1, 2)
    trained = [r["wall_time_s"] for r in b if "train_loss" in r]
    assert all(later - earlier >= 0.428 for earlier, later in zip(trained, trained[1:])), trained
