"""Rollouts: generation behind a small interface and the experience batch estimators read."""

from dvpo_lightning.rollout.experience import Experience

__all__ = ["Experience"]
