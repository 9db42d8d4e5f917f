"""A roll call before each generation of the process group forms, which the supervisor can call off.

Forming a process group (``rendezvous.join_generation``) blocks until every rank has joined, for up to
``engine.timeout_s``, and nothing can interrupt it. So a rank lost while the others wait there (a second
stage killed during another's recovery) would stall every survivor for the whole timeout, although the
supervisor sees the death at once. Hence the roll call first: each rank says it is present in the store, and
the last one to arrive gives the verdict "go". The supervisor, on seeing a death, sets the verdict "off"
instead (whichever is set first stands), and every rank still waiting returns at once.

Only a rank lost after everyone answered (inside the process group's own few milliseconds of set-up) still
costs the timeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

GO, OFF = "go", "off"


class CalledOff(RuntimeError):
    """The supervisor called this generation off: a rank was lost before everyone answered."""


def roll(store: dist.Store, generation: int, secret: str) -> dist.PrefixStore:
    # Under the run's secret, as the generation itself (rendezvous.generation_prefix): a process the
    # supervisor did not start can neither answer nor call a generation off.
    return dist.PrefixStore(f"checkfree/{secret}/rollcall{generation}", store)


def answer(store: dist.Store, generation: int, world_size: int, timeout_s: float, secret: str) -> None:
    """Say present and wait for the verdict: return on "go", raise ``CalledOff`` on "off" (a store timeout
    raises the store's error: a rank that never came, with nobody seen dead)."""
    names = roll(store, generation, secret)
    if names.add("present", 1) == world_size:
        names.compare_set("verdict", "", GO)
    names.wait(["verdict"], timedelta(seconds=timeout_s))
    verdict = names.get("verdict").decode()
    if verdict != GO:
        raise CalledOff(f"generation {generation} was called off: a rank was lost before all had answered")


def call_off(store: dist.Store, generation: int, secret: str) -> bool:
    """Call generation ``generation`` off unless everyone already answered; True if it was called off."""
    return roll(store, generation, secret).compare_set("verdict", "", OFF).decode() == OFF
