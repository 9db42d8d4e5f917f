"""Reliability (issue 6): resume, numeric guards, signals, bad input on the real CLI, multirun, short soak.

In-process runs use one torch thread: on a small shared machine two intra-op threads fighting for the
cores make these tiny models an order of magnitude slower. Subprocesses get OMP_NUM_THREADS=1 likewise.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkfree.run.config import ConfigError
from checkfree.run.runconfig import load_run_config
from checkfree.run.runlog import deterministic_view as strip
from checkfree.run.runlog import read_metrics
from checkfree.stage.guard import NonFiniteError
from checkfree.train import build_run, train
from tests.processes import write_trace

from .conftest import hooked_run, small_run_dict

ROOT = Path(__file__).resolve().parent.parent
NONDETERMINISTIC_SUMMARY = {"run_dir", "model_dir", "total_wall_time_s", "resume_state", "resumed_at_iterations", "config",
                            "resumable_from_iteration"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strict_metrics(path: Path) -> list[dict]:
    """Every line must parse: read_metrics would skip a torn one silently."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(run) -> list[dict[str, torch.Tensor]]:
    """The run's final weights: the local engine's stages, or (the process engine's workers are stopped by
    now) the model it exported from them."""
    if run.cfg.engine.name != "local":
        from safetensors.torch import load_file

        return [load_file(str(run.run_dir / "model" / "model.safetensors"))]
    return [{k: v.clone() for k, v in state.items()} for state in run.trainer.engine.stage_states()]


