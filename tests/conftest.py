"""Shared fixtures: tiny real models and configs, composed the way users compose them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from checkfree.plan import MEMORY, rolled_back_in_memory
from checkfree.storage.memory_store import MemoryStore

# Tests never talk to wandb's servers and never use more threads than the CI machine has.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and on a shared 2-core machine extra threads
# spin against other processes (10-20x slower steps).
torch.set_num_threads(1)

CUDA_DRY_RUN = os.environ.get("CHECKFREE_CUDA_DRY_RUN") == "1"
"""Run the ``cuda``-marked tests on the CPU (the CPU stands in for the GPU): checks the tests' own logic on a
machine without a GPU. Their comparisons then compare the CPU with itself."""


def no_cuda_reason() -> str | None:
    if torch.cuda.is_available() or CUDA_DRY_RUN:
        return None
    if torch.version.cuda is None:
        return f"needs CUDA: this torch ({torch.__version__}) is a CPU build"
    return f"needs CUDA: torch {torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES, driver)"


SLOWEST_MODULES = ("test_ray.py", "test_reliability.py", "test_config.py", "test_parity.py", "test_dead_runs.py",
                   "test_distributed.py", "test_rundir.py", "test_snapshots.py", "test_compile.py")
"""Modules that take longest (each 10-160 s on 2 cores), longest first. ``make test`` runs pytest-xdist with
``--dist loadfile``: each worker takes whole modules, in collection order, as it becomes free (a module's tests
share its fixtures, the Ray cluster among them, and Ray allows one cluster per driver). Starting with the
longest keeps one of them from running alone at the end while the other worker idles."""


def pytest_collection_modifyitems(config, items):
    """The slowest modules first (``SLOWEST_MODULES``; a stable sort keeps each module's own order); and
    ``@pytest.mark.cuda`` tests skip, saying why, wherever torch sees no CUDA device."""
    first = {name: rank for rank, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))
    reason = no_cuda_reason()
    if reason is not None:
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def tiny_cfg():
    from checkfree.model.presets import preset

    return preset("tiny").with_vocab(64)


@pytest.fixture
def tiny_stages(tiny_cfg):
    from checkfree.model.llama import build_stages

    return build_stages(tiny_cfg, seed=0)


def pipeline_logits(stages, input_ids: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The stages' logits along the path training runs: their visits chained by the local engine
    (``LocalEngine.logits``, each visit's ops through ``StageCompute.forward``), bodies in ``order``."""
    from checkfree.pipeline import LocalEngine

    return LocalEngine(stages, lr=0.0).logits(input_ids, order if order is not None else tuple(range(len(stages))))


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(n)]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer cache for the whole session: the BPE is trained once."""
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def small_run_dict(cache_dir: str, **sections) -> dict:
    """A tiny but real run: 4-stage LLaMA, small synthetic corpus, no wandb, no progress bar."""
    base = {
        "seed": 0,
        "model": {"name": "tiny", "n_stages": 4, "layers_per_stage": 1, "d_model": 32, "n_heads": 2, "seq_len": 32},
        "data": {"n_documents": 600, "val_documents": 60, "val_sequences": 8, "vocab_size": 300,
                 "cache_dir": cache_dir},
        # device cpu, not auto: on a GPU machine too, these runs are the CPU's (bit-for-bit comparisons between
        # engines hold there); tests/test_cuda.py asks for the GPU itself.
        "trainer": {"iterations": 8, "eval_every": 4, "micro_batches": 2, "micro_batch_size": 4, "lr": 3e-3,
                    "progress_bar": False, "clock_preset": "llama_500m", "clock_micro_batch_size": 16,
                    "device": "cpu"},
        "strategy": {"name": "checkfree"},
        "failure": {"name": "none"},
        "network": {"name": "geo_distributed"},
        "logger": {"wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base[name] = {**base.get(name, {}), **values}
        else:
            base[name] = values
    return base


@pytest.fixture
def small_run(data_cache):
    from checkfree.run.runconfig import load_run_config

    def make(**sections):
        return load_run_config(small_run_dict(data_cache, **sections))

    return make


class Driver:
    """A strategy over a local engine, driven the way the trainer drives them (progress, last gradient norms,
    the age of held copies), so a test can fail stages at exact points and inspect every tensor."""

    def __init__(self, engine, strategy, lr: float, run_dir, data=None, seed: int = 0, schedule=None) -> None:
        from checkfree.stage.schedule import build_schedule

        self.engine, self.strategy, self.lr, self.data, self.seed = engine, strategy, lr, data, seed
        self.schedule = schedule or build_schedule(strategy.schedule_name, engine.n_stages)
        self.iteration, self.progress = 0, 0
        self.grad_norm = self.grad_norm_post = None
        self.held_since: dict = {}
        self.memory = MemoryStore()
        engine.start(run_dir, fresh=True)
        self.upkeep(strategy.setup(self.view()))

    def view(self):
        from checkfree.plan import RunView

        def frozen(xs):
            return tuple(xs) if xs is not None else None

        return RunView(self.engine.n_stages, self.iteration, self.progress, self.seed, self.lr,
                       tuple(self.engine.stage_lrs()), frozen(self.grad_norm), frozen(self.grad_norm_post),
                       dict(self.held_since), self.memory.progress)

    def upkeep(self, upkeep):
        meta = {"progress": self.progress, "data": self.data.state_dict() if self.data is not None else None,
                "rng": torch.get_rng_state()}
        traffic = self.engine.upkeep(upkeep, meta)
        for held in upkeep.refresh:
            self.held_since[held] = self.progress
        if upkeep.snapshot:
            self.memory.commit(meta)
        return traffic

    def step(self, batches, upkeep: bool = True):
        """One iteration as the trainer runs it: train, count the step, then the strategy's upkeep."""
        self.iteration += 1
        result = self.engine.train_step(batches, self.schedule)
        self.progress += 1
        self.grad_norm, self.grad_norm_post = result.grad_norm, result.grad_norm_post
        traffic = self.upkeep(self.strategy.after_step(self.view())) if upkeep else None
        return result.loss, traffic

    def plan(self, lost):
        return self.strategy.plan(frozenset(lost), self.view())

    def recover(self, lost):
        """The stages in ``lost`` are lost; the strategy plans and the engine executes (as Trainer.recover)."""
        self.engine.lose(sorted(lost))
        plan = self.plan(lost)
        outcome = self.engine.execute(plan, self.progress)
        restored = outcome.restored
        if plan.rollback == MEMORY:
            restored = self.memory.restore()
            rolled_back_in_memory(outcome.reports, self.progress, restored["progress"])
        if restored is not None:
            if self.data is not None:
                self.data.load_state_dict(restored["data"])
            torch.set_rng_state(restored["rng"])
            self.progress = restored["progress"]
            if plan.reads_storage:
                self.memory.clear()
        for held in (*plan.refresh, *(h for r in plan.rebuilds for h in r.fetch)):
            self.held_since[held] = self.progress
        return outcome.reports


