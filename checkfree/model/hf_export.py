"""The trained model leaves the run: a Hugging Face directory that loads with no code of ours.

``export_model`` turns the per-stage state dicts of a run (stage 0 .. S-1, in index order) into a
``LlamaForCausalLM`` directory: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
tokenizer files, so that ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
give back exactly the pipeline's logits. ``sample`` and ``held_out_loss`` use only those two loaders, so
they check the export as much as they use it.

A run directory is exported from the command line (``checkfree.export``, which checks its arguments before
this module and torch are imported). The weights come from ``RUN_DIR/resume/state.pt`` (``trainer.save_every``) or else from the newest
checkpoint ``RUN_DIR/checkpoints/ckpt_<progress>/``; the model goes to ``RUN_DIR/model`` by default.

Stages are always exported in index order: a CheckFree+ run trains some micro-batches with the edge
stages swapped, but the model it validates (and the one it means) is the in-order chain 0..S-1.

This module imports only ``checkfree.model.llama``, ``checkfree.model.presets``, ``checkfree.data.corpora``, ``checkfree.data.loading``
and ``checkfree.storage.export_paths`` so that the run's lifecycle can import it without a cycle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from checkfree.data.corpora import DataConfig, validate_data_config
from checkfree.data.loading import load_corpus
from checkfree.model.init_from import WEIGHTS_FILE
from checkfree.model.llama import stage_to_hf_key
from checkfree.model.presets import ModelConfig
from checkfree.storage.export_paths import (
    ExportError,
    check_replaceable,
    clear_stale_exports,
    latest_checkpoint,
)

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerBase

__all__ = ["to_causal_lm_state", "export_model", "sample", "held_out_loss",
           "read_checkpoint_stages", "load_run", "model_config_of", "export_run"]

DEFAULT_TEMPERATURE = 0.8
"""A little below 1: small models sampled at full temperature wander off into rare tokens."""
DEFAULT_TOP_K = 50
STAGE_FILE = re.compile(r"stage(\d+)\.pt")


def to_causal_lm_state(stage_states: Sequence[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-stage state dicts (``Stage.state_dict()``, stage 0 first) -> one ``LlamaForCausalLM`` state dict.

    The inverse of ``load_causal_lm_weights``. Tensors are passed through as they are (same device and
    dtype); every key a ``LlamaForCausalLM`` of ``cfg`` has must be present exactly once, with its shape.
    """
    if len(stage_states) != cfg.n_stages:
        raise ValueError(f"stage_states has {len(stage_states)} stage(s), model.n_stages={cfg.n_stages} "
                         "needs one state dict per stage, in stage order.")
    state: dict[str, torch.Tensor] = {}
    for index, stage_state in enumerate(stage_states):
        for key, tensor in stage_state.items():
            if "rotary_emb" in key:  # RoPE tables follow from the config; a LlamaForCausalLM saves none
                continue
            state[stage_to_hf_key(index, key, cfg)] = tensor.detach()
    expected = _causal_lm_shapes(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"the stage states lack {len(missing)} LlamaForCausalLM key(s), first {missing[0]!r}: "
                         f"give the full state dict of every one of the {cfg.n_stages} stages.")
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the model config needs {expected[key]} "
                             "(the stage states come from another model config).")
    return state


def _causal_lm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a ``LlamaForCausalLM`` of ``cfg``, built on the meta device (no memory, no init)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg.hf_config())
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _export_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """``cfg.hf_config()`` plus what a stand-alone model needs: token ids, architecture, dtype, KV cache."""
    import transformers
    from packaging.version import Version

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: generation could never stop; give the run's tokenizer.")
    hf = cfg.hf_config()
    hf.architectures = ["LlamaForCausalLM"]
    # Documents are separated by EOS, so EOS is also the "start of a document" token when there is no BOS.
    hf.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    hf.eos_token_id = eos
    hf.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # transformers 4.56 renamed torch_dtype to dtype (and warns on the old name).
    setattr(hf, "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype", torch.float32)
    hf.use_cache = True  # training has no use for a KV cache; sampling does (it does not change the logits)
    return hf


# ----------------------------------------------------------------------------------------------- export

