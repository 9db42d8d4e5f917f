"""Hydra entry point: ``python -m checkfree.train [overrides]`` (multirun with ``-m``).

Config flows one way: Hydra composes ``conf/`` -> ``load_run_config`` validates everything into
dataclasses before any work starts -> ``Trainer`` builds each part once and runs. The run directory is
Hydra's output directory (``hydra.run.dir``); it receives ``metrics.jsonl`` and ``summary.json``.

Before Hydra starts, ``checkfree.run.preflight`` composes the same config, validates it and checks the machine
and the run directory, without importing torch: a bad value is refused in about a second and nothing is
written. A config error found later, while setting up (a tokenizer that cannot be loaded), takes Hydra's
files back out of a run directory Hydra created for it.

Exit status: 0 done; 2 a bad config (one sentence on stderr, nothing written: Hydra's own composition
errors are rephrased the same way), also for a run directory that another run holds, that holds a
state to resume, or that cannot be written (``checkfree.run.rundir``); 1 a run that failed (its
metrics.jsonl and summary.json stay); 128 + signal number when SIGINT/SIGTERM stopped it (summary.json
says "interrupted"; with ``trainer.save_every`` the run can go on with ``trainer.resume=<run dir>``),
however many more signals follow while it stops (``_raise_interrupted``).

Multirun (``-m``): a failing point is logged (``config_error.txt`` for a bad config, else its own
summary.json) and the sweep goes on; the sweep exits 0 once every point has run, and
``python -m checkfree.analysis`` lists the missing and incomplete points. A sweep with a point Hydra cannot
even compose (``strategy=checkfree,magic``: there is no conf/strategy/magic.yaml), or none of whose points
can run, is refused before any point runs, with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from checkfree.recovery import check_strategy_overrides
from checkfree.run.config import ConfigError, first_line
from checkfree.run.preflight import CONF_DIR, Checked, check_command_line, check_machine
from checkfree.run.runconfig import RunConfig, check_vocab, load_run_config
from checkfree.run.rundir import claim, unusable
from checkfree.storage.atomic import os_error_behind

if TYPE_CHECKING:
    from checkfree.lifecycle import Run
    from checkfree.model.presets import ModelConfig

_checked: Checked | None = None
"""What ``main`` checked before Hydra started: the run directory and the directories Hydra creates for it."""
_job_started = False
"""Set once Hydra hands over to ``run_job``: an OSError before that is Hydra's, writing the run directory."""


def _raise_interrupted(signum: int, frame: object) -> None:
    """The command line's SIGINT and SIGTERM handler: the first signal stops the run, and the ones after it
    are ignored, since the run is then writing its summary, closing and exiting with 128 + signum (a second
    Ctrl-C must not turn that into "killed by SIGINT"). While the run trains, its own
    handler comes first (``Run._stop_between_iterations``: a second signal there still stops at once)."""
    from checkfree.lifecycle import interrupted, request_stop

    _ignore_signals()
    request_stop(signum)  # should the exception be dropped (raised inside a finalizer), the loop still stops
    raise interrupted(signum)  # carries signum: the exit status says which signal stopped the run


