"""Real Hydra composition of every YAML in conf/, and the bad-input table of DESIGN §8."""

from __future__ import annotations

import json
import re
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
    (["trainer.target_loss=inf"], r"^trainer.target_loss=inf is invalid: allowed is a finite number or null\.$"),
    (["+trainer.iterationz=5"], r"trainer.iterationz is not a known key of trainer; allowed keys: .*iterations"),
    (["logger.wandb.mode=loud"], r"logger.wandb.mode='loud' .*offline, online or disabled"),
    (["strategy.lr_scale=0"], r"strategy.lr_scale=0 "),
    (["strategy.norm_source=mid"], r"strategy.norm_source='mid' .*'pre' or 'post'"),
    (["network.name=moon"], r"network.name='moon'"),
    (["engine.replicas=0"], r"engine.replicas=0 "),
    (["strategy=none"], r"strategy.name='none' recovers nothing.*failure=none"),
    (["seed=-1"], r"seed=-1 "),
    # What a new user types: wrong types, which Hydra passes through as it parsed them.
    (["trainer.iterations=abc"], r"trainer.iterations='abc' is invalid: allowed is an integer\."),
    (["trainer.iterations=2.5"], r"trainer.iterations=2.5 is invalid: allowed is an integer\."),
    (["trainer.lr=fast"], r"trainer.lr='fast' is invalid: allowed is a finite number\."),
    (["trainer.target_loss=low"], r"trainer.target_loss='low' is invalid: allowed is a finite number or null\."),
    (["trainer.progress_bar=maybe"], r"trainer.progress_bar='maybe' is invalid: allowed is true or false\."),
    (["failure.hourly_rate=often"], r"failure.hourly_rate='often' is invalid: allowed is a finite number\."),
    (["model.n_stages=[4]"], r"model.n_stages=\[4\] is invalid: allowed is an integer\."),
    # More values out of range, and names that do not exist.
    (["data.name=wikipedia"], r"data.name='wikipedia' .*allowed corpora are synthetic"),
    (["engine.name=warp"], r"engine.name='warp' .*local or distributed"),
    (["failure=bernoulli", "failure.p=1.5"], r"failure.p=1.5 .*\[0, 1\)"),
    (["failure=bernoulli", "failure.preset=500m_99"], r"failure.preset='500m_99' .*500m_33"),
    (["failure.stages=edges"], r"failure.stages='edges' .*all, intermediate"),
    (["failure.stages=[0,9]"], r"failure.stages=\[0, 9\] .*\[0, 5\]"),
    (["model.n_heads=0"], r"model.n_heads=0 .*>= 1"),
    (["model.seq_len=0"], r"model.seq_len=0 .*>= 1"),
    (["trainer.micro_batch_size=0"], r"trainer.micro_batch_size=0 .*>= 1"),
    (["trainer.eval_every=0"], r"trainer.eval_every=0 .*>= 1"),
    (["trainer.save_every=-1"], r"trainer.save_every=-1 .*>= 0"),
    (["trainer.on_nonfinite=ignore"], r"trainer.on_nonfinite='ignore' .*error or recover"),
    (["trainer.device=tpu"], r"trainer.device='tpu' .*auto, cpu or cuda"),
    (["trainer.precision=fp8"], r"trainer.precision='fp8' .*fp32 or bf16"),
    (["trainer.clock_preset=llama_7b"], r"trainer.clock_preset='llama_7b' is unknown"),
    (["strategy=checkpoint", "strategy.every=0"], r"strategy.every=0 .*>= 1"),
    (["strategy.unrecoverable=pray"], r"strategy.unrecoverable='pray' .*'error' or 'reinit'"),
    (["data.vocab_size=10"], r"data.vocab_size=10 .*at least 256"),
    # Malformed trace files (written by the test from TRACE_FILES): the message names the file and the line
    # (CSV, JSON syntax) or record (JSON list).
    (["failure=trace", "failure.path={dir}/syntax.json"], r"failure.path=.*syntax.json is not valid JSON: .*line 3"),
    (["failure=trace", "failure.path={dir}/record.json"], r"failure.path=.*record.json record 1 has stage=-1"),
    (["failure=trace", "failure.path={dir}/both.json"], r"both.json record 0 has both 'iteration' and 'time_s'"),
    (["failure=trace", "failure.path={dir}/range.json"], r"range.json record 0 has stage 9, which is out of range"),
    (["failure=trace", "failure.path={dir}/notalist.json"], r"notalist.json must hold a JSON list"),
    (["failure=trace", "failure.path={dir}/line.csv"], r"line.csv line 3 has iteration='soon', which is not an integer"),
    (["failure=trace", "failure.path={dir}/header.csv"], r"header.csv line 1 has header 'stage,when'"),
    (["failure=trace", "failure.path={dir}/trace.txt"], r"trace.txt is invalid: unknown extension '.txt'"),
]

