"""The CUDA path, wherever CUDA exists (``@pytest.mark.cuda``: skipped, with the reason, where torch sees no
GPU). ``CHECKFREE_CUDA_DRY_RUN=1`` runs them on the CPU instead, to check the tests themselves on a machine
without one (every comparison then compares the CPU with itself).

* the stages chained on the GPU compute the unsplit ``LlamaForCausalLM``'s logits, in fp32 and bf16;
* a CheckFree+ run with traced edge and intermediate failures on ``trainer.device=cuda`` has the CPU run's
  losses, and its rebuilt stages hold exactly what the rules compute from the neighbours' GPU tensors;
* the process engine on CUDA survives a real SIGKILL of a stage process;
* the model exported from a CUDA run loads on the CPU and computes the run's logits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from checkfree.data.loading import load_corpus
from checkfree.model.hf_export import held_out_loss
from checkfree.model.llama import build_stages, load_causal_lm_weights
from checkfree.pipeline import LocalEngine
from checkfree.run.runconfig import load_run_config
from checkfree.run.runlog import read_metrics
from checkfree.stage.routes import route
from checkfree.train import build_run
from tests.conftest import Hooked, hooked_run, pipeline_logits, small_run_dict
from tests.processes import losses
from tests.test_distributed import assert_no_strays, kill_mid_step

pytestmark = pytest.mark.cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" only in a dry run (see the module docstring)

LOSS_TOL = 1e-4
"""fp32 losses (about 5.7 = ln 300) of runs on different devices, or on one GPU through different processes,
may differ by this much: cuBLAS and MKL (and the GPU's atomics in the attention and embedding backward) sum in
other orders, ~1e-7 relative per op; Adam turns a gradient's rounding into an update difference only for
components whose gradient is near eps, which move the loss little; eight steps stay far below 1e-4 (2e-5
relative). The CPU engines, which share every kernel, agree bit for bit (tests/test_distributed.py)."""

EVENTS = [{"iteration": 3, "stage": 0}, {"iteration": 5, "stage": 2}]
"""An edge stage (CheckFree+ copies its swap partner and restores the embedding replica), then an
intermediate one (the gradient-norm-weighted average of its neighbours)."""


def clone(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in state.items()} for state in states]


class Snapshots(Hooked):
    """The engine, keeping every stage's weights right before each loss and each rebuilt stage's right after."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.before: list[list[dict[str, torch.Tensor]]] = []
        self.after: list[dict[int, dict[str, torch.Tensor]]] = []

    def lose(self, stages):
        self.before.append(clone(self.engine.stage_states()))
        return self.engine.lose(stages)

    def execute(self, plan, progress):
        outcome = self.engine.execute(plan, progress)
        states = self.engine.stage_states()
        self.after.append({r.stage: clone([states[r.stage]])[0] for r in outcome.reports})
        return outcome


def assert_close_losses(a, b) -> None:
    assert [x[0] for x in a] == [y[0] for y in b]
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or abs(u - v) <= LOSS_TOL), (x, y)


# --- the model ------------------------------------------------------------------------------------------


