"""The simulated world a run is priced in: what an hour of the modelled cluster costs and what happens in it.

* ``networks`` — the network and device presets: links, the geo-distributed table, device throughputs
* ``cost`` — the cost model: an iteration, a transfer, a stall, a checkpoint in seconds of the modelled run
* ``clock`` — the run's clock: the cost model (or the paper's measured prices) applied to what happened
* ``ledger`` — one iteration's work on the clock: interrupted, repriced, kept
* ``failures`` — the failures a run meets, one incident at a time (the models are ``checkfree.failure_models``)
* ``replacements``, ``elastic``, ``placement`` — when a lost node's replacement arrives, which nodes are live,
  which host runs which stages meanwhile
* ``paper_table2`` — the paper's Table 2 as published, and the prices it measured
"""
