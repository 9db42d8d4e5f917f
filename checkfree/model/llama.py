"""LLaMA pipeline stages built from Hugging Face ``transformers`` Llama blocks (shapes and presets:
``checkfree.model.presets``).

A model of ``n_stages * layers_per_stage`` decoder blocks is cut into contiguous stages. Stage 0 also
owns the token embedding, stage S-1 the final RMSNorm and the LM head ("de-embedding"). Chained in
order, the stages compute exactly what the unsplit ``LlamaForCausalLM`` with the same weights computes
(see ``load_causal_lm_weights`` and tests/test_model.py, which chains them through the local engine's
``LocalEngine.logits``, the path training runs).

Each stage exposes three pieces so that out-of-order schedules can run bodies in any order while the
embedding still runs first and the head last: ``embed`` (stage 0), ``body`` (every stage), ``head``
(stage S-1).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from checkfree.model.presets import ModelConfig

__all__ = ["Stage", "build_stages", "hf_key_to_stage", "stage_to_hf_key", "load_causal_lm_weights"]

BODY_PREFIX = "layers."
EMBED_KEYS = ("embed_tokens.weight",)
HEAD_KEYS = ("norm.weight", "lm_head.weight")


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
                _normal_(module.weight, self.init_std, generator)
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)


def _normal_(weight: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """N(0, std) into ``weight`` in place. A generator on another device than the weight (a plan's seeded CPU
    generator, a stage on a GPU) draws on its own device and the values are copied over: a rebuilt stage gets
    the same values on every device, and CUDA refuses a CPU generator anyway."""
    if generator is None or generator.device == weight.device:
        weight.normal_(0.0, std, generator=generator)
    else:
        draw = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
        weight.copy_(draw.normal_(0.0, std, generator=generator))


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

