"""Which launcher starts the stage processes: local processes (one machine) or Ray actors (many machines)."""

from __future__ import annotations

from pathlib import Path

from checkfree.config import EngineConfig
from checkfree.distributed.cluster import WorkerPool
from checkfree.distributed.worker import WorkerSpec


def make_pool(spec: WorkerSpec, engine: EngineConfig, run_dir: Path) -> WorkerPool:
    return WorkerPool(spec, engine.timeout_s, run_dir)
