"""Callbacks every stage shares: cost accounting, the run summary, export, held-out gold
evaluation of a policy, and a checkpoint on SIGTERM."""

from dvpo_lightning.callbacks.cost import CostMeter
from dvpo_lightning.callbacks.export import Export
from dvpo_lightning.callbacks.gold_eval import GoldEval, evaluate_policy
from dvpo_lightning.callbacks.preemption import SaveOnSigterm
from dvpo_lightning.callbacks.summary import RunSummary

__all__ = ["CostMeter", "Export", "GoldEval", "RunSummary", "SaveOnSigterm", "evaluate_policy"]
