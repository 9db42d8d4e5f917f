"""States between stage processes (``checkfree.transport.transfer`` / ``headers``): exact round trips, and
headers that are data — a forged one is refused, and nothing in it runs.

The header checks are pure functions; one pair of real processes (gloo on 127.0.0.1) carries a state of
several dtypes bit for bit and then receives a pickle that would create a file if it were ever unpickled.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
from pathlib import Path

import pytest
import torch

from checkfree.transport import headers
from checkfree.transport.headers import HeaderError
from tests.processes import two_peers

TIMEOUT_S = 60.0


class CreatesFile:
    """A pickle that, when unpickled, creates ``path`` (builtins.open in write mode): code from the network."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def sample_state() -> dict:
    """A held copy's shapes of data: several dtypes, a 0-d step count, an empty tensor, int keys, a tuple of
    floats, a None, a NaN."""
    g = torch.Generator().manual_seed(7)
    return {
        "weights": {"w": torch.randn(3, 4, generator=g), "b16": torch.randn(5, generator=g).to(torch.bfloat16),
                    "empty": torch.zeros(0, 3)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2, generator=g)}},
                      "param_groups": [{"lr": 1e-3 / 3, "betas": (0.9, 0.999), "foreach": None, "params": [0],
                                        "nan": math.nan}]},
        "ids": torch.randint(-2**40, 2**40, (6,), generator=g, dtype=torch.int64),
        "mask": torch.rand(7, generator=g) > 0.5,
    }


