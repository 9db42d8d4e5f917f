"""A LLaMA model's shape (``ModelConfig``), the named presets, and closed-form parameter counts.

Torch-free on purpose: a config is validated, and a run priced by the cost model, without importing torch or
transformers (``checkfree.model.llama`` builds the stages and re-exports everything here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from checkfree.run.config import require

if TYPE_CHECKING:
    from transformers import LlamaConfig


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
    """Vocabulary size; 0 means "take it from the tokenizer" (a run always does: a non-zero value must equal
    the tokenizer's size, and is refused when it does not)."""
    init_std: float = 0.02
    """Standard deviation of the N(0, std) init of every Linear and Embedding weight."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_from: str | None = None
    """A ``LlamaForCausalLM`` (Hugging Face directory, or a run directory with an exported ``model/``) whose
    weights the stages start from, cut into this split (``checkfree.model.init_from``); None: the seeded init."""

    @property
    def n_layers(self) -> int:
        return self.n_stages * self.layers_per_stage

    @property
    def d_ff(self) -> int:
        return self.mlp_ratio * self.d_model

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return self if self.vocab_size == vocab_size else replace(self, vocab_size=vocab_size)

    def hf_config(self) -> LlamaConfig:
        from transformers import LlamaConfig  # here, not at the top: validating a config never imports it

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
            # float(): transformers' strict config refuses an int (model.init_std=1 from the command line).
            rms_norm_eps=float(self.rms_norm_eps),
            rope_theta=self.rope_theta,
            hidden_act="silu",
            initializer_range=float(self.init_std),
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


# Paper presets (the reference's simulate_training/*_config.json; docs/paper.md, 'Setup') and small CPU
# presets for the default run and the tests. The paper presets keep the reference's 32000-token vocabulary,
# with which the clock prices a ``trainer.clock_preset``; a run's own comes from its tokenizer (vocab_size: 0).
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
    body = cfg.layers_per_stage * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.d_ff + 2 * cfg.d_model)
    return [body + edge_param_count(cfg, k) for k in range(cfg.n_stages)]


def edge_param_count(cfg: ModelConfig, stage: int) -> int:
    """Parameters of ``stage``'s (de)embedding: the embedding on the first stage, the final norm and the head on
    the last, none elsewhere (a one-stage model has both)."""
    v, d = cfg.vocab_size, cfg.d_model
    return (v * d if stage == 0 else 0) + (v * d + d if stage == cfg.n_stages - 1 else 0)


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise a ConfigError naming the key, the value and what is allowed."""
    for key in ("n_stages", "layers_per_stage", "d_model", "n_heads", "mlp_ratio", "seq_len"):
        value = getattr(cfg, key)
        require(isinstance(value, int) and value >= 1, f"model.{key}", value, "allowed is an integer >= 1")
    require(cfg.d_model % cfg.n_heads == 0, "model.d_model", cfg.d_model,
            f"it must be divisible by model.n_heads={cfg.n_heads}")
    require((cfg.d_model // cfg.n_heads) % 2 == 0, "model.d_model", cfg.d_model,
            f"the head size d_model / n_heads = {cfg.d_model // cfg.n_heads} must be even for rotary embeddings")
    require(cfg.vocab_size >= 0, "model.vocab_size", cfg.vocab_size, "allowed is 0 (from the tokenizer) or > 0")
    # A zero or negative std, epsilon or RoPE base is no model at all: N(0, -1) fails deep in torch, eps <= 0
    # divides by zero on a zero row, theta <= 0 gives NaN rotations.
    for key, what in (("init_std", "a standard deviation"), ("rms_norm_eps", "an epsilon added under a square root"),
                      ("rope_theta", "the RoPE base")):
        value = getattr(cfg, key)
        require(math.isfinite(value) and value > 0, f"model.{key}", value, f"it is {what}, allowed is a number > 0")
