"""Atomic writes: a signal during the write is delivered only once the file is whole."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from checkfree.atomic import torch_save_atomic, write_atomic


class Stop(Exception):
    pass


def test_signal_during_write_is_held_until_the_file_is_complete(tmp_path):
    def raising(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, raising)
    try:
        def write(f):
            f.write(b"first half ")
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
            f.write(b"second half")

        with pytest.raises(Stop):
            write_atomic(tmp_path / "x.bin", write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "x.bin").read_bytes() == b"first half second half"
    assert not (tmp_path / "x.bin.tmp").exists()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_torch_save_atomic_round_trips_and_replaces(tmp_path):
    path = tmp_path / "state.pt"
    torch_save_atomic({"w": torch.arange(4.0)}, path)
    torch_save_atomic({"w": torch.ones(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
