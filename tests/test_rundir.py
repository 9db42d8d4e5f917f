"""One run per run directory (checkfree/run/rundir.py): the lock, the refusals, and the real CLI's exit 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from checkfree.run.config import ConfigError
from checkfree.run.rundir import LOCK_FILE, check_creatable, check_free, owned

from .test_reliability import cli, finish, tiny_overrides


def test_a_second_run_is_refused_while_the_first_holds_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    with owned(run_dir, resume=False):
        assert (run_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        # flock locks belong to an open file, not a process: a second owner in this process is refused too.
        for resume in (False, True):
            with pytest.raises(ConfigError) as refused, owned(run_dir, resume=resume):
                pytest.fail("a held directory was handed out twice")
            key = "trainer.resume" if resume else "hydra.run.dir"
            assert str(refused.value) == (f"{key}={str(run_dir)!r} is in use by another run (pid {os.getpid()} on "
                                          f"{os.uname().nodename}); wait for it to end, or set {key} to another "
                                          "directory.")
    with owned(run_dir, resume=False):  # released when the block ended
        pass
    with pytest.raises(RuntimeError), owned(run_dir, resume=False):
        raise RuntimeError("the run failed")
    with owned(run_dir, resume=False):  # ... however it ended
        pass


HOLDER = textwrap.dedent("""
    import sys, time
    from checkfree.run.rundir import owned
    with owned(sys.argv[1], resume=False):
        print("held", flush=True)
        time.sleep(120)