def same_weights(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def stop_at(iteration: int):
    """Ctrl-C inside iteration ``iteration``, just before its step."""
    def hook(n, engine):
        if n == iteration:
            raise KeyboardInterrupt
    return hook


def poison(at: int, stage: int):
    """A NaN in one weight of ``stage`` just before the step of iteration ``at``."""
    def hook(n, engine):
        if n == at:
            with torch.no_grad():
                next(engine.stages[stage].layers.parameters()).view(-1)[0] = float("nan")
    return hook


def trace(tmp_path, events: list[dict]) -> str:
    return write_trace(tmp_path / "trace.json", events)


# --- resume ----------------------------------------------------------------------------------------------

RESUME_CASES = {
    # CheckFree+ with an edge loss before the stop (copy + stale replica) and a body loss after it.
    "checkfree_plus-trace": dict(strategy={"name": "checkfree_plus", "replica_sync_every": 3},
                                 failure=[{"iteration": 3, "stage": 0}, {"iteration": 9, "stage": 2}],
                                 save_every=1, stop_at=8),
    # Poisson failures drawn lazily from numpy generators: their state must travel with the resume.
    "checkfree_plus-poisson": dict(strategy={"name": "checkfree_plus", "unrecoverable": "reinit"},
                                   failure={"name": "poisson", "hourly_rate": 0.999}, save_every=1, stop_at=8),
    # Rollback after the resume to a checkpoint that the interrupted run had already pruned (keep=1), and a
    # state saved every 5 iterations: the metrics of iterations 6-9 are dropped and redone.
    "checkpoint-trace": dict(strategy={"name": "checkpoint", "every": 3, "keep": 1},
                             failure=[{"iteration": 4, "stage": 1}, {"iteration": 6, "stage": 2}],
                             save_every=5, stop_at=10),
    # Shadows (weights and Adam state) restored exactly after the resume.
    "redundant-trace": dict(strategy={"name": "redundant"},
                            failure=[{"iteration": 2, "stage": 1}, {"iteration": 9, "stage": 3}],
                            save_every=1, stop_at=8),
    # An in-memory checkpoint taken before the stop (iteration 6) rolled back to after it: the snapshots in
    # the nodes' RAM and the run's position for them (the MemoryStore) travel with the resume.
    "memory_checkpoint-trace": dict(strategy={"name": "memory_checkpoint", "every": 3, "storage_every": 12},
                                    failure=[{"iteration": 4, "stage": 1}, {"iteration": 9, "stage": 2}],
                                    save_every=1, stop_at=8),
    # A stage restored after the resume from the peer snapshot taken before the stop.
    "snapshot_restore-trace": dict(strategy={"name": "snapshot_restore", "every": 3},
                                   failure=[{"iteration": 4, "stage": 1}, {"iteration": 9, "stage": 2}],
                                   save_every=1, stop_at=8),
    # Its held copies are int8 codes and scales: they travel with the resumable state as they are.
    "compressed_snapshot-trace": dict(strategy={"name": "compressed_snapshot", "every": 3, "encoding": "int8"},
                                      failure=[{"iteration": 4, "stage": 1}, {"iteration": 9, "stage": 2}],
                                      save_every=1, stop_at=8),
    # The activations the stages buffered for their neighbours travel with the state: stage 2 lost after the resume
    # is fitted to pairs buffered before the stop (fit_buffer 8 > the 4 micro-batches of an iteration).
    "checkfree_fit-trace": dict(strategy={"name": "checkfree_fit", "fit_buffer": 8, "fit_steps": 5},
                                failure=[{"iteration": 4, "stage": 1}, {"iteration": 8, "stage": 2}],
                                save_every=1, stop_at=8),
    # The same under CheckFree+'s swapped routes on the process engine (each process's ring in its saved stage).
    "checkfree_plus_fit-process-trace": dict(strategy={"name": "checkfree_plus_fit", "fit_buffer": 8, "fit_steps": 5},
                                             engine={"name": "distributed", "timeout_s": 20},
                                             failure=[{"iteration": 4, "stage": 0}, {"iteration": 8, "stage": 2}],
                                             save_every=1, stop_at=8),
    # No replacement node for 0.04 h: stage 2 runs on host 1 when the run stops, its node arrives after the
    # resume (the placement, the absent node's arrival and the replacement draws travel with the state).
    "shrink-trace": dict(strategy={"name": "checkfree"}, engine={"no_replacement": "shrink"},
                         replacement={"replacement": "fixed", "replacement_mean_h": 0.04},
                         failure=[{"iteration": 3, "stage": 2}, {"iteration": 10, "stage": 1}],
                         save_every=1, stop_at=8),
    # The same on the process engine: stopped while node 1's process runs stages 1 and 2; the resumed run starts
    # a process per node, moves stage 2 into node 1's process and stops node 2's until its node arrives.
    "shrink-process-trace": dict(strategy={"name": "checkfree"},
                                 engine={"name": "distributed", "timeout_s": 20, "no_replacement": "shrink"},
                                 replacement={"replacement": "fixed", "replacement_mean_h": 0.04},
                                 failure=[{"iteration": 3, "stage": 2}, {"iteration": 10, "stage": 1}],
                                 save_every=1, stop_at=8),
    # Two nodes a stage: a node of stage 1 lost and re-synced before the stop, one of stage 2 still away at the
    # stop (the roster's vacancy travels with the state), and stage 2 emptied after the resume.
    "replicas-trace": dict(strategy={"name": "checkfree"}, engine={"replicas": 2},
                           failure=[{"iteration": 3, "stage": 1, "replica": 0}, {"iteration": 7, "stage": 2, "replica": 1},
                                    {"iteration": 10, "stage": 2}],
                           replacement={"replacement": "fixed", "replacement_mean_h": 0.05}, save_every=1, stop_at=8),
    # A pool of 9 nodes for 4 stages x 2 (one spare): losses before and after the stop, a vacancy filled by the
    # next node to come; the replay is played again to where the saved run was.
    "churn": dict(strategy={"name": "checkfree_plus"}, engine={"replicas": 2},
                  pool=[(0, f"n{i}", "up") for i in range(9)] + [(60, "n1", "down"), (200, "n2", "down"),
                                                                  (260, "n9", "up"), (330, "n3", "down"),
                                                                  (331, "n4", "down"), (340, "n5", "down"),
                                                                  (510, "n10", "up"), (610, "n11", "up"),
                                                                  (710, "n12", "up"), (5000, "n13", "up")],
                  save_every=1, stop_at=8),
}


def _resume_cfg(data_cache: str, tmp_path: Path, case: dict, **trainer) -> object:
    failure = case.get("failure")
    if "pool" in case:
        pool = tmp_path / "pool.csv"
        pool.write_text("time_s,node,event\n" + "".join(f"{t},{n},{e}\n" for t, n, e in case["pool"]))
        failure = {"name": "churn", "path": str(pool)}
    if isinstance(failure, list):
        failure = {"name": "trace", "path": trace(tmp_path, failure), **case.get("replacement", {})}
    return load_run_config(small_run_dict(data_cache, strategy=case["strategy"], failure=failure,
                                          engine=case.get("engine", {}),
                                          trainer={"iterations": 12, "save_every": case["save_every"], **trainer}))


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_after_interruption_gives_the_uninterrupted_run(name, data_cache, tmp_path):
    case = RESUME_CASES[name]
    full = build_run(_resume_cfg(data_cache, tmp_path, case), tmp_path / "full")
    full.run()

    stopped = hooked_run(_resume_cfg(data_cache, tmp_path, case), tmp_path / "run", train_step=stop_at(case["stop_at"]))
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    saved = (case["stop_at"] - 1) // case["save_every"] * case["save_every"]
    assert summary["status"] == "interrupted" and summary["resumable_from_iteration"] == saved
    assert [r["iteration"] for r in strict_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(case["stop_at"]))

    # The Hydra dir of the resuming job is ignored: the run goes on in its own directory.
    resumed = build_run(_resume_cfg(data_cache, tmp_path, case, resume=str(tmp_path / "run")), tmp_path / "elsewhere")
    after = resumed.run()
    assert not (tmp_path / "elsewhere").exists()
    a, b = strict_metrics(tmp_path / "full" / "metrics.jsonl"), strict_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in b] == list(range(13))  # one record per iteration, none twice
    assert strip(a) == strip(b)
    assert same_weights(weights(full), weights(resumed))
    before = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert {k: v for k, v in before.items() if k not in NONDETERMINISTIC_SUMMARY} == \
        {k: v for k, v in after.items() if k not in NONDETERMINISTIC_SUMMARY}
    assert after["status"] == "completed" and after["resumed_at_iterations"] == [saved]
    assert any(f["iteration"] > saved for f in before["failures"]), "the case must lose a stage after the resume"
    if name.startswith(("checkpoint", "memory_checkpoint")):
        assert before["lost_iterations"] > 0
    if "_fit" in name:  # the loss after the resume fitted on 8 pairs, half of them buffered before the stop
        assert [r["details"]["fit_pairs"] for rec in b if rec["iteration"] > saved
                for r in rec.get("recoveries", [])] == [8]
    if name.startswith("shrink"):  # stopped on three hosts, back on four after the resume
        hosts = {r["iteration"]: r["hosts"] for r in b if "hosts" in r}
        assert hosts[case["stop_at"] - 1] == [0, 1, 1, 3] and hosts[10] == [0, 0, 2, 3]  # stage 2 home, 1 shrunk
        assert [r["moves"] for r in b if r.get("moves")][0] == [{"stage": 2, "from": 1, "to": 2}]


