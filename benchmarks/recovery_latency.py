"""How long each recovery strategy takes to rebuild a lost stage, side by side, in one run.

For every strategy on one model (the default job's config, composed with Hydra as ``python -m
checkfree.train`` composes it, with ``strategy=<name>`` and no failures):

1. the real trainer runs a few iterations (step, then the strategy's upkeep), so Adam state, gradient norms,
   shadows, replicas and checkpoints exist;
2. the upkeep is timed over one whole period (the number of steps after which the strategy next asks for
   work: a checkpoint's ``every``, CheckFree+'s ``replica_sync_every``, else one), so a periodic save or sync
   is amortised per iteration;
3. the trainer's ``recover({k})`` — the strategy's plan, executed by the local engine — is timed ``--reps``
   times for an intermediate stage ``k`` (and stage 0 for CheckFree+), restoring the pre-failure state
   (``engine.load_state_dict``) before each repetition.

The median wall time of one optimizer step is measured in the same run (every strategy's warm-up steps but
the first), so the "x iteration" column compares like with like. Bytes are the report's ``bytes_moved``:
what a real system would send to the replacement node at this model's size.

    python benchmarks/recovery_latency.py [--preset cpu_small] [--reps 9] [--steps 5] [--stage K]
        [--set trainer.device=cuda --set trainer.precision=bf16 ...] [--json rows.jsonl]

On a GPU (``--set trainer.device=cuda``) every timed span ends with a ``torch.cuda.synchronize``, so a
recovery's seconds include the kernels it launched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from checkfree.plan import RecoveryReport
from checkfree.recovery import STRATEGIES
from checkfree.run.runconfig import load_run_config
from checkfree.train import build_run

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def sync() -> None:
    """Wait for the GPU's queued work (the rebuild's kernels) before reading the clock; nothing on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class Row:
    strategy: str
    stage: int
    recover_s: float
    bytes_moved: int
    after_step_s: float
    how: str


def describe(report: RecoveryReport, n_stages: int) -> str:
    if report.from_storage:
        total = report.details["largest_shard_bytes"]  # the shards are close in size; say what all move
        return f"{report.method}, all {n_stages} stages download (largest shard {total / 1e6:.2f} MB)"
    sources = f" from {report.sources}" if report.sources else ""
    coefficients = f" x {[round(c, 3) for c in report.coefficients]}" if len(report.coefficients) > 1 else ""
    return f"{report.method}{sources}{coefficients}"


def upkeep_period(trainer, limit: int = 100) -> int:
    """Steps until the strategy next asks for upkeep work (1 when it never or always does)."""
    view = trainer.view()
    for p in range(1, limit + 1):
        if trainer.strategy.after_step(replace(view, progress=view.progress + p)):
            return p
    return 1


def time_upkeep(trainer, reps: int) -> float:
    """Median over ``reps`` whole periods of the upkeep's seconds per iteration. Its cost does not depend on
    the weights' values, so the period is replayed by advancing the progress alone, then put back."""
    period, start = upkeep_period(trainer), trainer.progress
    per_iteration = []
    for _ in range(reps):
        total = 0.0
        for p in range(start + 1, start + period + 1):
            trainer.progress = p
            sync()
            t0 = time.perf_counter()
            trainer.upkeep(trainer.strategy.after_step(trainer.view()))
            sync()
            total += time.perf_counter() - t0
        per_iteration.append(total / period)
    trainer.progress = start
    # The replayed period left a checkpoint "from the future": save the real state again, so a rollback below
    # loads a checkpoint with full Adam state at the current progress.
    trainer.upkeep(trainer.strategy.setup(trainer.view()))
    return statistics.median(per_iteration)


