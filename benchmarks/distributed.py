"""The distributed engine, measured side by side in one run.

1. Iteration time: our engine (one process per stage, ``engine=distributed``, GPipe) against PyTorch's own
   ``torch.distributed.pipelining.ScheduleGPipe`` on the same stages (each rank wraps its ``Stage`` as a
   module that runs embedding / body / head as that stage owns them), the same micro-batches, the same
   process count and backend, per-stage clipping and Adam in both. Median seconds per iteration after a
   warm-up; ratio = torch's / ours (> 1: ours is faster).
2. Recovery latency of CheckFree failures (a trace kills an intermediate stage several times), broken
   into detect (kill order -> supervisor sees the process gone), respawn (replacement process up, stage
   built), re-rendezvous (all processes re-form the group) and weight transfer (neighbours -> replacement,
   averaged) — medians of the supervisor's own measurements, which every recovery report carries in
   ``process``. Replacements come from a warm forkserver (torch and transformers already imported);
   ``--cold`` adds a run where every process is a fresh interpreter (``CHECKFREE_START_METHOD=spawn``).

    python benchmarks/distributed.py [--stages 4] [--layers 2] [--d-model 128] [--seq-len 128]
        [--micro-batches 8] [--micro-batch-size 4] [--iterations 12] [--device cpu|cuda] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from checkfree.distributed.worker import seeded_stage
from checkfree.model import ModelConfig
from checkfree.pipeline import causal_lm_loss
from checkfree.runconfig import load_run_config
from checkfree.runlog import read_metrics
from checkfree.train import train


class WholeStage(nn.Module):
    """A ``Stage`` as one module, for ``PipelineStage``: embedding / body / head as this stage owns them."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage.has_embedding:
            x = self.stage.embed(x)
        x = self.stage.body(x)
        return self.stage.head(x) if self.stage.has_head else x


