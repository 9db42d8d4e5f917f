"""The simulated clock of a run: how many simulated seconds an iteration, a recovery and an upkeep cost.

``trainer.clock`` picks the pricing:

* ``cost_model`` — ``checkfree.cost``: FLOPs, the network's hops, the pipeline schedule, each strategy's
  overheads. With ``trainer.clock_preset`` (e.g. ``llama_500m``) every iteration is priced as that model
  would cost, and bytes scale from the trained model's stages to the preset's.
* ``fixed`` — ``failure.iteration_seconds`` per iteration (recoveries and upkeep still from the cost model).

The trainer asks the clock and never prices anything itself.
"""

from __future__ import annotations

from checkfree.cost import CostModel, StepOverhead, measure_flops
from checkfree.model import ModelConfig, preset, stage_param_counts
from checkfree.plan import RecoveryReport, Traffic
from checkfree.runconfig import RunConfig


class Clock:
    def __init__(self, cfg: RunConfig, model: ModelConfig, schedule: str, redundant_compute: bool) -> None:
        priced, micro_batch_size = model, cfg.trainer.micro_batch_size
        if cfg.trainer.clock_preset is not None:
            # Price every iteration as the paper-scale model would cost, so that failure rates per hour
            # mean at CPU scale what they mean in the paper's setting (README "The simulated clock").
            priced = preset(cfg.trainer.clock_preset)
            micro_batch_size = cfg.trainer.clock_micro_batch_size or micro_batch_size
        flops = measure_flops() if cfg.network.device == "measured" else None
        self.byte_scale = [p / a for p, a in zip(stage_param_counts(priced), stage_param_counts(model))]
        self.cost = CostModel(priced, cfg.trainer.micro_batches, micro_batch_size, cfg.network, flops_per_s=flops,
                              replicas=cfg.engine.replicas)
        self.iteration_s = (cfg.failure.iteration_seconds if cfg.trainer.clock == "fixed"
                            else self.cost.iteration_seconds(schedule, redundant=redundant_compute))

    def recovery_seconds(self, report: RecoveryReport) -> float:
        """Replacement delay + the bytes the replacement receives. A rollback downloads every stage's shard in
        parallel, so the largest shard bounds its time."""
        n_bytes = report.details.get("largest_shard_bytes", report.bytes_moved) if report.from_storage \
            else report.bytes_moved
        n_bytes = int(n_bytes * self.byte_scale[report.stage])
        return self.cost.recovery_seconds(report.stage, report.sources, n_bytes, from_storage=report.from_storage)

    def upkeep_seconds(self, traffic: Traffic) -> float:
        """Checkpoint upload (largest shard; stages upload in parallel) + replica refreshes (in parallel)."""
        scale = max(self.byte_scale)
        overhead = StepOverhead(storage_upload_bytes=int(max(traffic.shard_bytes, default=0) * scale),
                                replica_sync_bytes={k: int(v * scale) for k, v in traffic.sent.items()})
        return self.cost.overhead_seconds(overhead)
