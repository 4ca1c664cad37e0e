"""Whether this training step's metrics reach the loggers: a metric that costs work to compute
is computed only then.

Lightning sends a step metric to the loggers every ``trainer.log_every_n_steps`` steps (and
when training is about to stop); on the other steps ``self.log`` only keeps the value in memory,
about 0.3 ms a call on CPU. A tiny model's step is 40–70 ms, so five metrics and a gradient
norm a step cost the stage-1 runs about 5 % of their time for numbers no logger receives
(docs/benchmarks.md#where-the-default-studys-time-goes). Lightning's own monitors
(``LearningRateMonitor``, ``DeviceStatsMonitor``) skip the same way. A callback that monitors
one of these metrics (``ModelCheckpoint(monitor=...)``, ``EarlyStopping``) sees its value from
the last logging step; ``train/loss`` is still logged every step.
"""

from __future__ import annotations


def logs_this_step(trainer) -> bool:
    """True when Lightning writes step metrics to the loggers at the current training step
    (its logger connector's ``should_update_logs``; True outside a fit loop or when the trainer
    has no such connector), so a metric computed only when this is True reaches the loggers
    exactly as one computed every step would."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or getattr(trainer, "fast_dev_run", False):
        return True  # (a fast_dev_run logs every step)
    return bool(connector.should_update_logs)
