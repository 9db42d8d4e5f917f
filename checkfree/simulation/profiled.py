"""``network.device=profiled``: the FLOP/s this machine reaches training the run's own model, for the cost model.

``measured`` times one fp32 matmul (``networks.measure_flops``); a small model on a CPU is far from that: its
matmuls are small and most of its time goes to the other operations (attention, norms, the loss) and to each
operation's overhead. The process engine's emulated runs (``engine.shape``, ``experiments/clock_check.py``) need
the compute their stage processes really do priced, so ``profiled`` runs one micro-batch of the model itself
forward and backward through every stage, in order, on one thread (as one stage process computes), and returns
the FLOPs the cost model counts for it (``6 P T``, its matmul parameters) over the median of the measured
seconds: the cost model's structure (each stage's compute in proportion to its parameters) kept, its scale
measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from checkfree.model.presets import ModelConfig
from checkfree.simulation.cost import matmul_params


def profile_flops(model: ModelConfig, micro_batch_size: int, repeats: int = 5, seed: int = 0,
                  timer: Callable[[], float] | None = None) -> float:
    """FLOP/s of one micro-batch of ``model`` through all its stages, forward and backward, on one thread, timed by
    ``timer``: the wall's by default; ``time.thread_time`` for runs whose stage processes count their own CPU
    seconds (``engine.compute_time=cpu``), so that the price and the emulation time compute alike, whatever else
    the machine is doing while it profiles."""
    timer = timer or time.perf_counter
    import torch

    from checkfree.model.llama import build_stages
    from checkfree.stage.compute import StageCompute, causal_lm_loss
    from checkfree.stage.routes import in_order

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        computes = [StageCompute(stage, 1e-3, 1.0) for stage in build_stages(model, seed)]
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, model.vocab_size, (micro_batch_size, model.seq_len + 1), generator=generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        times = []
        for _ in range(repeats + 1):  # the first pass allocates and picks kernels: not counted
            start = timer()
            h = inputs
            for visit in in_order(model.n_stages):
                h = computes[visit.stage].forward(visit.ops, h)
            causal_lm_loss(h, targets).backward()
            times.append(timer() - start)
            for compute in computes:
                compute.drop_gradients()
    finally:
        torch.set_num_threads(threads)
    body, head = matmul_params(model)
    return 6 * (sum(body) + head) * micro_batch_size * model.seq_len / statistics.median(times[1:])


__all__ = ["profile_flops"]
