"""Real Hydra composition of every YAML in conf/, and the bad-input table of DESIGN §8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from checkfree.config import ConfigError
from checkfree.runconfig import load_run_config

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "data", "strategy", "failure", "network", "engine"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Options that need a value the user must give (marked ??? in their YAML).
MANDATORY = {
    ("failure", "trace"): ["failure.path=" + str(CONF / "failure" / "traces" / "example.json")],
}


def fixups(group: str, option: str) -> list[str]:
    extra = list(MANDATORY.get((group, option), []))
    if group == "data" and option.startswith("local_"):
        kind = option.split("_", 1)[1]
        extra.append(f"data.path={Path(__file__).parent / 'data' / ('sample.' + {'text': 'txt', 'json': 'jsonl', 'parquet': 'parquet'}[kind])}")
    if group == "strategy" and option in ("none",):
        extra.append("failure=none")
    if group == "failure" and option == "trace":
        pass
    return extra


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_yaml_composes_and_validates(group, option):
    cfg = composed(f"{group}={option}", *fixups(group, option))
    run = load_run_config(cfg)
    assert getattr(run, group).name == cfg[group]["name"]


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    run = load_run_config(composed(f"experiment={experiment}"))
    assert run.trainer.iterations >= 1


def test_default_config_values():
    run = load_run_config(composed())
    assert run.strategy.name == "checkfree_plus" and run.failure.name == "poisson"
    assert run.model.n_stages >= 4 and run.logger.wandb.mode == "offline"
    json.dumps(run.to_dict())  # the whole config goes into summary.json


TRACE_OK = str(CONF / "failure" / "traces" / "example.json")
BAD_INPUTS = [
    (["strategy.name=magic"], r"strategy.name='magic' is unknown; allowed: .*checkfree_plus"),
    (["model.name=llama_7b"], r"model.name='llama_7b' is unknown; allowed presets: .*llama_500m"),
    (["failure.name=meteor"], r"failure.name='meteor'.*allowed"),
    (["strategy=checkfree", "model.n_stages=2"], r"model.n_stages=2 .*checkfree.*at least 3"),
    (["strategy=checkfree_plus", "model.n_stages=3"], r"model.n_stages=3 .*checkfree_plus.*at least 4"),
    (["failure.hourly_rate=1.0"], r"failure.hourly_rate=1.0 .*\[0, 1\)"),
    (["failure.hourly_rate=-0.1"], r"failure.hourly_rate=-0.1 .*\[0, 1\)"),
    (["model.d_model=100", "model.n_heads=3"], r"model.d_model=100 .*divisible by model.n_heads=3"),
    (["trainer.micro_batches=0"], r"trainer.micro_batches=0 .*>= 1"),
    (["failure=trace"], r"failure.path.*(required|not set|\?\?\?)"),
    (["failure=trace", "failure.path=/nonexistent/trace.json"], r"/nonexistent/trace.json"),
    (["data=local_json", "data.path=/nonexistent/corpus.jsonl"], r"data.path=.*/nonexistent/corpus.jsonl"),
    (["trainer.target_loss=0"], r"trainer.target_loss=0 .*never"),
    (["trainer.target_loss=-1.5"], r"trainer.target_loss=-1.5"),
    (["+trainer.iterationz=5"], r"trainer.iterationz is not a known key of trainer; allowed keys: .*iterations"),
    (["logger.wandb.mode=loud"], r"logger.wandb.mode='loud' .*offline, online or disabled"),
    (["strategy.lr_scale=0"], r"strategy.lr_scale=0 "),
    (["strategy.norm_source=mid"], r"strategy.norm_source='mid' .*'pre' or 'post'"),
    (["network.name=moon"], r"network.name='moon'"),
    (["engine.replicas=0"], r"engine.replicas=0 "),
    (["strategy=none"], r"strategy.name='none' recovers nothing.*failure=none"),
    (["seed=-1"], r"seed=-1 "),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(composed(*overrides))
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text
