"""Redundant computation run for real (``engine.shadows=compute``): each keeper computes its successor's shadow on
every micro-batch and steps it, and the run is bitwise the one whose shadows are copied after every step."""

from __future__ import annotations

import json

import pytest

from checkfree.distributed import messages as msg
from checkfree.distributed.pool import Supervisor
from checkfree.distributed.shadows import grad_sender, holder_of_grad, kept_by
from checkfree.run.config import ConfigError
from checkfree.run.runlog import deterministic_view, read_metrics
from checkfree.train import train

# An intermediate stage, then an edge stage (stage 0: its shadow is kept by the last stage, which computes it
# from the token ids and stage 1's gradient), then the last stage (its shadow ends in the loss on stage S-2), then
# stage 1 again, from the shadow stage 0's replacement was given by copy at iteration 4 and computed since.
EVENTS = [{"iteration": 2, "stage": 1}, {"iteration": 4, "stage": 0}, {"iteration": 6, "stage": -1},
          {"iteration": 7, "stage": 1}]


def held_copies_sent(monkeypatch) -> list[int]:
    """Filled, as the supervisor sends them, with the number of held copies each ``Upkeep`` command refreshes."""
    upkeeps: list[int] = []
    broadcast = Supervisor.broadcast

    def counting(self, command, *args, **kwargs):
        if isinstance(command, msg.Upkeep):
            upkeeps.append(len(command.refresh))
        return broadcast(self, command, *args, **kwargs)

    monkeypatch.setattr(Supervisor, "broadcast", counting)
    return upkeeps


def test_who_keeps_which_shadow_and_who_sends_it_its_gradient():
    assert [kept_by(k, 4).owner for k in range(4)] == [1, 2, 3, 0]
    # stage i's input gradient is stage i-1's output gradient, whose shadow stage i-2 keeps
    assert [holder_of_grad(i, 4) for i in range(1, 4)] == [3, 0, 1]
    assert [kept_by(holder_of_grad(i, 4), 4).owner for i in range(1, 4)] == [0, 1, 2]
    # and the keeper receives it from the stage after its shadow's owner: the same pairs, seen from the keeper
    assert [grad_sender(k, 4) for k in range(4)] == [2, 3, 0, 1]
    assert all(grad_sender(holder_of_grad(i, 4), 4) == i for i in range(4))