def test_a_finished_run_trains_on_with_more_iterations(data_cache, tmp_path):
    """`trainer.iterations=7`, then `trainer.iterations=12 trainer.resume=DIR` = 12 iterations in one go
    (except that the short run validated at its last iteration, 7)."""
    case = RESUME_CASES["checkfree_plus-trace"]
    full = build_run(_resume_cfg(data_cache, tmp_path, case), tmp_path / "full")
    full.run()
    train(_resume_cfg(data_cache, tmp_path, case, iterations=7), tmp_path / "run")
    more = build_run(_resume_cfg(data_cache, tmp_path, case, resume=str(tmp_path / "run")), tmp_path / "x")
    more.run()
    a, b = strip(read_metrics(tmp_path / "full" / "metrics.jsonl")), strip(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert "val_loss" in b[7] and "val_loss" not in a[7]
    del b[7]["val_loss"]
    assert a == b and same_weights(weights(full), weights(more))


def test_resume_refuses_a_missing_state_or_a_changed_config(data_cache, tmp_path):

    with pytest.raises(ConfigError, match=r"trainer.resume='.*nowhere' is invalid: no such directory"):
        train(load_run_config(small_run_dict(data_cache, trainer={"resume": str(tmp_path / "nowhere")})), tmp_path / "a")
    train(load_run_config(small_run_dict(data_cache, trainer={"iterations": 2})), tmp_path / "nosave")
    with pytest.raises(ConfigError, match=r"holds no resume/state.pt.*trainer.save_every"):
        train(load_run_config(small_run_dict(data_cache, trainer={"resume": str(tmp_path / "nosave")})), tmp_path / "b")
    train(load_run_config(small_run_dict(data_cache, trainer={"iterations": 2, "save_every": 1})), tmp_path / "saved")
    metrics = (tmp_path / "saved" / "metrics.jsonl").read_bytes()
    changed = small_run_dict(data_cache, trainer={"resume": str(tmp_path / "saved"), "lr": 1e-3})
    with pytest.raises(ConfigError, match=r"trainer.lr=0.001: the saved run has trainer.lr=0.003"):
        train(load_run_config(changed), tmp_path / "c")
    fewer = small_run_dict(data_cache, trainer={"resume": str(tmp_path / "saved"), "iterations": 1})
    with pytest.raises(ConfigError, match=r"trainer.iterations=1 .*already at iteration 2"):
        train(load_run_config(fewer), tmp_path / "d")
    # Refused before any work: the saved run's files are untouched, and no other directory was made.
    assert (tmp_path / "saved" / "metrics.jsonl").read_bytes() == metrics
    assert not any((tmp_path / d).exists() for d in "abcd")
    # A fresh run over the directory is refused (it would throw the saved state away), and says how to resume.
    with pytest.raises(ConfigError, match=r"holds the resumable state of an earlier run .*trainer.resume="):
        train(load_run_config(small_run_dict(data_cache, trainer={"iterations": 1})), tmp_path / "saved")
    assert (tmp_path / "saved" / "metrics.jsonl").read_bytes() == metrics


def test_a_key_added_since_a_run_was_saved_resumes_at_its_default_only():
    """A run saved before ``network.link_scale`` existed resumes with it at 1 (the behaviour it was saved under);
    any other value, or any other change, is refused as before."""
    from checkfree.run.resume import check_same_config
    from checkfree.run.runconfig import RunConfig

    current = RunConfig().to_dict()
    saved = {**current, "network": {k: v for k, v in current["network"].items() if k != "link_scale"}}
    check_same_config(saved, current, "run")  # at its default: accepted
    slower = {**current, "network": {**current["network"], "link_scale": 10.0}}
    with pytest.raises(ConfigError, match=r"network.link_scale=10.0: the saved run has network.link_scale=None"):
        check_same_config(saved, slower, "run")
    changed = {**current, "network": {**current["network"], "latency_s": 0.5}}
    with pytest.raises(ConfigError, match=r"network.latency_s=0.5: the saved run has network.latency_s=0.001"):
        check_same_config(saved, changed, "run")


@pytest.mark.parametrize("strategy", [{"name": "checkpoint", "every": 1},
                                      {"name": "memory_checkpoint", "every": 1, "storage_every": 1}])
def test_a_loss_inside_a_step_right_after_a_save_redoes_it_on_the_same_batches_once(strategy, small_run, tmp_path):
    """A stage lost during iteration 4's step (from outside the failure model, as a killed process) with the
    rollback target saved at the end of iteration 3: the rollback rewinds the data stream to that save, so the
    redone step draws iteration 4's batches again, once -- the run is the run without the loss (the same losses,
    the same final weights and data position), plus the attempt's time, and no step is lost."""
    from checkfree.engine import StagesLost

    def kill_stage_1_in_step_4(n, engine):
        if n == 4:
            engine.lose([1])
            raise StagesLost({1}, "step")

    cfg = small_run(strategy=strategy, trainer={"iterations": 6, "eval_every": 6})
    clean = build_run(cfg, tmp_path / "clean")
    clean_summary = clean.run()
    lossy = hooked_run(cfg, tmp_path / "lossy", train_step=kill_stage_1_in_step_4)
    summary = lossy.run()
    assert summary["status"] == "completed" and [f["stage"] for f in summary["failures"]] == [1]
    assert summary["lost_iterations"] == 0 and summary["n_recoveries"] == 1
    losses = [[(r["iteration"], r.get("train_loss")) for r in read_metrics(d / "metrics.jsonl")]
              for d in (tmp_path / "clean", tmp_path / "lossy")]
    assert losses[0] == losses[1]
    assert summary["final_val_loss"] == clean_summary["final_val_loss"]
    assert lossy.trainer.corpus.train.state_dict() == clean.trainer.corpus.train.state_dict()
    weights = [run.trainer.engine.stage_states() for run in (clean, lossy)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*weights) for k in a)
    assert summary["total_sim_time_s"] > clean_summary["total_sim_time_s"]  # the attempt and the recovery