""")


def test_the_lock_dies_with_its_process_even_by_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on "), \
                owned(run_dir, resume=False):
            pass
        holder.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can let go of the lock
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    with owned(run_dir, resume=False):
        assert (run_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_a_new_run_is_refused_over_a_resumable_state_which_stays(tmp_path):
    run_dir = tmp_path / "run"
    state = run_dir / "resume" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"the only way to continue that run")
    with pytest.raises(ConfigError) as refused, owned(run_dir, resume=False):
        pytest.fail("a new run was let in over a resumable state")
    assert str(refused.value) == (
        f"hydra.run.dir={str(run_dir)!r} is invalid for a new run: it holds the resumable state of an earlier run "
        f"({state}); continue that run with trainer.resume={run_dir} hydra.run.dir={run_dir}, or set "
        f"hydra.run.dir to another directory (or delete {state} to start over there).")
    assert state.read_bytes() == b"the only way to continue that run"
    with owned(run_dir, resume=True):  # continuing it is what the state is for
        pass
    assert state.read_bytes() == b"the only way to continue that run"


def test_a_file_or_an_unwritable_place_is_a_config_error_not_a_traceback(tmp_path, tmpfs):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for path in (a_file, a_file / "run"):
        with pytest.raises(ConfigError) as refused, owned(path, resume=False):
            pass
        assert str(refused.value) == (f"hydra.run.dir={str(path)!r} is invalid: {a_file} is a file, not a directory; "
                                      "allowed is a directory this user can write, or a path where one can be created.")
    assert a_file.read_text() == "not a directory"
    read_only = tmpfs("64k", read_only=True)  # root may write anywhere else: a read-only mount refuses even root
    for path in (read_only, read_only / "run"):
        with pytest.raises(ConfigError, match=rf"hydra.run.dir='{path}' is invalid: {read_only}\S* cannot be "
                                              r"written \(Read-only file system\); allowed is a directory"), \
                owned(path, resume=False):
            pass


def test_the_command_line_checks_a_run_directory_without_creating_or_holding_it(tmp_path, tmpfs):
    """What ``python -m checkfree.train`` checks before Hydra writes anything (checkfree.run.preflight)."""
    target = tmp_path / "a" / "b"
    assert check_creatable(target, "hydra.run.dir") == target and not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match=r"^data.cache_dir='' is invalid: it is empty; allowed is a directory"):
        check_creatable("", "data.cache_dir")
    read_only = tmpfs("64k", read_only=True)
    with pytest.raises(ConfigError) as refused:
        check_creatable(read_only / "run", "hydra.run.dir")
    assert str(refused.value) == (f"hydra.run.dir='{read_only / 'run'}' is invalid: {read_only} cannot be written "
                                  "(Read-only file system); allowed is a directory this user can write, or a path "
                                  "where one can be created.")
    held = tmp_path / "held"
    with owned(held, resume=False):
        with pytest.raises(ConfigError, match=rf"^trainer.resume='{held}' is in use by another run \(pid {os.getpid()}"):
            check_free(held, "trainer.resume")
    check_free(held)  # the run ended: free again, and checking it did not take it
    with owned(held, resume=False):
        pass


def test_resuming_a_missing_directory_creates_nothing(tmp_path):
    with owned(tmp_path / "nowhere", resume=True):  # the trainer refuses it, naming trainer.resume
        pass
    assert not (tmp_path / "nowhere").exists()


# --- the real CLI ------------------------------------------------------------------------------------------

def _one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ") and lines[0].endswith("."), err[-2000:]
    return lines[0].removeprefix("config error: ")


def test_the_cli_exits_2_with_one_sentence_for_a_held_saved_or_unusable_run_dir(data_cache, tmp_path, tmpfs):
    held, saved, a_file = tmp_path / "held", tmp_path / "saved", tmp_path / "a_file"
    (saved / "resume").mkdir(parents=True)
    (saved / "resume" / "state.pt").write_bytes(b"state")
    a_file.write_text("x")
    read_only = tmpfs("64k", read_only=True)
    sweep = tmp_path / "sweep"  # point 0 is held, point 1 holds a state: both recorded, and the sweep goes on
    (sweep / "1" / "resume").mkdir(parents=True)
    (sweep / "1" / "resume" / "state.pt").write_bytes(b"state")
    cases = {
        "held": [f"hydra.run.dir={held}"],
        "saved": [f"hydra.run.dir={saved}"],
        "file": [f"hydra.run.dir={a_file}"],
        "read-only": [f"hydra.run.dir={read_only}"],
    }
    with owned(held, resume=False), owned(sweep / "0", resume=False):
        procs = {name: cli(*tiny_overrides(data_cache), "trainer.iterations=1", *args) for name, args in cases.items()}
        procs["sweep into a file"] = cli(*tiny_overrides(data_cache), "seed=0,1", f"hydra.sweep.dir={a_file}",
                                         sweep=True)
        procs["sweep"] = cli(*tiny_overrides(data_cache), "trainer.iterations=1", "seed=0,1",
                             f"hydra.sweep.dir={sweep}", sweep=True)
        results = {name: finish(proc) for name, proc in procs.items()}
    for name in [*cases, "sweep into a file"]:
        rc, _, err = results[name]
        assert rc == 2, f"{name}: exit {rc}: {err[-2000:]}"
        results[name] = _one_sentence(err)
    mine = rf"\(pid {os.getpid()} on [^)]+\)"
    assert re.fullmatch(rf"hydra.run.dir='{held}' is in use by another run {mine}; wait for it to end, or set "
                        r"hydra.run.dir to another directory\.", results["held"])
    assert results["saved"].startswith(f"hydra.run.dir='{saved}' is invalid for a new run: it holds the resumable "
                                       f"state of an earlier run ({saved / 'resume' / 'state.pt'}); continue that "
                                       f"run with trainer.resume={saved} hydra.run.dir={saved}, or set")
    assert results["file"] == (f"hydra.run.dir='{a_file}' is invalid: {a_file} is a file, not a directory; allowed is "
                               "a directory this user can write, or a path where one can be created.")
    assert results["sweep into a file"] == (f"hydra.sweep.dir='{a_file}' is invalid: {a_file} is a file, not a "
                                            "directory; allowed is a directory this user can write, or a path where "
                                            "one can be created.")
    assert results["read-only"].startswith(f"hydra.run.dir='{read_only}' is invalid: {read_only}")
    assert "cannot be written (Read-only file system)" in results["read-only"]
    # Nothing written, nothing deleted: no results in the held or saved directory, the state still there. The
    # single runs are refused before Hydra starts, so not even Hydra's files are written over the held run's.
    for run_dir in (held, saved, sweep / "0", sweep / "1"):
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "summary.json").exists()
    for run_dir in (held, saved):
        assert not (run_dir / ".hydra").exists() and not (run_dir / "train.log").exists()
    assert (saved / "resume" / "state.pt").read_bytes() == b"state" == (sweep / "1" / "resume" / "state.pt").read_bytes()
    assert a_file.read_text() == "x"

    rc, _, err = results["sweep"]
    assert rc == 0, err[-2000:]
    assert "is in use by another run" in (sweep / "0" / "config_error.txt").read_text()
    assert "holds the resumable state" in (sweep / "1" / "config_error.txt").read_text()


def test_two_runs_started_on_one_fresh_directory_one_trains_and_the_other_writes_nothing(data_cache, tmp_path):
    """The command line holds the run directory before Hydra writes into it: of two new runs on one fresh
    directory, started together, 0.3 s or 1.5 s apart, exactly one trains; the other exits 2 with one sentence,
    and every file there -- Hydra's .hydra/overrides.yaml included -- is the winner's (its seed). The three
    races run at once (most of each run is its interpreter starting)."""
    import json
    import threading
    import time

    procs: dict[float, list] = {}

    def race(apart_s: float) -> None:
        run_dir = tmp_path / f"apart{apart_s}" / "run"
        for seed in (1, 2):
            procs[apart_s].append((seed, cli(*tiny_overrides(data_cache), "trainer.iterations=4", f"seed={seed}",
                                             f"hydra.run.dir={run_dir}")))
            time.sleep(apart_s)

    threads = []
    for apart_s in (0.0, 0.3, 1.5):
        procs[apart_s] = []
        threads.append(threading.Thread(target=race, args=(apart_s,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    for apart_s, pair in procs.items():
        run_dir = tmp_path / f"apart{apart_s}" / "run"
        results = {seed: finish(proc, timeout=240) for seed, proc in pair}
        codes = sorted(rc for rc, _, _ in results.values())
        assert codes == [0, 2], (apart_s, {seed: (rc, err[-800:]) for seed, (rc, _, err) in results.items()})
        [winner] = [seed for seed, (rc, _, _) in results.items() if rc == 0]
        [(_, _, err)] = [r for seed, r in results.items() if seed != winner]
        assert re.fullmatch(rf"hydra.run.dir='{run_dir}' is in use by another run \(pid \d+ on [^)]+\); wait for it "
                            r"to end, or set hydra.run.dir to another directory\.", _one_sentence(err))
        assert json.loads((run_dir / "summary.json").read_text())["seed"] == winner
        assert f"seed={winner}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={3 - winner}" not in "".join(p.read_text() for p in (run_dir / ".hydra").iterdir())
