"""Callbacks: evaluation, guards, reports."""

from dvpo_lightning.callbacks.gold_eval import GoldEval, evaluate_policy
from dvpo_lightning.callbacks.preemption import SaveOnSigterm

__all__ = ["GoldEval", "SaveOnSigterm", "evaluate_policy"]
