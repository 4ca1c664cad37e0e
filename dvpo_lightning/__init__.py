"""dvpo_lightning."""
