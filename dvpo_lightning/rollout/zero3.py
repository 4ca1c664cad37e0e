"""Gather ZeRO-3-partitioned parameters for generation (a no-op everywhere else)."""

from __future__ import annotations

import contextlib

from torch import nn


def gathered_for_generation(module: nn.Module):
    """Context in which ``module``'s parameters are whole on every rank.

    Under DeepSpeed ZeRO-3 each rank holds a shard and DeepSpeed's hooks all-gather every
    layer's weights at every forward call — at every decode step of ``generate``. Gathering
    once for the whole generation trades that traffic for one full copy of the weights.
    Re-entrant: parameters an outer context already gathered are left to it (the rollout
    gathers the policy for generation, and the vLLM engine's weight push inside it again).
    """
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if partitioned:
            return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    return contextlib.nullcontext()
