"""model.init_from: a run starts from another run's export (a LlamaForCausalLM) cut into a different split."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from checkfree.run.config import ConfigError
from checkfree.train import build_run, train
from tests.conftest import pipeline_logits
from tests.test_distributed import assert_no_strays

SIX = {"n_stages": 6, "layers_per_stage": 1}


@pytest.fixture(scope="module")
def six_by_one(tmp_path_factory, data_cache):
    """A 6 x 1 run trained 3 iterations and exported (its run directory)."""
    from checkfree.run.runconfig import load_run_config
    from tests.conftest import small_run_dict

    run_dir = tmp_path_factory.mktemp("six") / "run"
    cfg = load_run_config(small_run_dict(data_cache, model=SIX, trainer={"iterations": 3, "eval_every": 3}))
    train(cfg, run_dir)
    return run_dir


def test_a_6x1_export_split_3x2_gives_the_export_s_logits(six_by_one, small_run, tmp_path):
    cfg = small_run(model={"n_stages": 3, "layers_per_stage": 2, "init_from": str(six_by_one)})
    engine = build_run(cfg, tmp_path / "three").trainer.engine
    hf = LlamaForCausalLM.from_pretrained(six_by_one / "model").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = pipeline_logits(engine.stages, ids), hf(ids).logits
    assert len(engine.stages) == 3 and (ours - theirs).abs().max().item() <= 1e-5
    # Stage 1 of the 3 x 2 split holds layers 2 and 3 of the export, bit for bit; stage 0 its embedding.
    assert torch.equal(engine.stages[1].layers[1].mlp.up_proj.weight, hf.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(engine.stages[0].embed_tokens.weight, hf.model.embed_tokens.weight)


def test_the_model_directory_itself_and_the_process_engine_start_alike(six_by_one, small_run, tmp_path):
    """Each stage process loads its own part of the file: the stages equal the local engine's, bitwise."""
    model, none = {"n_stages": 2, "layers_per_stage": 3, "init_from": str(six_by_one / "model")}, {"name": "none"}
    local = build_run(small_run(model=model, strategy=none), tmp_path / "local").trainer.engine
    engine = build_run(small_run(model=model, strategy=none, engine={"name": "distributed", "timeout_s": 20}),
                       tmp_path / "dist").trainer.engine
    engine.start(tmp_path / "dist")
    try:
        states = engine.stage_states()
    finally:
        engine.close()
    assert_no_strays(tmp_path / "dist")
    for ours, theirs in zip(local.stage_states(), states):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("model", "message"), [
    ({"n_stages": 4, "layers_per_stage": 1},
     r"^model.n_stages x model.layers_per_stage = 4 x 1 = 4 layers is invalid: model.init_from has 6 layers, so "
     r"allowed are the splits with 6 layers in all \(2 x 3, 3 x 2, 6 x 1\)\.$"),
    ({**SIX, "d_model": 64}, r"^model.d_model=64 is invalid: model.init_from has hidden_size=32; allowed: the same"),
    ({**SIX, "mlp_ratio": 2}, r"^model.mlp_ratio=2 is invalid: model.init_from has intermediate_size=128"),
])
def test_a_split_or_shape_that_does_not_fit_is_refused_up_front(six_by_one, small_run, model, message):
    with pytest.raises(ConfigError, match=message):
        small_run(model={**model, "init_from": str(six_by_one)})


def test_a_path_with_no_model_is_refused_up_front(small_run, tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_from='.*nothing' is neither a Hugging Face model directory"):
        small_run(model={**SIX, "init_from": str(tmp_path / "nothing")})


def test_another_tokenizer_s_model_is_refused_before_training(six_by_one, small_run, tmp_path):
    cfg = small_run(model={**SIX, "init_from": str(six_by_one)}, data={"vocab_size": 280})
    with pytest.raises(ConfigError, match=r"it has vocab_size=300, this run's tokenizer 280 tokens"):
        build_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_without_init_from_the_seeded_init_is_unchanged(small_run, tmp_path):
    a = build_run(small_run(), tmp_path / "a").trainer.engine.stage_states()
    b = build_run(small_run(model={"init_from": None}), tmp_path / "b").trainer.engine.stage_states()
    assert dataclasses.is_dataclass(small_run().model)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"model.safetensors is truncated: its header places tensor bytes up to \d+, the file has \d+"),
    ("random", r"model.safetensors is unreadable as safetensors \(its first 8 bytes give a header of"),
    ("wider", r"model.safetensors holds model.embed_tokens.weight of shape \[300, 32\], where its config.json gives "
              r"\[300, 64\]"),
])
def test_damaged_weights_are_refused_before_the_run_starts(damage, message, six_by_one, small_run, tmp_path):
    """A truncated or random model.safetensors, or weights of another width under its config.json, are refused
    while the config is checked (from the header alone), not after the run started."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(six_by_one / "model", model)
    weights = model / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "random":
        weights.write_bytes(bytes(range(256)) * 64)
    else:  # the config of a model twice as wide over these weights
        config = json.loads((model / "config.json").read_text())
        config.update(hidden_size=64, intermediate_size=256)
        (model / "config.json").write_text(json.dumps(config))
    shape = {"d_model": 64} if damage == "wider" else {}
    with pytest.raises(ConfigError, match=message):
        small_run(model={**SIX, **shape, "init_from": str(model)})
