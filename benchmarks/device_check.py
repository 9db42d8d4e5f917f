"""One device check: the CUDA tests and the GPU benchmarks, in one process, ending with one table.

On a GPU (about 8 minutes on one H100 class device; each part is given what is left of ``--budget-s`` and
the parts that find nothing left are listed as skipped):

1. ``tests/test_cuda.py`` (``-m cuda``): split == unsplit logits, a CheckFree+ run on the GPU against the CPU,
   the process engine with a real SIGKILL, an export loaded on the CPU;
2. ``benchmarks/gpu_throughput.py``: tokens/s and MFU of ``llama_124m`` and ``llama_500m`` in bf16, in order and
   out of order, fused and not, and compiled (``trainer.compile``) for the fused rows;
3. ``benchmarks/recovery_latency.py``: seconds of a CheckFree rebuild of an intermediate stage on the GPU;
4. ``benchmarks/distributed.py``: the process engine's iteration time against ``torch.distributed.pipelining``'s
   ``ScheduleGPipe`` on the same GPU(s), and the phases of one recovery of a stage process.

Without a GPU it says so and runs a CPU fallback at smoke sizes (the tests skip, tiny models, no process
engine), under a minute: it checks the script, not a machine.

    benchmarks/device_check.sh [--cpu] [--budget-s 480] [--json results.jsonl]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch is imported: the table's total is the whole script's

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import distributed  # noqa: E402  (the benchmarks are scripts in this directory, not a package)
import gpu_throughput  # noqa: E402
import recovery_latency  # noqa: E402


class Outcomes:
    """A pytest plugin that counts the tests' outcomes (a skip is reported at setup, a result at call)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.skip_reasons: set[str] = set()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.counts[report.outcome] += 1
            if report.skipped and isinstance(report.longrepr, tuple):
                self.skip_reasons.add(report.longrepr[2].removeprefix("Skipped: "))


def run_tests() -> list[str]:
    import pytest

    outcomes = Outcomes()
    threads = torch.get_num_threads()
    code = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda", str(ROOT / "tests" / "test_cuda.py")],
                       plugins=[outcomes])
    torch.set_num_threads(threads)  # tests/conftest.py sets one thread for the tests
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.counts.items())) or "none collected"
    reasons = f" ({'; '.join(sorted(outcomes.skip_reasons))})" if outcomes.skip_reasons else ""
    return [f"| CUDA tests | tests/test_cuda.py | {counts}{reasons}; pytest exit {int(code)} |"]


