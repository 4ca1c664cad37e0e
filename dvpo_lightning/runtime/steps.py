"""``trainer.global_step`` in RL steps: a rollout and its whole PPO update count as one step.

Under manual optimisation Lightning counts every ``optimizer.step()`` as a global step, so an RL
step of ``epochs × mini-batches`` updates would advance ``trainer.max_steps`` by that many,
while ``val_check_interval`` counts training batches (rollouts). :func:`one_global_step` makes
both count rollouts: ``trainer.max_steps: 60`` is 60 RL steps, and checkpoints, logs and
evaluations all say the same step number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightning.pytorch.core.optimizer import LightningOptimizer


def _nothing() -> None:
    pass


@contextlib.contextmanager
def one_global_step(optimizer: LightningOptimizer) -> Iterator[None]:
    """Inside the block, ``optimizer.step()`` does not advance ``trainer.global_step``; a block
    that finishes (returns, or leaves early) advances it by exactly one, one that raises not
    at all.

    Lightning's manual-optimisation loop counts a step through the two hooks it sets on the
    ``LightningOptimizer`` before each ``training_step`` (``_on_before_step`` /
    ``_on_after_step``); they are set aside for the block and called once after it.
    ``tests/test_rl_step_unit.py`` checks this against the installed Lightning.
    """
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = _nothing
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after
    before()
    after()
