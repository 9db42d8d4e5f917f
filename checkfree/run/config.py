"""Validated run configuration: Hydra composes a DictConfig, ``load_run_config`` turns it into dataclasses.

Every check happens here, before any work starts, and each failure is one sentence naming the key, the
bad value and what is allowed (docs/running.md, 'Keys, and what is refused').
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (C++ frames and OmegaConf's key/type lines cut off), or ''."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def finite(value: float) -> bool:
    """Whether ``value`` is a finite number (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise a ConfigError unless ``ok``: ``<key>=<value> is invalid: <allowed>.``"""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}.")


# --- the sections that belong to no other module ------------------------------------------------------


@dataclass(frozen=True)
class TrainerConfig:
    """Hydra key ``trainer``: the loop."""

    iterations: int = 200
    """Wall iterations to run (optimizer steps attempted; a rollback does not give them back)."""
    micro_batches: int = 4
    """M: micro-batches per iteration (gradient accumulation)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch."""
    fuse_micro_batches: bool = False
    """Local engine: run the micro-batches that take the same route as one batch (the same math up to float
    rounding, faster on small models); off keeps every step bit-for-bit equal to the process engine's."""
    lr: float = 3e-3
    """Adam learning rate (constant, as the reference)."""
    clip: float = 1.0
    """Per-stage gradient-norm clip."""
    eval_every: int = 25
    """Validate on the held-out split every this many iterations (and at the end)."""
    eval_batch_size: int = 16
    target_loss: float | None = None
    """Validation loss whose first crossing gives time_to_target_s in the summary."""
    sim_time_budget_s: float | None = None
    """Stop when the simulated clock passes this many seconds (compare strategies at equal wall-clock)."""
    clock: str = "cost_model"
    """'cost_model' (simulated time from checkfree.simulation.cost), 'fixed' (failure.iteration_seconds per iteration) or
    'paper_table2' (the paper's measured iteration times, each iteration standing for 10,000 / paper_T paper
    iterations, so simulated hours are paper hours: see checkfree.simulation.clock)."""
    paper_T: int | None = None
    """clock=paper_table2: T, the no-failure run's iterations to target_loss, measured by a calibration run."""
    paper_recovery: str = "measured"
    """clock=paper_table2: what a recovery costs. 'measured': the paper's ~30 s, whatever it moves (its testbed's
    links). 'priced': network.replacement_delay_s + the bytes the recovery moves (at clock_preset's size) over
    the network preset's links or storage, as the cost_model clock prices it — for experiments that vary the
    bandwidth, where restoring a 1.5 GB snapshot over 10 Mb/s cannot take 30 s."""
    stop_at_target: bool = False
    """Stop at the first validation that reaches target_loss (time to target is what a sweep compares)."""
    export: bool = True
    """Write the trained model to run_dir/model (a Hugging Face directory) when the run ends; sweeps that only
    compare metrics turn it off."""
    clock_preset: str | None = None
    """Price each iteration as this model preset would cost (e.g. llama_500m) instead of the trained model."""
    clock_micro_batch_size: int | None = None
    """Micro-batch size used when pricing with clock_preset (default: trainer.micro_batch_size)."""
    device: str = "auto"
    """auto | cpu | cuda"""
    precision: str = "fp32"
    """fp32 | bf16 (autocast on the stage bodies; head and loss stay fp32)."""
    compile: bool = False
    """Run each stage's training forward and backward through torch.compile (CPU and CUDA, both engines): the
    same math up to float rounding, compiled once in the first iterations (seconds to a minute of warm-up) and
    not again after a recovery (a replacement stage process compiles its own, from inductor's on-disk cache);
    validation stays eager."""
    on_nonfinite: str = "error"
    """A non-finite loss or weight: 'error' (stop, name iteration and stage) or 'recover' (treat as failed)."""
    resume: str | None = None
    """A run directory to continue from its last saved state."""
    save_every: int = 0
    """Save a resumable state into the run directory every this many iterations (0: never)."""
    progress_bar: bool = True


RAY_PLACEMENTS = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


@dataclass(frozen=True)
class RayConfig:
    """Hydra key ``engine.ray``: the Ray launcher of the process engine (``engine.launcher=ray``)."""

    address: str | None = None
    """null: start Ray on this machine (loopback) and stop it at the end | auto | HOST:PORT: join that cluster."""
    placement: str = "SPREAD"
    """Placement-group strategy for the stage actors: SPREAD | PACK | STRICT_SPREAD | STRICT_PACK."""
    cpus_per_stage: float = 1.0
    """CPUs each stage actor reserves; also its torch thread count (at least 1)."""
    gpus_per_stage: float = 0.0
    """GPUs each stage actor reserves (needed for trainer.device=cuda; a fraction shares a GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each stage actor reserves, e.g. {spot: 1} for nodes started with --resources."""
    start_timeout_s: float = 300.0
    """Bound on placing and starting actors (all of them at start, a replacement after a loss)."""
    standby: bool = True
    """Keep a warm spare actor (torch imported, nothing reserved) on each stage's node; CPU stages only."""


@dataclass(frozen=True)
class EngineConfig:
    """Hydra group ``engine``: where the stages run."""

    name: str = "local"
    """local (one process) | distributed (one process per stage on torch.distributed)"""
    launcher: str = "processes"
    """How the distributed engine starts its stage workers: processes (this machine) | ray (Ray actors)."""
    replicas: int = 1
    """W data-parallel replicas per stage: W nodes a stage, a stage lost only when all of them are
    (``checkfree.simulation.roster``). The process engine runs them (gradients all-reduced within a stage);
    the local engine runs one pipeline (the same math) and the clock prices the all-reduce over all W."""
    replica_placement: str = "same_zone"
    """Where a stage's replicas run on the geo network: same_zone (every one at the stage's location) | spread
    (replica r at location (k + r) mod 7: a location's failure takes one replica of a stage, not the stage; the
    gradient all-reduce and a replica's re-sync cross sites)."""
    backend: str = "auto"
    """auto | gloo | nccl. auto: gloo on CPU; on GPUs nccl, or gloo where the processes launcher starts more
    stage processes than this machine has GPUs (NCCL refuses two on one GPU; gloo carries their tensors through
    host memory)."""
    master_addr: str = "127.0.0.1"
    """The interface the stage processes talk on (one machine), or the rendezvous store's host (Ray: the driver
    node's). Never 0.0.0.0: the store has no authentication (``checkfree.distributed.rendezvous``)."""
    master_port: int = 0
    """Ray's rendezvous store's port; 0 picks a free one. (On one machine the store is a private file.)"""
    timeout_s: float = 60.0
    """Bound on any collective or point-to-point wait; nothing hangs longer."""
    failure_clock: str = "simulated"
    """simulated (the failure model's losses strike in simulated time, between the pieces of work the clock prices)
    | wall (the process engine only: each loss kills its stage's process at its time in wall seconds since training
    began, mid-step if that is when it falls; the replacement starts ``network.replacement_delay_s`` of real time
    later: ``checkfree.distributed.wall_failures``)."""
    shape: bool = False
    """The process engine only: every byte a stage process sends (activations, gradients, the all-reduce, a
    recovery's or a held copy's state, a checkpoint shard to and from storage) takes the time the run's network
    gives its link — latency + bytes / bandwidth, queued behind what the link already carries
    (``checkfree.transport.shaper``). With ``network.link_scale`` a small model keeps the preset's ratio of
    communication to compute."""
    compute_time: str = "wall"
    """The process engine's emulated runs (``engine.shape``): wall (a stage process's compute takes the wall seconds
    it takes: where the machine has fewer cores than stage processes, they take turns) | cpu (each process counts
    its own CPU seconds, as if it had a core to itself, and jumps over the waits its links give it instead of
    sleeping; processes meet at every message and command: ``checkfree.transport.core_clock``). cpu computes with
    one thread a stage process, on local processes, with failures in simulated time."""
    shadows: str = "copy"
    """How the process engine keeps redundant computation's shadows (``strategy=redundant``): copy (the owner
    sends its state to the shadow's keeper after every step: exact, the bytes move) | compute (the keeper runs the
    shadow's forward and backward on every micro-batch and steps it, as Bamboo does: exact, no bytes after its
    first copy; ``checkfree.distributed.shadows``). compute runs one stage a process (engine.replicas=1,
    engine.no_replacement=wait)."""
    no_replacement: str = "wait"
    """A lost node whose replacement has not arrived (``failure.replacement``; ``checkfree.simulation.elastic``): wait (the
    pipeline stalls until it is there) | shrink (its stages run on a neighbouring host meanwhile)."""
    min_hosts: int | None = None
    """shrink: the fewest live nodes the pipeline runs on (fewer: it waits); null = ceil(S / 2)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray launcher's settings (engine=ray)."""


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "offline"
    """offline | online | disabled (never a login prompt)"""
    project: str = "checkfree"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


def section(cls: type, key: str, values: dict[str, Any] | None) -> Any:
    """Build dataclass ``cls`` from a config section, rejecting keys it does not have and values of the wrong
    type (``_check_type``). ``values`` None (the section is absent) gives the defaults."""
    if values is not None and not isinstance(values, Mapping):
        # trainer=5 on the command line replaces the whole section: name it rather than fail on dict(5).
        require(False, key, values, f"allowed is a mapping of {key}'s keys, e.g. {key}.<key>=<value>")
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not a known key of {key}; allowed keys: {', '.join(sorted(names))}."
        )
    hints = get_type_hints(cls)
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            require(value is not None, f"{key}.{name}", value, f"allowed is a mapping of {key}.{name}'s keys")
            values[name] = section(hints[name], f"{key}.{name}", value)
        else:
            _check_type(f"{key}.{name}", value, hints[name])
    return cls(**values)


