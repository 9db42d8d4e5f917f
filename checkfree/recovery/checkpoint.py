"""Checkpointing baseline: periodic full-model checkpoints to storage, whole-model rollback on any loss.

Every ``every`` optimizer steps, all stages' weights, all Adam states (moments, step count, lr), the data
position and the torch RNG state go to ``<run_dir>/checkpoints/ckpt_<progress>.pt`` with a real
``torch.save``; only the last ``keep`` files stay on disk. A loss of *any* stage rolls *every* stage back
to the latest checkpoint (a pipeline cannot mix stages from different steps), and the steps since then
are lost work. Unlike the reference's ``one``/``whole_model`` modes (PAPER §9.7) the period is real, Adam's
own state is what is stored, and nothing is copied every iteration.

``setup`` writes a checkpoint of the initial state (progress 0): the initial weights follow from the seed,
which every node knows, so a loss before the first periodic save rolls back to the start at no upload cost.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from checkfree.atomic import torch_save_atomic
from checkfree.config import ConfigError
from checkfree.cost import StepOverhead
from checkfree.recovery.base import (
    RecoveryContext,
    RecoveryReport,
    RecoveryStrategy,
    Stopwatch,
    optimizer_state_bytes,
    state_bytes,
)


class CheckpointRollback(RecoveryStrategy):
    """Save everything every ``cfg.every`` steps; on any stage loss, roll all stages back."""

    name = "checkpoint"
    schedule_name = "in_order"
    min_stages = 1

    latest: Path | None = None
    storage_bytes: int = 0
    """Size on disk of the latest checkpoint file."""
    saves: int = 0
    """Checkpoints written so far (the setup one included)."""

    def setup(self, ctx: RecoveryContext) -> None:
        if ctx.run_dir is None:
            raise ConfigError("strategy=checkpoint needs a run directory to write checkpoints into "
                              "(RecoveryContext.run_dir is None).")
        self.directory = Path(ctx.run_dir) / "checkpoints"
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):  # left by a run killed mid-save: never a checkpoint
            stale.unlink()
        # A fresh run in a reused directory starts from progress 0: older checkpoints with higher numbers
        # would otherwise look newer and prune this run's own. (A resumed run restores its latest
        # checkpoint from the resume state after setup.)
        for old in self.directory.glob("ckpt_*.pt"):
            old.unlink()
        self.save(ctx)

    def after_step(self, ctx: RecoveryContext) -> StepOverhead:
        if ctx.progress % self.cfg.every != 0:
            return StepOverhead()
        shards = self.save(ctx)
        # Each stage uploads its own shard to storage in parallel, so the largest shard sets the time.
        return StepOverhead(storage_upload_bytes=max(shards))

    def save(self, ctx: RecoveryContext) -> list[int]:
        """Write the checkpoint for ``ctx.progress`` atomically; return each stage's shard bytes."""
        pipeline = ctx.pipeline
        payload = {
            "progress": ctx.progress,
            "stages": [stage.state_dict() for stage in pipeline.stages],
            "optimizers": [opt.state_dict() for opt in pipeline.optimizers],
            "data": ctx.data.state_dict() if ctx.data is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        # A kill mid-save leaves the previous checkpoint intact and only a *.tmp behind.
        path = torch_save_atomic(payload, self.directory / f"ckpt_{ctx.progress:07d}.pt")
        self.latest, self.storage_bytes, self.saves = path, path.stat().st_size, self.saves + 1
        for old in sorted(self.directory.glob("ckpt_*.pt"))[: -self.cfg.keep]:
            old.unlink()
        return [state_bytes(s) + optimizer_state_bytes(o)
                for s, o in zip(payload["stages"], payload["optimizers"])]

    def load(self) -> dict[str, Any]:
        assert self.latest is not None, "setup() writes the first checkpoint"
        try:
            return torch.load(self.latest, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # A data stream whose state holds non-tensor objects (e.g. a numpy RNG) needs the full
            # unpickler; the file is this run's own, written by ``save`` above, so it is trusted.
            return torch.load(self.latest, map_location="cpu", weights_only=False)

    def recover(self, failed: set[int], ctx: RecoveryContext) -> list[RecoveryReport]:
        pipeline = ctx.pipeline
        with Stopwatch() as watch:
            checkpoint = self.load()
            device = pipeline.device
            for k, (stage_state, opt_state) in enumerate(zip(checkpoint["stages"], checkpoint["optimizers"])):
                if k in failed:  # a new node: nothing of the lost stage survives, not even its optimizer
                    pipeline.stages[k].reset_parameters(torch.Generator().manual_seed(k))
                    pipeline.reset_optimizer(k, ctx.base_lr)
                pipeline.stages[k].load_state_dict({n: t.to(device) for n, t in stage_state.items()})
                # The saved lr is kept: a rollback restores a stage, it does not restart one (no lr_scale).
                pipeline.optimizers[k].load_state_dict(opt_state)
            if ctx.data is not None:
                ctx.data.load_state_dict(checkpoint["data"])
            torch.set_rng_state(checkpoint["rng"])
            if checkpoint["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
            before, saved = ctx.progress, checkpoint["progress"]
            ctx.progress = saved
        shards = [state_bytes(s) + optimizer_state_bytes(o)
                  for s, o in zip(checkpoint["stages"], checkpoint["optimizers"])]
        # Survivors roll back too, downloading their own shards in parallel: the largest one sets the time.
        details = {"rolled_back_to": saved, "all_stages": True, "largest_shard_bytes": max(shards)}
        return [
            RecoveryReport(k, self.name, "rollback", [], [], shards[k], wall_s=watch.seconds,
                           lost_iterations=before - saved, from_storage=True, details=dict(details))
            for k in sorted(failed)
        ]

    def memory_overhead_bytes(self) -> int:
        return 0  # checkpoints live on external storage, not on the training nodes

    def state_dict(self) -> dict:
        return {"latest": str(self.latest) if self.latest else None, "storage_bytes": self.storage_bytes,
                "saves": self.saves}

    def load_state_dict(self, state: dict) -> None:
        self.latest = Path(state["latest"]) if state["latest"] else None
        self.storage_bytes, self.saves = state["storage_bytes"], state["saves"]
