"""Local engine vs a plain single-module training loop: same model, same batches, one run.

The plain loop is what a user would write without pipeline stages: one ``ModuleList`` of the same stage
modules, one Adam over all parameters, one global clip, one forward/backward per micro-batch. The engine
adds per-stage optimizers, per-stage clipping with pre/post norms and route dispatch; ``fused`` is the engine
with ``trainer.fuse_micro_batches`` (micro-batches that take the same route run as one batch: the same math
up to float rounding). The contenders alternate in rounds and we compare median throughput, so machine
noise hits all alike. Goals: engine / plain >= 0.95; fused / plain >= 1.3 on the tiny presets.

With ``--compile`` two more contenders run every stage through ``torch.compile`` (``trainer.compile``):
``compiled`` (the engine's path) and ``compiled fused``; the ratios compiled / engine and compiled fused /
fused, and the seconds of each contender's two warm-up steps (where a compiled one compiles; inductor's
on-disk cache makes a second run's warm-up shorter: set TORCHINDUCTOR_CACHE_DIR to a new directory for a
cold one) are printed with them.

    python benchmarks/engine_overhead.py [--presets tiny,cpu_sweep,cpu_small] [--rounds 7] [--steps 5]
    python benchmarks/engine_overhead.py --presets cpu_sweep --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from checkfree.model.llama import build_stages
from checkfree.model.presets import preset
from checkfree.pipeline import LocalEngine
from checkfree.stage.compute import causal_lm_loss
from checkfree.stage.schedule import InOrder


def plain_step(modules: torch.nn.ModuleList, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> float:
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        hidden = modules[0].embed(batch[:, :-1])
        for stage in modules:
            hidden = stage.body(hidden)
        loss = causal_lm_loss(modules[-1].head(hidden), batch[:, 1:])
        (loss / len(batches)).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0, foreach=True)
    opt.step()
    return total / len(batches)


def bench(name: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = preset(name).with_vocab(args.vocab)
    stages = build_stages(cfg, seed=0)
    plain = torch.nn.ModuleList(copy.deepcopy(stages))
    engines = {"engine": LocalEngine(stages, lr=1e-3),
               "fused": LocalEngine(copy.deepcopy(stages), lr=1e-3, fuse=True)}
    if args.compile:
        torch._dynamo.reset()  # this preset's warm-up compiles from scratch (in this process)
        engines["compiled"] = LocalEngine(copy.deepcopy(stages), lr=1e-3, compile=True)
        engines["compiled fused"] = LocalEngine(copy.deepcopy(stages), lr=1e-3, fuse=True, compile=True)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    schedule = InOrder(cfg.n_stages)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_len + 1), generator=g)
               for _ in range(args.micro_batches)]
    tokens = args.micro_batches * args.micro_batch_size * cfg.seq_len
    steps = {"plain": lambda: plain_step(plain, opt, batches),
             **{k: (lambda e=e: e.train_step(batches, schedule)) for k, e in engines.items()}}

    warmup = {}
    for name, run in steps.items():  # warm-up every contender (allocator, kernels; a compiled one compiles)
        start = time.perf_counter()
        run()
        run()
        warmup[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.rounds):
        for contender in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[contender]()
            rates[contender].append(tokens * args.steps / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"preset={cfg.name} stages={cfg.n_stages} d={cfg.d_model} tokens/step={tokens} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} steps/round={args.steps}")
    for contender in names:
        print(f"  {contender:>14}: median {med[contender]:,.0f} tok/s  "
              f"(min {min(rates[contender]):,.0f}, max {max(rates[contender]):,.0f}), "
              f"warm-up {warmup[contender]:.1f} s")
    ratios = {"engine / plain": med["engine"] / med["plain"], "fused / plain": med["fused"] / med["plain"]}
    if args.compile:
        ratios["compiled / engine"] = med["compiled"] / med["engine"]
        ratios["compiled fused / fused"] = med["compiled fused"] / med["fused"]
        ratios["compiled warm-up s"] = warmup["compiled"]
        ratios["compiled fused warm-up s"] = warmup["compiled fused"]
    print("  " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,cpu_sweep,cpu_small")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sweeps run one thread per job)")
    parser.add_argument("--compile", action="store_true", help="also the compiled engine (trainer.compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: bench(name, args) for name in args.presets.split(",")}
    print("\n| preset | engine / plain (goal >= 0.95) | fused / plain (goal >= 1.3) |\n|---|---|---|")
    for name, ratios in results.items():
        print(f"| {name} | {ratios['engine / plain']:.3f} | {ratios['fused / plain']:.3f} |")
    if args.compile:
        print("\n| preset | compiled / engine | compiled fused / fused | warm-up s: compiled, compiled fused |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['compiled / engine']:.3f} | {r['compiled fused / fused']:.3f} "
                  f"| {r['compiled warm-up s']:.1f}, {r['compiled fused warm-up s']:.1f} |")


if __name__ == "__main__":
    main()
