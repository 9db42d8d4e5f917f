"""The network and device presets a modelled run is priced on: its links, the geo-distributed table, devices.

A link is ``latency + bytes / bandwidth``. ``single_cluster`` uses one link for every pair of stages;
``geo_distributed`` puts stage ``k`` at location ``k mod 7`` of the reference's 7-location latency / bandwidth
table. Devices are a peak throughput times a model FLOPs utilisation (or measured on this machine). The cost
model that prices with them is ``checkfree.simulation.cost``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache

from checkfree.run.config import ConfigError, require

GiB = 1024**3


@dataclass(frozen=True)
class Link:
    """A point-to-point network link."""

    latency_s: float
    """One-way latency in seconds."""
    bandwidth_Bps: float
    """Bandwidth in bytes per second."""


# --- devices -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePreset:
    """A device's matmul throughput; effective FLOP/s = peak_flops * mfu."""

    name: str
    """Key in DEVICES."""
    peak_flops: float
    """Dense bf16 tensor-core peak (fp32 for the CPU), FLOP/s, from the vendor's data sheet."""
    mfu: float
    """Model FLOPs utilisation actually reached in training (~0.4 is typical for LLaMA-size models)."""

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu


DEVICES: dict[str, DevicePreset] = {
    "a100": DevicePreset("a100", 312e12, 0.4),
    "h100": DevicePreset("h100", 989e12, 0.4),
    "v100": DevicePreset("v100", 125e12, 0.4),
    "t4": DevicePreset("t4", 65e12, 0.4),
    "rtx3090": DevicePreset("rtx3090", 71e12, 0.4),
    "rtx4090": DevicePreset("rtx4090", 165e12, 0.4),
    # A 2-core AVX-512 VM like the dev box: measure_flops() reads ~3.3e11 fp32 FLOP/s on one matmul;
    # small-model CPU training is overhead-bound, so the utilisation is a guess well below the GPUs'.
    "cpu": DevicePreset("cpu", 3.3e11, 0.15),
}


def measure_flops(d_model: int = 256, repeats: int = 5) -> float:
    """FLOP/s of a (4d x d) @ (d x d) fp32 matmul on this machine, median of ``repeats`` timings."""
    import torch

    a, b = torch.randn(4 * d_model, d_model), torch.randn(d_model, d_model)
    a @ b  # warm-up: first call pays allocation and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - t0) / 10)
    return 2 * 4 * d_model**3 / max(statistics.median(times), 1e-12)


# --- network presets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    """Where the stages run and how fast they talk (Hydra group ``network``)."""

    name: str = "single_cluster"
    """Preset: single_cluster (one link for all pairs) or geo_distributed (stage k at location k % 7)."""
    device: str = "a100"
    """Key of DEVICES, "measured" (one matmul's FLOP/s here: the caller passes measure_flops() to CostModel) or
    "profiled" (the FLOP/s this machine reaches training the run's model: ``checkfree.simulation.profiled``)."""
    dtype_bytes: int = 2
    """Bytes per element of activations, activation gradients and weight gradients on the wire (bf16)."""
    pipeline: str = "gpipe"
    """Pipeline schedule: gpipe or 1f1b."""
    latency_s: float = 0.001
    """Intra-site link latency: every link under single_cluster, same-location links under geo."""
    bandwidth_Bps: float = 2 * GiB
    """Intra-site link bandwidth, bytes/s (2 GiB/s, as the reference's communication_costs.delay_map)."""
    storage_latency_s: float = 0.05
    """Latency of the external (never failing) checkpoint storage."""
    storage_bandwidth_Bps: float = 500e6 / 8
    """Each node's bandwidth to storage, bytes/s: 500 Mb/s (Gensyn blog: a 70B checkpoint takes >20 min)."""
    host_bandwidth_Bps: float = 16e9
    """A node's device -> host memory copy, bytes/s (16 GB/s: PCIe 4.0 x16 in practice). What a step waits for
    when a snapshot of its stage is taken; sending it on to a peer overlaps training."""
    link_scale: float = 1.0
    """Every link, storage's too, this many times slower: latency x s, bandwidth / s. What lets a small model on a
    CPU, shaped to these links on the process engine (``engine.shape``), keep the communication-to-compute ratio
    the preset's model has on its GPUs (the CPU computes it ~s times slower); the clock prices the same links."""
    replacement_delay_s: float = 30.0
    """Time to detect a failure and bring a replacement node up, charged on every recovery alike."""
    table: str | None = None
    """geo_distributed only: a CSV of measured links between sites (``read_table``) in place of the reference's
    ``GEO_TABLE``; stage ``k`` runs at site ``k mod n`` of its ``n`` sites. None: the reference's table."""
    redundant_backward: bool = True
    """Redundant computation: the shadow also runs its backward (keeps weights and Adam state identical,
    so restores are exact); false = forward-only shadows (Bamboo's lazy backward), an optimistic bound."""


