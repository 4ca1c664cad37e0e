"""LightningModules: thin systems with injected parts, and the settings groups they take."""

from dvpo_lightning.modules.dpo import DPOModule, DPOSettings
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.gvm import GVMModule, ReturnTargets
from dvpo_lightning.modules.optim import OptimSettings, RLOptimSettings
from dvpo_lightning.modules.reward_model import RewardModelModule, ScoreRewardModelModule
from dvpo_lightning.modules.sft import SFTModule

__all__ = ["DPOModule", "DPOSettings", "DVPOModule", "GVMModule", "OptimSettings",
           "RLOptimSettings", "ReturnTargets", "RewardModelModule", "SFTModule",
           "ScoreRewardModelModule"]
