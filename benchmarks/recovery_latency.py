"""How long each recovery strategy takes to rebuild a lost stage, side by side, in one run.

For every strategy (the default config's ``conf/strategy/<name>.yaml``) on one model:

1. a fresh ``LocalPipeline`` trains a few steps exactly as the trainer does (step, then ``after_step``),
   so Adam state, gradient norms, shadows and replicas exist; the checkpoint strategy gets a real run
   directory (a temp dir) and a real ``TokenBatches`` stream to save and roll back;
2. the after-step hook is timed over one whole period (checkpoint: ``every`` iterations, CheckFree+:
   ``replica_sync_every``, else one), so a periodic save or sync is amortised per iteration;
3. ``strategy.recover({k}, ctx)`` is timed ``--reps`` times for an intermediate stage ``k`` (and stage 0
   for CheckFree+), restoring the pre-failure state before each repetition.

The median wall time of one training iteration is measured in the same run (every strategy's warm-up
steps but the first), so the "x iteration" column compares like with like. Bytes are the report's
``bytes_moved``: what a real system would send to the replacement node at this model's size.

    python benchmarks/recovery_latency.py [--preset cpu_small] [--reps 9] [--steps 5] [--stage K]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from checkfree.config import section
from checkfree.data import TokenBatches
from checkfree.model import build_stages, preset
from checkfree.pipeline import LocalPipeline
from checkfree.recovery import (
    RecoveryContext,
    RecoveryReport,
    RecoveryStrategy,
    StrategyConfig,
    build_strategy,
)
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.schedule import Schedule, build_schedule

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STRATEGIES = ("checkfree", "checkfree_plus", "checkpoint", "redundant", "copy", "uniform", "random", "zero")


@dataclass
class Row:
    strategy: str
    stage: int
    recover_s: float
    bytes_moved: int
    after_step_s: float
    how: str


def strategy_config(name: str) -> StrategyConfig:
    """The default run's settings for this strategy (every, keep, replica_sync_every, lr_scale, ...)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml"))
    return section(StrategyConfig, "strategy", raw)


def after_step_period(strategy: RecoveryStrategy) -> int:
    """Iterations between the hook's expensive calls; timing a whole period amortises them honestly."""
    if strategy.name == "checkpoint":
        return strategy.cfg.every
    if strategy.name == "checkfree_plus":
        return strategy.cfg.replica_sync_every
    return 1


class Snapshot:
    """Everything a recovery may change, so each repetition starts from the same pre-failure state."""

    def __init__(self, ctx: RecoveryContext) -> None:
        p = ctx.pipeline
        self.stages = [{k: v.clone() for k, v in s.state_dict().items()} for s in p.stages]
        self.optimizers = [copy.deepcopy(o.state_dict()) for o in p.optimizers]
        self.progress, self.data, self.rng = ctx.progress, ctx.data.state_dict(), torch.get_rng_state()

    def restore(self, ctx: RecoveryContext) -> None:
        p = ctx.pipeline
        for k, stage in enumerate(p.stages):
            stage.load_state_dict(self.stages[k])
            # A recovery may have replaced the optimizer (fresh Adam at lr_scale * lr): start from a new one.
            # Deep copies, because Adam keeps the loaded tensors and would otherwise share the snapshot's.
            p.reset_optimizer(k, p.lr)
            p.optimizers[k].load_state_dict(copy.deepcopy(self.optimizers[k]))
        ctx.progress = self.progress
        ctx.data.load_state_dict(self.data)
        torch.set_rng_state(self.rng)


def train_steps(ctx: RecoveryContext, strategy: RecoveryStrategy, schedule: Schedule, n: int,
                micro_batches: int, micro_batch_size: int) -> list[float]:
    """``n`` iterations as ``Trainer.iteration`` runs them; returns each optimizer step's wall seconds."""
    times = []
    for _ in range(n):
        batches = [ctx.data.next_batch(micro_batch_size) for _ in range(micro_batches)]
        start = time.perf_counter()
        result = ctx.pipeline.train_step(batches, schedule)
        times.append(time.perf_counter() - start)
        ctx.progress += 1
        ctx.iteration += 1
        ctx.grad_norm, ctx.grad_norm_post = result.grad_norm, result.grad_norm_post
        strategy.after_step(ctx)
    return times


def time_after_step(ctx: RecoveryContext, strategy: RecoveryStrategy, reps: int) -> float:
    """Median over ``reps`` whole periods of the hook's seconds per iteration.

    The hook's cost does not depend on the weights' values, so the period's iterations are replayed by
    advancing ``ctx.progress`` alone (no training in between), then progress is put back.
    """
    period, start = after_step_period(strategy), ctx.progress
    per_iteration = []
    for _ in range(reps):
        total = 0.0
        for p in range(start + 1, start + period + 1):
            ctx.progress = p
            t0 = time.perf_counter()
            strategy.after_step(ctx)
            total += time.perf_counter() - t0
        per_iteration.append(total / period)
    ctx.progress = start
    if isinstance(strategy, CheckpointRollback):
        # The replayed period left a checkpoint "from the future": save the real state again, so the
        # rollback below loads a checkpoint with full Adam state at the current progress (as if the last
        # periodic save had just happened), not the one saved at setup with no optimizer state.
        strategy.save(ctx)
    return statistics.median(per_iteration)