TRACE_FILES = {
    "syntax.json": '[\n  {"iteration": 2, "stage": 1},\n  {"iteration": 3 "stage": 2}\n]\n',
    "record.json": '[{"iteration": 2, "stage": 1}, {"iteration": 3, "stage": -1}]',
    "both.json": '[{"iteration": 2, "time_s": 5.0, "stage": 1}]',
    "range.json": '[{"iteration": 2, "stage": 9}]',
    "notalist.json": '{"iteration": 2, "stage": 1}',
    "line.csv": "stage,iteration\n1,2\n2,soon\n",
    "header.csv": "stage,when\n1,2\n",
    "trace.txt": "stage 1 at 2\n",
}


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    for name, text in TRACE_FILES.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_sentence(overrides, message, trace_dir):
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(composed(*(o.replace("{dir}", str(trace_dir)) for o in overrides)))
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text


# Errors Hydra raises itself, before our validation sees the config; `python -m checkfree.train` turns them
# into one sentence (and exit status 2) with checkfree.train._one_sentence.
HYDRA_BAD_INPUTS = [
    (["strategy=magic"], r"^strategy=magic is unknown \(there is no conf/strategy/magic.yaml\); allowed: checkfree, "),
    (["model=llama_7b"], r"^model=llama_7b is unknown .*allowed: cpu_small, "),
    (["+experiment=nope"], r"^experiment=nope is unknown .*allowed: "),
    (["trainer.iteratons=5"], r"^trainer.iteratons is not a known key of trainer; allowed keys: .*iterations.*leading \+"),
    (["strategy.lr_scal=2"], r"^strategy.lr_scal is not a known key of strategy; allowed keys: .*lr_scale"),
    (["seeed=1"], r"^seeed is not a known key; allowed keys: seed, model, "),
    (["trainer.iterations=[1,"], r"^the override 'trainer.iterations=\[1,' is malformed \("),
    (["model.n_stages=${oops}"], r"^model.n_stages is invalid: Interpolation key 'oops' not found\.$"),
]


@pytest.mark.parametrize("overrides,message", HYDRA_BAD_INPUTS, ids=[" ".join(o) for o, _ in HYDRA_BAD_INPUTS])
def test_hydra_errors_become_one_clear_sentence(overrides, message):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from checkfree.train import _one_sentence

    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        load_run_config(composed(*overrides))  # an interpolation only fails when the config is resolved
    text = _one_sentence(info.value, overrides)
    assert re.search(message, text), text
    assert text.endswith(".") and "\n" not in text


def test_validating_a_config_imports_no_tensor_library():
    """The CLI refuses a bad value in about a second because nothing before the run needs torch (seconds to
    import), transformers or datasets: checkfree.train imports them inside the functions that build a run."""
    import subprocess
    import sys

    code = ("import sys, checkfree.train\n"
            "from hydra import compose, initialize_config_dir\n"
            "from checkfree.runconfig import load_run_config\n"
            f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
            "    load_run_config(compose(config_name='config'))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=CONF.parent).stdout
    assert out.strip() == "[]"
