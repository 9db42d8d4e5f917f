"""A run that dies says so, however it dies (SIGKILL, a failed start), and readers tell a dead run from a
live one; the command-line tools refuse bad input in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from checkfree.analysis import load_run
from checkfree.analysis import main as analysis_main
from checkfree.model.hf_export import _torch_load
from checkfree.run.config import ConfigError
from checkfree.run.preflight import check_command_line
from checkfree.run.runconfig import load_run_config
from checkfree.run.rundir import LOCK_FILE, is_held, read_status, refuse_saved_state
from checkfree.storage.export_paths import ExportError, clear_stale_exports
from checkfree.train import train

from .conftest import small_run_dict
from .test_reliability import cli, finish, tiny_overrides

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], "run.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(600)
""")


def _running_summary(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "strategy": "checkfree", "seed": 0}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "sim_time_s": 0.0, "val_loss": 5.0}) + "\n"
                                           + json.dumps({"iteration": 1, "sim_time_s": 9.0}) + "\n")


def test_a_sigkilled_run_reads_as_killed_and_a_live_one_as_running(tmp_path):
    """The summary of a run killed by SIGKILL still says "running" (nothing could write its end): once no
    process holds its lock, analysis, export and a new run there call it killed."""
    run_dir = tmp_path / "run"
    _running_summary(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(run_dir) and read_status(run_dir) == "running"
        assert load_run(run_dir)["status"] == "running"
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock, nothing else happens
        holder.wait(10)
    assert not is_held(run_dir) and read_status(run_dir) == "killed"
    row = load_run(run_dir)
    assert row["status"] == "killed" and row["incomplete"] and row["iterations"] == 1
    (run_dir / "resume").mkdir()
    (run_dir / "resume" / "state.pt").write_bytes(b"saved")
    with pytest.raises(ConfigError, match=r"resumable state of an earlier run \(killed: its summary still said "
                                          r"running\)"):
        refuse_saved_state(run_dir)
    # Without a lock file nothing can hold the directory: a summary that says running is a dead run too.
    (run_dir / LOCK_FILE).unlink()
    assert read_status(run_dir) == "killed" and read_status(tmp_path / "nowhere") is None


def test_a_killed_export_leaves_nothing_the_next_one_does_not_clear(tmp_path):
    """export_model writes .model.<x>.tmp, then renames model aside (.model.<x>.old) and the new one in: a
    kill between the renames leaves only the aside copy, which the next export (or a resume) puts back."""
    model = tmp_path / "model"
    half = tmp_path / ".model.ab12.tmp"
    half.mkdir()
    (half / "config.json").write_text("{")
    aside = tmp_path / ".model.cd34.old"
    aside.mkdir()
    (aside / "config.json").write_text('{"earlier": true}')
    other = tmp_path / ".other.ef56.tmp"  # another directory's export: not ours to touch
    other.mkdir()
    assert clear_stale_exports(model) == [half]
    assert json.loads((model / "config.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ef56.tmp", "model"]
    aside.mkdir()  # with the export in place, an aside copy is a leftover
    assert clear_stale_exports(model) == [aside] and (model / "config.json").exists()


def test_a_damaged_state_file_is_named_in_our_sentence(tmp_path):
    damaged = tmp_path / "stage0.pt"
    damaged.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ExportError) as info:
        _torch_load(damaged)
    text = str(info.value)
    assert text.startswith(f"{damaged} could not be read (") and "44 bytes" in text and "mmap" not in text
    assert "--from checkpoint or --from resume" in text and "\n" not in text


def test_analysis_refuses_a_bad_target_in_one_line_and_counts_torn_lines_once(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _running_summary(run_dir)
    with pytest.raises(SystemExit) as info:
        analysis_main([str(run_dir), "--target", "abc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err == ("python -m checkfree.analysis: error: argument --target: 'abc' is invalid: allowed is a "
                   "validation loss, a number > 0; see --help.\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "tra\nnot json\n')
    assert analysis_main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: skipped 2 unparsable metrics line(s) in 1 run(s) (first: ")
    assert f"{run_dir / 'metrics.jsonl'}:3 (" in err


def test_a_resume_into_another_directory_is_refused(data_cache, tmp_path):
    saved = tmp_path / "saved"
    train(load_run_config(small_run_dict(data_cache, trainer={"iterations": 1, "save_every": 1})), saved)
    args = [*tiny_overrides(data_cache), f"trainer.resume={saved}"]
    with pytest.raises(ConfigError, match=rf"^hydra.run.dir='{tmp_path}/other' is invalid with trainer.resume="
                                          rf"'{saved}': a resumed run goes on in its own directory"):
        check_command_line([*args, f"hydra.run.dir={tmp_path / 'other'}"])
    assert not (tmp_path / "other").exists()


def test_a_run_that_cannot_start_leaves_a_summary_that_says_why(data_cache, tmp_path):
    """An unreachable Ray cluster is found only when the engine starts (after Hydra has run): exit 1 with
    a summary.json that says error and why, and no workers.json listing nobody."""
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    rc, _, err = finish(cli(*tiny_overrides(data_cache), "engine=ray", "engine.ray.address=127.0.0.1:9",
                            f"hydra.run.dir={run_dir}"), timeout=200)
    assert rc == 1, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "error" and summary["error"].startswith("RayLaunchError: cannot join the Ray "
                                                                        "cluster at engine.ray.address='127.0.0.1:9'")
    assert summary["strategy"] == "checkfree" and summary["iterations"] == 0 and read_status(run_dir) == "error"
    assert not (run_dir / "workers.json").exists()


def test_a_disk_too_full_to_start_is_refused_up_front(data_cache, tmpfs):
    """A file system with less room than a run's start (its summary reserve first) refuses the run with one
    sentence saying how much it needs; nothing is written there."""
    from checkfree.run.preflight import START_BYTES

    disk = tmpfs("256k")
    with pytest.raises(ConfigError, match=rf"^hydra.run.dir='{disk}/run' is invalid: its file system has [\d,]+ bytes "
                                          rf"free, and a run needs at least {START_BYTES:,} to start \(65,536 reserved"):
        check_command_line([*tiny_overrides(data_cache), f"hydra.run.dir={disk / 'run'}"])
    assert list(disk.iterdir()) == []


def test_a_real_run_killed_by_sigkill_reads_as_killed(data_cache, tmp_path):
    """python -m checkfree.train, SIGKILLed mid-training: its summary.json says "running" (written at the
    start, never again), and every reader calls it killed once the kernel has dropped its lock."""
    import signal
    import time

    run_dir = tmp_path / "run"
    proc = cli(*tiny_overrides(data_cache), "trainer.iterations=100000", f"hydra.run.dir={run_dir}")
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_bytes().splitlines()) >= 3):  # two iterations done
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        assert read_status(run_dir) == "running" and is_held(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # what the file says
    assert read_status(run_dir) == "killed" and load_run(run_dir)["status"] == "killed"