def test_truncate_metrics_keeps_one_whole_record_per_saved_iteration(tmp_path):
    from checkfree.run.resume import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i}) for i in (0, 1, 2, 3, 2, 3, 4)] + ['{"iteration": 5, "tra']
    path.write_text("\n".join(lines))
    assert truncate_metrics(path, 3) == 4
    assert [r["iteration"] for r in strict_metrics(path)] == [0, 1, 2, 3]


# --- numeric guards --------------------------------------------------------------------------------------

def test_a_nan_weight_stops_the_run_naming_iteration_and_stage(small_run, tmp_path):
    trainer = hooked_run(small_run(trainer={"iterations": 8}), tmp_path / "run", train_step=poison(5, 2))
    with pytest.raises(NonFiniteError, match=r"iteration 5 .*stage\(s\) \[2\] \(non-finite weights\).*skipped"):
        trainer.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "error" and "iteration 5" in summary["error"] and "[2]" in summary["error"]
    assert [r["iteration"] for r in strict_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    # The step was skipped: the NaN stayed in stage 2 and reached no other stage.
    assert trainer.trainer.engine.nonfinite_stages() == [2]


def test_on_nonfinite_recover_rebuilds_the_stage_from_its_neighbours(small_run, tmp_path):
    cfg = small_run(trainer={"iterations": 8, "on_nonfinite": "recover"})
    trainer = hooked_run(cfg, tmp_path / "run", train_step=poison(5, 2))
    summary = trainer.run()
    records = strict_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[5]["step_skipped"] is True and records[5]["nonfinite_stages"] == [2]
    assert records[5]["progress"] == 4  # the skipped step is not progress
    [rec] = records[6]["recoveries"]
    assert records[6]["failed_stages"] == [2] and (rec["method"], rec["sources"]) == ("average", [1, 3])
    assert summary["status"] == "completed" and summary["n_failures"] == summary["n_recoveries"] == 1
    assert summary["failures"] == [{"iteration": 6, "stage": 2, "time_s": records[5]["sim_time_s"], "cause": "nonfinite"}]
    assert all(math.isfinite(r["train_loss"]) for r in records[6:]) and math.isfinite(summary["final_val_loss"])
    assert trainer.trainer.engine.nonfinite_stages() == []


def test_a_nonfinite_loss_with_finite_weights_names_the_stage_it_came_from(small_run, tmp_path):
    def overflow(n, engine):
        """Stage 1 outputs inf at iteration 3 (its weights stay finite): an activation overflow."""
        if n == 3:
            body = engine.stages[1].body
            engine.stages[1].body = lambda h: body(h) * float("inf")

    with pytest.raises(NonFiniteError, match=r"iteration 3 .*stage\(s\) \[1\] \(the first non-finite output"):
        hooked_run(small_run(), tmp_path / "run", train_step=overflow).run()


def test_skip_nonfinite_leaves_every_stage_untouched(tiny_stages):
    from checkfree.pipeline import LocalEngine
    from checkfree.stage.schedule import InOrder

    from .conftest import random_batches

    pipeline = LocalEngine(tiny_stages, lr=1e-2)
    with torch.no_grad():
        next(tiny_stages[1].layers.parameters()).view(-1)[0] = float("inf")
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in tiny_stages]
    result = pipeline.train_step(random_batches(2, 2, 32, 64, 0), InOrder(4), skip_nonfinite=True)
    assert not result.stepped and not math.isfinite(result.loss)
    after = [{k: v.clone() for k, v in s.state_dict().items()} for s in tiny_stages]
    assert all(torch.equal(b[k], a[k]) for b, a in zip(before, after) for k in b)  # inf == inf: no NaN anywhere
    assert all(not opt.state for opt in pipeline.optimizers)  # Adam never saw the NaN gradients


