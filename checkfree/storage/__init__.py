"""What survives a kill: files written atomically, checkpoints, in-memory checkpoints, export paths.

* ``atomic`` — write to a temporary file, fsync, rename
* ``checkpoints`` — checkpoint storage in one format for both engines, with a fall-back when one is damaged
* ``memory_store`` — the run's side of an in-memory checkpoint (progress, data position, RNG)
* ``export_paths`` — where exports and checkpoints go, and the clean-up of a killed export's leftovers
"""
