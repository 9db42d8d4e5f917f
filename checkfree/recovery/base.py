"""The protocol every recovery strategy follows: decide, as data; never execute.

A strategy has three hooks, all pure functions of their arguments (docs/design.md, 'Recovery plans'):

* ``setup(view)`` — the copies to make (and the checkpoint to save) before the first iteration: an ``Upkeep``.
* ``plan(lost, view)`` — the stages in ``lost`` were lost (weights and optimizer state): say how to bring
  *all* of them back at once, from surviving stages only, as a ``RecoveryPlan``; or raise
  ``UnrecoverableFailure`` with one sentence that names what was lost and what would have survived it.
* ``after_step(view)`` — the copies to refresh and whether to save a checkpoint after each step: an ``Upkeep``.

Strategies import no engine, no module and no tensor code: they read a ``RunView`` (stage count, iteration,
progress, seed, learning rates, last gradient norms, when each held copy was refreshed) and return frozen
dataclasses from ``checkfree.plan``. Adding one = a module here, one line in the registry
(``checkfree/recovery/__init__.py``), its YAML in ``conf/strategy/`` and its test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from checkfree.plan import RecoveryPlan, RunView, Upkeep
from checkfree.run.config import ConfigError


@dataclass(frozen=True)
class StrategyConfig:
    """Hydra group ``strategy``: one YAML per strategy; keys a strategy does not use are ignored."""

    name: str = "checkfree_plus"
    """none | checkfree | checkfree_plus | checkpoint | redundant | copy | uniform | random | zero"""
    lr_scale: float = 1.1
    """The recovered stage trains at lr_scale * lr (the reference: 1.1 for 124M/1.5B, 1.2 for 500M)."""
    norm_source: str = "post"
    """Which gradient norm weights the neighbours: 'post' (after clipping, as the reference) or 'pre'."""
    norm_power: float = 1.0
    """Weights are |g|^power + eps (the reference uses 1; one secondary source says 2)."""
    eps: float = 1e-4
    """Added to each neighbour's weight so that zero gradients still give a defined average."""
    unrecoverable: str = "error"
    """A lost stage the strategy cannot rebuild (no survivor on one side, both swap partners or a stage and
    its shadow holder lost together): 'error' (stop, say why) or 'reinit' (fresh weights, logged)."""
    edge_rule: str = "none"
    """Neighbour strategies (checkfree and its ablations) on a lost edge stage, which has a neighbour on one
    side only: 'none' (not recoverable: see ``unrecoverable``) or 'copy' (copy that neighbour's blocks, as the
    paper's code does, and restore the embedding / head from a replica kept on it, as CheckFree+ does)."""
    replica_sync_every: int = 10
    """CheckFree+ (and edge_rule=copy): refresh the (de)embedding replicas on stages 1 and S-2 every this
    many iterations."""
    every: int | str = 50
    """checkpoint: save all stages + optimizers + data position + RNG every this many (wall) iterations;
    async_checkpoint, snapshot_restore, memory_checkpoint: checkpoint / snapshot every this many. 'auto' (those
    three): the smallest period the bandwidth sustains — one flush or send ends before the next begins
    (CheckFreq's rule; ``checkfree.simulation.cost.sustained_period``)."""
    keep: int = 2
    """checkpoint, memory_checkpoint: how many checkpoints to keep in storage."""
    copies: int = 1
    """snapshot_restore, memory_checkpoint: how many peers hold each stage's snapshot (stages k+1 .. k+copies,
    mod S)."""
    storage_every: int = 100
    """memory_checkpoint: save a checkpoint to storage every this many (wall) iterations, the fall-back when every
    copy of a lost stage's snapshot was lost with it."""
    encoding: str = "int8"
    """compressed_snapshot: how each stage's weights are sent to its peers: 'bf16' (2 bytes a parameter) or
    'int8' (1 byte and one fp32 scale per output channel; ``checkfree.stage.encoding``)."""

    fit_buffer: int = 8
    """checkfree_fit, checkfree_plus_fit: micro-batches of activations each stage buffers for its neighbours
    (the last ``fit_buffer`` of training; a stage's body input and output, held by the stages either side)."""
    fit_steps: int = 20
    """checkfree_fit, checkfree_plus_fit: Adam steps of the rebuilt stage's body on its buffered pairs (0: none)."""
    fit_lr: float = 1e-3
    """checkfree_fit, checkfree_plus_fit: the fit's learning rate (its own Adam, dropped after)."""
    fit_loss: str = "mse"
    """checkfree_fit, checkfree_plus_fit: what the fit minimises: 'mse' or 'smooth_l1'."""

    def to_dict(self) -> dict:
        return asdict(self)


class UnrecoverableFailure(RuntimeError):
    """A lost stage that the strategy cannot rebuild, with the way out in the message."""


class RecoveryStrategy:
    """Base class and the ``none`` strategy: no recovery, in-order schedule, nothing to keep."""

    name = "none"
    schedule_name = "in_order"
    """The micro-batch order the strategy trains with (``checkfree.stage.schedule``)."""
    min_stages = 1
    redundant_compute = False
    """True when every stage also computes its successor's step (its time is priced by the cost model)."""
    reads: tuple[str, ...] = ()
    """The ``strategy.*`` keys this strategy reads (besides ``name``): a key given on the command line that the
    chosen strategy does not read is refused (``check_strategy_overrides``), as ``failure.*`` keys are."""
    sends_in_background: str | None = None
    """Where this strategy's periodic copies go in the background, for ``every: auto``: 'storage' (an
    asynchronous checkpoint), 'peer' (snapshots to peers' RAM), or None (``every`` must be a number)."""
    fits = False
    """True when rebuilt stages are fitted to activations their neighbours buffer (the engines keep the buffers)."""
    table2_column = "checkfree"
    """Which of the paper's measured iteration times (its Table 2) this strategy pays under
    trainer.clock=paper_table2: checkfree | checkpointing | redundant."""

    @classmethod
    def background_bytes_per_param(cls, cfg: StrategyConfig) -> float:
        """Bytes a parameter takes in one background copy, for ``every: auto``: a whole state (fp32 weights and
        Adam's two fp32 moments) unless a strategy sends less."""
        return 12.0

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg

    def validate(self, n_stages: int) -> None:
        if n_stages < self.min_stages:
            raise ConfigError(
                f"model.n_stages={n_stages} is invalid for strategy={self.name}: "
                f"it needs at least {self.min_stages} stages."
            )

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep()

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        raise UnrecoverableFailure(
            f"stages {sorted(lost)} failed but strategy=none recovers nothing; "
            "use failure=none with strategy=none, or pick a recovery strategy."
        )

    def after_step(self, view: RunView) -> Upkeep:
        return Upkeep()
