"""Semi-online DVPO: the GVM refreshed from new labels during RL (docs/semi-online.md)."""

from dvpo_lightning.refresh.buffer import LabelledBuffer, LabelledRow
from dvpo_lightning.refresh.labellers import (
           Labeller,
           LabellerError,
           load_labeller,
           register_labeller,
)
from dvpo_lightning.refresh.objectives import GVMObjective, RewardObjective
from dvpo_lightning.refresh.refresher import Refresher, pair_accuracy
from dvpo_lightning.refresh.settings import RefreshSettings

__all__ = ["GVMObjective", "LabelledBuffer", "LabelledRow", "Labeller", "LabellerError",
           "RefreshSettings", "Refresher", "RewardObjective", "load_labeller", "pair_accuracy",
           "register_labeller"]