_KINDS = {int: "an integer", float: "a finite number", str: "a non-empty string", bool: "true or false"}


def _check_type(key: str, value: Any, hint: Any) -> None:
    """Hydra passes a mistyped override through as it parsed it (``trainer.iterations=abc`` is the string
    'abc'): catch it here, in one sentence, before a comparison deep inside a check fails with a TypeError.

    Two rules hold for every field, so that no section has to repeat them: a number is finite (``inf`` and
    ``nan`` parse as floats, and no setting means anything at infinity: "no limit" is null where a field
    allows it), and a string is not empty (an empty path is the current directory, an empty name no name).
    """
    union = isinstance(hint, types.UnionType)
    options = [a for a in get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and len(options) < len(get_args(hint))
    if value is None and optional:
        return
    for option in options:
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, int | float) and not isinstance(value, bool) and finite(value):
            return
        if option is str and isinstance(value, str) and value != "":
            return
        if option is bool and isinstance(value, bool):
            return
        if get_origin(option) is list and get_args(option) == (str,):
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return
            require(False, key, value, "allowed is a list of strings, e.g. [a, b]")
        if option not in _KINDS and get_origin(option) is not list:  # Any: checked by the section's own validation
            return
    allowed = " or ".join(_KINDS[o] for o in options) + (" or null" if optional else "")
    require(False, key, value, f"allowed is {allowed}")


