"""A full disk (checkfree/run/runlog.py): metrics lines stay whole, summary.json still says "error" and why.

Each case runs twice where it can: on a real tmpfs that fills up (skipped where mounting is not
allowed), and with ``os.write`` patched to take half a line and then fail with ENOSPC (everywhere).

And wandb on the real CLI: its files are written, its terminal output is one line of ours.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from checkfree.run import runlog
from checkfree.run.runlog import RESERVE_FILE, RunLog
from checkfree.storage.atomic import WriteError
from checkfree.train import train

from .test_reliability import cli, finish, strict_metrics, tiny_overrides

NO_SPACE = os.strerror(errno.ENOSPC)
REAL_WRITE, REAL_WRITE_ATOMIC = os.write, runlog.write_atomic
NO_WANDB = SimpleNamespace(mode="disabled")


class FullDisk:
    """The disk fills during metrics line number ``at`` (0-based): ``os.write`` takes half of that line and
    then refuses everything with ENOSPC; new files (a summary's temporary file) can no longer be written,
    blocks already allocated (the reserve) still can."""

    def __init__(self, at: int, finish_short_write: bool = False) -> None:
        self.at, self.lines, self.full = at, 0, False
        self.finish_short_write = finish_short_write
        """Let the write after the short one through: the disk had room after all."""

    def write(self, fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            return REAL_WRITE(fd, data)
        if self.full:
            if self.finish_short_write:
                self.full = False
                return REAL_WRITE(fd, data)
            raise OSError(errno.ENOSPC, NO_SPACE)
        self.lines += 1
        if self.lines > self.at:
            self.full = True
            return REAL_WRITE(fd, bytes(data)[: len(data) // 2])
        return REAL_WRITE(fd, data)

    def write_atomic(self, path, write, reuse=None):
        if self.full and reuse is None:
            def write(f):  # noqa: F811 (a new file on a full disk: a few bytes, then ENOSPC)
                f.write(b'{"status": ')
                raise OSError(errno.ENOSPC, NO_SPACE)
        return REAL_WRITE_ATOMIC(path, write, reuse=reuse)

    def install(self, monkeypatch) -> FullDisk:
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(runlog, "write_atomic", self.write_atomic)
        return self


def no_tmp_files(run_dir: Path) -> bool:
    return not list(run_dir.rglob("*.tmp"))


# --- RunLog alone ----------------------------------------------------------------------------------------

def test_a_short_write_is_completed_and_a_refused_one_rolled_back(tmp_path, monkeypatch):
    log = RunLog(tmp_path, {}, NO_WANDB, total=3, progress_bar=False)
    FullDisk(at=1, finish_short_write=True).install(monkeypatch)
    log.log({"iteration": 0})
    log.log({"iteration": 1, "note": "written in two pieces"})
    assert strict_metrics(log.metrics_path) == [{"iteration": 0}, {"iteration": 1, "note": "written in two pieces"}]

    FullDisk(at=0).install(monkeypatch)
    with pytest.raises(WriteError) as failed:
        log.log({"iteration": 2, "note": "half of this reaches the disk"})
    assert str(failed.value) == f"{NO_SPACE} writing {log.metrics_path}" and failed.value.errno == errno.ENOSPC
    assert [r["iteration"] for r in strict_metrics(log.metrics_path)] == [0, 1]  # the half line was cut off
    log.close(1)


def test_the_summary_goes_into_the_reserve_when_no_new_file_fits(tmp_path, monkeypatch):
    log = RunLog(tmp_path, {}, NO_WANDB, total=3, progress_bar=False)
    reserve = tmp_path / RESERVE_FILE
    assert reserve.stat().st_size == runlog.RESERVE_BYTES
    log.summary({"status": "running"})
    disk = FullDisk(at=0).install(monkeypatch)
    with pytest.raises(WriteError):
        log.log({"iteration": 0})
    assert disk.full
    log.summary({"status": "error", "error": "the sentence", "failures": [{"iteration": 1, "stage": 2}]})
    assert json.loads((tmp_path / "summary.json").read_text()) == \
        {"status": "error", "error": "the sentence", "failures": [{"iteration": 1, "stage": 2}]}
    assert not reserve.exists() and no_tmp_files(tmp_path)
    log.close(1)


def test_a_summary_larger_than_the_reserve_drops_its_per_event_lists(tmp_path, monkeypatch):
    log = RunLog(tmp_path, {}, NO_WANDB, total=3, progress_bar=False)
    FullDisk(at=0).install(monkeypatch)
    with pytest.raises(WriteError):
        log.log({"iteration": 0})
    failures = [{"iteration": i, "stage": 1, "time_s": 1.5 * i} for i in range(5000)]
    log.summary({"status": "error", "n_failures": 5000, "failures": failures, "recoveries": failures})
    assert json.loads((tmp_path / "summary.json").read_text()) == \
        {"status": "error", "n_failures": 5000, "omitted_for_space": ["failures", "recoveries"]}
    log.close(1)


def test_on_a_real_full_disk_lines_stay_whole_and_the_summary_still_fits(tmpfs):
    disk = tmpfs("256k")
    log = RunLog(disk, {}, NO_WANDB, total=3, progress_bar=False)
    log.summary({"status": "running"})
    log.log({"iteration": 0})
    with open(disk / "filler", "wb", buffering=0) as f:  # another program fills the disk to the last byte
        try:
            while True:
                f.write(os.urandom(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    line = {"iteration": 1, "padding": "x" * 5000}  # larger than what may be left in the last page
    with pytest.raises(WriteError, match=rf"^{NO_SPACE} writing {log.metrics_path}$"):
        log.log(line)
    assert strict_metrics(log.metrics_path) == [{"iteration": 0}]
    log.summary({"status": "error", "error": "the sentence"})
    assert json.loads((disk / "summary.json").read_text()) == {"status": "error", "error": "the sentence"}
    log.close(1)
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "metrics.jsonl", "summary.json"]


def test_a_disk_too_full_for_the_reserve_stops_the_run_before_it_writes_anything(tmpfs):
    disk = tmpfs("32k")  # less than the reserve
    (disk / "metrics.jsonl").write_text('{"iteration": 0}\n')  # an earlier run's, which must stay
    with pytest.raises(WriteError, match=rf"^{NO_SPACE} writing {disk / RESERVE_FILE}$"):
        RunLog(disk, {}, NO_WANDB, total=3, progress_bar=False)
    assert sorted(p.name for p in disk.iterdir()) == ["metrics.jsonl"]
    assert strict_metrics(disk / "metrics.jsonl") == [{"iteration": 0}]


# --- a whole run -----------------------------------------------------------------------------------------

def test_a_run_whose_disk_fills_ends_with_whole_metrics_and_an_error_summary(small_run, tmp_path, monkeypatch):
    FullDisk(at=4).install(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(WriteError):
        train(small_run(), run_dir)
    monkeypatch.undo()
    assert [r["iteration"] for r in strict_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "error"
    assert summary["error"] == f"WriteError: {NO_SPACE} writing {run_dir / 'metrics.jsonl'}"
    assert summary["iterations"] == 4  # the iteration whose line was refused was counted, not logged
    assert no_tmp_files(run_dir) and not (run_dir / RESERVE_FILE).exists()  # the reserve became summary.json


def test_a_run_on_a_real_tmpfs_that_fills_stops_cleanly_and_resumes_once_there_is_room(small_run, tmp_path, tmpfs):
    """Checkpoints (keep=100) and a resume state every iteration fill a 10 MiB tmpfs within a few
    iterations; with more room the run goes on from its last state and completes, one record per iteration."""
    disk = tmpfs("10m")
    run_dir = disk / "run"
    sections = dict(strategy={"name": "checkpoint", "every": 1, "keep": 100},
                    trainer={"iterations": 12, "save_every": 1})
    with pytest.raises(WriteError):
        train(small_run(**sections), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "error", summary
    assert summary["error"].startswith(f"WriteError: {NO_SPACE} writing {run_dir}/"), summary["error"]
    records = strict_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(len(records))) and 2 <= len(records) <= 12
    assert no_tmp_files(run_dir)
    saved = summary["resumable_from_iteration"]
    assert saved is not None and saved >= 1

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, timeout=30)
    trainer = dict(sections["trainer"], resume=str(run_dir))
    done = train(small_run(strategy=sections["strategy"], trainer=trainer), tmp_path / "hydra-of-the-resume")
    assert done["status"] == "completed" and done["resumed_at_iterations"] == [saved]
    assert [r["iteration"] for r in strict_metrics(run_dir / "metrics.jsonl")] == list(range(13))
    assert no_tmp_files(run_dir) and not (run_dir / RESERVE_FILE).exists()


def test_wandb_offline_writes_its_files_and_prints_one_line_of_ours(data_cache, tmp_path):
    """wandb's banner (4 lines) and run history and footer (~30) are not printed; wandb still writes its run
    (the .wandb file `wandb sync` uploads), and one line of ours says where it is."""
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(data_cache) if not o.startswith("logger.")]
    proc = cli(*overrides, "trainer.iterations=2", "trainer.export=false", "logger.wandb.mode=offline",
               f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline"})
    rc, out, err = finish(proc)
    assert rc == 0, err[-2000:]
    wandb_dir = Path(json.loads((run_dir / "summary.json").read_text())["wandb_dir"])
    assert wandb_dir.parent == run_dir / "wandb"
    [history] = wandb_dir.glob("run-*.wandb")
    assert history.stat().st_size > 0
    said = [line for line in (out + err).splitlines() if line.startswith("wandb")]  # all of wandb's start so
    assert said == [f"wandb: offline run in {wandb_dir}; `wandb sync {wandb_dir}` uploads it"]
