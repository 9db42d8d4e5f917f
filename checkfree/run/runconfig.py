"""The whole run's configuration: Hydra's DictConfig -> one validated ``RunConfig`` of dataclasses.

``load_run_config`` checks everything before any work starts (no model is built, no data is read),
so a bad value fails in a second with one sentence naming the key, the value and what is allowed.
Config flows one way: ``train.py`` calls this once and passes the dataclasses down.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from checkfree.data.corpora import DataConfig, validate_data_config
from checkfree.failure_models import validate_failure_config
from checkfree.failure_models.base import FailureConfig, Nodes
from checkfree.model import init_from
from checkfree.model.presets import PRESETS, ModelConfig, validate_model_config
from checkfree.recovery import StrategyConfig, strategy_class, validate_strategy_config
from checkfree.run.config import (
    ConfigError,
    EngineConfig,
    LoggerConfig,
    TrainerConfig,
    require,
    section,
    validate_engine,
    validate_logger,
    validate_trainer,
)
from checkfree.simulation.networks import NetworkConfig, validate_network_config


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "strategy": StrategyConfig,
    "failure": FailureConfig, "network": NetworkConfig, "engine": EngineConfig, "logger": LoggerConfig,
}


MAX_SEED = 2**32 - 1


def check_vocab(model: ModelConfig, data: DataConfig, tokenizer_size: int | None = None) -> None:
    """A run's vocabulary always comes from its tokenizer; a non-zero ``model.vocab_size`` must agree with it,
    or it would be silently ignored. Without ``tokenizer_size`` (before the tokenizer is loaded) only a BPE's
    size is known: ``data.vocab_size``, special tokens included."""
    if model.vocab_size == 0:
        return
    if tokenizer_size is None and data.tokenizer != "bpe":
        return  # a pretrained tokenizer's size is known once it is loaded (checkfree.train.build_run)
    if tokenizer_size is None:
        size, source = data.vocab_size, f"a BPE of data.vocab_size={data.vocab_size} tokens (special tokens included)"
    else:
        size = tokenizer_size
        source = (f"the BPE trained for data.vocab_size={data.vocab_size}" if data.tokenizer == "bpe"
                  else f"data.tokenizer={data.tokenizer!r}") + f", which has {size} tokens"
    require(model.vocab_size == size, "model.vocab_size", model.vocab_size,
            f"the vocabulary comes from the tokenizer, here {source}; set model.vocab_size=0 (from the tokenizer)"
            + (" or data.vocab_size" if data.tokenizer == "bpe" and tokenizer_size is None else ""))


def load_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Resolve, convert and validate every section; raise ConfigError on the first bad value."""
    if isinstance(cfg, DictConfig):
        try:
            raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as exc:
            raise ConfigError(f"{exc.full_key} is required but was not set (it is '???' in the config).") from exc
    else:
        raw = dict(cfg)
    raw.pop("hydra", None)
    known = {"seed", *SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known top-level key; allowed: {', '.join(sorted(known))}.")
    seed = raw.get("seed", 0)
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED, "seed", seed,
            f"it seeds numpy's and torch's generators, so allowed is an integer in 0..{MAX_SEED} (2**32 - 1)")
    for name in SECTIONS:
        # An explicit null (trainer=null) would silently mean "all defaults"; an absent section does.
        require(raw.get(name, {}) is not None, name, None, f"allowed is a mapping of {name}'s keys")
    model_raw = dict(raw.get("model") or {})
    if model_raw.get("name") not in (None, "custom") and model_raw["name"] not in PRESETS:
        raise ConfigError(f"model.name={model_raw['name']!r} is unknown; allowed presets: {', '.join(PRESETS)}.")
    parts = {name: section(cls, name, raw.get(name)) for name, cls in SECTIONS.items()}
    run = RunConfig(seed=seed, **parts)
    validate_run_config(run)
    return run


