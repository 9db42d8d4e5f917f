"""Atomic writes: a signal during the write is delivered only once the file is whole."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch

from checkfree.storage.atomic import WriteError, torch_save_atomic, write_atomic, write_error


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


def test_a_failed_write_leaves_no_tmp_and_names_the_file_and_the_cause(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b"the previous, whole file")

    def full_disk(f):
        f.write(b"half of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as failed:
        write_atomic(path, full_disk)
    assert str(failed.value) == f"No space left on device writing {path}" and failed.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert path.read_bytes() == b"the previous, whole file"

    def not_io(f):
        raise TypeError("cannot pickle 'generator' object")

    with pytest.raises(TypeError, match="cannot pickle"):  # not an I/O error: passed on as it was
        write_atomic(path, not_io)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_torch_save_on_a_full_disk_says_so_and_keeps_the_previous_file(tmpfs):
    disk = tmpfs("128k")
    path = disk / "state.pt"
    torch_save_atomic({"w": torch.ones(8)}, path)
    with pytest.raises(WriteError) as failed:  # torch itself says "unexpected pos ...", from the OSError
        torch_save_atomic({"w": torch.zeros(100_000)}, path)
    assert str(failed.value) == f"No space left on device writing {path}"
    assert sorted(p.name for p in disk.iterdir()) == ["state.pt"]
    assert torch.equal(torch.load(path)["w"], torch.ones(8))


def test_a_reused_file_becomes_the_published_one_cut_to_length(tmp_path):
    reserve = tmp_path / "reserve"
    reserve.write_bytes(b"x" * 1000)
    write_atomic(tmp_path / "out.json", lambda f: f.write(b"{}"), reuse=reserve)
    assert (tmp_path / "out.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_error_finds_the_os_error_behind_a_wrapping_exception(tmp_path):
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")  # noqa: B904 (as torch does)
    except RuntimeError as exc:
        wrapped = exc
    error = write_error(wrapped, tmp_path / "x.pt")
    assert str(error) == f"Disk quota exceeded writing {tmp_path / 'x.pt'}" and error.errno == errno.EDQUOT
    assert write_error(ValueError("no I/O here"), tmp_path / "x.pt") is None