def chain(stages, tokens):
    """The stages' own pieces chained under the caller's autocast: the Llama blocks' kernels, compared with the
    unsplit model under one autocast (the training path, ``pipeline_logits``, keeps the head in fp32 whatever the
    caller's autocast, so it cannot be compared in bf16 this way)."""
    hidden = stages[0].embed(tokens)
    for stage in stages:
        hidden = stage.body(hidden)
    return stages[-1].head(hidden)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stages_on_cuda_equal_unsplit_llama(tiny_cfg, precision):
    """The pattern of tests/test_model.py on the GPU. fp32: <= 1e-5, as on the CPU. bf16 (both chains under one
    bf16 autocast): the same bf16 kernels on the same shapes, so they agree to within one bf16 rounding at the
    logits' scale (2^-7 of their largest magnitude), far below what a wrong block or order would change."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_cfg.hf_config()).eval()
    stages = build_stages(tiny_cfg, seed=1)
    load_causal_lm_weights(stages, reference.state_dict(), tiny_cfg)
    reference, stages = reference.to(DEVICE), [s.to(DEVICE).eval() for s in stages]
    tokens = torch.randint(0, tiny_cfg.vocab_size, (3, tiny_cfg.seq_len), device=DEVICE)
    bf16 = precision == "bf16"
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        ours, theirs = chain(stages, tokens), reference(tokens).logits
    assert ours.device.type == DEVICE and ours.dtype == theirs.dtype == (torch.bfloat16 if bf16 else torch.float32)
    diff = (ours.float() - theirs.float()).abs().max().item()
    tol = 2 ** -7 * theirs.float().abs().max().item() if bf16 else 1e-5
    print(f"{precision}: max abs logits diff {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol


def test_bf16_training_precision_keeps_the_head_in_fp32(tiny_cfg):
    """trainer.precision=bf16 on the GPU: bodies under bf16 autocast, the head and the logits in fp32 (the rule
    of checkfree.stage.compute). Against the fp32 chain: bf16 keeps 8 significant bits, four blocks of it move the
    logits by a few 1e-3 of their range; 5e-2 of it is a loose bound that still catches a wrong scale."""
    stages = build_stages(tiny_cfg, seed=1, device=DEVICE)
    fp32, bf16 = (LocalEngine(copy.deepcopy(stages), lr=0.0, autocast_dtype=dtype) for dtype in (None, torch.bfloat16))
    tokens = torch.randint(0, tiny_cfg.vocab_size, (3, tiny_cfg.seq_len), device=DEVICE)
    order = tuple(range(tiny_cfg.n_stages))
    logits = {}
    for name, engine in (("fp32", fp32), ("bf16", bf16)):
        h = tokens
        for visit in route(order, tiny_cfg.n_stages):  # with grad: the path a training step takes
            h = engine.computes[visit.stage].forward(visit.ops, h)
        logits[name] = h.detach()
    assert logits["bf16"].dtype == torch.float32 and logits["bf16"].device.type == DEVICE
    scale = logits["fp32"].abs().max().item()
    diff = (logits["bf16"] - logits["fp32"]).abs().max().item()
    print(f"bf16 vs fp32 logits: max abs diff {diff:.3g} of a range {scale:.3g}")
    assert 0 < diff <= 5e-2 * scale  # 0 would mean that autocast never reached the bodies


# --- a CheckFree+ run on the GPU --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """The same CheckFree+ run with the traced failures, on the CPU and on the GPU (the GPU run's engine keeps
    the weights around each recovery)."""
    root = tmp_path_factory.mktemp("cuda_runs")
    (root / "trace.json").write_text(json.dumps(EVENTS))

    def config(device: str):
        return load_run_config(small_run_dict(
            # Five stages: CheckFree+ rebuilds its swap partners (0, 1 and S-2, S-1) by copying; stage 2 averages.
            data_cache, model={"n_stages": 5}, strategy={"name": "checkfree_plus", "replica_sync_every": 1},
            failure={"name": "trace", "path": str(root / "trace.json")},
            trainer={"iterations": 8, "eval_every": 4, "device": device}))

    cpu = build_run(config("cpu"), root / "cpu")
    cpu_summary = cpu.run()
    gpu = build_run(config(DEVICE), root / DEVICE if DEVICE != "cpu" else root / "dry")
    gpu.trainer.engine = Snapshots(gpu.trainer.engine)
    summary = gpu.run()
    return {"cpu": root / "cpu", "gpu": gpu.trainer.run_dir, "run": gpu, "summary": summary,
            "cpu_summary": cpu_summary, "cfg": config(DEVICE)}


def test_checkfree_plus_on_cuda_has_the_cpu_runs_losses(runs):
    summary = runs["summary"]
    assert summary["status"] == "completed" and summary["n_failures"] == summary["n_recoveries"] == 2
    assert summary["recoveries"] == runs["cpu_summary"]["recoveries"] == [
        {"iteration": 3, "stage": 0, "method": "copy+replica", "sources": [1]},
        {"iteration": 5, "stage": 2, "method": "average", "sources": [1, 3]}]
    assert_close_losses(losses(runs["cpu"]), losses(runs["gpu"]))
    worst = max(abs(u - v) for x, y in zip(losses(runs["cpu"]), losses(runs["gpu"])) for u, v in zip(x[1:], y[1:])
                if u is not None)
    print(f"largest CPU vs {DEVICE} loss difference: {worst:.3g}")


def test_rebuilt_stages_on_cuda_hold_the_rules_results(runs):
    """Stage 0 (iteration 3): stage 1's blocks and its own embedding from the replica, bit for bit. Stage 2
    (iteration 5): (a W_3 + b W_1) / (a + b), a = |g_3| + 1e-4, b = |g_1| + 1e-4 (post-clip norms of iteration 4),
    computed here by hand on the GPU tensors; fp32 in another order of operations: within a few ulps of the
    largest weights (the RMSNorm gains, ~1): 1e-6."""
    engine = runs["run"].trainer.engine
    records = read_metrics(runs["gpu"] / "metrics.jsonl")
    (before0, after0), (before2, after2) = zip(engine.before, engine.after)
    assert set(after0) == {0} and set(after2) == {2}
    for name, tensor in after0[0].items():
        expected = before0[1][name] if name.startswith("layers.") else before0[0][name]
        assert tensor.device.type == DEVICE and torch.equal(tensor, expected), name

    post = records[4]["grad_norm_post"]
    a, b = post[3] + 1e-4, post[1] + 1e-4
    [rec] = records[5]["recoveries"]
    assert rec["coefficients"] == pytest.approx([b / (a + b), a / (a + b)])
    for name, tensor in after2[2].items():
        expected = (a * before2[3][name] + b * before2[1][name]) / (a + b)
        assert tensor.device.type == DEVICE and tensor.dtype == torch.float32, name
        assert (tensor - expected).abs().max().item() <= 1e-6, name


def test_export_of_a_cuda_run_loads_on_the_cpu_with_equal_logits(runs):
    """The run's model directory, loaded on the CPU: the pipeline's logits (its stages copied to the CPU) to
    1e-5, as tests/test_export.py; the logits on the GPU and the run's final validation loss to LOSS_TOL."""
    model_dir = runs["gpu"] / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    assert next(model.parameters()).device.type == "cpu"
    cfg = runs["cfg"]
    val = load_corpus(cfg.data, cfg.model.seq_len).val
    ids = val[:4, :-1]
    stages = runs["run"].trainer.engine.stages
    with torch.no_grad():
        theirs = model(ids).logits
        on_cpu = pipeline_logits([copy.deepcopy(s).to("cpu").eval() for s in stages], ids)
        on_gpu = pipeline_logits([copy.deepcopy(s).eval() for s in stages], ids.to(DEVICE)).cpu()
    assert (on_cpu - theirs).abs().max().item() <= 1e-5
    assert (on_gpu - theirs).abs().max().item() <= LOSS_TOL
    assert held_out_loss(model_dir, val) == pytest.approx(runs["summary"]["final_val_loss"], abs=LOSS_TOL)