def validate_run_config(run: RunConfig) -> None:
    n = run.model.n_stages
    validate_model_config(run.model)
    init_from.check(run.model)
    validate_strategy_config(run.strategy, n)
    # A run that saves its state may be continued with more iterations (trainer.resume), where later trace
    # events do happen; one that saves nothing ends at trainer.iterations.
    validate_failure_config(run.failure, n, horizon=None if run.trainer.save_every else run.trainer.iterations,
                            nodes=nodes_of(run))
    validate_data_config(run.data)
    validate_trainer(run.trainer)
    validate_network_config(run.network, n)
    validate_engine(run.engine)
    validate_logger(run.logger)
    if run.trainer.clock_preset is not None and run.trainer.clock_preset not in PRESETS:
        raise ConfigError(f"trainer.clock_preset={run.trainer.clock_preset!r} is unknown; "
                          f"allowed: null or one of {', '.join(PRESETS)}.")
    if run.engine.launcher == "ray" and run.trainer.device == "cuda" and run.engine.ray.gpus_per_stage == 0:
        raise ConfigError("trainer.device='cuda' with engine.launcher=ray needs engine.ray.gpus_per_stage > 0: Ray "
                          "hides the GPUs from actors that reserve none; set engine.ray.gpus_per_stage=1 (or a fraction).")
    reads = strategy_class(run.strategy.name).reads
    for key in ("every", "storage_every"):
        value = getattr(run.strategy, key)
        if key in reads and isinstance(value, int) and not isinstance(value, bool):
            # Only the copy taken before the first iteration would ever exist: every restore would go back to
            # the start, which is a different experiment than the one the key asks for.
            require(value <= run.trainer.iterations, f"strategy.{key}", value,
                    f"it is larger than the run (trainer.iterations={run.trainer.iterations}), so no checkpoint after "
                    f"the initial one would be saved; allowed is 1..{run.trainer.iterations}")
    require(run.trainer.paper_recovery == "measured" or run.trainer.clock == "paper_table2",
            "trainer.paper_recovery", run.trainer.paper_recovery,
            f"only trainer.clock=paper_table2 reads it (this run's clock is {run.trainer.clock}, which prices every "
            "recovery by its bytes anyway); allowed here: measured")
    if run.strategy.name == "none" and run.failure.name != "none":
        raise ConfigError(f"strategy.name='none' recovers nothing, so failure.name={run.failure.name!r} would "
                          "stop the run at the first failure; use failure=none with strategy=none.")
    require(run.seed + run.failure.seed_offset >= 0, "failure.seed_offset", run.failure.seed_offset,
            f"the failure RNG is seeded with seed + failure.seed_offset, so with seed={run.seed} allowed is an "
            f"integer >= {-run.seed}")
    validate_placement(run)
    check_vocab(run.model, run.data)
    # A GPU computes asynchronously and its backward runs on autograd's threads: the serving thread's CPU seconds
    # would not be its compute.
    require(run.engine.compute_time == "wall" or run.trainer.device == "cpu", "engine.compute_time",
            run.engine.compute_time, f"a core clock counts CPU seconds, and trainer.device={run.trainer.device!r} may "
            "compute on a GPU; allowed: trainer.device=cpu, or engine.compute_time=wall")
    require(run.engine.shadows == "copy" or strategy_class(run.strategy.name).redundant_compute, "engine.shadows",
            run.engine.shadows, f"strategy={run.strategy.name} keeps no shadows to compute; allowed: copy (compute "
            "is for strategy=redundant)")
    # With 3 stages stage 1 sends the shadow of stage 0 its gradient on the link its activations take to stage 2;
    # NCCL matches a pair's messages in order, not by tag, so that gradient would be taken for an activation.
    require(run.engine.shadows == "copy" or run.model.n_stages != 3 or run.trainer.device == "cpu", "engine.shadows",
            run.engine.shadows, f"with model.n_stages=3 a shadow's gradient shares a link with activations, which NCCL "
            f"cannot tell apart (trainer.device={run.trainer.device!r}); allowed: copy, or trainer.device=cpu (gloo), "
            "or another number of stages")
    if run.engine.backend == "nccl":
        require(run.trainer.device != "cpu", "engine.backend", "nccl",
                "NCCL runs on CUDA devices only and trainer.device='cpu'; allowed here: gloo or auto")
    if run.logger.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("logger.wandb.mode='online' needs WANDB_API_KEY in the environment (we never prompt "
                          "for a login); set it, or use logger.wandb.mode=offline.")


