"""In-memory snapshots: restore only the lost stage (snapshot_restore), or roll every stage back to an
in-memory checkpoint (memory_checkpoint) — exact states, exact records, and the pricing rule by hand."""

from __future__ import annotations

import pytest

from checkfree.cost import CostModel, NetworkConfig
from checkfree.plan import (
    HOST_SNAPSHOT,
    REPLICA,
    SHADOW,
    SNAPSHOT,
    Held,
    Traffic,
    sent_into,
)
from checkfree.presets import preset

# --- the vocabulary --------------------------------------------------------------------------------


def test_held_copies_say_what_they_are_and_where_their_refresh_bytes_go():
    traffic = Traffic()
    for held, n in [(Held(REPLICA, 0, 1), 10), (Held(SHADOW, 2, 1), 20), (Held(SNAPSHOT, 2, 3), 30),
                    (Held(HOST_SNAPSHOT, 3, 3), 40)]:
        sent_into(traffic, held, n)
    assert traffic.sent == {(0, 1): 10} and traffic.background == {(2, 3): 30}  # shadow, host copy: no traffic
    assert [Held(k, 1, 2 if k != HOST_SNAPSHOT else 1).what.holds for k in (REPLICA, SHADOW, SNAPSHOT,
                                                                            HOST_SNAPSHOT)] == \
        ["edges", "state", "state", "state"]
    with pytest.raises(ValueError, match="unknown kind of held copy 'mirror'"):
        Held("mirror", 0, 1)
    with pytest.raises(ValueError, match="exactly when its holder is its owner"):
        Held(HOST_SNAPSHOT, 1, 2)
    with pytest.raises(ValueError, match="exactly when its holder is its owner"):
        Held(SNAPSHOT, 1, 1)


def test_background_stall_is_host_copy_plus_what_the_window_cannot_hide():
    network = NetworkConfig(bandwidth_Bps=1e8, latency_s=0.01, host_bandwidth_Bps=1e9)
    cost = CostModel(preset("tiny"), 2, 2, network)
    # 1e9 bytes: 1 s to host memory, 0.01 + 10 s to the peer.
    assert cost.background_seconds({(0, 1): 10**9}, window_s=4.0) == pytest.approx(1.0 + 6.01)
    assert cost.background_seconds({(0, 1): 10**9}, window_s=20.0) == pytest.approx(1.0)
    # Owners send in parallel: the slowest sets the stall; nothing to send costs nothing.
    assert cost.background_seconds({(0, 1): 10**9, (1, 2): 2 * 10**9}, window_s=4.0) == pytest.approx(2.0 + 16.01)
    assert cost.background_seconds({}, window_s=1.0) == 0.0
