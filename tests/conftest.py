"""Shared fixtures: tiny real models and configs, composed the way users compose them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

# Tests never talk to wandb's servers and never use more threads than the CI machine has.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and on a shared 2-core machine extra threads
# spin against other processes (10-20x slower steps).
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg():
    from checkfree.model import preset

    return preset("tiny").with_vocab(64)


@pytest.fixture
def tiny_stages(tiny_cfg):
    from checkfree.model import build_stages

    return build_stages(tiny_cfg, seed=0)


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(n)]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer cache for the whole session: the BPE is trained once."""
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def small_run_dict(cache_dir: str, **sections) -> dict:
    """A tiny but real run: 4-stage LLaMA, small synthetic corpus, no wandb, no progress bar."""
    base = {
        "seed": 0,
        "model": {"name": "tiny", "n_stages": 4, "layers_per_stage": 1, "d_model": 32, "n_heads": 2, "seq_len": 32},
        "data": {"n_documents": 600, "val_documents": 60, "val_sequences": 8, "vocab_size": 300,
                 "cache_dir": cache_dir},
        "trainer": {"iterations": 8, "eval_every": 4, "micro_batches": 2, "micro_batch_size": 4, "lr": 3e-3,
                    "progress_bar": False, "clock_preset": "llama_500m", "clock_micro_batch_size": 16},
        "strategy": {"name": "checkfree"},
        "failure": {"name": "none"},
        "network": {"name": "geo_distributed"},
        "logger": {"wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base[name] = {**base.get(name, {}), **values}
        else:
            base[name] = values
    return base


@pytest.fixture
def small_run(data_cache):
    from checkfree.runconfig import load_run_config

    def make(**sections):
        return load_run_config(small_run_dict(data_cache, **sections))

    return make


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, name, read_only)``: a small real file system (one that fills up, or refuses writes even
    to root), mounted under ``tmp_path`` and unmounted when the test ends. Skips the test where mounting is
    not allowed (not root, no CAP_SYS_ADMIN, no ``mount``)."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "fs", read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot run mount here ({exc})")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or f'exit {done.returncode}'}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True, timeout=30)  # a file still open
