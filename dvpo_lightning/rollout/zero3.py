"""Gather ZeRO-3-partitioned parameters for generation (a no-op everywhere else)."""

from __future__ import annotations

import contextlib

from torch import nn


def gathered_for_generation(module: nn.Module):
    """Context in which ``module``'s parameters are whole on every rank.

    Under DeepSpeed ZeRO-3 each rank holds a shard and DeepSpeed's hooks all-gather every
    layer's weights at every forward call — at every decode step of ``generate``. Gathering
    once for the whole generation trades that traffic for one full copy of the weights.
    """
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
