"""Advantage estimators: one file each, one shared contract (:mod:`.base`)."""

from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.estimators.gae import GAE
from dvpo_lightning.estimators.grpo import GRPO
from dvpo_lightning.estimators.gvm import GVM
from dvpo_lightning.estimators.reinforce_pp import REINFORCEPP, REINFORCEPPBaseline
from dvpo_lightning.estimators.remax import ReMax
from dvpo_lightning.estimators.rloo import RLOO

__all__ = [
    "GAE",
    "GRPO",
    "GVM",
    "REINFORCEPP",
    "RLOO",
    "AdvantageEstimator",
    "Need",
    "REINFORCEPPBaseline",
    "ReMax",
]
