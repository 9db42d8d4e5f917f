"""Tokens per second and model FLOPs utilisation (MFU) of the local engine on a GPU, fused and not.

The paper-scale preset (``llama_124m`` by default: 4 stages x 3 LLaMA blocks, d=512, 32k vocabulary, 512
tokens per sequence) trains in bf16 autocast on the local engine, with its micro-batches one by one and fused
(``trainer.fuse_micro_batches``: micro-batches that take the same route run as one batch), for CheckFree's
in-order schedule and CheckFree+'s out-of-order one. MFU = 6 x parameters x tokens / second / the device's
dense bf16 peak (looked up from the device name, or ``--peak-tflops``).

    python benchmarks/gpu_throughput.py [--preset llama_124m] [--micro-batches 4] [--micro-batch-size 16]
    python benchmarks/gpu_throughput.py --smoke      # tiny preset on the CPU, a few steps (the tests run it)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from checkfree.model import build_stages, param_count, preset
from checkfree.pipeline import LocalEngine
from checkfree.schedule import InOrder, OutOfOrder

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


def measure(engine: LocalEngine, schedule, batches: list[torch.Tensor], steps: int, device: torch.device) -> float:
    """Median seconds per optimizer step over ``steps`` steps, after two warm-up steps."""
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.train_step(batches, schedule)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama_124m")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, when not in the table")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, CPU, fp32, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.precision, args.steps = "tiny", "cpu", "fp32", 2
        args.micro_batch_size = 2
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
    rows = []
    for schedule in (InOrder(cfg.n_stages), OutOfOrder(cfg.n_stages)):
        for fuse in (False, True):
            engine = LocalEngine(build_stages(cfg, 0, device), lr=3e-4, autocast_dtype=autocast, fuse=fuse)
            seconds = measure(engine, schedule, batches, args.steps, device)
            rate = tokens / seconds
            mfu = 6 * param_count(cfg) * rate / peak if peak else None
            rows.append({"schedule": schedule.name, "fused": fuse, "step_s": seconds, "tokens_per_s": rate,
                         "mfu": mfu})
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"{cfg.name}: {param_count(cfg) / 1e6:.1f} M parameters, {tokens} tokens/step "
          f"({args.micro_batches} x {args.micro_batch_size} x {cfg.seq_len}), {args.precision}, {name}")
    print("| schedule | fused | s / step | tokens / s | MFU |\n|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "— (no peak known: --peak-tflops)"
        print(f"| {r['schedule']} | {r['fused']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {mfu} |")
    return rows


if __name__ == "__main__":
    main()