def validate_trainer(cfg: TrainerConfig) -> None:
    positive_ints = ["iterations", "micro_batches", "micro_batch_size", "eval_every", "eval_batch_size"]
    for key in positive_ints:
        value = getattr(cfg, key)
        require(isinstance(value, int) and value >= 1, f"trainer.{key}", value, "allowed is an integer >= 1")
    require(cfg.lr > 0 and math.isfinite(cfg.lr), "trainer.lr", cfg.lr, "allowed is a positive number")
    require(cfg.clip > 0, "trainer.clip", cfg.clip, "allowed is a positive number")
    require(cfg.target_loss is None or cfg.target_loss > 0, "trainer.target_loss", cfg.target_loss,
            "a cross-entropy can never reach a value <= 0, so allowed is null or a positive number")
    require(cfg.sim_time_budget_s is None or cfg.sim_time_budget_s > 0, "trainer.sim_time_budget_s",
            cfg.sim_time_budget_s, "allowed is null or a positive number of seconds")
    require(cfg.clock in ("cost_model", "fixed", "paper_table2"), "trainer.clock", cfg.clock,
            "allowed is cost_model, fixed or paper_table2")
    require(cfg.paper_T is None or (isinstance(cfg.paper_T, int) and not isinstance(cfg.paper_T, bool)
                                    and cfg.paper_T >= 1), "trainer.paper_T", cfg.paper_T,
            "it is T, the calibrated iterations to target: allowed is null or an integer >= 1")
    require(cfg.paper_recovery in ("measured", "priced"), "trainer.paper_recovery", cfg.paper_recovery,
            "allowed is measured or priced")
    require(cfg.clock != "paper_table2" or cfg.paper_T is not None, "trainer.paper_T",
            cfg.paper_T, "trainer.clock=paper_table2 needs T, the calibrated iterations to target: an integer >= 1")
    require(not cfg.stop_at_target or cfg.target_loss is not None, "trainer.stop_at_target", cfg.stop_at_target,
            "it needs a trainer.target_loss to stop at")
    require(cfg.device in ("auto", "cpu", "cuda"), "trainer.device", cfg.device, "allowed is auto, cpu or cuda")
    require(cfg.precision in ("fp32", "bf16"), "trainer.precision", cfg.precision, "allowed is fp32 or bf16")
    # None prices with trainer.micro_batch_size; 0 would do the same silently and a negative size makes the
    # simulated clock run backwards.
    require(cfg.clock_micro_batch_size is None or cfg.clock_micro_batch_size >= 1, "trainer.clock_micro_batch_size",
            cfg.clock_micro_batch_size, "allowed is null (price with trainer.micro_batch_size) or an integer >= 1")
    require(cfg.on_nonfinite in ("error", "recover"), "trainer.on_nonfinite", cfg.on_nonfinite,
            "allowed is error or recover")
    require(cfg.save_every >= 0, "trainer.save_every", cfg.save_every, "allowed is an integer >= 0")


