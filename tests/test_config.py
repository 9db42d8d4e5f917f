"""Real Hydra composition of every YAML in conf/, and the bad inputs of docs/running.md, 'Keys, and what is refused'."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from checkfree.run.config import ConfigError
from checkfree.run.preflight import SWEEP_POINTS_CHECKED, check_command_line
from checkfree.run.runconfig import load_run_config

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
    ("failure", "churn"): ["failure.path=" + str(CONF / "failure" / "traces" / "bamboo" / "p3-trace.csv"),
                           "failure.format=bamboo"],
}


def fixups(group: str, option: str) -> list[str]:
    extra = list(MANDATORY.get((group, option), []))
    if group == "data" and option.startswith("local_"):
        kind = option.split("_", 1)[1]
        extra.append(f"data.path={Path(__file__).parent / 'data' / ('sample.' + {'text': 'txt', 'json': 'jsonl', 'parquet': 'parquet'}[kind])}")
    if group == "data" and option in ("fortunes", "pydocs"):  # CI has no Debian packages: a tiny copy
        extra.append(f"data.path={Path(__file__).parent / 'data' / option}")
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


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a mapping, e.g. ("trainer.lr", 0.0003)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_applies_every_setting_it_lists(experiment):
    """A preset's values win over conf/config.yaml's (it once listed ``experiment`` before ``_self_``, so
    experiment=paper_500m silently trained at the demo's lr, length, batch and precision)."""
    import yaml

    listed = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    cfg = composed(f"experiment={experiment}")
    for group_override in listed.pop("defaults", []):
        (key, option), = group_override.items()
        assert cfg[key.removeprefix("override /")]["name"] == yaml.safe_load(
            (CONF / key.removeprefix("override /") / f"{option}.yaml").read_text())["name"]
    leaves = dict(_leaves(listed))
    assert leaves, experiment
    for key, value in leaves.items():
        assert OmegaConf.select(cfg, key) == value, (experiment, key)
    load_run_config(cfg)  # and the whole preset validates


def test_paper_500m_preset_values():
    run = load_run_config(composed("experiment=paper_500m"))
    t = run.trainer
    assert (t.lr, t.iterations, t.micro_batches, t.micro_batch_size) == (3.0e-4, 20000, 4, 16)
    assert (t.precision, t.device, t.clock_preset, t.eval_every) == ("bf16", "cuda", None, 500)
    assert (run.model.name, run.model.d_model, run.model.n_stages) == ("llama_500m", 1024, 6)
    assert run.strategy.lr_scale == 1.2 and run.engine.replicas == 4
    # An override on the command line still wins over the preset.
    assert load_run_config(composed("experiment=paper_500m", "trainer.lr=1e-4")).trainer.lr == 1e-4


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
    # What a new user types: wrong types, which Hydra passes through as it parsed them.
    (["trainer.iterations=abc"], r"trainer.iterations='abc' is invalid: allowed is an integer\."),
    (["trainer.iterations=2.5"], r"trainer.iterations=2.5 is invalid: allowed is an integer\."),
    (["trainer.lr=fast"], r"trainer.lr='fast' is invalid: allowed is a finite number\."),
    (["trainer.target_loss=low"], r"trainer.target_loss='low' is invalid: allowed is a finite number or null\."),
    (["trainer.progress_bar=maybe"], r"trainer.progress_bar='maybe' is invalid: allowed is true or false\."),
    (["trainer.compile=fast"], r"trainer.compile='fast' is invalid: allowed is true or false\."),
    (["failure.hourly_rate=often"], r"failure.hourly_rate='often' is invalid: allowed is a finite number\."),
    (["model.n_stages=[4]"], r"model.n_stages=\[4\] is invalid: allowed is an integer\."),
    # More values out of range, and names that do not exist.
    (["data.name=wikipedia"], r"data.name='wikipedia' .*allowed corpora are synthetic"),
    (["engine.name=warp"], r"engine.name='warp' .*local or distributed"),
    (["engine=distributed", "engine.launcher=k8s"], r"engine.launcher='k8s' .*processes or ray"),
    (["engine=ray", "engine.ray.placement=RANDOM"], r"engine.ray.placement='RANDOM' .*STRICT_SPREAD"),
    (["engine=ray", "engine.ray.address=ray://head:10001"], r"engine.ray.address='ray://head:10001' .*Ray Client"),
    (["engine=ray", "engine.ray.address=head"], r"engine.ray.address='head' .*HOST:PORT"),
    (["engine=ray", "trainer.device=cuda"], r"trainer.device='cuda' .*engine.ray.gpus_per_stage > 0"),
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
    (["failure=trace", "failure.path={dir}/binary.json"], r"binary.json is invalid: it is a binary file \(byte 2 is NUL\)"),
    (["failure=trace", "failure.path={dir}/latin1.csv"], r"latin1.csv is invalid: it is not UTF-8 text \(byte 23 is 0xe9\)"),
    (["failure=trace", "failure.path={dir}"], r"failure.path=.* is invalid: it is a directory"),
    # Numbers a model cannot have; a number must be finite everywhere (inf and nan parse as floats).
    (["model.init_std=-1"], r"^model.init_std=-1 is invalid: it is a standard deviation, allowed is a number > 0\.$"),
    (["model.rms_norm_eps=0"], r"^model.rms_norm_eps=0 is invalid: .*allowed is a number > 0\.$"),
    (["model.rope_theta=-10000"], r"^model.rope_theta=-10000 is invalid: it is the RoPE base, allowed is a number > 0"),
    (["model.init_std=wide"], r"^model.init_std='wide' is invalid: allowed is a finite number\.$"),
    (["model.rope_theta=inf"], r"^model.rope_theta=inf is invalid: allowed is a finite number\.$"),
    (["engine.timeout_s=inf"], r"^engine.timeout_s=inf is invalid: allowed is a finite number\.$"),
    (["engine.timeout_s=1e9"], r"^engine.timeout_s=1000000000.0 is invalid: .*at most 86400 \(a day\)"),
    (["engine.shape=true"], r"^engine.shape=True is invalid: shaping emulates links between stage processes; "
                            r"allowed with engine.name=local is false"),
    (["engine.compute_time=gpu"], r"^engine.compute_time='gpu' is invalid: allowed is wall or cpu\.$"),
    (["engine=distributed", "engine.compute_time=cpu"], r"^engine.compute_time='cpu' is invalid: cpu emulates a core a "
                                                        r"stage .*engine.shape=False .*needs engine=distributed, its "
                                                        r"processes launcher, engine.shape=true"),
    (["engine=distributed", "engine.shape=true", "engine.compute_time=cpu", "engine.failure_clock=wall"],
     r"^engine.compute_time='cpu' is invalid: .*engine.failure_clock='wall' is wall"),
    (["engine=distributed", "engine.shape=true", "engine.compute_time=cpu"],
     r"^engine.compute_time='cpu' is invalid: a core clock counts CPU seconds, and trainer.device='auto' may compute "
     r"on a GPU; allowed: trainer.device=cpu, or engine.compute_time=wall\.$"),
    (["network.link_scale=0"], r"^network.link_scale=0 is invalid: must be a finite number from 1e-6 to 1e6 \(1: the links as given\)\.$"),
    (["strategy.lr_scale=inf"], r"^strategy.lr_scale=inf is invalid: allowed is a finite number\.$"),
    (["network.latency_s=inf"], r"^network.latency_s=inf is invalid: allowed is a finite number\.$"),
    (["network.bandwidth_Bps=nan"], r"^network.bandwidth_Bps=nan is invalid: allowed is a finite number\.$"),
    (["network.replacement_delay_s=-inf"], r"^network.replacement_delay_s=-inf is invalid: allowed is a finite number"),
    (["trainer.lr=inf"], r"^trainer.lr=inf is invalid: allowed is a finite number\.$"),
    (["trainer.clip=nan"], r"^trainer.clip=nan is invalid"),
    (["trainer.sim_time_budget_s=inf"], r"^trainer.sim_time_budget_s=inf is invalid: allowed is a finite number or null"),
    (["trainer.target_loss=inf"], r"^trainer.target_loss=inf is invalid: allowed is a finite number or null"),
    (["trainer.target_loss=nan"], r"^trainer.target_loss=nan is invalid"),
    (["failure.iteration_seconds=inf"], r"^failure.iteration_seconds=inf is invalid: allowed is a finite number"),
    (["failure.iteration_seconds=1e12"], r"^failure.iteration_seconds=1000000000000.0 is invalid: .*at most 1e\+06"),
    (["trainer.lr=1" + "0" * 400], r"^trainer.lr=10{20}.* is invalid: allowed is a finite number\.$"),
    (["trainer.clock_micro_batch_size=0"], r"trainer.clock_micro_batch_size=0 is invalid: allowed is null .* >= 1"),
    (["trainer.clock_micro_batch_size=-4"], r"trainer.clock_micro_batch_size=-4 is invalid: allowed is null .* >= 1"),
    # T is checked even where the clock does not read it: a wrong value must not wait for a later override.
    (["trainer.paper_T=-1"], r"trainer.paper_T=-1 is invalid: it is T, .* allowed is null or an integer >= 1"),
    (["trainer.clock=paper_table2"], r"trainer.paper_T=None is invalid: trainer.clock=paper_table2 needs T"),
    (["seed=4294967296"], r"^seed=4294967296 is invalid: it seeds numpy's and torch's generators, .*0..4294967295"),
    (["seed=true"], r"^seed=True is invalid: .*an integer in 0..4294967295"),
    (["failure.seed_offset=-5"], r"^failure.seed_offset=-5 is invalid: .*with seed=0 allowed is an integer >= 0"),
    # A value that would be silently ignored.
    (["model.vocab_size=32000"], r"^model.vocab_size=32000 is invalid: the vocabulary comes from the tokenizer, "
                                 r"here a BPE of data.vocab_size=1024 tokens .*set model.vocab_size=0"),
    (["failure.path={dir}/example.json"], r"^failure.path=.* is invalid: only failure=churn\|trace reads it, and this run "
                                          r"has failure=poisson"),
    (["failure.preset=500m_33"], r"^failure.preset='500m_33' is invalid: only failure=bernoulli reads it"),
    (["+strategy.every=5"], r"^strategy.every=5 is not read by strategy=checkfree_plus: it is read only by "
                            r"strategy=async_checkpoint\|checkpoint\|compressed_snapshot\|memory_checkpoint\|snapshot_restore, so it "
                            r"would be ignored; drop it "
                            r"\(strategy=checkfree_plus reads "),
    (["strategy=compressed_snapshot", "strategy.encoding=fp8"],
     r"^strategy.encoding='fp8' is invalid: allowed is 'bf16' or 'int8'.$"),
    (["strategy=checkfree", "+strategy.encoding=bf16"], r"^strategy.encoding=bf16 is not read by strategy=checkfree: "
                                                        r"it is read only by strategy=compressed_snapshot"),
    (["strategy=checkfree_fit", "strategy.fit_buffer=0"],
     r"^strategy.fit_buffer=0 is invalid: allowed is an integer >= 1 \(micro-batches\).$"),
    (["strategy=checkfree_plus_fit", "strategy.fit_steps=-1"], r"^strategy.fit_steps=-1 is invalid: allowed is an "
                                                                r"integer >= 0.$"),
    (["strategy=checkfree_fit", "strategy.fit_loss=l1"], r"^strategy.fit_loss='l1' is invalid: allowed is 'mse' or "
                                                         r"'smooth_l1'.$"),
    (["strategy=checkfree", "+strategy.fit_steps=5"], r"^strategy.fit_steps=5 is not read by strategy=checkfree: it "
                                                      r"is read only by strategy=checkfree_fit\|checkfree_plus_fit"),
    (["strategy=checkfree_fit", "engine.replicas=2"], r"^strategy='checkfree_fit' is invalid: it fits a rebuilt stage "
                                                      r"to activations its neighbours buffered, and with "
                                                      r"engine.replicas=2"),
    (["strategy=checkfree", "+strategy.keep=3"], r"^strategy.keep=3 is not read by strategy=checkfree: it is read "
                                                 r"only by strategy=async_checkpoint\|checkpoint\|memory_checkpoint"),
    (["strategy=checkpoint", "strategy.every=auto"], r"^strategy.every='auto' is invalid for strategy=checkpoint: only "
                                                    r"strategies that save in the background"),
    (["strategy=async_checkpoint", "strategy.keep=1"], r"^strategy.keep=1 is invalid for strategy=async_checkpoint: a "
                                                       r"loss during a flush rolls back to the checkpoint before it"),
    (["strategy=snapshot_restore", "strategy.copies=6"], r"^strategy.copies=6 is invalid for strategy=snapshot_restore "
                                                         r"with model.n_stages=6: .* allowed is 1..5\.$"),
    (["strategy=checkpoint", "+strategy.lr_scale=2"], r"^strategy.lr_scale=2 is not read by strategy=checkpoint: it "
                                                      r"is read only by strategy=checkfree\|checkfree_fit\|checkfree_plus\|"
                                                      r"checkfree_plus_fit\|"),
    (["strategy=redundant", "++strategy.edge_rule=copy"], r"^strategy.edge_rule=copy is not read by "
                                                          r"strategy=redundant: it is read only by strategy=checkfree\|"),
    (["strategy=checkpoint", "strategy.every=300"], r"^strategy.every=300 is invalid: it is larger than the run "
                                                    r"\(trainer.iterations=200\), so no checkpoint after the initial"),
    (["failure=trace", "failure.path={dir}/empty.json"], r"^failure.path=.*empty.json' is invalid: the trace holds no "
                                                         r"event, so nothing would fail"),
    (["failure=trace", "failure.path={dir}/twice.csv"], r"twice.csv line 3 repeats the event of line 2 \(stage 1 at "
                                                        r"iteration 2\); allowed is each loss once\.$"),
    (["failure=trace", "failure.path={dir}/late.json"], r"late.json record 1 is at iteration 201, after the run's "
                                                        r"last \(trainer.iterations=200\), so it would never happen"),
    (["failure=poisson", "failure.p=0.1"], r"^failure.p=0.1 is invalid: only failure=bernoulli reads it"),
    # Empty strings, whole sections replaced, lists that are no lists.
    (["data.path=''"], r"^data.path='' is invalid: allowed is a non-empty string or null\.$"),
    (["data.cache_dir=''"], r"^data.cache_dir='' is invalid: allowed is a non-empty string\.$"),
    (["trainer.resume=''"], r"^trainer.resume='' is invalid: allowed is a non-empty string or null\.$"),
    (["engine.master_addr=''"], r"^engine.master_addr='' is invalid: allowed is a non-empty string\.$"),
    (["trainer=5"], r"^trainer=5 is invalid: allowed is a mapping of trainer's keys"),
    (["trainer=null"], r"^trainer=None is invalid: allowed is a mapping of trainer's keys"),
    (["logger.wandb=5"], r"^logger.wandb=5 is invalid: allowed is a mapping of logger.wandb's keys"),
    (["logger.wandb.tags=fast"], r"^logger.wandb.tags='fast' is invalid: allowed is a list of strings"),
    (["failure.stages=[1,1]"], r"^failure.stages=\[1, 1\] is invalid: allowed is each stage at most once\.$"),
    (["failure.stages=[]"], r"^failure.stages=\[\] is invalid: an empty list lets no stage fail"),
    (["engine.backend=nccl", "trainer.device=cpu"], r"^engine.backend='nccl' is invalid: NCCL runs on CUDA"),
    # What the values point at on this machine (checkfree.run.preflight): paths, files, addresses, memory.
    (["hydra.run.dir=''"], r"^hydra.run.dir='' is invalid: it is empty; allowed is a directory"),
    (["hydra.run.dir={dir}/example.json/run"], r"^hydra.run.dir=.* is invalid: .*example.json is a file, not a dir"),
    (["data.cache_dir=/proc/checkfree-cache"], r"^data.cache_dir='/proc/checkfree-cache' is invalid: /proc is on a "
                                               r"proc file system, where no directory can be created"),
    (["data.cache_dir={dir}/example.json"], r"^data.cache_dir=.* is invalid: .*example.json is a file, not a dir"),
    (["trainer.resume={dir}/example.json"], r"^trainer.resume=.* is invalid: it is a file, not a directory"),
    (["trainer.resume={dir}"], r"^trainer.resume=.* is invalid: it holds no resume/state.pt"),
    (["trainer.resume={dir}/damaged"], r"^trainer.resume=.*damaged' is invalid: .*state.pt is damaged \(1,000 bytes that "
                                       r"are not a whole torch.save archive: File is not a zip file\), so there is"),
    (["data=local_json", "data.path={dir}/torn.jsonl", "data.n_documents=0", "data.val_documents=1"],
     r"^data.path=.*torn.jsonl:3 could not be read as json \(Unterminated string starting at: column 10\)\.$"),
    (["data=local_text", "data.path={dir}/latin1.txt"], r"^data.path=.*latin1.txt could not be read as text \(byte 3 "
                                                          r"is not UTF-8\); allowed is UTF-8 text\.$"),
    (["data=local_parquet", "data.path={dir}/fake.parquet"], r"fake.parquet could not be read as parquet"),
    (["data=tinystories", "data.path={dir}/empty"], r"^data.path=.*empty' is invalid: the directory holds no files"),
    (["data.tokenizer=checkfree-test/no-such-tokenizer", "+env=HF_HUB_OFFLINE=1"],
     r"^data.tokenizer='checkfree-test/no-such-tokenizer' is invalid: it is not in the local Hugging Face cache "
     r"and HF_HUB_OFFLINE \(or TRANSFORMERS_OFFLINE\) forbids downloading it"),
    (["data.tokenizer=./no/such/tokenizer"], r"^data.tokenizer='./no/such/tokenizer' is invalid: no such directory"),
    (["data.n_documents=10000000000000"], r"^data.n_documents=10000000000000 is invalid: the synthetic corpus is "
                                          r"held in memory"),
    (["trainer.device=cpu", "model.d_model=1000000", "model.n_heads=2"],
     r"^model='n_stages=6 layers_per_stage=1 d_model=1000000 mlp_ratio=4' is invalid: training its "
     r"96,002,061,000,000 parameters on the CPU needs at least 16 bytes each"),
    (["trainer.device=cpu", "trainer.micro_batch_size=1000000"],
     r"^trainer.micro_batch_size=1000000 with model.seq_len=64 is invalid: one batch of logits \(1000000 x 64 x "
     r"1024 tokens, fp32\) needs 244 GiB, more than this machine's"),
    (["data.path={dir}/torn.jsonl"], r"^data.path=.* is invalid: data.name=synthetic generates its stories and reads "
                                     r"no file"),
    (["failure=trace", "failure.path=/dev/null"], r"^failure.path=/dev/null is invalid: it is not a regular file"),
    (["=5"], r"^the override '=5' names no key; allowed is key=value"),
    (["engine=distributed", "engine.master_addr=192.0.2.1"], r"^engine.master_addr='192.0.2.1' is invalid: it is not "
                                                             r"an address of this machine"),
    (["engine=distributed", "engine.master_addr=nohost.invalid"], r"^engine.master_addr='nohost.invalid' is invalid: "
                                                                  r"it (does not resolve|did not resolve within)"),
    (["engine=distributed", "engine.master_addr=0.0.0.0"], r"^engine.master_addr='0.0.0.0' is invalid: it would put "
                                                           r"the unauthenticated rendezvous store on every interface"),
    (["trainer.device=cuda", "+env=CUDA_VISIBLE_DEVICES="], r"^trainer.device='cuda' is invalid: torch will see no "
                                                            r"CUDA device, as CUDA_VISIBLE_DEVICES='' hides every GPU"),
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
    "example.json": '[{"iteration": 5, "stage": 2}]',
    "empty.json": "[]",
    "twice.csv": "stage,iteration\n1,2\n1,2\n",
    "late.json": '[{"iteration": 5, "stage": 2}, {"iteration": 201, "stage": 1}]',
    "torn.jsonl": '{"text": "one"}\n{"text": "two"}\n{"text": "a torn record\n',
}
BINARY_FILES = {
    "binary.json": b'[{\x00\x01"stage": 1}]',
    "latin1.csv": "stage,iteration\n1,2 caf\u00e9\n".encode("latin-1"),
    "latin1.txt": "caf\u00e9 story one.\n\nanother story.\n".encode("latin-1"),
    "fake.parquet": b"this is not parquet",
}


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    for name, text in TRACE_FILES.items():
        (d / name).write_text(text)
    for name, data in BINARY_FILES.items():
        (d / name).write_bytes(data)
    (d / "empty").mkdir()
    (d / "damaged" / "resume").mkdir(parents=True)
    (d / "damaged" / "resume" / "state.pt").write_bytes(b"\x80" * 1000)  # a torn state file
    return d


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_sentence(overrides, message, trace_dir, busy_port, tmp_path, monkeypatch):
    """Each row through what ``python -m checkfree.train`` runs before Hydra starts: compose, validate, check
    the machine and the run directory. Nothing is created."""
    args = [f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    for override in overrides:
        if override.startswith("+env="):
            monkeypatch.setenv(*override.removeprefix("+env=").split("=", 1))
        else:
            args.append(override.replace("{dir}", str(trace_dir)).replace("{port}", str(busy_port)))
    with pytest.raises(ConfigError, match=message) as info:
        check_command_line(args)
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the run directory nor the cache


def test_cuda_without_a_driver_is_refused_without_torch(monkeypatch):
    """On a machine without a GPU driver (this one, in CI) trainer.device=cuda is refused up front."""
    from checkfree.run.preflight import no_cuda_reason

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if no_cuda_reason() is None:
        pytest.skip("this machine has a GPU driver: torch decides, when the run starts")
    with pytest.raises(ConfigError, match=r"^trainer.device='cuda' is invalid: torch will see no CUDA device, as "
                                          r"this machine has no GPU driver"):
        load_run_config_and_machine("trainer.device=cuda")


def load_run_config_and_machine(*overrides: str):
    from checkfree.run.preflight import check_machine

    run = load_run_config(composed(*overrides))
    check_machine(run)
    return run


def test_a_sweep_is_refused_up_front_only_when_no_point_can_run(tmp_path):
    sweep = [f"hydra.sweep.dir={tmp_path / 'sweep'}", f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"^model.init_std=-1 is invalid"):
        check_command_line(["-m", *sweep, "seed=0,1", "model.init_std=-1"])
    # strategy=none is valid with failure=none only: one point can run, so the sweep starts (the other
    # point writes its config_error.txt); a base config without the sweep would have been refused.
    assert check_command_line(["-m", *sweep, "strategy=none", "failure=poisson,none"]) is not None
    # A sweep too long to check point by point in a second or two is left to its jobs (config_error.txt each).
    many = ",".join(str(seed) for seed in range(SWEEP_POINTS_CHECKED + 1))
    assert check_command_line(["-m", *sweep, f"seed={many}", "model.init_std=-1"]) is not None
    with pytest.raises(ConfigError, match=r"^hydra.sweep.dir=.* is invalid: .* is a file"):
        (tmp_path / "a_file").write_text("x")
        check_command_line(["-m", f"hydra.sweep.dir={tmp_path / 'a_file'}", "seed=0,1"])
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()


def test_a_run_dir_with_a_clock_is_checked_and_pinned(tmp_path, monkeypatch):
    """``${now:...}`` resolves once: the directory checked is the one Hydra is handed (checkfree.train pins it)."""
    monkeypatch.chdir(tmp_path)
    checked = check_command_line([f"data.cache_dir={tmp_path / 'cache'}"])
    assert checked.run_dir.parts[0] == "outputs" and checked.created[0] == tmp_path / "outputs"
    assert checked.created[-1] == tmp_path / checked.run_dir and not (tmp_path / "outputs").exists()


# Errors Hydra raises itself, before our validation sees the config; `python -m checkfree.train` turns them
# into one sentence (and exit status 2) with checkfree.train._one_sentence.
HYDRA_BAD_INPUTS = [
    (["strategy=magic"], r"^strategy=magic is unknown \(there is no conf/strategy/magic.yaml\); allowed: async_checkpoint, checkfree, "),
    (["model=llama_7b"], r"^model=llama_7b is unknown .*allowed: cpu_small, "),
    (["+experiment=nope"], r"^experiment=nope is unknown .*allowed: "),
    (["trainer.iteratons=5"], r"^trainer.iteratons is not a known key of trainer; allowed keys: .*iterations.*leading \+"),
    (["strategy.lr_scal=2"], r"^strategy.lr_scal is not a known key of strategy; allowed keys: .*lr_scale"),
    (["seeed=1"], r"^seeed is not a known key; allowed keys: seed, model, "),
    (["strategy.every=5"], r"^strategy.every is a key of strategy that the chosen conf/strategy/\*.yaml does not "
                           r"set, so Hydra needs it added with a leading \+: '\+strategy.every=5'\.$"),
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
            "from checkfree.run.runconfig import load_run_config\n"
            f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
            "    load_run_config(compose(config_name='config'))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=CONF.parent).stdout
    assert out.strip() == "[]"


def test_a_pretrained_tokenizers_size_is_checked_once_it_is_loaded():
    """Before loading, only a BPE's size is known (data.vocab_size, special tokens included); a pretrained
    tokenizer's is checked by build_run right after loading it (a ConfigError: exit 2, files taken back)."""
    from checkfree.run.runconfig import check_vocab

    run = load_run_config(composed("data.tokenizer=gpt2", "model.vocab_size=32000"))
    with pytest.raises(ConfigError, match=r"^model.vocab_size=32000 is invalid: the vocabulary comes from the "
                                          r"tokenizer, here data.tokenizer='gpt2', which has 50257 tokens; set "
                                          r"model.vocab_size=0 \(from the tokenizer\)\.$"):
        check_vocab(run.model, run.data, tokenizer_size=50257)
    check_vocab(run.model, run.data, tokenizer_size=32000)
    bpe = load_run_config(composed("data.vocab_size=300", "model.vocab_size=300"))
    with pytest.raises(ConfigError, match=r"here the BPE trained for data.vocab_size=300, which has 280 tokens"):
        check_vocab(bpe.model, bpe.data, tokenizer_size=280)  # a corpus too small for 300 tokens