def bench_strategy(name: str, stages_to_fail: list[int], args: argparse.Namespace,
                   run_dir: Path) -> tuple[list[Row], list[float]]:
    overrides = [f"model={args.preset}", f"strategy={name}", "failure=none", "trainer.progress_bar=false",
                 "logger.wandb.mode=disabled", f"trainer.micro_batches={args.micro_batches}",
                 f"trainer.micro_batch_size={args.micro_batch_size}", f"trainer.lr={args.lr}", *args.set]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = load_run_config(compose(config_name="config", overrides=overrides))
    trainer = build_run(cfg, run_dir).trainer
    trainer.engine.start(run_dir, fresh=True)
    trainer.upkeep(trainer.strategy.setup(trainer.view()))
    step_times = []
    for iteration in range(1, args.steps + 1):
        record = trainer.iteration(iteration)
        step_times.append(record.outcome["tokens"] / record.outcome["throughput_tok_s"])
    after_step_s = time_upkeep(trainer, args.reps)
    rows = []
    for k in stages_to_fail:
        trainer.iteration_no += 1  # the failure hits at the start of the next iteration
        before = trainer.engine.state_dict()
        progress, data, held_since = trainer.progress, trainer.corpus.train.state_dict(), dict(trainer.held_since)
        times, reports = [], []
        for _ in range(args.reps):
            trainer.engine.load_state_dict(before)
            trainer.progress, trainer.held_since = progress, dict(held_since)
            trainer.corpus.train.load_state_dict(data)
            trainer.engine.lose([k])
            sync()
            t0 = time.perf_counter()
            reports = trainer.recover({k})
            sync()
            times.append(time.perf_counter() - t0)
        trainer.engine.load_state_dict(before)
        rows.append(Row(name, k, statistics.median(times), reports[0].bytes_moved, after_step_s,
                        describe(reports[0], trainer.engine.n_stages)))
    return rows, step_times[1:]  # the first step pays for allocations: not a typical iteration


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu_small", help="model preset (checkfree/model/llama.py PRESETS)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions of each recovery and upkeep period")
    parser.add_argument("--steps", type=int, default=5, help="training steps per strategy before the failure")
    parser.add_argument("--stage", type=int, default=None, help="intermediate stage to fail (default S // 2)")
    parser.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "none"),
                        help="comma-separated subset (default: every registered strategy)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    # One thread by default: on a shared 2-core machine two OpenMP threads stall whenever a neighbour's
    # process holds a core, and the medians of a 0.2 s step swing by 10x. Both the iteration and the
    # recoveries run under the same setting, so the ratio column stays fair.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more Hydra override (repeatable), e.g. trainer.device=cuda")
    parser.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from checkfree.model.presets import preset

    n_stages = preset(args.preset).n_stages
    k = n_stages // 2 if args.stage is None else args.stage
    if not 0 < k < n_stages - 1:
        parser.error(f"--stage={k} is not an intermediate stage of a {n_stages}-stage model "
                     f"(allowed 1..{n_stages - 2})")
    rows: list[Row] = []
    step_times: list[float] = []
    for name in args.strategies.split(","):
        fail = [k, 0] if name == "checkfree_plus" else [k]  # stage 0 is CheckFree+'s reason to exist
        with tempfile.TemporaryDirectory(prefix=f"recovery_latency_{name}_") as run_dir:
            strategy_rows, times = bench_strategy(name, fail, args, Path(run_dir))
        rows += strategy_rows
        step_times += times
        print(f"  {name}: done", flush=True)

    iteration_s = statistics.median(step_times)
    print(f"\npreset={args.preset} stages={n_stages} micro_batches={args.micro_batches}x"
          f"{args.micro_batch_size} threads={torch.get_num_threads()} reps={args.reps}")
    print(f"one training iteration: median {iteration_s * 1e3:.1f} ms over {len(step_times)} steps "
          f"(min {min(step_times) * 1e3:.1f}, max {max(step_times) * 1e3:.1f})\n")
    print("| strategy | stage | recovery ms (median) | x iteration | bytes moved | upkeep ms/iter "
          "| upkeep x iteration | how |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.strategy} | {r.stage} | {r.recover_s * 1e3:.2f} | {r.recover_s / iteration_s:.3f} "
              f"| {r.bytes_moved:,} | {r.after_step_s * 1e3:.3f} | {r.after_step_s / iteration_s:.4f} "
              f"| {r.how} |")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps({"benchmark": "recovery_latency", "preset": args.preset, "overrides": args.set,
                                     "iteration_s": iteration_s, **asdict(r)}) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
