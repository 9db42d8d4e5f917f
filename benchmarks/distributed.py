"""The distributed engine, measured side by side in one run.

1. Iteration time: our engine (one worker per stage, ``engine=distributed``) with its two launchers, local
   processes and Ray actors (``engine=ray``, one local Ray), against PyTorch's own
   ``torch.distributed.pipelining`` schedules ``ScheduleGPipe`` and ``Schedule1F1B`` on the same stages
   (each rank wraps its ``Stage`` as a module that runs embedding / body / head as that stage owns them),
   the same micro-batches, the same process count and backend, per-stage clipping and Adam everywhere.
   Ours runs GPipe and 1F1B (``network.pipeline``). Median seconds per iteration after a warm-up; ratios
   ray / processes (goal <= 1.10) and torch / ours (> 1: ours is faster; goal >= 1.0).
2. Recovery latency of CheckFree failures (a trace kills an intermediate stage several times), broken
   into detect (kill order -> supervisor sees the worker gone), replace (replacement up, stage built),
   re-rendezvous (all workers re-form the group) and weight transfer (neighbours -> replacement,
   averaged) — medians of the supervisor's own measurements, which every recovery report carries in
   ``process``. Warm: local processes come from a forkserver that has imported torch and transformers,
   Ray replacements take over a standby actor that has (``engine.ray.standby``). Cold: a fresh interpreter
   for every replacement (``CHECKFREE_START_METHOD=spawn``; ``engine.ray.standby=false``). Ray is measured
   warm and cold always, local processes cold with ``--cold``.

    python benchmarks/distributed.py [--stages 4] [--layers 2] [--d-model 128] [--seq-len 128]
        [--micro-batches 8] [--micro-batch-size 4] [--iterations 12] [--rounds 1] [--device cpu|cuda] [--cold]
        [--no-ray] [--pipelines gpipe,1f1b] [--failures 3] [--json rows.jsonl]

On GPUs: with a GPU per stage both sides run one process per stage on NCCL. With fewer GPUs (one, say) our
stage processes share them over gloo (``engine.backend=auto``: NCCL refuses two ranks on one GPU, and gloo
stages the tensors through host memory), while ``torch.distributed.pipelining`` cannot (its point-to-point
ops need NCCL for CUDA tensors): its baseline is then one process holding every stage as a single
``PipelineStage`` on that GPU — the same micro-batches and schedule without any transfer, the bound a
process per stage on one GPU can approach.
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

from checkfree.distributed.rendezvous import open_store
from checkfree.distributed.worker import seeded_stage
from checkfree.model.presets import ModelConfig
from checkfree.run.runconfig import load_run_config
from checkfree.run.runlog import read_metrics
from checkfree.stage.compute import causal_lm_loss
from checkfree.train import train


class WholeStage(nn.Module):
    """Consecutive ``Stage``s (one, or all of them) as one module, for ``PipelineStage``: embedding / bodies /
    head as these stages own them."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stages[0].has_embedding:
            x = self.stages[0].embed(x)
        for stage in self.stages:
            x = stage.body(x)
        return self.stages[-1].head(x) if self.stages[-1].has_head else x


def torch_ranks(n_stages: int, device: str) -> int:
    """Processes of the torch baseline: one per stage, or one for all where the stages would share GPUs."""
    if device == "cuda" and torch.cuda.device_count() < n_stages:
        return 1
    return n_stages


