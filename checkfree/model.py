"""LLaMA presets and pipeline stages built from Hugging Face ``transformers`` Llama blocks.

A model of ``n_stages * layers_per_stage`` decoder blocks is cut into contiguous stages. Stage 0 also
owns the token embedding, stage S-1 the final RMSNorm and the LM head ("de-embedding"). Chained in
order, the stages compute exactly what the unsplit ``LlamaForCausalLM`` with the same weights computes
(see ``load_causal_lm_weights`` and tests/test_model.py).

Each stage exposes three pieces so that out-of-order schedules can run bodies in any order while the
embedding still runs first and the head last: ``embed`` (stage 0), ``body`` (every stage), ``head``
(stage S-1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

BODY_PREFIX = "layers."
EMBED_KEYS = ("embed_tokens.weight",)
HEAD_KEYS = ("norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA model and how it is cut into stages."""

    name: str = "custom"
    """Preset name, for logs."""
    n_stages: int = 4
    """Number of pipeline stages S."""
    layers_per_stage: int = 1
    """Decoder blocks per stage."""
    d_model: int = 64
    """Hidden size."""
    n_heads: int = 4
    """Attention heads (no grouped-query attention: kv heads = heads, as in the reference)."""
    mlp_ratio: int = 4
    """MLP hidden size = mlp_ratio * d_model (the reference uses 4d, not LLaMA's 8/3 d)."""
    seq_len: int = 64
    """Training sequence length."""
    vocab_size: int = 0
    """Vocabulary size; 0 means "take it from the tokenizer"."""
    init_std: float = 0.02
    """Standard deviation of the N(0, std) init of every Linear and Embedding weight."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def n_layers(self) -> int:
        return self.n_stages * self.layers_per_stage

    @property
    def d_ff(self) -> int:
        return self.mlp_ratio * self.d_model

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return self if self.vocab_size == vocab_size else replace(self, vocab_size=vocab_size)

    def hf_config(self) -> LlamaConfig:
        if self.vocab_size <= 0:
            raise ValueError("model.vocab_size is 0: call with_vocab(tokenizer vocab size) before building stages.")
        cfg = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.d_ff,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_heads,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            hidden_act="silu",
            initializer_range=self.init_std,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            use_cache=False,
        )
        cfg._attn_implementation = "sdpa"
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# Paper presets (DESIGN §5, PAPER §7.1) and small CPU presets for the default run and the tests.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", n_stages=4, layers_per_stage=1, d_model=32, n_heads=2, seq_len=32),
    "cpu_small": ModelConfig("cpu_small", n_stages=6, layers_per_stage=1, d_model=96, n_heads=4, seq_len=64),
    # The CPU-scale sweeps: many short runs, so a narrower model than the demo.
    "cpu_sweep": ModelConfig("cpu_sweep", n_stages=6, layers_per_stage=1, d_model=64, n_heads=4, seq_len=64),
    "llama_124m": ModelConfig("llama_124m", 4, 3, 512, 8, seq_len=512, vocab_size=32000),
    "llama_500m": ModelConfig("llama_500m", 6, 4, 1024, 16, seq_len=1024, vocab_size=32000),
    "llama_1_5b": ModelConfig("llama_1_5b", 6, 4, 2048, 16, seq_len=4096, vocab_size=32000),
}



def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model.name={name!r} is not a preset; allowed: {sorted(PRESETS)}.")
    return PRESETS[name]


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count: untied embedding + head, final norm, and per block
    4 d^2 (q, k, v, o) + 3 d d_ff (gate, up, down) + 2 d (two RMSNorms)."""
    d, v = cfg.d_model, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * cfg.d_ff + 2 * d
    return 2 * v * d + d + cfg.n_layers * per_layer


def stage_param_counts(cfg: ModelConfig) -> list[int]:
    d, v = cfg.d_model, cfg.vocab_size
    body = cfg.layers_per_stage * (4 * d * d + 3 * d * cfg.d_ff + 2 * d)
    counts = [body] * cfg.n_stages
    counts[0] += v * d
    counts[-1] += v * d + d
    return counts