def validate_engine(cfg: EngineConfig) -> None:
    require(cfg.name in ("local", "distributed"), "engine.name", cfg.name, "allowed is local or distributed")
    require(cfg.replicas >= 1, "engine.replicas", cfg.replicas, "allowed is an integer >= 1")
    require(cfg.backend in ("auto", "gloo", "nccl"), "engine.backend", cfg.backend,
            "allowed is auto, gloo or nccl")
    require(0 <= cfg.master_port < 65536, "engine.master_port", cfg.master_port, "allowed is 0..65535")
    # The rendezvous store has no authentication: on every interface, any host that reaches this one could read
    # and change the run's state (checkfree.distributed.rendezvous).
    require(str(cfg.master_addr).strip("[]") not in ("0.0.0.0", "::"), "engine.master_addr", cfg.master_addr,
            "it would put the unauthenticated rendezvous store on every interface; allowed is the address of the "
            "one interface the stage processes use (127.0.0.1 on one machine)")
    # It bounds every single wait of the process engine: a wait of more than a day hides a hang.
    require(0 < cfg.timeout_s <= 86400, "engine.timeout_s", cfg.timeout_s,
            "allowed is a number of seconds > 0 and at most 86400 (a day)")
    require(cfg.failure_clock in ("simulated", "wall"), "engine.failure_clock", cfg.failure_clock,
            "allowed is simulated or wall")
    require(cfg.failure_clock == "simulated" or (cfg.name == "distributed" and cfg.replicas == 1
                                                  and cfg.launcher == "processes"),
            "engine.failure_clock", cfg.failure_clock, "wall kills stage processes on this machine, one a stage: "
            f"allowed with engine.name={cfg.name!r}, engine.launcher={cfg.launcher!r} and engine.replicas="
            f"{cfg.replicas} is simulated (wall needs engine=distributed, its processes launcher and "
            "engine.replicas=1)")
    require(not cfg.shape or cfg.name == "distributed", "engine.shape", cfg.shape,
            "shaping emulates links between stage processes; allowed with engine.name=local is false "
            "(engine=distributed runs one process per stage)")
    require(cfg.compute_time in ("wall", "cpu"), "engine.compute_time", cfg.compute_time, "allowed is wall or cpu")
    if cfg.compute_time == "cpu":
        # Each process's clock is met by the others only through the times its shaped messages carry, and the
        # supervisor's wall-clock kills would strike a time no process keeps.
        require(cfg.name == "distributed" and cfg.launcher == "processes" and cfg.shape
                and cfg.failure_clock == "simulated", "engine.compute_time", cfg.compute_time,
                "cpu emulates a core a stage for the stage processes on this machine, timed by their shaped "
                f"messages; allowed with engine.name={cfg.name!r}, engine.launcher={cfg.launcher!r}, engine.shape="
                f"{cfg.shape} and engine.failure_clock={cfg.failure_clock!r} is wall (cpu needs engine=distributed, "
                "its processes launcher, engine.shape=true and engine.failure_clock=simulated)")
    require(cfg.shadows in ("copy", "compute"), "engine.shadows", cfg.shadows, "allowed is copy or compute")
    require(cfg.shadows == "copy" or (cfg.name == "distributed" and cfg.replicas == 1 and cfg.no_replacement == "wait"),
            "engine.shadows", cfg.shadows, "compute runs each shadow in its keeper's stage process, one stage a "
            f"process; allowed with engine.name={cfg.name!r}, engine.replicas={cfg.replicas} and "
            f"engine.no_replacement={cfg.no_replacement!r} is copy (compute needs engine=distributed, "
            "engine.replicas=1 and engine.no_replacement=wait)")
    require(cfg.launcher in ("processes", "ray"), "engine.launcher", cfg.launcher, "allowed is processes or ray")
    require(cfg.launcher == "processes" or cfg.name == "distributed", "engine.launcher", cfg.launcher,
            f"it launches the process engine, not engine.name={cfg.name!r}; use engine=ray (engine.name=distributed)")
    require(cfg.no_replacement in ("wait", "shrink"), "engine.no_replacement", cfg.no_replacement,
            "allowed is wait or shrink")
    require(cfg.min_hosts is None or cfg.no_replacement == "shrink", "engine.min_hosts", cfg.min_hosts,
            f"only engine.no_replacement=shrink reads it, and this run has {cfg.no_replacement}; set it to null")
    validate_ray(cfg.ray)