NETWORK_NAMES = ("single_cluster", "geo_distributed")
MAX_DELAY_S = 1e9
"""31 years: a larger latency or replacement delay is a typo that would only overflow the clock."""
PIPELINES = ("gpipe", "1f1b")
SCHEDULES = ("in_order", "out_of_order")


def validate_network_config(cfg: NetworkConfig, n_stages: int) -> None:
    """Raise a ConfigError naming the key, the value and what is allowed."""
    require(cfg.name in NETWORK_NAMES, "network.name", cfg.name, f"allowed: {list(NETWORK_NAMES)}")
    devices = sorted(DEVICES) + ["measured", "profiled"]
    require(cfg.device in devices, "network.device", cfg.device, f"allowed: {devices}")
    require(cfg.dtype_bytes in (1, 2, 4), "network.dtype_bytes", cfg.dtype_bytes, "allowed: 1, 2 or 4")
    require(cfg.pipeline in PIPELINES, "network.pipeline", cfg.pipeline, f"allowed: {list(PIPELINES)}")
    for key in ("bandwidth_Bps", "storage_bandwidth_Bps", "host_bandwidth_Bps"):
        value = getattr(cfg, key)
        # At least a byte per second: a bandwidth of 1e-300 B/s made a transfer's time overflow to inf.
        require(math.isfinite(value) and value >= 1, f"network.{key}", value,
                "must be a finite number of bytes per second, at least 1")
    require(math.isfinite(cfg.link_scale) and 1e-6 <= cfg.link_scale <= 1e6, "network.link_scale", cfg.link_scale,
            "must be a finite number from 1e-6 to 1e6 (1: the links as given)")
    for key in ("latency_s", "storage_latency_s", "replacement_delay_s"):
        value = getattr(cfg, key)
        require(math.isfinite(value) and 0 <= value <= MAX_DELAY_S, f"network.{key}", value,
                f"must be >= 0 seconds and at most {MAX_DELAY_S:.0e}")
    require(n_stages >= 1, "model.n_stages", n_stages, "must be >= 1")
    if cfg.table is not None:
        require(cfg.name == "geo_distributed", "network.table", cfg.table,
                f"it gives the links between sites, and network={cfg.name} is one site; allowed here: null, or "
                "network=geo_distributed")
        read_table(cfg.table)  # refuses a bad file, naming it and what is wrong


GEO_LOCATIONS = ["Australia", "Belgium", "Canada", "Germany", "Iowa", "NL", "London"]


def _pair(a: str, b: str) -> frozenset[str]:
    return frozenset((a, b))


# (latency ms, GiB/s), verbatim: DELAY_BANDWIDTHS of gensyn-ai/CheckFree communication/communication_costs.py.
GEO_TABLE: dict[frozenset[str], tuple[float, float]] = {
    _pair("Australia", "London"): (132, 0.0093994140625),
    _pair("Australia", "NL"): (128, 0.009521484375),
    _pair("Australia", "Belgium"): (129, 0.00982666015625),
    _pair("Australia", "Germany"): (125.5, 0.01046142578125),
    _pair("Australia", "Iowa"): (84, 0.01123046875),
    _pair("Australia", "Canada"): (98, 0.01318359375),
    _pair("Belgium", "Canada"): (41, 0.0198974609375),
    _pair("Iowa", "London"): (48.1, 0.0218505859375),
    _pair("NL", "London"): (4.8, 0.023681640625),
    _pair("Canada", "NL"): (42, 0.0250244140625),
    _pair("Germany", "Iowa"): (53.5, 0.026611328125),
    _pair("Iowa", "NL"): (51, 0.02740478515625),
    _pair("Belgium", "Iowa"): (49, 0.0283203125),
    _pair("Canada", "Germany"): (44, 0.0318603515625),
    _pair("Canada", "London"): (38.5, 0.036376953125),
    _pair("Canada", "Iowa"): (14, 0.07568359375),
    _pair("Germany", "London"): (6.6, 0.18875),
    _pair("Belgium", "Germany"): (4, 0.2425),
    _pair("Belgium", "NL"): (3, 0.2425),
    _pair("Germany", "NL"): (3.5, 0.2425),
    _pair("Belgium", "London"): (3.5, 0.2425),
}


TABLE_COLUMNS = ("site_a", "site_b", "latency_ms", "bandwidth_Mbps")
"""The header of a ``network.table`` file: one row per pair of sites, its one-way latency in milliseconds and its
bandwidth in megabits (10^6 bits) per second, the same both ways."""


