"""One stage's work, shared by every engine.

* ``compute`` — a stage's module, Adam, precision rule, clipping and rebuild (``StageCompute``)
* ``averaging`` — CheckFree's tensor math: the weighted average of neighbouring stages
* ``routes``, ``schedule`` — a micro-batch's path through the stages, and the order of their bodies
* ``host`` — the stage host both engines are: the plan executor and the copies a node holds
* ``guard`` — after a step, is everything finite, and if not, which stage did it come from
"""
