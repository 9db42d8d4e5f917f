"""How a held copy of a stage's weights is encoded: exactly, in bfloat16, or in int8 with per-channel scales.

A compressed snapshot (``compressed_snapshot``) sends the owner's weights only, in fewer bytes than a whole
state (weights + Adam, 12 bytes a parameter in fp32): ``bf16`` 2 bytes a parameter, ``int8`` 1 byte plus one
fp32 scale per output channel. Encoded, a copy is a nested dict of tensors like every held copy
(``checkfree.plan``): ``{"weights": {name: tensor}}``, and for int8 also ``{"scales": {name: tensor}}``.

int8 is symmetric absmax quantization per output channel (row ``i`` of a matrix; a vector is one channel):
``scale_i = max_j |W_ij| / 127``, ``q_ij = round(W_ij / scale_i)``, decoded as ``q_ij * scale_i``, so every
element comes back within ``scale_i / 2`` of what it was (an all-zero channel has scale 0 and comes back 0).

Decoding is told the encoding the copy's kind declares and checks the tensors are in it: a copy is never
cast silently from whatever dtype it happens to hold.
"""

from __future__ import annotations

import torch

from checkfree.plan import BF16, ENCODINGS, EXACT, INT8

INT8_LEVELS = 127
"""Symmetric int8: codes -127..127 (-128 unused, so that the range is symmetric and 0 is exact)."""


def encode(weights: dict[str, torch.Tensor], encoding: str) -> dict[str, dict[str, torch.Tensor]]:
    """``weights`` (a state dict) as a held copy in ``encoding``. The encoded tensors are new (never views of
    the stage's parameters), so a later step does not change a copy."""
    if encoding == EXACT:
        return {"weights": {k: v.detach().clone() for k, v in weights.items()}}
    if encoding == BF16:
        return {"weights": {k: v.detach().to(torch.bfloat16) for k, v in weights.items()}}
    if encoding == INT8:
        codes, scales = {}, {}
        for name, w in weights.items():
            rows = w.detach().float().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().float().reshape(1, -1)
            scale = rows.abs().amax(dim=1) / INT8_LEVELS
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes[name] = torch.round(rows / safe[:, None]).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8) \
                .reshape(w.shape)
            scales[name] = scale
        return {"weights": codes, "scales": scales}
    raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")


def decode(copy: dict[str, dict[str, torch.Tensor]], encoding: str, dtype: torch.dtype = torch.float32
           ) -> dict[str, torch.Tensor]:
    """The state dict (in ``dtype``) a held copy in ``encoding`` encodes; a tensor not in that encoding's dtype
    is refused (``TypeError``), never cast."""
    expected = {EXACT: None, BF16: torch.bfloat16, INT8: torch.int8}
    if encoding not in expected:
        raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")
    weights = copy["weights"]
    wrong = sorted(k for k, v in weights.items() if expected[encoding] is not None and v.dtype != expected[encoding])
    if wrong:
        raise TypeError(f"a held copy declared {encoding} holds {weights[wrong[0]].dtype} tensors ({wrong[0]}, ...): "
                        "refusing to cast it")
    if encoding != INT8:
        return {k: v.to(dtype) for k, v in weights.items()}
    out = {}
    for name, q in weights.items():
        rows = q.float().reshape(q.shape[0], -1) if q.dim() > 1 else q.float().reshape(1, -1)
        out[name] = (rows * copy["scales"][name].float()[:, None]).reshape(q.shape).to(dtype)
    return out