def read_table(path: str) -> tuple[tuple[str, ...], dict[frozenset[str], Link]]:
    """The sites of a ``network.table`` file, in order of first appearance (row by row, ``site_a`` before
    ``site_b``: stage ``k`` runs at the ``k mod n``-th), and the link of every pair of them. Every pair of distinct
    sites appears exactly once; a site's own link is the preset's intra-site one (``latency_s``,
    ``bandwidth_Bps``). A bad file is refused in one sentence naming it, the row and what is allowed. Read once per
    version of the file (its real path, size and modification time): an edited file is read again."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"network.table={path!r} is invalid: it cannot be read ({e.__class__.__name__}: {e}).") \
            from None
    return _read_table(path, os.path.realpath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_table(path: str, real: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], dict[frozenset[str], Link]]:
    import csv

    def bad(what: str) -> None:
        raise ConfigError(f"network.table={path!r} is invalid: {what}.")

    try:
        with open(real, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        bad(f"it cannot be read ({e.__class__.__name__}: {e})")
    if not rows or tuple(c.strip() for c in rows[0]) != TABLE_COLUMNS:
        bad(f"its header must be {','.join(TABLE_COLUMNS)}, got {','.join(rows[0]) if rows else 'an empty file'}")
    sites: list[str] = []
    links: dict[frozenset[str], Link] = {}
    for i, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(TABLE_COLUMNS):
            bad(f"row {i} has {len(row)} fields, the header {len(TABLE_COLUMNS)}")
        a, b = row[0].strip(), row[1].strip()
        numbers = []
        for column, text in zip(TABLE_COLUMNS[2:], row[2:]):
            try:
                numbers.append(float(text))
            except ValueError:
                bad(f"row {i}: {column}={text.strip()!r} must be a number")
        ms, mbps = numbers
        if not a or not b or a == b:
            bad(f"row {i}: a link joins two different named sites, got {a!r} and {b!r} (a site's own link is "
                "network.latency_s and network.bandwidth_Bps)")
        if not (math.isfinite(ms) and 0 <= ms <= MAX_DELAY_S * 1000):
            bad(f"row {i}: latency_ms={row[2].strip()} must be a number of milliseconds from 0 to {MAX_DELAY_S * 1000:.0e}")
        if not (math.isfinite(mbps) and mbps * 125_000 >= 1):  # at least a byte per second, as every bandwidth
            bad(f"row {i}: bandwidth_Mbps={row[3].strip()} must be a finite number of megabits per second, at least "
                "8e-06 (one byte per second)")
        if _pair(a, b) in links:
            bad(f"row {i} gives the link {a}-{b} a second time")
        links[_pair(a, b)] = Link(ms / 1000, mbps * 125_000)
        sites += [x for x in (a, b) if x not in sites]
    if not links:
        bad("it has no rows: give the link of at least one pair of sites")
    missing = [f"{a}-{b}" for i, a in enumerate(sites) for b in sites[i + 1:] if _pair(a, b) not in links]
    if missing:
        bad(f"it must give the link of every pair of its sites, and {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} {'is' if len(missing) == 1 else 'are'} "
            "missing")
    return tuple(sites), links


def stage_link(cfg: NetworkConfig, a: int, b: int) -> Link:
    """The link between the nodes of stages ``a`` and ``b`` (symmetric).

    geo_distributed puts stage k at GEO_LOCATIONS[k % 7] (or at its site in ``network.table``); two stages at one
    location (and every pair under single_cluster) use the intra-site link (latency_s, bandwidth_Bps), by default
    the reference's same-cluster (1 ms, 2 GiB/s).
    """
    intra = _scaled(cfg, cfg.latency_s, cfg.bandwidth_Bps)
    if cfg.name != "geo_distributed":
        return intra
    # The table read once a call: the shaper asks for a link at every message it books.
    sites, links = read_table(cfg.table) if cfg.table is not None else (GEO_LOCATIONS, None)
    la, lb = sites[a % len(sites)], sites[b % len(sites)]
    if la == lb:
        return intra
    if links is not None:
        link = links[_pair(la, lb)]
        return _scaled(cfg, link.latency_s, link.bandwidth_Bps)
    ms, gib_s = GEO_TABLE[_pair(la, lb)]
    return _scaled(cfg, ms / 1000, gib_s * GiB)


def storage_link(cfg: NetworkConfig) -> Link:
    """A node's link to the checkpoint storage (each node has its own: shards move in parallel)."""
    return _scaled(cfg, cfg.storage_latency_s, cfg.storage_bandwidth_Bps)


def replica_link(cfg: NetworkConfig, stage: int, replicas: int, spread: bool) -> Link:
    """The link between two replicas of ``stage``: the intra-site link where they share the stage's site; spread
    (replica ``r`` where stage ``k + r`` runs), the slowest link of the ring through their sites (the longest
    latency, the least bandwidth: a ring's steps wait for its slowest hop)."""
    if not spread or replicas < 2:
        return stage_link(cfg, stage, stage)
    ring = [stage + r for r in range(replicas)]
    links = [stage_link(cfg, a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
    return Link(max(x.latency_s for x in links), min(x.bandwidth_Bps for x in links))


def _scaled(cfg: NetworkConfig, latency_s: float, bandwidth_Bps: float) -> Link:
    # At link_scale 1 both are exact (x * 1.0 and x / 1.0 change no bit): every run made before it prices the same.
    return Link(latency_s * cfg.link_scale, bandwidth_Bps / cfg.link_scale)
