"""Shared fixtures: tiny real models and configs, composed the way users compose them."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never talk to wandb's servers and never use more threads than the CI machine has.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


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