def export_model(
    stage_states: Sequence[dict[str, torch.Tensor]],
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path | str,
) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` directory at ``out_dir`` (replacing an earlier export).

    The directory is written next to ``out_dir`` under a temporary name and renamed into place, so a reader
    never sees half a model and a crash never leaves one under the final name. Weights are saved as
    float32 on the CPU, whatever device and dtype the stages trained in.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    clear_stale_exports(out_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than model.vocab_size={cfg.vocab_size}: "
                         "give the tokenizer the run trained with.")
    state = {k: v.to("cpu", torch.float32).contiguous() for k, v in to_causal_lm_state(stage_states, cfg).items()}
    hf = _export_config(cfg, tokenizer)
    generation = GenerationConfig(
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
        do_sample=True, temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K,
        max_length=cfg.seq_len,  # the model never saw a position past its training length
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    aside: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an exported model is meant to be shared
        hf.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)  # the rename below must not publish files whose data is still only in the page cache
        if out_dir.exists():
            # Two renames: a directory cannot be renamed over a non-empty one.
            aside = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(out_dir, aside)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not out_dir.exists():
            os.replace(aside, out_dir)  # failed between the renames: put the earlier export back
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out_dir


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- use

def _load(model_dir: Path | str) -> tuple[Any, Any]:
    """(model, tokenizer) with transformers' Auto classes only, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@torch.no_grad()
def sample(
    model_dir: Path | str,
    prompt: str = "",
    max_new_tokens: int | None = None,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
) -> str:
    """Sample a continuation of ``prompt`` from an exported model; the same seed gives the same text.

    The prompt is preceded by the start token (EOS for our tokenizer): documents were separated by EOS in
    training, so what follows one is the start of a new document, and an empty prompt starts a fresh one.
    Sampling stops at EOS or after ``max_new_tokens`` (default: the rest of the training context,
    ``seq_len`` positions). ``temperature=0`` is greedy. The caller's global RNG state is left untouched.
    Returns the prompt and the continuation, decoded without special tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: allowed is >= 0 (0 = greedy).")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: allowed is an integer >= 1.")
    model, tokenizer = _load(model_dir)
    start = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
    ids = [start, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if max_new_tokens is None:
        max_new_tokens = model.config.max_position_embeddings - len(ids)
        if max_new_tokens < 1:
            raise ValueError(f"prompt is {len(ids) - 1} tokens and fills the model's context of "
                             f"{model.config.max_position_embeddings}; shorten it or pass max_new_tokens.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: allowed is an integer >= 1.")
    input_ids = torch.tensor([ids])
    options: dict[str, Any] = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": top_k}
    # fork_rng: seeding here must not change what the caller (e.g. a training run) draws next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # max_length, not max_new_tokens: generation_config.json sets max_length, and giving both warns.
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_length=len(ids) + max_new_tokens, eos_token_id=model.config.eos_token_id,
                             pad_token_id=model.config.pad_token_id, **options)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.no_grad()
def held_out_loss(model_dir: Path | str, sequences: torch.Tensor, batch_size: int = 32) -> float:
    """Mean token cross-entropy of an exported model on ``[N, seq_len + 1]`` token sequences.

    Computed as the trainer's validation loss is (inputs ``x[:, :-1]``, targets ``x[:, 1:]``, mean over
    every target token), so the number can be compared with the run's ``val_loss``.
    """
    if sequences.dim() != 2 or sequences.shape[1] < 2 or sequences.shape[0] < 1:
        raise ValueError(f"sequences has shape {tuple(sequences.shape)}; allowed is [N >= 1, seq_len + 1 >= 2].")
    model, _ = _load(model_dir)
    total, count = 0.0, 0
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start: start + batch_size].long()
        logits = model(batch[:, :-1]).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


# ----------------------------------------------------------------------------------------------- run dirs

def read_checkpoint_stages(ckpt_dir: Path | str) -> list[dict[str, torch.Tensor]]:
    """The stage weights of a checkpoint directory: ``stage<k>.pt`` = {"weights", "optimizer"}, k = 0..S-1."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for path in ckpt_dir.glob("stage*.pt"):
        match = STAGE_FILE.fullmatch(path.name)
        if match:
            files[int(match.group(1))] = path
    if not files:
        raise ExportError(f"{ckpt_dir} holds no stage<k>.pt files, so it is not a checkpoint directory.")
    gap = next(k for k in range(len(files) + 1) if k not in files)
    if gap < len(files):
        raise ExportError(f"{ckpt_dir} lacks stage{gap}.pt, so the checkpoint is incomplete; export another one.")
    stages = []
    for k in range(len(files)):
        payload = _torch_load(files[k])
        if not isinstance(payload, dict) or "weights" not in payload:
            raise ExportError(f"{files[k]} holds no 'weights' entry, so it is not a stage checkpoint file.")
        stages.append(payload["weights"])
    return stages


def _torch_load(path: Path) -> Any:
    try:
        # mmap: only the tensors that are used are read, not a stage's Adam moments (twice its weights).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, or not a torch file: name the file, not a pickle traceback
        # torch's own first line is about its loader (e.g. advice on mmap), not about the file: say what is
        # wrong with the file and what the user can do instead.
        size = path.stat().st_size if path.exists() else 0
        raise ExportError(f"{path} could not be read ({type(exc).__name__}): it is damaged (truncated or overwritten; "
                          f"{size} bytes) or not a file torch.save wrote; export another source of the run "
                          "(--from checkpoint or --from resume).") from None


def _run_config(run_dir: Path, ckpt_dir: Path) -> dict[str, Any]:
    """The run config for a checkpoint export: from meta.pt if it carries one, else summary.json, else the
    resume state (a run killed before its summary has only that)."""
    meta = _torch_load(ckpt_dir / "meta.pt")
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"]
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            config = json.loads(summary.read_text()).get("config")
        except (ValueError, AttributeError):
            config = None
        if isinstance(config, dict):
            return config
    state = run_dir / "resume" / "state.pt"
    if state.is_file():
        saved = _torch_load(state)
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return saved["config"]
    raise ExportError(f"{run_dir} holds no run config for {ckpt_dir.name} (none in meta.pt, summary.json or "
                      "resume/state.pt), so the model's shape is unknown.")


def load_run(run_dir: Path | str, source: str | None = None) -> tuple[list[dict[str, torch.Tensor]], dict, str]:
    """(stage states, run config, what was read) of a run directory; ``source`` = "resume" | "checkpoint" | None
    (None: the resume state if there is one, else the newest checkpoint)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR={str(run_dir)!r} is not a directory; give the directory of a training run.")
    state_file = run_dir / "resume" / "state.pt"
    if source in (None, "resume") and state_file.is_file():
        state = _torch_load(state_file)
        if not isinstance(state, dict) or not {"stages", "config"} <= set(state):
            raise ExportError(f"{state_file} holds no 'stages' and 'config', so it is not a resume state.")
        return state["stages"], state["config"], f"{state_file} (iteration {state.get('iteration')})"
    ckpt = latest_checkpoint(run_dir) if source in (None, "checkpoint") else None
    if ckpt is not None:
        return read_checkpoint_stages(ckpt), _run_config(run_dir, ckpt), str(ckpt)
    lacks = {"resume": "no resume/state.pt", "checkpoint": "no checkpoints/ckpt_<progress>/ directory with meta.pt",
             None: "neither resume/state.pt nor a checkpoints/ckpt_<progress>/ directory with meta.pt"}[source]
    raise ExportError(f"RUN_DIR={str(run_dir)!r} holds {lacks}, so there is no model to export "
                      "(train with trainer.save_every=N > 0 or strategy=checkpoint).")


def model_config_of(run_config: dict, stage_states: Sequence[dict[str, torch.Tensor]]) -> ModelConfig:
    """The run's ``ModelConfig``, with vocab_size = 0 ("from the tokenizer") read off the embedding."""
    cfg = _section(run_config, "model", ModelConfig)
    embed = stage_states[0].get("embed_tokens.weight") if stage_states else None
    if embed is None:
        raise ExportError("stage 0 of the saved state has no embed_tokens.weight, so it is not a first stage.")
    if cfg.vocab_size not in (0, embed.shape[0]):
        raise ExportError(f"model.vocab_size={cfg.vocab_size} disagrees with the saved embedding's "
                          f"{embed.shape[0]} rows; the state and the config come from different runs.")
    return cfg.with_vocab(embed.shape[0])


def _section(run_config: dict, name: str, cls: type) -> Any:
    """``cls(**run_config[name])``, refusing keys this version does not know (one sentence, not a TypeError)."""
    values = dict(run_config.get(name) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExportError(f"the run config's {name}.{unknown[0]} is unknown to this version; allowed keys: "
                          f"{', '.join(sorted(known))}.")
    return cls(**values)


def export_run(run_dir: Path | str, out_dir: Path | str | None = None, source: str | None = None) -> tuple[Path, str]:
    """Export the model of a run directory (default ``RUN_DIR/model``); returns (out_dir, what was read)."""
    run_dir = Path(run_dir)
    stages, run_config, origin = load_run(run_dir, source)
    cfg = model_config_of(run_config, stages)
    # load_corpus reads the tokenizer from data.cache_dir, retraining the (deterministic) BPE if it is gone.
    data = _section(run_config, "data", DataConfig)
    validate_data_config(data)  # the gate a run passes, for a corpus that may have moved since it ran
    tokenizer = load_corpus(data, cfg.seq_len).tokenizer
    try:
        out = export_model(stages, cfg, tokenizer, out_dir if out_dir is not None else run_dir / "model")
    except ValueError as exc:
        raise ExportError(f"{origin} cannot be exported: {exc}") from None
    return out, origin