def throughput_rows(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        out.append(f"| tokens/s | {r['preset']} {r['precision']}, {r['schedule']}, fused={r['fused']}, "
                   f"compiled={r['compiled']} | {r['tokens_per_s']:,.0f} tok/s{mfu} ({r['step_s'] * 1e3:.1f} ms/step, "
                   f"warm-up {r['warmup_s']:.1f} s) |")
    return out


def recovery_rows(rows: list, preset: str) -> list[str]:
    return [f"| recovery | {r.strategy} rebuild of stage {r.stage}, {preset}, local engine | "
            f"{r.recover_s * 1e3:.1f} ms ({r.bytes_moved / 1e6:.1f} MB; {r.how}) |" for r in rows]


def distributed_rows(result: dict) -> list[str]:
    ours, theirs = result["ours_s"]["processes, GPipe"], result["torch_s"]["gpipe"]
    alone = "" if result["torch_ranks"] == result["stages"] else ", every stage in one process"
    rows = [f"| process engine | {result['stages']} stage processes ({result['backend']}) vs ScheduleGPipe "
            f"({result['torch_ranks']} process(es){alone}), {result['where']} | ours {ours * 1e3:.1f} ms, "
            f"torch {theirs * 1e3:.1f} ms per iteration (torch / ours {theirs / ours:.2f}) |"]
    for name, p in result["recovery"].items():
        rows.append(f"| process recovery | CheckFree, {name} | {p['total_s']:.2f} s (detect {p['detect_s']:.2f}, "
                    f"replace {p['respawn_s']:.2f}, rendezvous {p['rendezvous_s']:.2f}, "
                    f"transfer {p['transfer_s']:.2f}) |")
    return rows


def gpu_parts(json_path: str) -> list[tuple[str, Callable[[float], list[str]]]]:
    """(name, run(seconds left) -> table rows), cheapest and most telling first."""
    recovery = ["--preset", "llama_124m", "--strategies", "checkfree", "--reps", "5", "--steps", "3",
                "--set", "trainer.device=cuda", "--set", "trainer.precision=bf16", "--set", "data.n_documents=3000",
                "--json", json_path]
    dist = ["--device", "cuda", "--pipelines", "gpipe", "--no-ray", "--stages", "4", "--layers", "3",
            "--d-model", "512", "--heads", "8", "--seq-len", "512", "--micro-batches", "8", "--micro-batch-size", "4",
            "--iterations", "8", "--failures", "1", "--failure-every", "3", "--json", json_path]

    def throughput(preset: str, mbs: int, steps: int) -> Callable[[float], list[str]]:
        return lambda left: throughput_rows(gpu_throughput.main(
            ["--preset", preset, "--micro-batch-size", str(mbs), "--steps", str(steps), "--compile", "fused",
             "--time-budget-s", f"{max(left - 60, 0):.0f}", "--json", json_path]))

    return [
        ("CUDA tests", lambda left: run_tests()),
        ("llama_124m throughput", throughput("llama_124m", 16, 10)),
        ("CheckFree recovery", lambda left: recovery_rows(recovery_latency.main(recovery), "llama_124m, vocab 1024")),
        ("process engine vs ScheduleGPipe", lambda left: distributed_rows(distributed.main(dist))),
        ("llama_500m throughput", throughput("llama_500m", 4, 5)),
    ]


def cpu_parts(json_path: str) -> list[tuple[str, Callable[[float], list[str]]]]:
    recovery = ["--preset", "tiny", "--strategies", "checkfree", "--reps", "1", "--steps", "2",
                "--set", "data.n_documents=600", "--set", "data.val_documents=60", "--json", json_path]
    return [
        ("CUDA tests", lambda left: run_tests()),
        ("tiny throughput (smoke)", lambda left: throughput_rows(gpu_throughput.main(["--smoke", "--json", json_path]))),
        ("CheckFree recovery (smoke)", lambda left: recovery_rows(recovery_latency.main(recovery), "tiny")),
        ("process engine vs ScheduleGPipe",
         lambda left: ["| process engine | skipped without a GPU (a CPU comparison: python benchmarks/distributed.py) "
                       "| — |"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback even where a GPU is found")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    parser.add_argument("--json", default=None, help="the benchmarks' JSON lines (default: a temporary file)")
    args = parser.parse_args(argv)
    start = STARTED
    gpu = torch.cuda.is_available() and not args.cpu
    if gpu:
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = "NO GPU FOUND, CPU fallback at smoke sizes"
        why = "--cpu was given" if args.cpu else f"torch {torch.__version__} sees no CUDA device"
        print(f"\n*** NO GPU FOUND ({why}): CPU fallback, smoke sizes. These numbers check the script and say "
              "nothing about a GPU. ***\n", flush=True)
    json_path = args.json or str(Path(tempfile.mkdtemp(prefix="device-check-")) / "results.jsonl")
    rows, failed = [], []
    for name, part in (gpu_parts if gpu else cpu_parts)(json_path):
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            rows.append(f"| {name} | skipped: the --budget-s of {args.budget_s:g} s was spent | — |")
            continue
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        try:
            got = part(left)
        except Exception as exc:  # one broken part never hides the others' numbers
            failed.append(name)
            got = [f"| {name} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} | — |"]
        rows += got
        rows.append(f"| wall time | {name} | {time.perf_counter() - t0:.0f} s |")
    tests = next((r for r in rows if r.startswith("| CUDA tests |")), "")
    if tests and "pytest exit 0 |" not in tests:
        failed.append("CUDA tests")
    total = time.perf_counter() - start
    print(f"\n## Device check: {device}, torch {torch.__version__}, {total:.0f} s in all\n")
    print("| what | configuration | result |\n|---|---|---|")
    print("\n".join(rows))
    print(f"\nbenchmark rows: {json_path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    with open(json_path, "a") as f:
        f.write(json.dumps({"benchmark": "device_check", "device": device, "total_s": total, "failed": failed}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