def describe(report: RecoveryReport, n_stages: int) -> str:
    if report.method == "rollback":
        total = report.details["largest_shard_bytes"]  # the shards are close in size; say what all move
        return f"rollback, all {n_stages} stages download (largest shard {total / 1e6:.2f} MB)"
    sources = f" from {report.sources}" if report.sources else ""
    coefficients = f" x {[round(c, 3) for c in report.coefficients]}" if len(report.coefficients) > 1 else ""
    return f"{report.method}{sources}{coefficients}"


def bench_strategy(name: str, stages_to_fail: list[int], args: argparse.Namespace, vocab: int,
                   tokens: torch.Tensor, run_dir: Path) -> tuple[list[Row], list[float]]:
    cfg = preset(args.preset).with_vocab(vocab)
    pipeline = LocalPipeline(build_stages(cfg, seed=0), args.lr)
    strategy = build_strategy(strategy_config(name), cfg.n_stages)
    schedule = build_schedule(strategy.schedule_name, cfg.n_stages)
    data = TokenBatches(tokens, cfg.seq_len, batch_seed=0)
    ctx = RecoveryContext(pipeline, args.lr, run_dir=run_dir, data=data)
    strategy.setup(ctx)
    step_times = train_steps(ctx, strategy, schedule, args.steps, args.micro_batches, args.micro_batch_size)
    after_step_s = time_after_step(ctx, strategy, args.reps)
    rows = []
    for k in stages_to_fail:
        ctx.iteration += 1  # the failure hits at the start of the next iteration
        before = Snapshot(ctx)
        times, report = [], None
        for _ in range(args.reps):
            before.restore(ctx)
            t0 = time.perf_counter()
            (report,) = strategy.recover({k}, ctx)
            times.append(time.perf_counter() - t0)
        before.restore(ctx)
        rows.append(Row(name, k, statistics.median(times), report.bytes_moved, after_step_s,
                        describe(report, cfg.n_stages)))
    return rows, step_times[1:]  # the first step pays for allocations: not a typical iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu_small", help="model preset (checkfree/model.py PRESETS)")
    parser.add_argument("--vocab", type=int, default=1024,
                        help="vocabulary size (1024 = the default synthetic corpus's BPE; no data is loaded)")
    parser.add_argument("--reps", type=int, default=9,
                        help="timed repetitions of each recovery and hook period")
    parser.add_argument("--steps", type=int, default=5, help="training steps per strategy before the failure")
    parser.add_argument("--stage", type=int, default=None, help="intermediate stage to fail (default S // 2)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    # One thread by default: on a shared 2-core machine two OpenMP threads stall whenever a neighbour's
    # process holds a core, and the medians of a 0.2 s step swing by 10x. Both the iteration and the
    # recoveries run under the same setting, so the ratio column stays fair.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    n_stages = preset(args.preset).n_stages
    k = n_stages // 2 if args.stage is None else args.stage
    if not 0 < k < n_stages - 1:
        parser.error(f"--stage={k} is not an intermediate stage of a {n_stages}-stage model "
                     f"(allowed 1..{n_stages - 2})")
    seq_len = preset(args.preset).seq_len
    g = torch.Generator().manual_seed(0)
    # Enough sequences for every warm-up step without wrapping an epoch; values only need to be valid ids.
    n_sequences = (args.steps + 1) * args.micro_batches * args.micro_batch_size
    tokens = torch.randint(0, args.vocab, (n_sequences * (seq_len + 1),), generator=g)

    rows: list[Row] = []
    step_times: list[float] = []
    for name in args.strategies.split(","):
        fail = [k, 0] if name == "checkfree_plus" else [k]  # stage 0 is CheckFree+'s reason to exist
        with tempfile.TemporaryDirectory(prefix=f"recovery_latency_{name}_") as run_dir:
            strategy_rows, times = bench_strategy(name, fail, args, args.vocab, tokens, Path(run_dir))
        rows += strategy_rows
        step_times += times
        print(f"  {name}: done", flush=True)

    iteration_s = statistics.median(step_times)
    print(f"\npreset={args.preset} stages={n_stages} vocab={args.vocab} micro_batches={args.micro_batches}x"
          f"{args.micro_batch_size} threads={torch.get_num_threads()} reps={args.reps}")
    print(f"one training iteration: median {iteration_s * 1e3:.1f} ms over {len(step_times)} steps "
          f"(min {min(step_times) * 1e3:.1f}, max {max(step_times) * 1e3:.1f})\n")
    print("| strategy | stage | recovery ms (median) | x iteration | bytes moved | after-step ms/iter "
          "| after-step x iteration | how |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.strategy} | {r.stage} | {r.recover_s * 1e3:.2f} | {r.recover_s / iteration_s:.3f} "
              f"| {r.bytes_moved:,} | {r.after_step_s * 1e3:.3f} | {r.after_step_s / iteration_s:.4f} "
              f"| {r.how} |")


if __name__ == "__main__":
    main()