# --- the process engine on the GPU -------------------------------------------------------------------------


def test_process_engine_on_cuda_survives_a_sigkill(data_cache, tmp_path):
    """One process per stage on the GPU(s): NCCL where every stage has a GPU of its own, else gloo, which carries
    the activations and weights of processes that share a GPU through host memory (NCCL refuses two ranks on
    one GPU, and gloo's send/recv take CPU tensors only: checkfree.transport.transfer.wire_device). Stage 2's
    process is SIGKILLed mid-iteration 4 (tests/test_distributed.py's kill_mid_step); the iteration is
    discarded, stage 2 rebuilt in a new process from its neighbours, and the run matches a local run on the same
    device that lost stage 2 at iteration 4, within LOSS_TOL. Plain CheckFree (in order, GPipe): between two
    stages the messages then go in one order each way, which NCCL (it matches messages by order, not by tag)
    needs."""
    sections = {"trainer": {"iterations": 6, "eval_every": 3, "device": DEVICE}}
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 4, "stage": 2}]))
    local = build_run(load_run_config(small_run_dict(data_cache, **sections,
                                                     failure={"name": "trace", "path": str(trace)})),
                      tmp_path / "local")
    local.run()

    cfg = load_run_config(small_run_dict(data_cache, **sections, engine={"name": "distributed", "timeout_s": 60}))
    run_dir = tmp_path / "dist"
    hook, killed = kill_mid_step(run_dir, at=4, victim_stage=2, paused_stage=1)
    run = hooked_run(cfg, run_dir, train_step=hook)
    own_gpus = DEVICE == "cuda" and torch.cuda.device_count() >= cfg.model.n_stages
    assert run.trainer.engine.engine.spec.backend == ("nccl" if own_gpus else "gloo")
    summary = run.run()

    assert summary["status"] == "completed" and [f["stage"] for f in summary["failures"]] == [2]
    records = read_metrics(run_dir / "metrics.jsonl")
    [rec] = records[4]["recoveries"]
    assert (rec["stage"], rec["method"], rec["sources"]) == (2, "average", [1, 3])
    assert killed == [rec["process"]["old_pid"]] and rec["process"]["new_pid"] not in killed
    assert_close_losses(losses(tmp_path / "local"), losses(run_dir))
    assert_no_strays(run_dir)