def assert_identical(a, b) -> None:
    """Equal bit for bit: same types, same keys in the same order, tensors of the same dtype, shape and bits."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        return
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def header(state=None, tensors=None, **override) -> bytes:
    """A header as JSON bytes, from a valid one with parts replaced."""
    good = {"format": headers.FORMAT, "state": {"tensor": 0} if state is None else state,
            "tensors": [[[2, 3], "float32", True]] if tensors is None else tensors}
    return json.dumps({**good, **override}).encode()


# --- the header, as pure functions ----------------------------------------------------------------------

def test_header_round_trip_keeps_types_and_bits():
    state = sample_state()
    data, tensors = headers.encode(state)
    skeleton, entries = headers.decode(data)
    assert [(list(s), str(d), c) for s, d, c in entries] == [
        ([3, 4], "torch.float32", True), ([5], "torch.bfloat16", True), ([0, 3], "torch.float32", True),
        ([], "torch.float32", True), ([2, 2], "torch.float32", True), ([6], "torch.int64", True),
        ([7], "torch.bool", True)]
    assert_identical(headers.rebuild(skeleton, tensors), {**state, "weights": dict(state["weights"])})
    assert b"pickle" not in data and json.loads(data)["format"] == "checkfree-state/1"


def test_a_pickled_header_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "created-by-the-header"
    hostile = pickle.dumps(CreatesFile(str(target)))
    with pytest.raises(HeaderError, match="not a JSON state header"):
        headers.decode(hostile)
    assert not target.exists()
    pickle.loads(hostile).close()  # the control: the same bytes, unpickled, do create the file
    assert target.exists()


@pytest.mark.parametrize("data, message", [
    (header(format="checkfree-state/0"), "format 'checkfree-state/0'"),
    (json.dumps([1, 2]).encode(), "expected an object with format, state and tensors"),
    (header(extra=1), "expected an object with format, state and tensors"),
    (header(tensors=[[[2, 3], "object", True]]), "dtype 'object' is not one of"),
    (header(tensors=[[[2, -3], "float32", True]]), "shape must be a list of at most 64 non-negative ints"),
    (header(tensors=[[[2, True], "float32", True]]), "non-negative ints"),
    (header(tensors=[[[2.0], "float32", True]]), "non-negative ints"),
    (header(tensors=[[[2], "float32", "yes"]]), "on_cpu must be true or false"),
    (header(tensors=[[[2**40, 2**40], "float32", True]]), "more than 4611686018427387904 elements"),
    (header(state={"tensor": 1}), "tensor reference 1 is not an index"),
    (header(state={"list": [{"tensor": 0}, {"tensor": 0}]}), "tensor 0 is placed twice"),
    (header(state=None, tensors=[[[1], "float32", True], [[1], "int64", True]]), "tensor 1 is listed but placed"),
    (header(state={"set": [1]}), "a state node must be a plain value or one of"),
    (header(state={"__reduce__": "os.system", "args": ["touch x"]}), "a state node must be"),
    (header(state={"dict": [[{"list": []}, 1]]}), "a dict entry must be"),
    (header(state={"dict": [["a", 1], ["a", 2]], "tensor": 0}), "a state node must be"),
    (header(state={"dict": [["a", {"tensor": 0}], ["a", 2]]}), "dict key 'a' appears twice"),
    (header(state=json.loads('{"list":[' * 70 + "]}" * 70)), "nests deeper than 64"),
    (b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a JSON state header"),
    (b"\xff\xfe", "not a JSON state header"),
])
def test_malformed_headers_are_refused_with_the_reason(data, message):
    with pytest.raises(HeaderError, match=message.replace("(", r"\(").replace("[", r"\[")):
        headers.decode(data)


def test_announced_header_length_is_bounded_before_allocation():
    assert headers.check_length(100) == 100
    for n in (0, -1, headers.MAX_HEADER_BYTES + 1, 2**62):
        with pytest.raises(HeaderError, match="announced a header of"):
            headers.check_length(n)


def test_a_state_that_a_header_cannot_carry_is_refused_at_the_sender():
    with pytest.raises(TypeError, match="cannot hold a torch.complex64 tensor"):
        headers.encode({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="not set"):
        headers.encode({"s": {1, 2}})
    with pytest.raises(TypeError, match="dict keys of plain types only"):
        headers.encode({(1, 2): torch.zeros(1)})


# --- two real processes ---------------------------------------------------------------------------------

def _peer(rank: int, port: int, secret: str, out: str, conn) -> None:
    """Rank 1 sends the sample state, then a forged header (a pickle, length announced as usual); rank 0
    receives both and writes what it got to ``out`` (torch.save: the test reads it with weights_only)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch.distributed as dist

    from checkfree.distributed.rendezvous import connect_store, join_generation
    from checkfree.transport.transfer import isend_state, recv_state

    cpu = torch.device("cpu")
    try:
        store = connect_store("127.0.0.1", port, TIMEOUT_S, f"rank {rank}")
        join_generation(store, 0, "gloo", rank, 2, TIMEOUT_S, secret)
        if rank == 1:
            isend_state(sample_state(), dst=0, tag=5, device=cpu).wait()
            forged = torch.frombuffer(bytearray(pickle.dumps(CreatesFile(out + ".created"))), dtype=torch.uint8)
            dist.send(torch.tensor([forged.numel()], dtype=torch.int64), dst=0, tag=6 * 8)
            dist.send(forged, dst=0, tag=6 * 8 + 1)
            dist.recv(torch.zeros(1), src=0, tag=99)  # stay in the group until rank 0 has read everything
            conn.send({"ok": True})
        else:
            state, nbytes = recv_state(src=1, tag=5, device=cpu)
            try:
                recv_state(src=1, tag=6, device=cpu)
                refused = None
            except HeaderError as exc:
                refused = str(exc)
            dist.send(torch.zeros(1), dst=1, tag=99)
            torch.save({"state": state, "nbytes": nbytes}, out)
            conn.send({"ok": True, "refused": refused})
        dist.destroy_process_group()
    except Exception as exc:  # reported to the test, which fails with it
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """Run the two processes once; every test below reads the result. Both processes are joined here."""
    out = str(tmp_path_factory.mktemp("exchange") / "received.pt")
    replies, exits = two_peers(_peer, out, timeout_s=TIMEOUT_S)
    assert all(r["ok"] for r in replies), replies
    assert exits == [0, 0]
    return {"refused": replies[0]["refused"], "out": out, **torch.load(out, weights_only=True)}


def test_a_state_of_several_dtypes_crosses_processes_bit_for_bit(exchange):
    sent = sample_state()
    assert_identical(exchange["state"], {**sent, "weights": dict(sent["weights"])})
    tensors = headers.encode(sent)[1]
    # 12 float32 + 5 bfloat16 + 0 + a 0-d float32 + 4 float32 + 6 int64 + 7 bool
    assert exchange["nbytes"] == sum(t.numel() * t.element_size() for t in tensors) == 48 + 10 + 4 + 16 + 48 + 7


def test_a_forged_header_from_a_peer_is_refused_without_running_it(exchange):
    assert exchange["refused"] is not None
    assert exchange["refused"].startswith("refused the state header from rank 1: not a JSON state header")
    assert not Path(exchange["out"] + ".created").exists()
    assert multiprocessing.active_children() == []
