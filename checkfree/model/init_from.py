"""``model.init_from``: start a run from a ``LlamaForCausalLM`` — a Hugging Face model directory, or a run
directory whose ``model/`` is another run's export — cut into this run's ``model.n_stages`` x
``model.layers_per_stage``, whatever split it was trained with. The user's way to continue a model on a
different number of machines.

The split only has to keep the layer count and the shapes; the checks read the directory's ``config.json``
(no torch) and run with the config's validation, before any work. Each stage then reads only its own
tensors from the weights file (``stage_weights``): a stage process or Ray actor loads its part itself, so the
path must be readable where the stages run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from checkfree.model.presets import ModelConfig
from checkfree.run.config import ConfigError, first_line, require

if TYPE_CHECKING:
    from checkfree.model.llama import Stage

WEIGHTS_FILE = "model.safetensors"
"""As ``hf_export`` writes it (and ``save_pretrained`` with safetensors)."""

SHAPE_KEYS = (("hidden_size", "d_model"), ("num_attention_heads", "n_heads"), ("rms_norm_eps", "rms_norm_eps"),
              ("rope_theta", "rope_theta"))
"""config.json keys that must equal the run's model.* keys (the layer count and MLP width are checked apart)."""


def _read(hf: dict, key: str):
    """A config.json value; RoPE's where transformers 5 keeps it too (``rope_parameters``)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return hf.get(key, rope.get(key)) if key.startswith("rope") else hf.get(key)


def model_dir(path: str) -> Path:
    """The Hugging Face model directory ``model.init_from`` names: the path itself, or a run directory's
    ``model/``."""
    root = Path(path).expanduser()
    for candidate in (root, root / "model"):
        if (candidate / "config.json").is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ConfigError(f"model.init_from={path!r} is neither a Hugging Face model directory (config.json and "
                      f"{WEIGHTS_FILE}) nor a run directory with one in model/ (a run exports it unless "
                      "trainer.export=false); allowed: such a directory.")


def check(cfg: ModelConfig) -> None:
    """``model.init_from`` fits the run's model: same layers in all, same shapes (a ConfigError otherwise)."""
    if cfg.init_from is None:
        return
    require(isinstance(cfg.init_from, str) and cfg.init_from != "", "model.init_from", cfg.init_from,
            "allowed: null, or the path of a Hugging Face model directory or of a run directory")
    directory = model_dir(cfg.init_from)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from={cfg.init_from!r}: {directory / 'config.json'} is unreadable "
                          f"({exc}); allowed: a Hugging Face model directory.") from exc
    if hf.get("model_type") != "llama":
        raise ConfigError(f"model.init_from={cfg.init_from!r} holds a {hf.get('model_type')!r} model; allowed: "
                          "a LlamaForCausalLM (model_type 'llama').")
    layers = hf.get("num_hidden_layers")
    splits = [f"{s} x {layers // s}" for s in range(2, layers + 1) if layers % s == 0] if isinstance(layers, int) \
        else []
    if layers != cfg.n_layers:
        raise ConfigError(f"model.n_stages x model.layers_per_stage = {cfg.n_stages} x {cfg.layers_per_stage} = "
                          f"{cfg.n_layers} layers is invalid: model.init_from has {layers} layers, so allowed are the "
                          f"splits with {layers} layers in all" + (f" ({', '.join(splits)})" if splits else "") + ".")
    for theirs, ours in SHAPE_KEYS:
        require(_read(hf, theirs) == getattr(cfg, ours), f"model.{ours}", getattr(cfg, ours),
                f"model.init_from has {theirs}={_read(hf, theirs)!r}; allowed: the same")
    require(_read(hf, "rope_type") in (None, "default"), "model.init_from", cfg.init_from,
            f"its RoPE is {_read(hf, 'rope_type')!r}; allowed: the default RoPE our stages compute")
    require(hf.get("intermediate_size") == cfg.d_ff, "model.mlp_ratio", cfg.mlp_ratio,
            f"model.init_from has intermediate_size={hf.get('intermediate_size')!r}, mlp_ratio x d_model = "
            f"{cfg.d_ff}; allowed: a ratio that gives the same")
    kv = hf.get("num_key_value_heads", hf.get("num_attention_heads"))
    require(kv == cfg.n_heads, "model.init_from", cfg.init_from,
            f"it has {kv} key/value heads for {cfg.n_heads} attention heads; allowed: no grouped-query attention")
    check_weights(cfg, directory, hf)