def torch_pipeline_rank(rank: int, model: ModelConfig, batches: list[torch.Tensor], args: dict, port: int,
                        results: dict) -> None:
    """One rank of the ``ScheduleGPipe`` / ``Schedule1F1B`` baseline; rank 0 reports per-iteration times."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ranks = args["ranks"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=60))
    mine = [rank] if ranks == model.n_stages else list(range(model.n_stages))
    stages = [seeded_stage(model, 0, k).to(device) for k in mine]
    module = WholeStage(stages)
    pipe = PipelineStage(module, rank, ranks, device)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args["schedule"]]
    schedule = kind(pipe, n_microbatches=args["micro_batches"], loss_fn=causal_lm_loss)
    optimizers = [torch.optim.Adam(stage.parameters(), lr=3e-3) for stage in stages]
    times = []
    for it in range(args["iterations"]):
        full = batches[it % len(batches)].to(device)
        dist.barrier()
        start = time.perf_counter()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if ranks == 1:
            schedule.step(full[:, :-1], target=full[:, 1:], losses=[])
        elif rank == 0:
            schedule.step(full[:, :-1])
        elif rank == ranks - 1:
            schedule.step(target=full[:, 1:], losses=[])
        else:
            schedule.step()
        for stage, optimizer in zip(stages, optimizers):  # per-stage clipping and Adam, as ours
            torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0, foreach=True)
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        results["torch"] = times
    dist.destroy_process_group()


def run_torch_pipeline(model: ModelConfig, batches: list[torch.Tensor], args: dict) -> list[float]:
    ctx = mp.get_context("spawn")
    store = open_store("127.0.0.1", 0, 60.0)  # loopback only, as the process engine's (torch's binds every interface)
    manager = ctx.Manager()
    results = manager.dict()
    procs = [ctx.Process(target=torch_pipeline_rank, args=(r, model, batches, args, store.port, results))
             for r in range(args["ranks"])]
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


def iteration_times(args: argparse.Namespace, cache: str, root: Path, label: str, **sections: dict) -> list[float]:
    summary = train(run_config(args, cache, **sections), root / label)
    assert summary["status"] == "completed", summary["error"]
    return step_seconds(root / label)[args.warmup:]


def recovery_latency(args: argparse.Namespace, cache: str, root: Path, label: str, **sections: dict) -> dict[str, float]:
    """A failure every ``--failure-every`` iterations, the first after as many (so that a Ray standby, started
    behind the initial actors and behind each replacement, has imported torch by the next failure)."""
    every = args.failure_every
    failures = [{"iteration": every * (j + 1), "stage": 1 + j % (args.stages - 2)} for j in range(args.failures)]
    trace = root / f"trace-{label}.json"
    trace.write_text(json.dumps(failures))
    cfg = run_config(args, cache, failure={"name": "trace", "path": str(trace)},
                     trainer={"iterations": every * args.failures + 1}, **sections)
    summary = train(cfg, root / f"recovery-{label}")
    reports = [r for rec in read_metrics(root / f"recovery-{label}" / "metrics.jsonl") for r in rec.get("recoveries", [])]
    assert summary["status"] == "completed" and len(reports) == len(failures), summary["error"]
    parts = {k: statistics.median(r["process"][k] for r in reports)
             for k in ("detect_s", "respawn_s", "rendezvous_s", "transfer_s")}
    parts["total_s"] = statistics.median(r["wall_s"] + r["process"]["detect_s"] for r in reports)
    parts["bytes"] = statistics.median(r["bytes_moved"] for r in reports)
    return parts


RAY = {"name": "distributed", "launcher": "ray", "timeout_s": 60}


def main(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--rounds", type=int, default=1, help="measure every engine this many times, round robin")
    parser.add_argument("--failures", type=int, default=3, help="CheckFree failures timed (0: no recovery section)")
    parser.add_argument("--failure-every", type=int, default=8,
                        help="iterations before the first failure and between two (a standby warms up meanwhile)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pipelines", default="gpipe,1f1b", help="schedules to compare: gpipe, 1f1b or both")
    parser.add_argument("--cold", action="store_true", help="also measure local processes started cold (spawn)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray launcher (Ray not installed)")
    parser.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    args = parser.parse_args(argv)
    pipelines = args.pipelines.split(",")
    ray_engine = {**RAY, "ray": {"gpus_per_stage": 1.0 if args.device == "cuda" else 0.0}}
    label = {"gpipe": "GPipe", "1f1b": "1F1B"}

    with tempfile.TemporaryDirectory(prefix="checkfree-bench-") as tmp:
        root, cache = Path(tmp), str(Path(tmp) / "cache")
        cfg = run_config(args, cache)
        # The same micro-batches, from the same stream, for the baselines.
        from checkfree.data.loading import load_corpus
        from checkfree.distributed.rendezvous import pick_backend

        corpus = load_corpus(cfg.data, cfg.model.seq_len, batch_seed=cfg.seed)
        model = cfg.model.with_vocab(corpus.vocab_size)
        backend = pick_backend(cfg.engine, torch.device(args.device), args.stages)
        batches = [corpus.train.next_batch(args.micro_batches * args.micro_batch_size) for _ in range(args.iterations)]
        # Without a standby: it would import torch beside the timed iterations (it idles afterwards).
        ray_cold = {**ray_engine, "ray": {**ray_engine["ray"], "standby": False}}
        torch_args = {"device": args.device, "micro_batches": args.micro_batches, "iterations": args.iterations,
                      "ranks": torch_ranks(args.stages, args.device)}
        runs = {}
        for pipe in pipelines:
            network = {"network": {"pipeline": pipe}}
            runs[f"processes, {label[pipe]}"] = lambda r, n=network, p=pipe: iteration_times(args, cache, root,
                                                                                           f"{p}-{r}", **n)
            if pipe == "gpipe" and not args.no_ray:
                runs["Ray actors, GPipe"] = lambda r: iteration_times(args, cache, root, f"ray-gpipe-{r}",
                                                                      engine=ray_cold)
            runs[f"torch {pipe}"] = lambda r, p=pipe: run_torch_pipeline(
                model, batches, {**torch_args, "schedule": p})[args.warmup:]
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):  # round robin, so that a change of the machine's load hits every engine
            for name, run in runs.items():
                times[name] += run(r)
        theirs = {name.split()[1]: times.pop(name) for name in list(times) if name.startswith("torch ")}
        ours = times

        latencies = {}
        if args.failures > 0:
            latencies["local processes, forkserver (warm)"] = recovery_latency(args, cache, root, "warm")
        if args.cold and args.failures > 0:
            os.environ["CHECKFREE_START_METHOD"] = "spawn"
            latencies["local processes, spawn (cold)"] = recovery_latency(args, cache, root, "cold")
            del os.environ["CHECKFREE_START_METHOD"]
        if not args.no_ray and args.failures > 0:
            latencies["Ray actors, standby (warm)"] = recovery_latency(args, cache, root, "ray-warm", engine=ray_engine)
            latencies["Ray actors, fresh actor (cold)"] = recovery_latency(
                args, cache, root, "ray-cold", engine={**ray_engine, "ray": {**ray_engine["ray"], "standby": False}})

    med = {name: statistics.median(times) for name, times in ours.items()}
    med_torch = {name: statistics.median(times) for name, times in theirs.items()}
    ranks = torch_args["ranks"]
    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
             else f"{os.cpu_count()} CPU cores")
    print(f"\nmodel: {args.stages} stages x {args.layers} layers, d_model {args.d_model}, seq {args.seq_len}, "
          f"vocab {model.vocab_size}; M={args.micro_batches} x {args.micro_batch_size} sequences; "
          f"ours: {args.stages} workers, {backend}; torch: {ranks} process(es); {where}")
    print("\n| engine | median s / iteration | iterations timed |")
    print("|---|---|---|")
    for name, times in ours.items():
        print(f"| checkfree, {name} | {med[name]:.4f} | {len(times)} |")
    torch_label = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
    for name, times in theirs.items():
        alone = "" if ranks == args.stages else ", every stage in one process"
        print(f"| torch.distributed.pipelining {torch_label[name]}{alone} | {med_torch[name]:.4f} | {len(times)} |")
    print()
    if "Ray actors, GPipe" in med:
        print(f"ratio Ray / local processes (GPipe): {med['Ray actors, GPipe'] / med['processes, GPipe']:.2f}"
              "  (goal <= 1.10)")
    ratios = {pipe: med_torch[pipe] / med[f"processes, {label[pipe]}"] for pipe in pipelines}
    for pipe, ratio in ratios.items():
        print(f"ratio torch / ours, {label[pipe]}: {ratio:.2f}  (goal >= 1.0)")
    if "Ray actors, GPipe" in med:
        print(f"ratio torch / ours on Ray, GPipe: {med_torch['gpipe'] / med['Ray actors, GPipe']:.2f}  (goal >= 1.0)")
    if latencies:
        print(f"\nrecovery latency of one CheckFree failure (median of {args.failures}):")
        print("| workers from | detect s | replace s | re-rendezvous s | weight transfer s | total s | bytes |")
        print("|---|---|---|---|---|---|---|")
        for name, p in latencies.items():
            print(f"| {name} | {p['detect_s']:.3f} | {p['respawn_s']:.3f} | {p['rendezvous_s']:.3f} | "
                  f"{p['transfer_s']:.3f} | {p['total_s']:.3f} | {int(p['bytes'])} |")
    result = {"benchmark": "distributed", "device": args.device, "where": where, "backend": backend,
              "torch_ranks": ranks, "stages": args.stages, "ours_s": med, "torch_s": med_torch,
              "recovery": latencies}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
