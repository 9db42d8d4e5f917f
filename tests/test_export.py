"""The exported Hugging Face directory computes exactly what the trained pipeline computes, with no code of ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from checkfree.data.corpora import DataConfig
from checkfree.data.loading import load_corpus
from checkfree.export import main
from checkfree.model.hf_export import (
    export_model,
    held_out_loss,
    read_checkpoint_stages,
    sample,
    to_causal_lm_state,
)
from checkfree.model.llama import build_stages, load_causal_lm_weights
from checkfree.model.presets import preset
from checkfree.pipeline import LocalEngine
from checkfree.stage.schedule import OutOfOrder, swapped_order
from checkfree.storage.export_paths import ExportError, latest_checkpoint
from tests.conftest import pipeline_logits, small_run_dict

SENTENCE = "Once upon a time, a little fox found a red ball in the garden."


@pytest.fixture(scope="module")
def corpus(data_cache):
    """The small run's corpus (same data config, so the session's BPE cache is shared with the run test)."""
    return load_corpus(DataConfig(**small_run_dict(data_cache)["data"]), seq_len=32)


@pytest.fixture(scope="module")
def trained(corpus):
    """A tiny model after a few real CheckFree+ (out-of-order) steps on the corpus: (cfg, stages)."""
    cfg = preset("tiny").with_vocab(corpus.vocab_size)
    stages = build_stages(cfg, seed=0)
    pipeline = LocalEngine(stages, lr=3e-3)
    schedule = OutOfOrder(cfg.n_stages)
    for _ in range(4):
        pipeline.train_step([corpus.train.next_batch(4), corpus.train.next_batch(4)], schedule)
    for stage in stages:
        stage.eval()
    return cfg, stages


@pytest.fixture(scope="module")
def exported(trained, corpus, tmp_path_factory):
    cfg, stages = trained
    return export_model([s.state_dict() for s in stages], cfg, corpus.tokenizer,
                        tmp_path_factory.mktemp("export") / "model")


def test_to_causal_lm_state_inverts_loading(tiny_cfg):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_cfg.hf_config()).state_dict()
    stages = build_stages(tiny_cfg, seed=1)
    load_causal_lm_weights(stages, reference, tiny_cfg)
    state = to_causal_lm_state([s.state_dict() for s in stages], tiny_cfg)
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="stage_states has 3 stage"):
        to_causal_lm_state([s.state_dict() for s in stages[:3]], tiny_cfg)
    partial = [s.state_dict() for s in stages]
    del partial[3]["norm.weight"]
    with pytest.raises(ValueError, match="'model.norm.weight'"):
        to_causal_lm_state(partial, tiny_cfg)


def test_exported_model_computes_the_pipelines_logits(exported, trained, corpus):
    cfg, stages = trained
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    ids = corpus.val[:4, :-1]
    with torch.no_grad():
        ours, theirs = pipeline_logits(stages, ids), model(ids).logits
        swapped = pipeline_logits(stages, ids, swapped_order(cfg.n_stages))
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logits diff: {diff:.3g}")
    assert diff <= 1e-5
    # The export is the in-order chain: the CheckFree+ swapped order computes something else.
    assert (swapped - theirs).abs().max().item() > 1e-2


def test_exported_directory_is_a_complete_hf_model(exported, corpus):
    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                    "tokenizer.json", "tokenizer_config.json"}
    assert [p.name for p in exported.parent.iterdir()] == ["model"]  # no temporary directory left behind
    config = json.loads((exported / "config.json").read_text())
    eos = corpus.tokenizer.eos_token_id
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (eos, eos, 1)
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert config["vocab_size"] == corpus.vocab_size == 300
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    ids = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    assert ids == corpus.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    assert len(ids) > 10 and tokenizer.decode(ids) == SENTENCE
    assert tokenizer.eos_token_id == eos and len(tokenizer) == corpus.vocab_size


def test_sample_is_reproducible_at_a_seed(exported):
    rng = torch.get_rng_state()
    first, again = sample(exported, seed=0), sample(exported, seed=0)
    other = sample(exported, seed=1)
    assert first == again and first != other and len(first) > 20
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    prompted = sample(exported, "Once upon a time", max_new_tokens=8, seed=0)
    assert prompted.startswith("Once upon a time") and len(prompted) > len("Once upon a time")
    assert sample(exported, "Once", max_new_tokens=8, temperature=0) == sample(exported, "Once", max_new_tokens=8,
                                                                              temperature=0, seed=5)


def test_held_out_loss_equals_the_pipelines_validation_loss(exported, trained, corpus):
    _, stages = trained
    expected = LocalEngine(stages, lr=0.0).evaluate(corpus.val, batch_size=4)
    got = held_out_loss(exported, corpus.val, batch_size=3)  # batching does not change a mean over tokens
    print(f"held-out loss {got:.6f}, pipeline {expected:.6f}, diff {abs(got - expected):.3g}")
    assert abs(got - expected) <= 1e-5
    assert 3.0 < got < 5.7  # trained: below ln(300) = 5.70, the loss of a uniform guess


def test_export_replaces_an_earlier_export_and_nothing_else(trained, corpus, tmp_path, monkeypatch):
    cfg, stages = trained
    states = [s.state_dict() for s in stages]
    out = export_model(states, cfg, corpus.tokenizer, tmp_path / "model")
    fresh = [s.state_dict() for s in build_stages(cfg, seed=7)]
    export_model(fresh, cfg, corpus.tokenizer, out)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["lm_head.weight"], fresh[-1]["lm_head.weight"])
    # A crash mid-write keeps the earlier export whole and leaves no temporary directory.
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(states, cfg, corpus.tokenizer, out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], fresh[-1]["lm_head.weight"])
    # A directory that is not an export (e.g. --out RUN_DIR) is never replaced.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ExportError, match="holds no config.json"):
        export_model(states, cfg, corpus.tokenizer, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]


@pytest.fixture(scope="module")
def run_dir(data_cache, tmp_path_factory):
    """A real tiny run that saved its resume state (trainer.save_every=1)."""
    from checkfree.run.runconfig import load_run_config
    from checkfree.train import train

    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = load_run_config(small_run_dict(data_cache, trainer={"iterations": 3, "save_every": 1}))
    assert train(cfg, run)["status"] == "completed"
    return run


def test_cli_exports_a_runs_resume_state(run_dir, capsys):
    assert main([str(run_dir), "--sample"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"exported {run_dir}/resume/state.pt (iteration 3) -> {run_dir}/model"
    assert len(out) >= 2 and out[1]  # the sample
    state = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
    cfg = preset("tiny").with_vocab(300)
    expected = to_causal_lm_state(state["stages"], cfg)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def write_checkpoint(ckpt: Path, stages: list[dict], progress: int) -> None:
    """The per-stage checkpoint format: stage<k>.pt = {"weights", "optimizer"} and a meta.pt."""
    ckpt.mkdir(parents=True)
    for k, weights in enumerate(stages):
        torch.save({"weights": weights, "optimizer": {"state": {}, "param_groups": []}}, ckpt / f"stage{k}.pt")
    torch.save({"progress": progress}, ckpt / "meta.pt")


def test_cli_exports_the_newest_checkpoint(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
    run = tmp_path / "ckpt-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted", "config": state["config"]}))
    old = [{k: torch.zeros_like(v) for k, v in s.items()} for s in state["stages"]]
    write_checkpoint(run / "checkpoints" / "ckpt_0000002", old, 2)
    write_checkpoint(run / "checkpoints" / "ckpt_0000004", state["stages"], 4)
    (run / "checkpoints" / "ckpt_0000009").mkdir()  # still being written: no meta.pt yet
    assert latest_checkpoint(run) == run / "checkpoints" / "ckpt_0000004"
    read = read_checkpoint_stages(run / "checkpoints" / "ckpt_0000004")
    assert len(read) == 4 and all(torch.equal(read[k][n], state["stages"][k][n]) for k in range(4) for n in read[k])

    assert main([str(run), "--from", "checkpoint", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"exported {run}/checkpoints/ckpt_0000004 -> ")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(saved["model.layers.2.mlp.up_proj.weight"], state["stages"][2]["layers.0.mlp.up_proj.weight"])

    (run / "checkpoints" / "ckpt_0000004" / "stage1.pt").unlink()
    with pytest.raises(ExportError, match="lacks stage1.pt"):
        read_checkpoint_stages(run / "checkpoints" / "ckpt_0000004")


def test_cli_errors_are_one_sentence(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        (str(tmp_path / "missing"),): "is not a directory",
        (str(empty),): "holds neither resume/state.pt nor a checkpoints/ckpt_<progress>/",
        (str(run_dir), "--from", "checkpoint"): "holds no checkpoints/ckpt_<progress>/",
        (str(run_dir), "--out", str(run_dir)): "holds no config.json",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("checkfree.export: error: ")
    (empty / "resume").mkdir()
    (empty / "resume" / "state.pt").write_bytes(b"not a torch file")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "state.pt is damaged (16 bytes that are not a whole torch.save archive" in err and err.count("\n") == 1
    assert err.endswith("the run has no checkpoint to export instead.\n")


def test_module_entry_point_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "checkfree.export", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "is not a directory" in result.stderr
