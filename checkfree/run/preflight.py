"""Refuse a bad run before anything is written: the whole config, and the machine it would run on.

``python -m checkfree.train`` calls ``check_command_line`` before Hydra starts. It composes the config from
the same overrides and the same ``conf/`` (Hydra's compose API), validates it with ``load_run_config`` and
checks the machine (``check_machine``): data.cache_dir can be created and written, local data files can be
read as their corpus type, trainer.device=cuda has a GPU, the process engine's rendezvous address is one of this machine's and a fixed port is free, the
model fits in memory. For a single run it also checks the run directory: creatable and writable, not held
by a live run, holding no resumable state a new run would drop. Nothing here imports torch,
transformers or datasets, so a refusal costs about a second, and nothing is created: no run directory,
no ``.hydra/``, no log.

A sweep (``-m``) is refused up front only when none of its points can run: the points are checked in
order until one passes, for a sweep of at most ``SWEEP_POINTS_CHECKED`` points (a longer one has its first
point checked and is never refused up front). A bad point among good ones is refused by its own job, which
writes ``config_error.txt`` and lets the sweep go on, as before.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from checkfree.data.corpora import check_data_files
from checkfree.model.hub import check_tokenizer
from checkfree.model.presets import param_count
from checkfree.recovery import check_strategy_overrides
from checkfree.run.config import ConfigError, EngineConfig, require
from checkfree.run.resume import check_saved_state
from checkfree.run.runconfig import RunConfig, load_run_config
from checkfree.run.rundir import check_creatable, check_free, refuse_saved_state
from checkfree.run.runlog import RESERVE_BYTES

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
START_BYTES = 1024 * 1024
"""Free space a run needs before it starts (the summary's reserve included); checkpoints need more later, and
a full disk then is survived (``checkfree.storage.atomic``)."""
SWEEP_POINTS_CHECKED = 16
"""A sweep of more points is never refused up front (each point costs a compose, ~0.1 s): its jobs refuse
their own bad points."""


@dataclass(frozen=True)
class Checked:
    """What the command line was found to ask for."""

    run_dir: Path | None
    """The single run's directory, resolved (``${now:...}`` included); None for a sweep."""
    created: tuple[Path, ...]
    """The directories Hydra will create for the run, outermost first (none if ``run_dir`` exists)."""


# --- the command line ----------------------------------------------------------------------------------------


def check_command_line(args: list[str]) -> Checked | None:
    """Compose and check what ``python -m checkfree.train *args`` would run; raise a ConfigError (or Hydra's
    own composition error) if it cannot run. None: not a run or a sweep (``--help``, ``--cfg``, ...)."""
    from hydra import initialize_config_dir

    multirun = False
    overrides = []
    for arg in args:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            return None  # Hydra's other flags print something and exit, or change the config source
        else:
            overrides.append(arg)
    _check_keys(overrides)
    multirun = multirun or "hydra.mode=MULTIRUN" in overrides  # the config's way of saying -m
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="train"):
        if multirun:
            _check_sweep(overrides)
            return Checked(None, ())
        cfg = _compose(overrides)
        run = _validate(cfg, overrides)
        run_dir = check_run_dir(_resumed_dir(run, overrides) or str(cfg.hydra.run.dir), run)
    created = [p for p in (run_dir.absolute(), *run_dir.absolute().parents) if not p.exists()]
    return Checked(run_dir, tuple(reversed(created)))


def _check_keys(overrides: list[str]) -> None:
    """``=5`` parses, with an empty key, and then fails deep in Hydra with a ValueError: refuse it here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        if override.lstrip("+~").startswith(("=", "@")) and parser.parse_override(override).key_or_group == "":
            raise ConfigError(f"the override {override!r} names no key; allowed is key=value (see Hydra's "
                              "override grammar).")


def _resumed_dir(run: RunConfig, overrides: list[str]) -> str | None:
    """A resumed run goes on in its own directory, and Hydra's files go there too: a different
    hydra.run.dir would get a .hydra/ and a log of a run that never writes there, so it is refused."""
    if run.trainer.resume is None:
        return None
    given = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.lstrip("+").startswith("hydra.run.dir=")]
    if given and not _same(Path(given[-1]), Path(run.trainer.resume)):
        raise ConfigError(f"hydra.run.dir={given[-1]!r} is invalid with trainer.resume={run.trainer.resume!r}: a "
                          f"resumed run goes on in its own directory; drop hydra.run.dir or set it to "
                          f"{run.trainer.resume}.")
    return run.trainer.resume


def check_run_dir(value: str, run: RunConfig) -> Path:
    """The single run's directory (``hydra.run.dir``, resolved): creatable, free, and not the home of another
    run's resumable state (unless this run resumes it there)."""
    run_dir = check_creatable(value, "hydra.run.dir", expand_user=False)
    if run_dir.is_dir():
        check_free(run_dir, "hydra.run.dir")
        resumed = run.trainer.resume is not None and _same(run_dir, Path(run.trainer.resume))
        if not resumed:
            refuse_saved_state(run_dir)
    check_room(run_dir)
    return run_dir