def nodes_of(run: RunConfig) -> Nodes:
    """The run's nodes as its failure model sees them."""
    return Nodes(run.engine.replicas, run.engine.replica_placement == "spread")


def validate_placement(run: RunConfig) -> None:
    """Where the replicas run, and what a loss without a replacement node may do, against the model and the
    engine."""
    n, engine = run.model.n_stages, run.engine
    require(run.failure.replacement != "trace" or engine.replicas == 1, "failure.replacement", "trace",
            f"its file names each stage's node, and engine.replicas={engine.replicas} gives a stage several; "
            "allowed here: immediate, fixed, exponential or never (or failure=churn for a pool's own timing)")
    require(not strategy_class(run.strategy.name).fits or engine.replicas == 1, "strategy", run.strategy.name,
            f"it fits a rebuilt stage to activations its neighbours buffered, and with engine.replicas="
            f"{engine.replicas} those are spread over the replicas' pipelines (not built yet); allowed here: "
            "engine.replicas=1, or strategy=checkfree / checkfree_plus")
    if engine.failure_clock == "wall":
        from checkfree.distributed.wall_failures import MODELS

        require(run.failure.name in MODELS, "failure", run.failure.name,
                f"engine.failure_clock=wall kills processes at the wall times of the model's losses, and "
                f"{run.failure.name}'s have none of their own; allowed here: {', '.join(MODELS)}")
        if run.failure.name == "trace":
            from checkfree.failure_models.trace_files import read_trace_records

            by_iteration = [where for where, e in read_trace_records(run.failure.path) if e.time_s is None]
            require(not by_iteration, "failure.path", run.failure.path,
                    f"engine.failure_clock=wall kills at wall times, and its {by_iteration[0] if by_iteration else ''}"
                    " has an iteration instead; allowed here: a trace of time_s records")
    require(run.failure.name != "zone" or run.network.table is None, "network.table", run.network.table,
            "failure=zone strikes the reference's 7 locations (GEO_LOCATIONS), not a table's own sites; allowed with "
            "failure=zone is null")
    require(engine.replica_placement in ("same_zone", "spread"), "engine.replica_placement",
            engine.replica_placement, "allowed same_zone or spread")
    if engine.replica_placement == "spread":
        require(engine.replicas > 1, "engine.replica_placement", "spread",
                "it places a stage's replicas at different locations, and engine.replicas=1 keeps one; allowed "
                "here: same_zone, or engine.replicas > 1")
        require(run.network.name == "geo_distributed", "engine.replica_placement", "spread",
                f"network={run.network.name} is one site, so there is nowhere to spread to; allowed here: same_zone, "
                "or network=geo_distributed")
    if engine.no_replacement == "shrink":
        require(not engine.shape, "engine.shape", True,
                "a shrunk pipeline renumbers its processes, and the emulated links follow each process's own site "
                "(not built for a shrink yet); allowed with engine.no_replacement=shrink is false")
        require(n >= 2, "engine.no_replacement", "shrink",
                f"a stage can only move to a neighbouring host, and model.n_stages={n} has none; allowed here: wait")
        require(engine.replicas == 1, "engine.no_replacement", "shrink",
                f"a stage moves to a neighbour host only when its one node is gone, and engine.replicas="
                f"{engine.replicas} keeps the stage on its surviving replicas instead; allowed here: wait, or "
                "engine.replicas=1")
        require(engine.min_hosts is None or 1 <= engine.min_hosts <= n, "engine.min_hosts", engine.min_hosts,
                f"allowed is null or 1..{n} (model.n_stages)")
    elif run.failure.replacement == "never":
        raise ConfigError("failure.replacement=never with engine.no_replacement=wait would wait for ever at the "
                          "first loss; use engine.no_replacement=shrink, or a replacement delay.")


def min_hosts(run: RunConfig) -> int:
    """``engine.min_hosts``, its default (ceil(S / 2): two stages per host on average) filled in."""
    return run.engine.min_hosts if run.engine.min_hosts is not None else -(-run.model.n_stages // 2)
