"""Callbacks: evaluation, guards, reports."""

from dvpo_lightning.callbacks.gold_eval import GoldEval, evaluate_policy

__all__ = ["GoldEval", "evaluate_policy"]