def _ignore_signals() -> None:
    """SIGINT and SIGTERM ignored until the process exits. SIG_IGN, not a Python handler that does nothing:
    Python gives the signals back their default action (death by the signal) before it tears the interpreter
    down, about a second after a run with torch loaded, where an ignored signal stays ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


# --- building a run: config -> corpus, engine, trainer ------------------------------------------------------
# Heavy imports (torch, transformers, datasets) happen here, inside the functions: validating a config
# (``load_run_config``) imports none of them.


def train(cfg: RunConfig, run_dir: Path | str) -> dict:
    """Run one training job into ``run_dir`` (with ``trainer.resume=DIR``: on in DIR); returns the summary."""
    return build_run(cfg, Path(run_dir)).run()


def build_run(cfg: RunConfig, run_dir: Path) -> Run:
    """Everything a run needs, built once: the corpus, the engine (local or processes) and the trainer."""
    import torch

    from checkfree.data.loading import load_corpus
    from checkfree.lifecycle import Run
    from checkfree.model.init_from import check_vocab as check_init_vocab
    from checkfree.run.resume import check_resume
    from checkfree.trainer import RunParts, Trainer

    resume_state = None
    if cfg.trainer.resume:
        # Before any work: a missing state or a changed config fails in a second, writing nothing. A resumed
        # run continues in the interrupted run's own directory.
        run_dir = Path(cfg.trainer.resume)
        resume_state = check_resume(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.trainer.device)
    corpus = load_corpus(cfg.data, cfg.model.seq_len, batch_seed=cfg.seed)
    check_vocab(cfg.model, cfg.data, tokenizer_size=corpus.vocab_size)  # a pretrained tokenizer: known only now
    model = cfg.model.with_vocab(corpus.vocab_size)
    check_init_vocab(model)
    parts = RunParts.build(cfg, model)  # strategy, schedule, failure model and clock: once
    engine = build_engine(cfg, model, device, parts.strategy.schedule_name)
    return Run(Trainer(cfg, engine, corpus, model, run_dir, parts), resume_state)


def build_engine(cfg: RunConfig, model: ModelConfig, device, schedule: str | None = None):
    """``engine=local``: every stage in this process; otherwise one process per stage x replica, which train
    with ``schedule`` (the strategy's; worked out from the config when not given)."""
    import torch

    autocast = torch.bfloat16 if cfg.trainer.precision == "bf16" else None
    world = model.n_stages * cfg.engine.replicas
    from checkfree.recovery import strategy_class

    # Micro-batches of activations each stage buffers for its neighbours: only for a strategy that fits to them.
    buffer = cfg.strategy.fit_buffer if strategy_class(cfg.strategy.name).fits else 0
    if cfg.engine.name == "local":
        from checkfree.model.init_from import start_from
        from checkfree.model.llama import build_stages
        from checkfree.pipeline import LocalEngine

        # The thread count a stage process computes with: CPU kernels split their reductions by thread, so the
        # same count makes the two engines' runs alike bit for bit (tests/test_parity.py), from the command line
        # too. On 2 cores that is one thread, which is also the faster for models this small.
        torch.set_num_threads(stage_threads(world))

        stages = [start_from(stage, model, k) for k, stage in enumerate(build_stages(model, cfg.seed, device))]
        return LocalEngine(stages, cfg.trainer.lr, cfg.trainer.clip, autocast_dtype=autocast,
                           fuse=cfg.trainer.fuse_micro_batches, compile=cfg.trainer.compile, buffer=buffer)
    from checkfree.distributed.engine import ProcessEngine
    from checkfree.distributed.rendezvous import pick_backend
    from checkfree.distributed.worker import WorkerSpec

    spec = WorkerSpec(
        stage=0, replica=0, model=model, seed=cfg.seed, lr=cfg.trainer.lr, clip=cfg.trainer.clip,
        precision=cfg.trainer.precision, compile=cfg.trainer.compile, device=device.type,
        schedule=schedule or strategy_class(cfg.strategy.name).schedule_name,
        pipeline=cfg.network.pipeline, micro_batches=cfg.trainer.micro_batches,
        micro_batch_size=cfg.trainer.micro_batch_size, replicas=cfg.engine.replicas,
        backend=pick_backend(cfg.engine, device, world), store_addr=cfg.engine.master_addr,
        store_port=cfg.engine.master_port, timeout_s=cfg.engine.timeout_s,
        # A core clock counts the serving thread's CPU: its stage must compute there alone.
        threads=1 if cfg.engine.compute_time == "cpu" else stage_threads(world), buffer=buffer,
        network=cfg.network if cfg.engine.shape else None, spread=cfg.engine.replica_placement == "spread",
        compute_time=cfg.engine.compute_time, shadows=cfg.engine.shadows,
    )
    wall = cfg.engine.failure_clock == "wall"  # the replacement's delay then passes for real
    core = cfg.engine.compute_time == "cpu"  # or in the processes' emulated time
    return ProcessEngine(spec, cfg.engine, respawn_delay_s=cfg.network.replacement_delay_s if wall else 0.0,
                         core_delay_s=cfg.network.replacement_delay_s if core else 0.0)


def stage_threads(world: int) -> int:
    """The torch threads of one of ``world`` stage processes on this machine: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // world)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' is invalid: torch sees no CUDA device; allowed here: cpu or auto.")
    return torch.device(name)


def run_job(cfg: DictConfig) -> dict | None:
    """One Hydra job. Returns the summary, or None when the job failed inside a multirun."""
    from hydra.types import RunMode

    global _job_started
    _job_started = True
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run = load_run_config(cfg)
        check_strategy_overrides(run.strategy.name, list(hydra_cfg.overrides.task))
        check_machine(run)  # done before Hydra started for a single run; a sweep's points meet it here
    except ConfigError as exc:
        return _config_error(exc, run_dir, multirun)
    except OmegaConfBaseException as exc:  # e.g. model.n_stages=${oops}: an interpolation that cannot resolve
        return _config_error(ConfigError(_key_sentence(exc)), run_dir, multirun)

    # A resumed run goes on in its own directory (checkfree.lifecycle); Hydra's keeps only Hydra's files.
    results = Path(run.trainer.resume) if run.trainer.resume else run_dir
    try:
        summary = train(run, run_dir)
    except ConfigError as exc:
        # Raised while setting up, before the first iteration and before any result file is written: a
        # malformed data file, a trace event out of range, a trainer.resume without a saved state, a run
        # directory that is in use, holds a state to resume, or cannot be written.
        return _config_error(exc, run_dir, multirun)
    except KeyboardInterrupt:
        _ignore_signals()  # the first signal may have gone to the run's own handler, not to ours
        print(f"interrupted; partial results in {results}", file=sys.stderr)
        raise
    except Exception as exc:
        print(f"run failed: {type(exc).__name__}: {exc}\nresults so far in {results}", file=sys.stderr)
        _say_it_failed(results, run, exc)
        if multirun:
            return None  # one bad sweep point never stops the others
        sys.exit(1)
    _print_summary(summary)
    return summary


def _say_it_failed(run_dir: Path, run: RunConfig, exc: Exception) -> None:
    """A run that failed before it could write its own summary (while loading the corpus or building the
    model, or starting its engine: an unreachable Ray cluster) still leaves one that says so, with the cause.
    A summary the run wrote itself (status error, with its totals) is kept as it is."""
    from checkfree.run.rundir import read_status
    from checkfree.run.runlog import write_json_atomic

    if read_status(run_dir) not in (None, "killed"):
        return  # the run's own summary: it knows more than this one
    payload = {"status": "error", "error": f"{type(exc).__name__}: {first_line(exc, limit=1000)}",
               "run_dir": str(run_dir), "strategy": run.strategy.name, "failure": run.failure.name,
               "hourly_rate": run.failure.hourly_rate, "seed": run.seed, "iterations": 0, "n_failures": 0,
               "n_recoveries": 0, "config": run.to_dict()}
    try:
        write_json_atomic(run_dir / "summary.json", payload)
    except OSError as write_exc:  # the cause on stderr above stays the whole story
        print(f"summary.json could not be written ({write_exc})", file=sys.stderr)


def _config_error(exc: ConfigError, run_dir: Path, multirun: bool) -> None:
    print(f"config error: {exc}", file=sys.stderr)
    if multirun:
        (run_dir / "config_error.txt").write_text(f"{exc}\n")
        return None  # the other points of the sweep still run
    _take_back(run_dir)
    sys.exit(2)


def _take_back(run_dir: Path) -> None:
    """A run refused once Hydra has started (a malformed data file, a tokenizer that cannot be loaded) leaves
    nothing either: Hydra's ``.hydra/`` and log go, and so do the directories Hydra created for the run, as
    long as they hold nothing else. A directory that existed before is never touched."""
    created = _checked.created if _checked is not None else ()
    if not created or run_dir.absolute() != created[-1]:
        return
    from checkfree.run.rundir import LOCK_FILE, release_claim

    log = f"{HydraConfig.get().job.name}.log"
    hydra_files = {"config.yaml", "hydra.yaml", "overrides.yaml"}
    dot_hydra = run_dir / ".hydra"
    if not ({p.name for p in run_dir.iterdir()} <= {".hydra", log, LOCK_FILE}
            and (not dot_hydra.is_dir() or {p.name for p in dot_hydra.iterdir()} <= hydra_files)):
        return  # something else was written there: leave it all as it is
    try:
        for name in hydra_files:
            (dot_hydra / name).unlink(missing_ok=True)
        if dot_hydra.exists():
            dot_hydra.rmdir()
        (run_dir / log).unlink(missing_ok=True)
        if release_claim(run_dir):  # the directory this run created goes, its lock file with it
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        for directory in reversed(created):
            directory.rmdir()  # fails (and stops) at the first one that holds something else
    except OSError:
        pass


def _unclaim(checked: Checked | None) -> None:
    """A run refused after its directory was claimed, before Hydra wrote there: the directories the claim
    created go again while they hold nothing but the lock file."""
    from checkfree.run.rundir import LOCK_FILE, release_claim

    if checked is None or checked.run_dir is None or not release_claim(checked.run_dir):
        return
    run_dir = checked.run_dir.absolute()
    if not checked.created or run_dir != checked.created[-1] or not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
        try:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            for directory in reversed(checked.created):
                directory.rmdir()
        except OSError:
            pass


def _recovered_from(recovery: dict) -> str:
    """"rollback to checkpoint ckpt-…" / "checkfree from [1, 3]" / "reinit from scratch"."""
    if recovery.get("checkpoint"):
        return f"{recovery['method']} to checkpoint {recovery['checkpoint']}"
    return f"{recovery['method']} from {recovery['sources'] or 'scratch'}"


def _print_summary(summary: dict) -> None:
    from checkfree.run.runlog import wandb_line

    print(f"\n{summary['strategy']} | {summary['iterations']} iterations | "
          f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} | "
          f"simulated {summary['total_sim_time_s'] / 3600:.2f} h")
    print(f"failures: {summary['n_failures']}, recoveries: {summary['n_recoveries']} "
          f"{summary['recoveries_by_method']}, lost iterations: {summary['lost_iterations']}")
    if summary.get("replicas", 1) > 1:
        print(f"nodes lost: {summary['node_losses']} ({summary['replicas']} nodes a stage), stages emptied: "
              f"{summary['stage_losses']}, replicas re-synced: {summary['resyncs']}")
    for recovery in summary["recoveries"]:
        print(f"  iteration {recovery['iteration']:>4}: stage {recovery['stage']} lost -> {_recovered_from(recovery)}")
    if summary.get("time_to_target_s") is not None:
        print(f"target {summary['target_loss']} reached at {summary['time_to_target_s'] / 3600:.2f} simulated h")
    print(f"run directory: {summary['run_dir']}")
    wandb = wandb_line(summary.get("wandb_dir"), summary.get("wandb_url"))
    if wandb is not None:
        print(wandb)
    if summary.get("model_dir"):
        from transformers.utils import logging as hf_logging

        from checkfree.model.hf_export import sample

        hf_logging.disable_progress_bar()  # one summary, no load bars
        # What the model learned, in its own words: sampled from the exported Hugging Face model (fixed seed).
        print(f"model: {summary['model_dir']} (AutoModelForCausalLM.from_pretrained loads it); a sample:")
        print("  " + sample(summary["model_dir"], seed=0).strip().replace("\n", "\n  "))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def main() -> None:
    """``python -m checkfree.train``: Hydra's own errors (an unknown group option, a key that is not in the
    config, a malformed override) read like ours — one sentence, exit 2 — instead of Hydra's multi-line
    report and exit 1; an interrupted run exits 128 + signal number without a traceback (its results and
    summary are already written). ``HYDRA_FULL_ERROR=1`` still shows Hydra's full traceback."""
    from hydra.errors import HydraException

    global _checked
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises its exceptions instead of printing them
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # as Python does: a signal ignored by our parent stays so
            signal.signal(sig, _raise_interrupted)
    try:
        # The whole config and the machine, before Hydra creates the run directory and writes into it: a
        # bad value costs a second and leaves nothing behind.
        _checked = check_command_line(sys.argv[1:])
        if _checked is not None and _checked.run_dir is not None:
            _pin_run_dir(_checked.run_dir)
            # Held from here, before Hydra writes into it: another run started on it meanwhile is refused.
            claim(_checked.run_dir)
        hydra_main()
    except KeyboardInterrupt as exc:
        _ignore_signals()
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    except ConfigError as exc:
        _unclaim(_checked)
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as exc:
        _unclaim(_checked)
        if wants_traceback:
            raise
        print(f"config error: {_one_sentence(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        # Hydra creates the run directory and writes .hydra/ and its log there before our job starts: a
        # path that is a file or cannot be written fails in there.
        cause = os_error_behind(exc)
        if wants_traceback or _job_started or cause is None or cause.filename is None:
            raise
        print(f"config error: {_run_dir_sentence(cause)}", file=sys.stderr)
        sys.exit(2)
    finally:
        _ignore_signals()  # the exit status is decided; a signal during the interpreter's teardown must not change it


def _pin_run_dir(run_dir: Path) -> None:
    """Hand Hydra the run directory that was checked: resolving ``hydra.run.dir`` again, it would read the
    clock again for ``${now:...}``, a second later perhaps. Skipped for a path the override grammar cannot
    carry as it is (a backslash, an interpolation); the last hydra.run.dir override wins."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = str(run_dir)
    if "\\" in value or "${" in value:
        return
    override = "hydra.run.dir='" + value.replace("'", "\\'") + "'"
    if OverridesParser.create().parse_override(override).value() == value:
        sys.argv.append(override)


def _one_sentence(exc: Exception, overrides: list[str] | None = None) -> str:
    """Hydra's or OmegaConf's error as one sentence naming the key (or override), the value and what is
    allowed; ``overrides`` (default: the command line) locate a malformed one."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from checkfree.run.runconfig import SECTIONS

    cause = exc.__cause__
    if isinstance(exc, MissingConfigException) and "/" in (exc.missing_cfg_file or ""):
        group, option = exc.missing_cfg_file.rsplit("/", 1)
        return (f"{group}={option} is unknown (there is no conf/{group}/{option}.yaml); allowed: "
                f"{', '.join(exc.options or [])}.")
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        parent = cause.full_key.rpartition(".")[0]
        cls = SECTIONS.get(parent)
        if cls is not None:
            known = sorted(f.name for f in dataclasses.fields(cls))
        else:
            known = [] if parent else ["seed", *SECTIONS]
        leaf = cause.full_key.rpartition(".")[2]
        args = sys.argv[1:] if overrides is None else overrides
        given = next((a for a in args if a.split("=", 1)[0] == cause.full_key), None)
        if cls is not None and leaf in known and given is not None:
            # A real field that the chosen conf/<group>/*.yaml leaves out: Hydra only adds keys with a +.
            return (f"{cause.full_key} is a key of {parent} that the chosen conf/{parent}/*.yaml does not set, so "
                    f"Hydra needs it added with a leading +: '+{given}'.")
        where = f" of {parent}" if parent else ""
        allowed = f"; allowed keys: {', '.join(known)}" if known else ""
        return f"{cause.full_key} is not a known key{where}{allowed} (a new key needs a leading +)."
    if isinstance(exc, OverrideParseException):
        args = sys.argv[1:] if overrides is None else overrides
        bad = next((arg for arg in args if "=" in arg and not arg.startswith("-") and _unparsable(arg)), None)
        detail = str(exc).splitlines()[0] if str(exc) else "syntax error"
        return (f"the override {bad or ' '.join(args)!r} is malformed ({detail}); "
                "see Hydra's override grammar.")
    return _key_sentence(exc)


def _run_dir_sentence(exc: OSError) -> str:
    """``exc``, raised by Hydra creating or writing the run (or sweep) directory, as our sentence."""
    args = sys.argv[1:]
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    value = next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"{key}=")), exc.filename)
    return str(unusable(value, exc, key))


def _key_sentence(exc: Exception) -> str:
    """OmegaConf appends 'full_key: ...' and 'object_type=...' lines; the key leads our sentence instead."""
    key = getattr(exc, "full_key", None)
    text = (first_line(exc, limit=1000) or type(exc).__name__).strip().rstrip(".")
    return f"{key} is invalid: {text}." if key else f"{text}."


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException:
        return True
    return False


if __name__ == "__main__":
    main()
