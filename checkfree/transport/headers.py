"""The header of a state in transit: its structure as plain JSON data, checked before anything is built.

A state (a stage's blocks, a held copy with its optimizer state) is sent as a header and one flat buffer per
dtype (``transfer``). The header says how to cut the buffers back into tensors and where they sit in the
nested structure. It is JSON, never a pickle: a receiver decodes it into dicts, lists, numbers and strings
and nothing else, so a header that a process outside the run forged, or that arrived damaged, can only be
refused (``HeaderError``), never run code.

The JSON keeps the Python types of the structure exactly (tuple vs list, int vs float keys, the float bits of
``lr`` and ``betas``), so a state comes back equal to the one sent, as the local engine would hold it:

* a scalar (None, bool, int, float, str) is itself;
* a container is an object with one key: ``{"tensor": i}`` (the i-th entry of ``tensors``), ``{"list": [...]}``,
  ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}`` (a key is a scalar);
* ``tensors`` lists ``[shape, dtype, on_cpu]`` in the order their data fills the buffers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

FORMAT = "checkfree-state/1"
MAX_HEADER_BYTES = 64 << 20
"""A header names shapes and keys only (a few KiB for a stage); anything longer is not one of ours."""
MAX_DEPTH = 64
"""Nesting of a state: a held copy is {weights, optimizer: {state: {i: {...}}, param_groups: [...]}}."""
MAX_DIMS = 64
MAX_NUMEL = 1 << 62
"""torch's sizes are int64: a larger tensor (or a sum of them, one dtype's buffer) cannot be allocated."""

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
"""The only dtypes a header may name: what weights, optimizer states and step counts are made of."""

_SCALARS = (type(None), bool, int, float, str)
_CONTAINERS = ("tensor", "list", "tuple", "dict")


class HeaderError(ValueError):
    """A received header is not a well-formed state header; nothing of it was executed or allocated."""


@dataclass(frozen=True)
class Slot:
    """Where tensor ``index`` of the header goes in a decoded skeleton (no plain value can look like one)."""

    index: int


# --- sending ---------------------------------------------------------------------------------------------

def encode(state: Any) -> tuple[bytes, list[torch.Tensor]]:
    """(header bytes, the state's tensors in header order). Raises TypeError for what a header cannot carry."""
    tensors: list[torch.Tensor] = []
    skeleton = _encode(state, tensors)
    entries = []
    for tensor in tensors:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"a state in transit cannot hold a {tensor.dtype} tensor; allowed: {sorted(DTYPES)}")
        entries.append([list(tensor.shape), dtype, tensor.device.type == "cpu"])
    header = {"format": FORMAT, "state": skeleton, "tensors": entries}
    # allow_nan: a diverged lr or loss scale still travels (JSON's NaN / Infinity extension, which json reads).
    return json.dumps(header, separators=(",", ":")).encode(), tensors


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                raise TypeError(f"a state in transit has dict keys of plain types only, not {type(key).__name__}")
            pairs.append([key, _encode(item, tensors)])
        return {"dict": pairs}
    if isinstance(value, list | tuple):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    raise TypeError(f"a state in transit holds tensors, containers and plain values, not {type(value).__name__}")


# --- receiving -------------------------------------------------------------------------------------------

def check_length(n: int) -> int:
    """The announced header length, before a buffer of that size is allocated."""
    if not 0 < n <= MAX_HEADER_BYTES:
        raise HeaderError(f"announced a header of {n} bytes; a state header has 1..{MAX_HEADER_BYTES}")
    return n


def decode(data: bytes) -> tuple[Any, list[tuple[tuple[int, ...], torch.dtype, bool]]]:
    """(skeleton, entries) of a received header; the skeleton has a ``Slot`` where each tensor goes.
    Every rule is checked here, so the caller allocates and receives only what a valid header describes."""
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"not a JSON state header ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(header, dict) or set(header) != {"format", "state", "tensors"}:
        raise HeaderError("not a state header: expected an object with format, state and tensors")
    if header["format"] != FORMAT:
        raise HeaderError(f"format {str(header['format'])[:40]!r}, expected {FORMAT!r}")
    entries = _entries(header["tensors"])
    used: list[bool] = [False] * len(entries)
    skeleton = _decode(header["state"], used, 0)
    if not all(used):
        raise HeaderError(f"tensor {used.index(False)} is listed but placed nowhere in the state")
    totals: dict[torch.dtype, int] = {}
    for shape, dtype, _ in entries:
        totals[dtype] = totals.get(dtype, 0) + math.prod(shape)
        if totals[dtype] > MAX_NUMEL:
            raise HeaderError(f"the {dtype} tensors add up to more than {MAX_NUMEL} elements")
    return skeleton, entries


def _entries(raw: Any) -> list[tuple[tuple[int, ...], torch.dtype, bool]]:
    if not isinstance(raw, list):
        raise HeaderError("tensors must be a list")
    entries = []
    for i, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise HeaderError(f"tensor {i}: expected [shape, dtype, on_cpu]")
        shape, dtype, on_cpu = entry
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= MAX_NUMEL for d in shape)):
            raise HeaderError(f"tensor {i}: shape must be a list of at most {MAX_DIMS} non-negative ints")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise HeaderError(f"tensor {i}: dtype {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
        if type(on_cpu) is not bool:
            raise HeaderError(f"tensor {i}: on_cpu must be true or false")
        if math.prod(shape) > MAX_NUMEL:
            raise HeaderError(f"tensor {i}: shape {shape} has more than {MAX_NUMEL} elements")
        entries.append((tuple(shape), DTYPES[dtype], on_cpu))
    return entries


def _decode(node: Any, used: list[bool], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise HeaderError(f"the state nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, _SCALARS):
        return node
    if not (isinstance(node, dict) and len(node) == 1 and next(iter(node)) in _CONTAINERS):
        raise HeaderError(f"a state node must be a plain value or one of {list(_CONTAINERS)}")
    [(kind, body)] = node.items()
    if kind == "tensor":
        if type(body) is not int or not 0 <= body < len(used):
            raise HeaderError(f"tensor reference {str(body)[:40]} is not an index into tensors")
        if used[body]:
            raise HeaderError(f"tensor {body} is placed twice")
        used[body] = True
        return Slot(body)
    if not isinstance(body, list):
        raise HeaderError(f"a {kind} node must hold a list")
    if kind == "dict":
        result = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], _SCALARS)):
                raise HeaderError("a dict entry must be [plain key, value]")
            if pair[0] in result:
                raise HeaderError(f"dict key {str(pair[0])[:40]!r} appears twice")
            result[pair[0]] = _decode(pair[1], used, depth + 1)
        return result
    items = [_decode(v, used, depth + 1) for v in body]
    return tuple(items) if kind == "tuple" else items


def rebuild(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The state: ``decode``'s skeleton with its tensors put in their places."""
    if isinstance(skeleton, Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: rebuild(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(rebuild(v, tensors) for v in skeleton)
    return skeleton