def validate_ray(cfg: RayConfig) -> None:
    address = cfg.address
    require(address is None or not address.startswith("ray://"), "engine.ray.address", address,
            "Ray Client (ray://) is not supported because the supervisor hosts the rendezvous store, so run it "
            "on a node of the cluster with address auto or HOST:PORT")
    require(address is None or address == "auto" or _host_port(address), "engine.ray.address", address,
            "allowed is null (a local Ray), auto (the cluster running here) or HOST:PORT of the head node")
    require(cfg.placement in RAY_PLACEMENTS, "engine.ray.placement", cfg.placement,
            f"allowed is {', '.join(RAY_PLACEMENTS)}")
    require(cfg.cpus_per_stage > 0, "engine.ray.cpus_per_stage", cfg.cpus_per_stage, "allowed is a number > 0")
    require(cfg.gpus_per_stage >= 0, "engine.ray.gpus_per_stage", cfg.gpus_per_stage, "allowed is a number >= 0")
    require(isinstance(cfg.resources, dict), "engine.ray.resources", cfg.resources,
            "allowed is a mapping of resource name to amount, e.g. {spot: 1}")
    for name, amount in cfg.resources.items():
        ok = isinstance(amount, int | float) and not isinstance(amount, bool) and amount > 0
        require(ok, f"engine.ray.resources.{name}", amount, "allowed is a number > 0")
    require(cfg.start_timeout_s > 0, "engine.ray.start_timeout_s", cfg.start_timeout_s,
            "allowed is a positive number of seconds")


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def validate_logger(cfg: LoggerConfig) -> None:
    require(cfg.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode", cfg.wandb.mode,
            "allowed is offline, online or disabled")