def torch_gpipe_rank(rank: int, model: ModelConfig, batches: list[torch.Tensor], args: dict, port: int,
                     results: dict) -> None:
    """One rank of the ``ScheduleGPipe`` baseline; rank 0 reports per-iteration times."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // model.n_stages))
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=model.n_stages,
                            timeout=timedelta(seconds=60))
    stage = seeded_stage(model, 0, rank).to(device)
    module = WholeStage(stage)
    pipe = PipelineStage(module, rank, model.n_stages, device)
    schedule = ScheduleGPipe(pipe, n_microbatches=args["micro_batches"], loss_fn=causal_lm_loss)
    optimizer = torch.optim.Adam(stage.parameters(), lr=3e-3)
    times = []
    for it in range(args["iterations"]):
        full = batches[it % len(batches)].to(device)
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(full[:, :-1])
        elif rank == model.n_stages - 1:
            schedule.step(target=full[:, 1:], losses=[])
        else:
            schedule.step()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0, foreach=True)
        optimizer.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        results["torch"] = times
    dist.destroy_process_group()


def run_torch_gpipe(model: ModelConfig, batches: list[torch.Tensor], args: dict) -> list[float]:
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    manager = ctx.Manager()
    results = manager.dict()
    procs = [ctx.Process(target=torch_gpipe_rank, args=(r, model, batches, args, store.port, results))
             for r in range(model.n_stages)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(600)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    times = list(results.get("torch", []))
    manager.shutdown()
    if not times:
        raise RuntimeError("the torch.distributed.pipelining baseline failed; see the messages above")
    return times


def run_config(args: argparse.Namespace, cache: str, **sections: dict):
    raw = {
        "seed": 0,
        "model": {"name": "custom", "n_stages": args.stages, "layers_per_stage": args.layers,
                  "d_model": args.d_model, "n_heads": args.heads, "seq_len": args.seq_len},
        "data": {"n_documents": 3000, "val_documents": 100, "val_sequences": 8, "vocab_size": 1024,
                 "cache_dir": cache},
        "trainer": {"iterations": args.iterations, "eval_every": 10_000, "micro_batches": args.micro_batches,
                    "micro_batch_size": args.micro_batch_size, "progress_bar": False, "device": args.device,
                    "eval_batch_size": 8},
        "strategy": {"name": "checkfree"},
        "failure": {"name": "none"},
        "engine": {"name": "distributed", "timeout_s": 60},
        "logger": {"wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return load_run_config(raw)


def step_seconds(run_dir: Path) -> list[float]:
    """Per-iteration wall seconds of the optimizer step (tokens / throughput of each record)."""
    return [r["tokens"] / r["throughput_tok_s"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("throughput_tok_s")]


def recovery_latency(args: argparse.Namespace, cache: str, root: Path, label: str) -> dict[str, float]:
    failures = [{"iteration": i, "stage": 1 + i % (args.stages - 2)} for i in range(3, 3 + 2 * args.failures, 2)]
    trace = root / f"trace-{label}.json"
    trace.write_text(json.dumps(failures))
    cfg = run_config(args, cache, failure={"name": "trace", "path": str(trace)},
                     trainer={"iterations": 3 + 2 * args.failures})
    summary = train(cfg, root / f"recovery-{label}")
    reports = [r for rec in read_metrics(root / f"recovery-{label}" / "metrics.jsonl") for r in rec.get("recoveries", [])]
    assert summary["status"] == "completed" and len(reports) == len(failures), summary["error"]
    parts = {k: statistics.median(r["process"][k] for r in reports)
             for k in ("detect_s", "respawn_s", "rendezvous_s", "transfer_s")}
    parts["total_s"] = statistics.median(r["wall_s"] + r["process"]["detect_s"] for r in reports)
    parts["bytes"] = statistics.median(r["bytes_moved"] for r in reports)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--failures", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cold", action="store_true", help="also measure recovery with spawn (cold) processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="checkfree-bench-") as tmp:
        root, cache = Path(tmp), str(Path(tmp) / "cache")
        cfg = run_config(args, cache)
        ours_dir = root / "ours"
        summary = train(cfg, ours_dir)
        assert summary["status"] == "completed", summary["error"]
        ours = step_seconds(ours_dir)[args.warmup:]

        # The same micro-batches, from the same stream, for the baseline.
        from checkfree.data import load_corpus

        corpus = load_corpus(cfg.data, cfg.model.seq_len, batch_seed=cfg.seed)
        model = cfg.model.with_vocab(corpus.vocab_size)
        batches = [corpus.train.next_batch(args.micro_batches * args.micro_batch_size) for _ in range(args.iterations)]
        theirs = run_torch_gpipe(model, batches, {"device": args.device, "micro_batches": args.micro_batches,
                                                  "iterations": args.iterations})[args.warmup:]
        latencies = {"forkserver (warm)": recovery_latency(args, cache, root, "warm")}
        if args.cold:
            os.environ["CHECKFREE_START_METHOD"] = "spawn"
            latencies["spawn (cold)"] = recovery_latency(args, cache, root, "cold")
            del os.environ["CHECKFREE_START_METHOD"]

    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(f"\nmodel: {args.stages} stages x {args.layers} layers, d_model {args.d_model}, seq {args.seq_len}, "
          f"vocab {model.vocab_size}; M={args.micro_batches} x {args.micro_batch_size} sequences; "
          f"{args.stages} processes, {'nccl' if args.device == 'cuda' else 'gloo'}, {os.cpu_count()} CPU cores")
    print("\n| engine | median s / iteration | iterations timed |")
    print("|---|---|---|")
    print(f"| checkfree distributed (GPipe) | {ours_med:.4f} | {len(ours)} |")
    print(f"| torch.distributed.pipelining ScheduleGPipe | {theirs_med:.4f} | {len(theirs)} |")
    print(f"\nratio (torch / ours): {theirs_med / ours_med:.2f}  (goal >= 1.0)")
    print(f"\nrecovery latency of one CheckFree failure (median of {args.failures}):")
    print("| processes from | detect s | respawn s | re-rendezvous s | weight transfer s | total s | bytes |")
    print("|---|---|---|---|---|---|---|")
    for label, p in latencies.items():
        print(f"| {label} | {p['detect_s']:.3f} | {p['respawn_s']:.3f} | {p['rendezvous_s']:.3f} | "
              f"{p['transfer_s']:.3f} | {p['total_s']:.3f} | {int(p['bytes'])} |")


if __name__ == "__main__":
    main()
