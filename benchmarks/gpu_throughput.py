"""Tokens per second and model FLOPs utilisation (MFU) of the local engine on a GPU: fused and not, compiled
and not.

The paper-scale preset (``llama_124m`` by default: 4 stages x 3 LLaMA blocks, d=512, 32k vocabulary, 512
tokens per sequence) trains in bf16 autocast on the local engine, with its micro-batches one by one and fused
(``trainer.fuse_micro_batches``: micro-batches that take the same route run as one batch), eager and through
``torch.compile`` (``trainer.compile``), for CheckFree's in-order schedule and CheckFree+'s out-of-order one.
MFU = 6 x parameters x tokens / second / the device's dense bf16 peak (looked up from the device name, or
``--peak-tflops``). Each row also gives its warm-up seconds (the first two steps: a compiled row compiles there).

    python benchmarks/gpu_throughput.py [--preset llama_124m] [--micro-batches 4] [--micro-batch-size 16]
        [--compile none|fused|all] [--json rows.jsonl]
    python benchmarks/gpu_throughput.py --smoke      # tiny preset on the CPU, a few steps, eager (the tests run it)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from checkfree.model.llama import build_stages
from checkfree.model.presets import param_count, preset
from checkfree.pipeline import LocalEngine
from checkfree.stage.schedule import InOrder, OutOfOrder

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine: LocalEngine, schedule, batches: list[torch.Tensor], steps: int,
            device: torch.device) -> tuple[float, float]:
    """(median seconds per optimizer step over ``steps`` steps, seconds of the two warm-up steps before them)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(2):
        engine.train_step(batches, schedule)
    sync(device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step(batches, schedule)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), warmup


def variants(compile: str) -> list[tuple[bool, bool]]:
    """(fused, compiled) pairs to measure: eager always; compiled for the fused rows only (``fused``: what a long
    GPU run would use, and half the compile warm-ups), for every row (``all``) or never (``none``)."""
    eager = [(False, False), (True, False)]
    return eager + {"none": [], "fused": [(True, True)], "all": [(False, True), (True, True)]}[compile]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama_124m")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--compile", default="fused", choices=("none", "fused", "all"),
                        help="which rows also run compiled (trainer.compile)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, when not in the table")
    parser.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no row after this many seconds (the rows left are listed as skipped)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, CPU, fp32, 2 steps, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.precision, args.steps = "tiny", "cpu", "fp32", 2
        args.micro_batch_size, args.compile = 2, "none"
        torch.set_num_threads(1)  # a tiny model gains nothing from more, and spins against a busy machine's load
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cfg = preset(args.preset)
    cfg = cfg.with_vocab(cfg.vocab_size or 1024)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_len + 1), generator=g)
               for _ in range(args.micro_batches)]
    tokens = args.micro_batches * args.micro_batch_size * cfg.seq_len
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows, skipped, start = [], [], time.perf_counter()
    initial = build_stages(cfg, 0, device)  # built once (a 500M model takes seconds), copied for every row
    for schedule in (InOrder(cfg.n_stages), OutOfOrder(cfg.n_stages)):
        for fuse, compiled in variants(args.compile):
            if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                skipped.append(f"{schedule.name}, fused={fuse}, compiled={compiled}")
                continue
            engine = LocalEngine(copy.deepcopy(initial), lr=3e-4, autocast_dtype=autocast, fuse=fuse,
                                 compile=compiled)
            seconds, warmup = measure(engine, schedule, batches, args.steps, device)
            rate = tokens / seconds
            mfu = 6 * param_count(cfg) * rate / peak if peak else None
            rows.append({"preset": cfg.name, "device": name, "precision": args.precision, "schedule": schedule.name,
                         "fused": fuse, "compiled": compiled, "step_s": seconds, "tokens_per_s": rate, "mfu": mfu,
                         "warmup_s": warmup, "tokens_per_step": tokens})
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del initial
    if args.compile != "none":
        torch._dynamo.reset()  # the next preset's graphs start from a clean cache (and this one's memory goes)
    print(f"{cfg.name}: {param_count(cfg) / 1e6:.1f} M parameters, {tokens} tokens/step "
          f"({args.micro_batches} x {args.micro_batch_size} x {cfg.seq_len}), {args.precision}, {name}")
    print("| schedule | fused | compiled | s / step | tokens / s | MFU | warm-up s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "— (no peak known: --peak-tflops)"
        print(f"| {r['schedule']} | {r['fused']} | {r['compiled']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} "
              f"| {mfu} | {r['warmup_s']:.1f} |")
    for row in skipped:
        print(f"skipped (--time-budget-s {args.time_budget_s:g} spent): {row}")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps({"benchmark": "gpu_throughput", **r}) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