def check_room(run_dir: Path) -> None:
    """Refuse a run whose file system cannot hold even its start: Hydra's files, the first metrics and the
    reserve that guarantees its last summary.json (``runlog.RESERVE_BYTES``). Without this, a nearly full disk
    lets a run start and die before it could say anything."""
    where = next((p for p in (run_dir, *run_dir.absolute().parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # cannot tell: the writes themselves will say
    if free < START_BYTES:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} is invalid: its file system has {free:,} bytes free, and a "
                          f"run needs at least {START_BYTES:,} to start ({RESERVE_BYTES:,} reserved for its last "
                          "summary.json, the rest for Hydra's files and the first metrics); free some space there "
                          "or choose another directory.")


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations, as in a real job
    return cfg


def _validate(cfg: DictConfig, overrides: list[str]) -> RunConfig:
    """The job's config (Hydra's node removed, as Hydra does for the job), validated, and the machine checked;
    ``overrides`` are the command line's (a strategy key the chosen strategy does not read is refused)."""
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    run = load_run_config(task)
    check_strategy_overrides(run.strategy.name, overrides)
    check_machine(run)
    return run


def _check_sweep(overrides: list[str]) -> None:
    """Refuse the sweep if no point of it can run (see the module docstring); the sweep directory too."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    base = _compose(fixed)
    check_creatable(str(base.hydra.sweep.dir), "hydra.sweep.dir", expand_user=False)
    if base.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return  # another sweeper plugin chooses its points itself
    params = [f"{key}={value}" for key, value in (base.hydra.sweeper.get("params") or {}).items()]
    # The points as Hydra's basic sweeper will run them: hydra.sweeper.params, then the command line.
    points = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)[0]
    # A longer sweep cannot be decided in a second or two: its first point is checked, for the common case.
    checked = points if len(points) <= SWEEP_POINTS_CHECKED else points[:1]
    first: Exception | None = None
    for point in checked:
        try:
            _validate(_compose(point), point)
            return
        except (ConfigError, OmegaConfBaseException) as exc:  # the latter: an interpolation that cannot resolve
            first = first or exc
    if first is not None and checked is points:
        raise first  # no point can run: the first one's sentence says why


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


# --- the machine -------------------------------------------------------------------------------------------


def check_machine(run: RunConfig) -> None:
    """What the values point at on this machine; each refusal is a ConfigError of one sentence."""
    check_creatable(run.data.cache_dir, "data.cache_dir")
    check_data_files(run.data)
    check_tokenizer(run.data.tokenizer)
    if run.trainer.resume is not None:
        check_saved_state(run.trainer.resume)
        check_free(run.trainer.resume, "trainer.resume")
    check_device(run)
    check_memory(run)
    if run.engine.name != "local":
        check_rendezvous(run.engine)


def no_cuda_reason() -> str | None:
    """Why torch certainly sees no CUDA device here, or None when it may see one (then torch decides, later).

    Answered without importing torch (seconds): a GPU needs a driver (NVIDIA's /proc/driver/nvidia or
    nvidia-smi, or ROCm's /dev/kfd), and CUDA_VISIBLE_DEVICES='' or '-1' hides every device.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    if any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")) \
            or shutil.which("nvidia-smi"):
        return None
    return "this machine has no GPU driver (neither /proc/driver/nvidia nor nvidia-smi)"


def check_device(run: RunConfig) -> None:
    if run.trainer.device == "cpu":
        return
    reason = no_cuda_reason()
    if reason is None:
        return
    require(run.trainer.device != "cuda", "trainer.device", "cuda",
            f"torch will see no CUDA device, as {reason}; allowed here: cpu or auto")
    require(run.engine.backend != "nccl", "engine.backend", "nccl",
            f"NCCL needs CUDA devices and torch will see none, as {reason}; allowed here: gloo or auto")


def on_cpu(run: RunConfig) -> bool:
    return run.trainer.device == "cpu" or (run.trainer.device == "auto" and no_cuda_reason() is not None)


def memory_bytes() -> int | None:
    """This machine's memory, or the container's limit if lower (cgroup v2); None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


ADAM_BYTES_PER_PARAM = 16
"""fp32 weight, gradient and Adam's two moments: a lower bound on what training holds per parameter."""
STR_BYTES = 57
"""A list slot (8) plus an empty Python str (49): a lower bound on the memory of one document."""


def check_memory(run: RunConfig) -> None:
    """Refuse what cannot fit in this machine's memory, by lower bounds only (so never a run that could fit):
    the model's weights and Adam state and one batch's logits when it trains on the CPU, and the synthetic
    corpus, which is held in memory whole. A GPU's memory is not known without torch: a model on a GPU is not checked here."""
    total = memory_bytes()
    if total is None:
        return
    gib = 1024**3
    model = run.model
    if on_cpu(run):
        vocab = model.vocab_size or (run.data.vocab_size if run.data.tokenizer == "bpe" else 0)
        need = ADAM_BYTES_PER_PARAM * param_count(model.with_vocab(vocab))
        shape = " ".join(f"{k}={getattr(model, k)}" for k in ("n_stages", "layers_per_stage", "d_model", "mlp_ratio"))
        require(need <= total, "model", shape,
                f"training its {need // ADAM_BYTES_PER_PARAM:,} parameters on the CPU needs at least "
                f"{ADAM_BYTES_PER_PARAM} bytes each ({need / gib:,.0f} GiB), more than this machine's "
                f"{total / gib:,.0f} GiB; allowed is a smaller model, or a GPU")
        # One batch's logits (batch x seq_len x vocab, fp32) exist at once, whatever else is freed. Validation
        # batches hold at most data.val_sequences sequences.
        batches = {"micro_batch_size": run.trainer.micro_batch_size,
                   "eval_batch_size": min(run.trainer.eval_batch_size, run.data.val_sequences)}
        key = max(batches, key=batches.get)
        need = 4 * batches[key] * model.seq_len * vocab
        if need > total:
            raise ConfigError(
                f"trainer.{key}={getattr(run.trainer, key)} with model.seq_len={model.seq_len} is invalid: one batch "
                f"of logits ({batches[key]} x {model.seq_len} x {vocab} tokens, fp32) needs {need / gib:,.0f} GiB, "
                f"more than this machine's {total / gib:,.0f} GiB; allowed is a smaller batch or sequence.")
    if run.data.name == "synthetic":
        need = STR_BYTES * run.data.n_documents
        require(need <= total, "data.n_documents", run.data.n_documents,
                f"the synthetic corpus is held in memory, at least {STR_BYTES} bytes a document ({need / gib:,.0f} "
                f"GiB), more than this machine's {total / gib:,.0f} GiB; allowed is at most {total // STR_BYTES:,}")


# --- the process engine's rendezvous ---------------------------------------------------------------------
# On one machine the stage processes meet in a private file (``rendezvous.open_file_store``) and talk to each
# other on engine.master_addr's interface; across machines (Ray) the supervisor hosts a TCP store on the
# driver's address. Which addresses are right depends on who starts the workers: each launcher has its own check.

RESOLVE_TIMEOUT_S = 2.0


def check_rendezvous(engine: EngineConfig) -> None:
    check = RENDEZVOUS_CHECKS.get(engine.launcher)
    if check is not None:
        check(engine)


def _local_processes(engine: EngineConfig) -> None:
    """Workers on this machine: the address their sockets use must be one of this machine's. (engine.master_port
    is Ray's: a one-machine run's store is a file, on no port.)"""
    addr = engine.master_addr
    allowed = "allowed is an address of this machine, e.g. 127.0.0.1"
    family, host = _resolve(addr, allowed)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            raise ConfigError(f"engine.master_addr={addr!r} is invalid: it is not an address of this machine "
                              f"({exc.strerror}); {allowed}.") from None


def _resolve(addr: str, allowed: str) -> tuple[int, str]:
    """(address family, numeric host) of ``addr``; a name that does not resolve in time is refused."""
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0])
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)  # a lookup cannot be cancelled: it is left behind
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    if not found:
        raise ConfigError(f"engine.master_addr={addr!r} is invalid: it did not resolve within "
                          f"{RESOLVE_TIMEOUT_S:g} s; {allowed}.")
    if isinstance(found[0], OSError):
        why = found[0].strerror or str(found[0])
        raise ConfigError(f"engine.master_addr={addr!r} is invalid: it does not resolve ({why}); {allowed}.")
    family, _, _, _, sockaddr = found[0]
    return family, sockaddr[0]


RENDEZVOUS_CHECKS = {"processes": _local_processes}
"""engine.launcher -> its check (a launcher not listed is not checked here: e.g. Ray's store runs on the
driver's node, whose address the workers reach over the network)."""

