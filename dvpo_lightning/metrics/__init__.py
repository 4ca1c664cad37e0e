"""Metrics (torchmetrics) shared by the stages."""

from dvpo_lightning.metrics.pair_accuracy import AGGREGATIONS, PairAccuracy, aggregate_token_values

__all__ = ["AGGREGATIONS", "PairAccuracy", "aggregate_token_values"]
