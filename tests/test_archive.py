"""An experiment's runs in one Parquet file (checkfree/storage/archive.py): packed and unpacked byte for byte,
never over a newer file or outside the experiment, and a committed experiment's report regenerated from it alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from checkfree.run.runlog import KEPT_METRICS
from checkfree.storage.archive import ARCHIVE, SCHEMA, archived, pack, read, run_dirs, unpack
from tests.scripts import experiment

ROOT = Path(__file__).resolve().parents[1]


def make_run(run_dir: Path, status: str, losses: list[float]) -> None:
    """A run directory as the trainer leaves it: a summary and one metrics line per iteration (validations on
    the even ones)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "final_val_loss": losses[-1]}))
    lines = [{"iteration": i, "train_loss": loss, **({"val_loss": loss} if i % 2 == 0 else {})}
             for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "train.log").write_text("not kept\n")


def test_pack_then_unpack_gives_back_every_kept_file_byte_for_byte(tmp_path):
    out = tmp_path / "exp"
    make_run(out / "runs" / "table2" / "000_a", "completed", [6.0, 5.0, 4.0, 3.5])
    make_run(out / "calibration" / "table2" / "000_none", "completed", [6.0, 4.0, 3.0])
    pack(out)
    kept = {p.relative_to(out): p.read_bytes() for d in run_dirs(out) for p in d.iterdir()
            if p.name in ("summary.json", KEPT_METRICS)}
    assert len(kept) == 4  # each run's summary and the kept rows pack made from its metrics.jsonl
    # The kept rows: first, last and every validation (iterations 0, 2 and 3 of the first run).
    rows = [json.loads(line) for line in (out / "runs/table2/000_a" / KEPT_METRICS).read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 2, 3]
    assert sorted((r, f) for r, f, _ in read(out)) == [("calibration/table2/000_none", KEPT_METRICS),
                                                      ("calibration/table2/000_none", "summary.json"),
                                                      ("runs/table2/000_a", KEPT_METRICS),
                                                      ("runs/table2/000_a", "summary.json")]
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(out / ARCHIVE, clone / ARCHIVE)
    assert unpack(clone) == 4
    assert {p.relative_to(clone): p.read_bytes() for p in clone.rglob("*") if p.is_file() and p.name != ARCHIVE} == kept
    assert unpack(clone) == 0  # everything is there already


def test_unpack_keeps_a_newer_run_and_pack_keeps_the_runs_that_are_not_here(tmp_path):
    out = tmp_path / "exp"
    make_run(out / "runs" / "table2" / "000_a", "completed", [6.0, 3.0])
    make_run(out / "runs" / "table2" / "001_b", "completed", [6.0, 4.0])
    pack(out)
    shutil.rmtree(out / "runs" / "table2" / "001_b")
    (out / "runs/table2/000_a/summary.json").write_text('{"status": "completed", "final_val_loss": 2.5}')
    assert unpack(out) == 2  # 001_b's two files come back; 000_a's newer summary stays
    assert json.loads((out / "runs/table2/000_a/summary.json").read_text())["final_val_loss"] == 2.5
    shutil.rmtree(out / "runs" / "table2" / "001_b")
    pack(out)  # 001_b is not here, but the archive still holds it; 000_a's summary is the newer one now
    archived_summaries = {r: json.loads(d) for r, f, d in read(out) if f == "summary.json"}
    assert archived_summaries == {"runs/table2/000_a": {"status": "completed", "final_val_loss": 2.5},
                                  "runs/table2/001_b": {"status": "completed", "final_val_loss": 4.0}}
    # A run is the unit: a run here whose kept rows are gone (made again, say, and not finished) leaves none of
    # its older rows in the archive beside its newer summary.
    (out / "runs/table2/000_a" / KEPT_METRICS).unlink()
    (out / "runs/table2/000_a" / "metrics.jsonl").unlink()
    pack(out)
    assert [f for r, f, _ in read(out) if r == "runs/table2/000_a"] == ["summary.json"]


def test_archived_packs_what_an_experiment_made_even_when_it_fails(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(RuntimeError), archived(out):
        make_run(out / "runs" / "table2" / "000_a", "completed", [6.0, 3.0])
        raise RuntimeError("the experiment died after one point")
    assert [(r, f) for r, f, _ in read(out)] == [("runs/table2/000_a", KEPT_METRICS), ("runs/table2/000_a", "summary.json")]


@pytest.mark.parametrize("run, name", [("../../elsewhere", "summary.json"), ("runs/table2/000_a", "model.safetensors")])
def test_unpack_refuses_an_entry_outside_the_run_files_it_may_write(tmp_path, run, name):
    out = tmp_path / "exp"
    out.mkdir()
    pq.write_table(pa.table({"run": [run], "file": [name], "data": [b"{}"]}, schema=SCHEMA), out / ARCHIVE)
    with pytest.raises(ValueError, match="outside the run directories"):
        unpack(out)
    assert not (tmp_path / "elsewhere").exists()


def test_a_committed_experiment_regenerates_its_report_from_its_archive_alone(tmp_path):
    """The crossover's 75 runs from results/crossover/runs.parquet, as a fresh clone has them: the report
    written from them is the committed crossover.md and crossover.csv, to the digit."""
    committed = ROOT / "results" / "crossover"
    out = tmp_path / "crossover"
    out.mkdir()
    shutil.copy(committed / ARCHIVE, out / ARCHIVE)
    crossover = experiment("crossover")
    crossover.main(["--report-only", "--out", str(out),
                    "--calibration", str(ROOT / "results" / "table2_pydocs" / "calibration.json")])
    assert len(run_dirs(out)) == 75
    assert (out / "crossover.md").read_text() == (committed / "crossover.md").read_text()
    assert (out / "crossover.csv").read_text() == (committed / "crossover.csv").read_text()
