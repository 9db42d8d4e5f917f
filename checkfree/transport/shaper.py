"""Emulated links: every byte a stage process sends takes the time the run's network gives its link.

The process engine on one machine talks over loopback, where a gigabyte moves in a fraction of a second; the
simulated clock prices the same bytes on the network preset's links (``checkfree.simulation.networks``). With
``engine.shape`` the transport makes the two meet: a message of ``n`` bytes on a link of latency ``L`` and
bandwidth ``B`` *arrives* ``L + n / B`` after it entered the link, and a link carries one message at a time, in
the order they were sent (a token bucket that fills at ``B`` and holds one message: a message waits until the
link has sent the ones before it). Concurrent sends on one link therefore share its rate; sends on different
links do not slow each other (each node has its own link to each peer, as the clock assumes, and its own link
to storage).

How, without root, kernel settings or threads (portable to any backend and to Ray):

* The **sender** books the message on its link (``Shaper.book``): it leaves when the link is free and takes
  ``n / B``; it arrives ``L`` later. The sender sends the arrival time first, as a one-number message of its own
  (``Shaper.STAMP`` added to the payload's tag), then the payload, and goes on computing: a NIC sends while the
  host computes. Only when it waits for its sends to complete (``Pending.wait``) does it also wait until its
  bytes have left.
* The **receiver** takes both and waits until the arrival time: it can use the tensor no sooner than it would
  have had it over the emulated link.

The arrival time is a wall time (``time.time``): processes on one machine share it; across machines (Ray) the
hosts' clock offset (NTP: about a millisecond) adds to every latency. What the transport does not carry is not
shaped: the control channel (commands, token ids, plans, small replies), which the clock does not price either.
The all-reduce of a stage's replicas and a node's checkpoint shards do not travel as point-to-point messages;
they are shaped where they happen (``allreduce_seconds``; ``storage``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from checkfree.simulation.cost import ring_allreduce_seconds
from checkfree.simulation.networks import Link, NetworkConfig, replica_link, stage_link, storage_link

STAMP = 1 << 28
"""Added to a payload's tag for its arrival-time message: above every tag the transport uses (a message tag is
at most (M (S + 2) + S + 2) * 2, a state's sub-tag (8 + 8 S^2) * 8 + 7), below gloo's 32-bit limit."""


@dataclass
class Shaper:
    """The links of one stage process: where each message it sends arrives, and when its bytes have left."""

    network: NetworkConfig
    n_stages: int
    spread: bool = False
    """``engine.replica_placement=spread``: replica ``r`` of stage ``k`` runs at stage ``k + r``'s site."""
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    free_at: dict[tuple, float] = field(default_factory=dict)
    """Per link this process sends on: when the last message booked on it has left."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Bookings come from the main thread and from a stage's checkpoint writer thread (storage)."""

    def site(self, rank: int) -> int:
        """The site (``stage_link``'s stage index) of the process of ``rank``: replica ``r`` of stage ``k`` is
        rank ``r S + k`` (``worker.rank_of``), at ``k``'s site, or at ``k + r``'s when spread."""
        stage, replica = rank % self.n_stages, rank // self.n_stages
        return stage + replica if self.spread else stage

    def peer_link(self, src_rank: int, dst_rank: int) -> Link:
        return stage_link(self.network, self.site(src_rank), self.site(dst_rank))

    def book(self, link_key: tuple, n_bytes: int, link: Link, at: float | None = None) -> tuple[float, float]:
        """Put ``n_bytes`` on the link ``link_key`` now (or from ``at``, a moment already past): (when they have
        left, when they arrive)."""
        with self.lock:
            start = max(self.clock() if at is None else at, self.free_at.get(link_key, 0.0))
            left = start + n_bytes / link.bandwidth_Bps
            self.free_at[link_key] = left
        return left, left + link.latency_s

    def send_to(self, src_rank: int, dst_rank: int, n_bytes: int) -> tuple[float, float]:
        """Book a message from this process (``src_rank``) to ``dst_rank``."""
        return self.book(("peer", dst_rank), n_bytes, self.peer_link(src_rank, dst_rank))

    def storage(self, n_bytes: int, at: float | None = None) -> float:
        """Book ``n_bytes`` on this node's link to the checkpoint storage (either way), now or from ``at``; when
        they have arrived."""
        return self.book(("storage",), n_bytes, storage_link(self.network), at)[1]

    def allreduce_seconds(self, n_bytes: int, stage: int, replicas: int) -> float:
        """A ring all-reduce of ``n_bytes`` over ``stage``'s replicas, as the clock prices it."""
        return ring_allreduce_seconds(n_bytes, replicas, replica_link(self.network, stage, replicas, self.spread))

    def wait_until(self, when: float) -> None:
        delay = when - self.clock()
        if delay > 0:
            self.sleep(delay)

    @staticmethod
    def stamp(when: float, device: torch.device) -> torch.Tensor:
        return torch.tensor([when], dtype=torch.float64, device=device)

    @staticmethod
    def read(stamp: torch.Tensor) -> float:
        return float(stamp.item())


__all__ = ["STAMP", "Shaper"]