class Hooked:
    """A run's engine with test hooks: ``hooks[name](n, engine)`` runs right before the n-th call (1-based) of
    the engine's method ``name``. A test puts a fault (a poisoned weight, an interruption, a SIGKILL) at an
    exact point of the loop through the public engine interface; production code has no test hooks."""

    def __init__(self, engine, **hooks) -> None:
        self.engine, self.hooks, self.calls = engine, hooks, {}

    def __getattr__(self, name):
        method = getattr(self.engine, name)
        if name not in self.hooks:
            return method

        def hooked(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.hooks[name](self.calls[name], self.engine)
            return method(*args, **kwargs)

        return hooked


def hooked_run(cfg, run_dir, **hooks):
    """``checkfree.train.build_run`` with the engine wrapped in ``Hooked``."""
    from checkfree.train import build_run

    run = build_run(cfg, run_dir)
    run.trainer.engine = Hooked(run.trainer.engine, **hooks)
    return run


class Capture(Hooked):
    """An engine that keeps a copy of every rebuilt stage's weights right after each recovery."""

    captured: dict[int, dict[str, torch.Tensor]]

    def execute(self, plan, progress):
        outcome = self.engine.execute(plan, progress)
        states = self.engine.stage_states()
        self.captured = {r.stage: {n: t.clone() for n, t in states[r.stage].items()} for r in outcome.reports}
        return outcome


def captured_run(cfg, run_dir):
    """``checkfree.train.build_run`` with the engine wrapped in ``Capture``."""
    from checkfree.train import build_run

    run = build_run(cfg, run_dir)
    run.trainer.engine = Capture(run.trainer.engine)
    return run


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, name, read_only)``: a small real file system (one that fills up, or refuses writes even
    to root), mounted under ``tmp_path`` and unmounted when the test ends. Skips the test where mounting is
    not allowed (not root, no CAP_SYS_ADMIN, no ``mount``)."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "fs", read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot run mount here ({exc})")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or f'exit {done.returncode}'}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True, timeout=30)  # a file still open
