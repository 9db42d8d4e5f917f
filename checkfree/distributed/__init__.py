"""The process engine: one OS process per pipeline stage (x data-parallel replica) on torch.distributed; after a
shrink (``engine.no_replacement=shrink``) one process runs several consecutive stages.

``engine=distributed`` runs the same trainer with every stage in its own process (gloo on CPU, NCCL on GPU),
activations and gradients sent point to point, and failures that are real: the stage's process exits, a
replacement takes its place, the survivors re-form the process group and the plan's tensors travel to the
replacement over the new group.

Modules, one idea each:

* ``programs`` — which stage runs which forward / backward pass, in which order (GPipe, 1F1B)
* ``messages`` — the typed commands and replies of the control channel
* ``worker`` — the stage worker and the commands it serves
* ``shadows`` — redundant computation's shadows computed by their keepers (``engine.shadows=compute``)
* ``rendezvous`` — the store and its generations
* ``pool`` — what the engine asks of the workers (``WorkerPool``) and the supervisor every launcher shares
* ``cluster`` — the local launcher: starting, watching, replacing and stopping one process per stage
* ``launchers`` — which pool starts the workers: local processes or Ray actors (``engine.launcher``)
* ``ray_pool``, ``ray_actor`` — the same pool with one Ray actor per stage, on one machine or a cluster
* ``engine`` — the engine the trainer drives: steps, validation, the plan executor
* ``wall_failures`` — a failure model's losses killing stage processes on the wall clock (``engine.failure_clock``)

States move between stages through ``checkfree.transport`` (the courier both engines' stage host uses).
"""