class Stage(nn.Module):
    """One pipeline stage: a contiguous slice of decoder blocks (+ embedding on stage 0, + head on S-1)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        hf = cfg.hf_config()
        self.index = index
        self.n_stages = cfg.n_stages
        first_layer = index * cfg.layers_per_stage
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model) if index == 0 else None
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf, layer_idx=first_layer + j) for j in range(cfg.layers_per_stage)
        )
        # Every stage computes its own RoPE tables: stages live on different nodes.
        self.rotary_emb = LlamaRotaryEmbedding(hf)
        last = index == cfg.n_stages - 1
        self.norm = LlamaRMSNorm(cfg.d_model, eps=cfg.rms_norm_eps) if last else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if last else None
        self.init_std = cfg.init_std

    @property
    def has_embedding(self) -> bool:
        return self.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def body(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rope = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            # attention_mask=None makes the SDPA path strictly causal (is_causal=True).
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def body_state(self) -> dict[str, torch.Tensor]:
        """The decoder-block tensors: what neighbouring stages share in shape and can be averaged."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(BODY_PREFIX)}

    def edge_state(self) -> dict[str, torch.Tensor]:
        """Embedding (stage 0) or final norm + LM head (stage S-1); empty for intermediate stages."""
        return {k: v for k, v in self.state_dict().items() if k in EMBED_KEYS or k in HEAD_KEYS}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh init as in the reference: N(0, std) for Linear/Embedding weights, RMSNorm weights = 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, self.init_std, generator=generator)
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)


def build_stages(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> list[Stage]:
    """All stages, initialised from one seeded generator in stage order (reproducible at a seed)."""
    generator = torch.Generator().manual_seed(seed)
    stages = []
    for index in range(cfg.n_stages):
        stage = Stage(cfg, index)
        stage.reset_parameters(generator)
        stages.append(stage.to(device))
    return stages


def hf_key_to_stage(key: str, cfg: ModelConfig) -> tuple[int, str]:
    """Map a ``LlamaForCausalLM`` state-dict key to (stage index, key inside that stage)."""
    if key == "model.embed_tokens.weight":
        return 0, "embed_tokens.weight"
    if key == "model.norm.weight":
        return cfg.n_stages - 1, "norm.weight"
    if key == "lm_head.weight":
        return cfg.n_stages - 1, "lm_head.weight"
    if key.startswith("model.layers."):
        layer, rest = key[len("model.layers.") :].split(".", 1)
        stage, local = divmod(int(layer), cfg.layers_per_stage)
        return stage, f"layers.{local}.{rest}"
    raise KeyError(f"unexpected LlamaForCausalLM key {key!r}")


def stage_to_hf_key(index: int, key: str, cfg: ModelConfig) -> str:
    """The inverse of ``hf_key_to_stage``: stage ``index``'s state-dict ``key`` -> its ``LlamaForCausalLM`` key."""
    if key == "embed_tokens.weight" and index == 0:
        return "model.embed_tokens.weight"
    if key in HEAD_KEYS and index == cfg.n_stages - 1:
        return key if key == "lm_head.weight" else f"model.{key}"
    if key.startswith(BODY_PREFIX):
        local, rest = key[len(BODY_PREFIX):].split(".", 1)
        if int(local) < cfg.layers_per_stage:
            return f"model.layers.{index * cfg.layers_per_stage + int(local)}.{rest}"
    raise KeyError(f"stage {index} key {key!r} is not a key of a stage {index} of {cfg.n_stages} with "
                   f"{cfg.layers_per_stage} layer(s) per stage")


@torch.no_grad()
def load_causal_lm_weights(stages: list[Stage], state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Load an (unsplit) ``LlamaForCausalLM`` state dict into the stages, e.g. pretrained weights."""
    per_stage: list[dict[str, torch.Tensor]] = [{} for _ in stages]
    for key, tensor in state.items():
        if "rotary_emb" in key:
            continue
        index, local = hf_key_to_stage(key, cfg)
        per_stage[index][local] = tensor
    for stage, sd in zip(stages, per_stage):
        stage.load_state_dict(sd, strict=False)


def forward_logits(stages: list[Stage], input_ids: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the whole pipeline in one process: embedding, bodies in ``order``, head."""
    order = order if order is not None else tuple(range(len(stages)))
    hidden = stages[0].embed(input_ids)
    for index in order:
        hidden = stages[index].body(hidden)
    return stages[-1].head(hidden)
