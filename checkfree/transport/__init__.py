"""How a stage's state moves to another stage, whichever engine runs them: one idea per module.

* ``courier`` — stage to stage: over the process group, or handed over in memory when both are in this process
* ``transfer`` — (nested) states point to point over torch.distributed
* ``headers`` — a state's structure as checked JSON, never a pickle

The stage host (``checkfree.stage.host``) sends and receives through a courier; the local engine's courier has
every stage here, the process engine's stage workers send over the group.
"""