@pytest.mark.parametrize("pipeline, n_stages, micro_batches", [("gpipe", 4, 2), ("1f1b", 4, 6), ("gpipe", 3, 2)])
def test_computed_shadows_train_and_restore_bitwise_as_copied_ones(pipeline, n_stages, micro_batches, small_run,
                                                                   tmp_path, monkeypatch):
    """Losses restored from the shadows (an intermediate, the first and the last stage, and one from a shadow made
    anew by a recovery): the metrics of the run whose keepers compute the shadows are the local engine's, whose
    shadows are copies, bit for bit, so every shadow was its owner's state to the bit when it was restored; and
    only the setup sent shadows by ``Upkeep`` (the recoveries re-make a lost keeper's within the plan). With 3
    stages the shadow of stage 0 gets its gradient on the link stage 1's activations take to stage 2; 1F1B with 6
    micro-batches reaches its steady state (one forward, one backward) on every stage."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{**e, "stage": e["stage"] % n_stages} for e in EVENTS]))
    sections = {"strategy": {"name": "redundant"}, "failure": {"name": "trace", "path": str(trace)},
                "trainer": {"iterations": 8, "eval_every": 4, "micro_batches": micro_batches},
                "network": {"pipeline": pipeline}, "model": {"n_stages": n_stages}}
    local = train(small_run(**sections), tmp_path / "local")

    upkeeps = held_copies_sent(monkeypatch)
    computed = train(small_run(**sections, engine={"name": "distributed", "timeout_s": 20, "shadows": "compute"}),
                     tmp_path / "computed")
    assert computed["status"] == local["status"] == "completed"
    assert local["n_recoveries"] == len(EVENTS)
    assert deterministic_view(read_metrics(tmp_path / "computed" / "metrics.jsonl")) == \
        deterministic_view(read_metrics(tmp_path / "local" / "metrics.jsonl"))
    for key in ("recoveries", "lost_iterations", "memory_overhead_bytes_per_node", "final_val_loss"):
        assert computed[key] == local[key], key
    assert upkeeps == [n_stages]  # the setup's shadows; none after a step


def test_copied_shadows_are_sent_after_every_step(small_run, tmp_path, monkeypatch):
    """The contrast: engine.shadows=copy refreshes all four shadows after each of the 3 steps, after the setup."""
    upkeeps = held_copies_sent(monkeypatch)
    train(small_run(strategy={"name": "redundant"}, trainer={"iterations": 3, "eval_every": 3},
                    engine={"name": "distributed", "timeout_s": 20}), tmp_path / "copied")
    assert upkeeps == [4, 4, 4, 4]


@pytest.mark.parametrize("sections, words", [
    ({"strategy": {"name": "checkfree"}, "engine": {"name": "distributed", "shadows": "compute"}},
     ["engine.shadows", "'compute'", "strategy=checkfree keeps no shadows", "allowed: copy"]),
    ({"strategy": {"name": "redundant"}, "engine": {"name": "local", "shadows": "compute"}},
     ["engine.shadows", "'compute'", "engine.name='local'", "engine=distributed"]),
    ({"strategy": {"name": "redundant"}, "engine": {"name": "distributed", "shadows": "compute", "replicas": 2}},
     ["engine.shadows", "engine.replicas=2", "engine.replicas=1"]),
    ({"strategy": {"name": "redundant"}, "engine": {"name": "distributed", "shadows": "both"}},
     ["engine.shadows", "'both'", "allowed is copy or compute"]),
    ({"strategy": {"name": "redundant"}, "engine": {"name": "distributed", "shadows": "compute"},
      "model": {"n_stages": 3}, "trainer": {"device": "cuda"}},
     ["engine.shadows", "model.n_stages=3", "NCCL", "trainer.device='cuda'", "allowed: copy"]),
])
def test_computed_shadows_are_refused_where_they_cannot_run(sections, words, small_run):
    with pytest.raises(ConfigError) as error:
        small_run(**sections)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_a_resumed_run_computes_its_shadows_on_from_the_saved_copies(small_run, tmp_path):
    """Interrupted at iteration 6 and resumed from its save at 4 on new stage processes, a run whose shadows are
    computed ends as the uninterrupted run of the local engine does, bit for bit: the shadows came back with the
    saved state, were computed from there, and stage 2 lost at iteration 8 was restored from one exactly."""
    from checkfree.train import build_run
    from tests.conftest import hooked_run

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"iteration": 3, "stage": 1}, {"iteration": 8, "stage": 2}]))
    sections = {"strategy": {"name": "redundant"}, "failure": {"name": "trace", "path": str(trace)},
                "trainer": {"iterations": 10, "eval_every": 5, "save_every": 2}}
    computed = {"name": "distributed", "timeout_s": 20, "shadows": "compute"}
    build_run(small_run(**sections), tmp_path / "full").run()

    def interrupt(n, engine):
        if n == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hooked_run(small_run(**sections, engine=computed), tmp_path / "run", train_step=interrupt).run()
    resumed = small_run(**{**sections, "trainer": {**sections["trainer"], "resume": str(tmp_path / "run")}},
                        engine=computed)
    summary = train(resumed, tmp_path / "elsewhere")
    assert summary["resumed_at_iterations"] == [4] and summary["n_recoveries"] == 2
    assert deterministic_view(read_metrics(tmp_path / "run" / "metrics.jsonl")) == \
        deterministic_view(read_metrics(tmp_path / "full" / "metrics.jsonl"))