def check_weights(cfg: ModelConfig, directory: Path, hf: dict) -> None:
    """The weights file is whole and holds what its config.json describes: a readable safetensors header, every
    tensor's bytes inside the file (not truncated), and each tensor a stage reads in the shape the config gives
    it. Reads the header only (no tensor, no torch), before the run starts."""
    path = directory / WEIGHTS_FILE
    where = f"model.init_from={cfg.init_from!r}: {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"its first 8 bytes give a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{where} is unreadable as safetensors ({first_line(exc) or type(exc).__name__}); allowed: "
                          "a model.safetensors as save_pretrained writes it.") from None
    if 8 + n + end > size:
        raise ConfigError(f"{where} is truncated: its header places tensor bytes up to {8 + n + end}, the file has "
                          f"{size}; allowed: a whole model.safetensors (copy it again).")
    d, v, ff = hf.get("hidden_size"), hf.get("vocab_size"), hf.get("intermediate_size")
    expected = {"model.embed_tokens.weight": [v, d], "model.norm.weight": [d]}
    if not hf.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = [v, d]
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}."
        expected.update({layer + f"self_attn.{p}_proj.weight": [d, d] for p in "qkvo"})
        expected.update({layer + "mlp.gate_proj.weight": [ff, d], layer + "mlp.up_proj.weight": [ff, d],
                         layer + "mlp.down_proj.weight": [d, ff], layer + "input_layernorm.weight": [d],
                         layer + "post_attention_layernorm.weight": [d]})
    for key, shape in expected.items():
        got = (header.get(key) or {}).get("shape")
        if got != shape:
            raise ConfigError(f"{where} holds {key} " + (f"of shape {got}" if got is not None else "nowhere") +
                              f", where its config.json gives {shape}; allowed: the weights its config.json "
                              "describes.")


def check_vocab(cfg: ModelConfig) -> None:
    """Once the tokenizer is known (``train.build_run``): the embedding and head of ``init_from`` fit it."""
    if cfg.init_from is None:
        return
    hf = json.loads((model_dir(cfg.init_from) / "config.json").read_text())
    require(hf.get("vocab_size") == cfg.vocab_size, "model.init_from", cfg.init_from,
            f"it has vocab_size={hf.get('vocab_size')}, this run's tokenizer {cfg.vocab_size} tokens; allowed: a "
            "model trained with the same tokenizer (data.*)")


def stage_weights(cfg: ModelConfig, index: int) -> dict:
    """Stage ``index``'s tensors (keys of ``model.Stage``) of the model ``cfg.init_from``, in its file's dtype."""
    from safetensors import safe_open

    from checkfree.model.llama import hf_key_to_stage

    tensors = {}
    with safe_open(str(model_dir(cfg.init_from) / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            if "rotary_emb" in key:
                continue
            stage, local = hf_key_to_stage(key, cfg)
            if stage == index:
                tensors[local] = f.get_tensor(key)
    return tensors


def start_from(stage: Stage, cfg: ModelConfig, index: int) -> Stage:
    """Stage ``index`` with the weights of ``model.init_from`` when set (every parameter of the stage must be in
    it); as it is otherwise. Called after the seeded init, so the generator's draws stay the same either way."""
    if cfg.init_from is None:
        return stage
    missing, _ = stage.load_state_dict(stage_weights(cfg, index), strict=False)
    params = {name for name, _ in stage.named_parameters()}
    if params & set(missing):
        raise ValueError(f"model.init_from={cfg.init_from!r} lacks stage {index}'s {sorted(params & set(missing))}")
    return stage
