"""Local pipeline engine vs a plain single-module training loop: same model, same batches, one run.

The plain loop is what a user would write without pipeline stages: one ``ModuleList`` of the same stage
modules, one Adam over all parameters, one global clip. The engine adds per-stage optimizers, per-stage
clipping with pre/post norms and schedule dispatch. We alternate the two in rounds and compare median
throughput, so machine noise hits both alike.

    python benchmarks/engine_overhead.py [--preset cpu_small] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from checkfree.model import build_stages, preset
from checkfree.pipeline import LocalPipeline, causal_lm_loss
from checkfree.schedule import InOrder


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and contender")
    args = parser.parse_args()

    cfg = preset(args.preset).with_vocab(args.vocab)
    stages = build_stages(cfg, seed=0)
    plain = torch.nn.ModuleList(copy.deepcopy(stages))
    engine = LocalPipeline(stages, lr=1e-3)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    schedule = InOrder(cfg.n_stages)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_len + 1), generator=g)
               for _ in range(args.micro_batches)]
    tokens = args.micro_batches * args.micro_batch_size * cfg.seq_len

    for _ in range(2):  # warm-up both (allocator, kernels)
        engine.train_step(batches, schedule)
        plain_step(plain, opt, batches)
    rates: dict[str, list[float]] = {"engine": [], "plain": []}
    for r in range(args.rounds):
        order = ["engine", "plain"] if r % 2 == 0 else ["plain", "engine"]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                if name == "engine":
                    engine.train_step(batches, schedule)
                else:
                    plain_step(plain, opt, batches)
            rates[name].append(tokens * args.steps / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"preset={cfg.name} stages={cfg.n_stages} tokens/step={tokens} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} steps/round={args.steps}")
    for name in ("plain", "engine"):
        print(f"  {name:>6}: median {med[name]:,.0f} tok/s  (min {min(rates[name]):,.0f}, max {max(rates[name]):,.0f})")
    print(f"throughput ratio engine / plain = {med['engine'] / med['plain']:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
