"""The distributed engine: one OS process per pipeline stage (x data-parallel replica) on torch.distributed.

``engine=distributed`` runs the same trainer loop as the local engine, with every stage in its own process
(gloo on CPU, NCCL on GPU), activations and gradients sent point to point, and failures that are real: the
stage's process exits, a replacement process takes its place, the survivors re-form the process group and
the strategy's tensors travel to the replacement over the new group.

Modules, one idea each:

* ``routes`` — which stage runs what, in which order (GPipe, 1F1B, CheckFree+'s swapped order)
* ``transfer`` — state dicts point to point
* ``worker`` — the stage process
* ``rendezvous`` — the store and its generations
* ``cluster`` — starting, commanding, watching, replacing and stopping the processes
* ``launchers`` — which pool starts the workers: local processes or Ray actors (``engine.launcher``)
* ``ray_pool``, ``ray_actor`` — the same pool with one Ray actor per stage, on one machine or a cluster
* ``process_pipeline`` — the pipeline interface the trainer drives
* ``strategies`` — recovery strategies executed with real transfers
* ``supervisor`` — the trainer over all of it (``train``)
* ``launch`` — the same under ``torchrun``
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from checkfree.runconfig import RunConfig


def train(cfg: RunConfig, run_dir: Path | str) -> dict:
    """Run one training job with one process per stage into ``run_dir``; returns the summary."""
    from checkfree.distributed.supervisor import train as _train

    return _train(cfg, run_dir)


__all__ = ["train"]
