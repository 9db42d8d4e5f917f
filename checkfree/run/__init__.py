"""A run's configuration and what it leaves on disk.

* ``config``, ``runconfig`` — Hydra's DictConfig -> one validated ``RunConfig`` (the one gate for bad input)
* ``preflight`` — refuse a bad run before anything is written: the config and the machine
* ``rundir`` — one run per run directory
* ``runlog``, ``records`` — metrics.jsonl, summary.json, the progress bar, wandb; an iteration's record
* ``resume`` — the resumable state ``trainer.save_every`` writes and ``trainer.resume`` reads
* ``provenance`` — library and corpus-package versions the numbers depend on
* ``audit`` — the invariants every finished run directory must hold
"""
