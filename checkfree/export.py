"""``python -m checkfree.export RUN_DIR [--out DIR] [--sample] [--from resume|checkpoint]``: a run's model as a
Hugging Face ``LlamaForCausalLM`` directory (the work is ``checkfree.model.hf_export``).

The weights come from ``RUN_DIR/resume/state.pt`` (``trainer.save_every``) or else from the newest
checkpoint ``RUN_DIR/checkpoints/ckpt_<progress>/``; the model goes to ``RUN_DIR/model`` by default.
Everything about the paths (a missing run directory, nothing to export, an output that is not an earlier
export) is checked here before torch and transformers are imported, so a refusal takes a second, not the
several seconds of those imports (the paths themselves: ``checkfree.storage.export_paths``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from checkfree.run.config import ConfigError
from checkfree.run.resume import torch_file_problem
from checkfree.run.rundir import read_status
from checkfree.storage.export_paths import ExportError, check_replaceable, latest_checkpoint


def argv_checked(args: argparse.Namespace) -> bool:
    """The command line's paths, checked without torch: False (and one sentence on stderr) if they cannot work."""
    run_dir = Path(args.run_dir)
    try:
        if not run_dir.is_dir():
            raise ExportError(f"RUN_DIR={str(run_dir)!r} is not a directory; give the directory of a training run.")
        has_state = (run_dir / "resume" / "state.pt").is_file()
        has_ckpt = latest_checkpoint(run_dir) is not None
        if not {None: has_state or has_ckpt, "resume": has_state, "checkpoint": has_ckpt}[args.source]:
            lacks = {"resume": "no resume/state.pt", "checkpoint": "no checkpoints/ckpt_<progress>/ directory with "
                     "meta.pt", None: "neither resume/state.pt nor a checkpoints/ckpt_<progress>/ directory with "
                     "meta.pt"}[args.source]
            raise ExportError(f"RUN_DIR={str(run_dir)!r} holds {lacks}, so there is no model to export "
                              "(train with trainer.save_every=N > 0 or strategy=checkpoint).")
        state = run_dir / "resume" / "state.pt"
        problem = torch_file_problem(state) if has_state and args.source != "checkpoint" else None
        if problem is not None:
            instead = ("export the newest checkpoint instead with --from checkpoint" if has_ckpt
                       else "the run has no checkpoint to export instead")
            raise ExportError(f"{state} {problem}; {instead}.")
        check_replaceable(Path(args.out) if args.out is not None else run_dir / "model")
    except ExportError as exc:
        print(f"checkfree.export: error: {exc}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkfree.export",
                                     description="Export a run's model as a Hugging Face LlamaForCausalLM directory.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a (finished or interrupted) training run")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/model)")
    parser.add_argument("--from", dest="source", choices=("resume", "checkpoint"), default=None,
                        help="read only this source (default: resume/state.pt, else the newest checkpoint)")
    parser.add_argument("--sample", action="store_true", help="print a short sample after exporting")
    args = parser.parse_args(argv)
    if not argv_checked(args):
        return 2
    from transformers.utils import logging as hf_logging

    from checkfree.model.hf_export import export_run, sample

    hf_logging.disable_progress_bar()  # a command that prints one line per step has no use for load bars
    try:
        out, origin = export_run(args.run_dir, args.out, args.source)
    except (ExportError, ConfigError) as exc:
        print(f"checkfree.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {origin} -> {out}")
    if read_status(args.run_dir) == "killed":
        print(f"note: the run in {args.run_dir} was killed (its summary.json still says running and no process "
              "holds it): this is its last saved state, not its end")
    if args.sample:
        print(sample(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
