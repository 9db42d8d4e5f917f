"""Which launcher starts the process engine's stage workers: ``engine.launcher=processes | ray``.

Both launchers give the supervisor a ``pool.WorkerPool`` (each a ``pool.Supervisor`` over its own handles):
local processes on this machine (``cluster.ProcessPool``), or Ray actors on one machine or a cluster
(``ray_pool.RayPool``). Ray is imported only when
it is asked for, so the processes launcher never needs it installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from checkfree.distributed.cluster import ProcessPool
from checkfree.distributed.pool import WorkerPool
from checkfree.distributed.worker import WorkerSpec
from checkfree.run.config import ConfigError, EngineConfig

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 before importing Ray: a Ray started here uses 127.0.0.1 (docs/design.md, 'Engines and launchers')."""


def make_pool(spec: WorkerSpec, engine: EngineConfig, run_dir: Path) -> WorkerPool:
    """The pool of stage workers for ``engine.launcher`` (not started yet: the supervisor calls ``start``)."""
    if engine.launcher == "processes":
        return ProcessPool(spec, engine.timeout_s, run_dir)
    if engine.ray.address is None:
        # A Ray of our own on this machine: loopback, like the processes launcher. Only effective before the
        # first `import ray` in this process (Ray reads it once).
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        from checkfree.distributed.ray_pool import RayPool
    except ImportError as exc:
        raise ConfigError(f"engine.launcher='ray' needs Ray ({exc}); install it with pip install "
                          "'checkfree[ray]', or use engine.launcher=processes.") from exc
    return RayPool(spec, engine.timeout_s, run_dir, engine.ray)