# --- the real CLI: signals, bad input, multirun ------------------------------------------------------------

def tiny_overrides(cache: str) -> list[str]:
    """The conftest small run as Hydra overrides (the defaults: clock_preset=llama_500m, geo network)."""
    return ["model=tiny", "data.n_documents=600", "data.val_documents=60", "data.val_sequences=8",
            "data.vocab_size=300", f"data.cache_dir={cache}", "trainer.micro_batches=2", "trainer.micro_batch_size=4",
            "trainer.eval_every=4", "trainer.progress_bar=false", "logger.wandb.mode=disabled", "strategy=checkfree",
            "failure=none"]


def cli(*args: str, sweep: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "checkfree.train", *(["-m"] if sweep else []), *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for ``proc``; a hang kills it and fails the test (no process outlives its test)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()  # what it said before it hung: where it was stuck
        pytest.fail(f"{proc.args} hung for {timeout} s; its stderr ended with:\n{err[-3000:]}")
    return proc.returncode, out, err


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_sigint_and_sigterm_leave_whole_metrics_and_an_interrupted_summary(data_cache, tmp_path):
    rng = random.Random(os.getpid())
    # (signal, how many): a second signal stops at once instead of letting the iteration finish.
    cases = [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)]
    procs = []
    try:
        for sig, n in cases:  # all at once: most of each run is the interpreter starting
            run_dir = tmp_path / f"{sig.name}-{n}"
            procs.append((cli(*tiny_overrides(data_cache), "trainer.iterations=100000", "trainer.save_every=1000",
                              f"hydra.run.dir={run_dir}"), run_dir))
        for (sig, n), (proc, run_dir) in zip(cases, procs):
            deadline = time.monotonic() + 120
            while proc.poll() is None and _lines(run_dir / "metrics.jsonl") < 2:
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))  # anywhere: mid-step, mid-eval, mid-write
            for _ in range(n):
                proc.send_signal(sig)
                time.sleep(0.01)
        results = [finish(proc, timeout=60) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for (sig, n), (_, run_dir), (rc, _, err) in zip(cases, procs, results):
        assert rc == 128 + sig, err[-2000:]
        assert "Traceback" not in err
        records = strict_metrics(run_dir / "metrics.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted", summary["error"]
        assert [r["iteration"] for r in records] == list(range(len(records)))
        if n == 1:
            # The signal let the iteration under way finish and saved there (save_every > 0): nothing lost.
            assert summary["resumable_from_iteration"] == records[-1]["iteration"] >= 1

    run_dir = procs[1][1]
    last = json.loads((run_dir / "summary.json").read_text())["resumable_from_iteration"]
    # No hydra.run.dir: a resumed run goes on in its own directory, Hydra's files too (another one is refused).
    proc = cli(*tiny_overrides(data_cache), f"trainer.iterations={last + 2}", "trainer.save_every=1000",
               f"trainer.resume={run_dir}")
    rc, out, err = finish(proc)
    assert rc == 0, err[-2000:]
    assert [r["iteration"] for r in strict_metrics(run_dir / "metrics.jsonl")] == list(range(last + 3))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_at_iterations"] == [last]


def test_a_second_signal_while_the_run_stops_still_exits_with_the_first_ones_status(data_cache, tmp_path):
    """After a Ctrl-C the run takes a second or two to stop: the iteration under way (with save_every), the
    last state and summary, wandb's finish, the engine's close, then Python tearing down an interpreter with
    torch loaded, where it gives SIGINT back its default action. A second Ctrl-C in there used to kill the
    process by the signal (returncode -2, no exit status: 10 of 11 delays from 0.1 to 1.0 s did). Now every
    case exits 130 (143 when SIGTERM came first) with summary.json saying "interrupted"."""
    # (first signal, save_every, wandb, seconds between the two signals)
    cases = [(signal.SIGINT, 0, "offline", 0.3), (signal.SIGINT, 0, "disabled", 0.8),
             (signal.SIGINT, 1000, "offline", 0.5), (signal.SIGTERM, 1000, "disabled", 1.0)]
    procs, sent_twice = [], []
    try:
        for i, (_, save_every, wandb, _) in enumerate(cases):
            run_dir = tmp_path / f"case{i}"
            overrides = [o for o in tiny_overrides(data_cache) if not o.startswith("logger.")]
            procs.append((cli(*overrides, "trainer.iterations=100000", f"trainer.save_every={save_every}",
                              f"logger.wandb.mode={wandb}", f"hydra.run.dir={run_dir}", env={"WANDB_MODE": wandb}),
                          run_dir))
        for (first, _, _, gap), (proc, run_dir) in zip(cases, procs):
            deadline = time.monotonic() + 120
            while proc.poll() is None and _lines(run_dir / "metrics.jsonl") < 3:
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.02)
            proc.send_signal(first)
            time.sleep(gap)
            sent_twice.append(proc.poll() is None)
            if sent_twice[-1]:
                proc.send_signal(signal.SIGINT)
        results = [finish(proc, timeout=60) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert any(sent_twice), "every run had stopped before its second signal: nothing was tested"
    for (first, *_), (_, run_dir), (rc, _, err) in zip(cases, procs, results):
        assert rc == 128 + first, err[-2000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted", summary["error"]
        records = strict_metrics(run_dir / "metrics.jsonl")
        assert [r["iteration"] for r in records] == list(range(len(records)))


def test_a_stop_whose_exception_was_dropped_still_stops_at_the_next_iteration(data_cache, tmp_path):
    """The CLI's signal handler raises, and Python drops an exception raised while the main thread runs a
    finalizer; the stop it also asked for (``lifecycle.request_stop``) ends the run at the next iteration."""
    from checkfree import lifecycle

    def asked_but_dropped(n, engine):
        if n == 3:
            lifecycle.request_stop(signal.SIGTERM)  # what the handler does before its exception is lost

    run = hooked_run(load_run_config(small_run_dict(data_cache, trainer={"iterations": 12})), tmp_path / "run",
                     train_step=asked_but_dropped)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            run.run()
    finally:
        lifecycle._requested.clear()  # a process's CLI asks once; this test process goes on
    assert stopped.value.signum == signal.SIGTERM
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] == 3
    assert [r["iteration"] for r in strict_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_first_signal_mid_iteration_finishes_it_and_stops_before_the_next_even_without_saving(data_cache,
                                                                                                   tmp_path):
    """save_every=0: the SIGINT that arrives inside iteration 3's step is noted, not raised there (where it
    could land inside a library's lock); iteration 3 finishes and is logged, and the run stops before
    iteration 4, saving no state (nothing asked for one)."""
    def signal_mid_step(n, engine):
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)

    run = hooked_run(load_run_config(small_run_dict(data_cache, trainer={"iterations": 12, "save_every": 0})),
                     tmp_path / "run", train_step=signal_mid_step)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run.run()
    assert stopped.value.signum == signal.SIGINT
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] == 3
    assert [r["iteration"] for r in strict_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert not (tmp_path / "run" / "resume").exists()


def _bad_corpus(tmp: Path) -> str:
    path = tmp / "corpus.jsonl"
    good = "\n".join(json.dumps({"text": f"story number {i} about a cat."}) for i in range(5))
    path.write_text(good + '\n{"text": "a torn record\n')
    return str(path)


# (name, overrides, stderr pattern, environment): one case per layer that can refuse a run — Hydra's
# composition, the value checks and the machine checks before Hydra starts (nothing imports torch there), a
# sweep none of whose points can run, and the set-up (a tokenizer is only loaded there, after Hydra wrote its
# files: they are taken back). The whole table of messages is checked in-process, much faster, in
# tests/test_config.py.
CLI_BAD_INPUTS = [
    ("unknown group option", lambda tmp: ["strategy=magic"],
     r"strategy=magic is unknown .*allowed: async_checkpoint, checkfree, checkfree_fit, checkfree_plus", None),
    ("wrong type", lambda tmp: ["trainer.iterations=abc"], r"trainer.iterations='abc' is invalid: allowed is an integer",
     None),
    ("out of range", lambda tmp: ["model.init_std=-1"], r"^config error: model.init_std=-1 is invalid: .* > 0\.$", None),
    ("malformed data", lambda tmp: ["data=local_json", f"data.path={_bad_corpus(tmp)}", "data.n_documents=0",
                                    "data.val_documents=1"],
     r"data.path=.*corpus.jsonl:6 could not be read as json", None),
    ("no GPU", lambda tmp: ["trainer.device=cuda"], r"trainer.device='cuda' is invalid: torch will see no CUDA device",
     {"CUDA_VISIBLE_DEVICES": ""}),
    ("not this machine", lambda tmp: ["engine=distributed", "engine.master_addr=192.0.2.1"],
     r"engine.master_addr='192.0.2.1' is invalid: it is not an address of this machine", None),
    ("sweep", lambda tmp: ["-m", "seed=0,1", "model.rope_theta=0", f"hydra.sweep.dir={tmp / 'run'}"],
     r"model.rope_theta=0 is invalid", None),
    ("hub tokenizer", lambda tmp: ["data.tokenizer=checkfree-test/no-such-tokenizer"],
     r"data.tokenizer='checkfree-test/no-such-tokenizer' is invalid: it is not in the local Hugging Face cache", None),
    ("set-up", lambda tmp: [f"data.tokenizer={_empty_dir(tmp)}"], r"data.tokenizer='.*/tokenizer' could not be loaded",
     None),
]


def _empty_dir(tmp: Path) -> Path:
    """A local tokenizer directory with nothing in it: found only when the tokenizer is loaded, in the set-up."""
    (tmp / "tokenizer").mkdir()
    return tmp / "tokenizer"


def test_bad_input_on_the_command_line_exits_2_with_one_sentence_and_writes_nothing(data_cache, tmp_path):
    procs = []
    for i, (_, make, _, env) in enumerate(CLI_BAD_INPUTS):
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        args = [*tiny_overrides(data_cache), f"hydra.run.dir={case_dir / 'run' / 'deeper'}", *make(case_dir)]
        procs.append((cli(*args, env=env), time.monotonic()))  # all at once: most of each is the interpreter starting
    for i, ((name, _, pattern, _), (proc, start)) in enumerate(zip(CLI_BAD_INPUTS, procs)):
        rc, out, err = finish(proc)
        print(f"{name}: exit {rc} after {time.monotonic() - start:.1f} s (all {len(procs)} in parallel)")
        assert rc == 2, f"{name}: exit {rc}: {err[-1500:]}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("config error: ") and lines[0].endswith("."), f"{name}: {err}"
        assert re.search(pattern, lines[0]), f"{name}: {lines[0]}"
        assert out == "", f"{name}: {out}"
        # Nothing written: no run directory (no .hydra/, no train.log), not even the parent Hydra would create.
        assert not (tmp_path / f"case{i}" / "run").exists(), f"{name}: {list((tmp_path / f'case{i}').rglob('*'))}"


def test_a_failing_sweep_point_does_not_stop_the_others_and_analysis_reports_it(data_cache, tmp_path):
    from checkfree import analysis

    stage0 = trace(tmp_path, [{"iteration": 2, "stage": 0}])
    sweep = tmp_path / "sweep"
    # Point 0 completes (CheckFree+ copies stage 0 back), point 1 is not a strategy (config error: a missing
    # point), point 2 fails mid-run (plain CheckFree cannot rebuild stage 0).
    proc = cli(*tiny_overrides(data_cache), "trainer.iterations=4", "strategy=checkfree_plus", "failure=trace",
               f"failure.path={stage0}", "strategy.name=checkfree_plus,magic,checkfree", f"hydra.sweep.dir={sweep}",
               sweep=True)
    rc, out, err = finish(proc, timeout=180)
    assert rc == 0, err[-2000:]
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "completed"
    assert "strategy.name='magic' is unknown" in (sweep / "1" / "config_error.txt").read_text()
    assert not (sweep / "1" / "metrics.jsonl").exists()
    failed = json.loads((sweep / "2" / "summary.json").read_text())
    assert failed["status"] == "error" and "stage 0" in failed["error"]
    assert [r["iteration"] for r in strict_metrics(sweep / "2" / "metrics.jsonl")] == [0, 1]

    assert analysis.main([str(sweep), "--out", str(tmp_path / "analysis")]) == 0
    report = (tmp_path / "analysis" / "comparison.md").read_text()
    assert "## Missing points (1)" in report and "magic" in report and str(sweep / "1") in report
    assert "Incomplete runs" in report and str(sweep / "2") in report


# --- short soak ------------------------------------------------------------------------------------------

def test_short_soak_every_strategy_survives_a_brutal_failure_rate(data_cache, tmp_path):
    """The soak of benchmarks/soak.py (its invariants are checkfree.run.audit's) on the tiny model: 40 iterations at p=0.15 per stage per iteration
    on every stage (edges included), so each strategy meets simultaneous and adjacent losses."""
    from checkfree.recovery import STRATEGIES
    from checkfree.run.audit import check_run

    for strategy in (name for name in STRATEGIES if name != "none"):  # every registered strategy
        # What each needs to survive every kind of loss: fresh weights where it cannot rebuild.
        cfg = load_run_config(small_run_dict(
            data_cache, strategy={"name": strategy, "unrecoverable": "reinit", "every": 4, "storage_every": 20},
            failure={"name": "bernoulli", "p": 0.15, "stages": "all"},
            trainer={"iterations": 40, "eval_every": 20}))
        train(cfg, tmp_path / strategy)
        figures = check_run(tmp_path / strategy, 40)
        assert figures["failures"] >= 15 and figures["simultaneous"] >= 2 and figures["adjacent"] >= 1, figures
        assert min(figures["per_stage"].get(k, 0) for k in range(4)) >= 2, figures
