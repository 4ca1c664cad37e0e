"""The rollout engine a config names (``generation``), behind the one
:class:`~dvpo_lightning.rollout.generation.Generator` interface."""

from __future__ import annotations

import torch

from dvpo_lightning.rollout.fast_generation import StaticCacheGenerator
from dvpo_lightning.rollout.generation import Generator, HFGenerator

GENERATOR_KINDS = ("hf", "static", "auto")


def make_generator(kind: str, eos_token_id: int, pad_token_id: int, **options) -> Generator:
    """The generator named by the config value ``model.init_args.rollout.engine``.

    Args:
        kind: ``"hf"``: :class:`HFGenerator` (``model.generate``); ``"static"``:
            :class:`~dvpo_lightning.rollout.fast_generation.StaticCacheGenerator` (static KV
            cache, hand-written decode loop, compiled on CUDA); ``"auto"``: the static one when
            CUDA is available (where it is faster), HFGenerator otherwise.
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS.
        **options: keyword arguments of ``StaticCacheGenerator`` (``compile``,
            ``prompt_bucket``, ``batch_bucket``, …); ignored when ``"auto"`` picks HFGenerator.
    """
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"model.init_args.rollout.engine={kind!r} is not a generator kind; "
                         f"allowed values: {', '.join(repr(k) for k in GENERATOR_KINDS)}")
    if kind == "hf":
        if options:
            raise ValueError(f"model.init_args.rollout.engine='hf' takes no options, got "
                             f"{sorted(options)} (they belong to 'static')")
        return HFGenerator(eos_token_id, pad_token_id)
    if kind == "auto" and not torch.cuda.is_available():
        return HFGenerator(eos_token_id, pad_token_id)
    return StaticCacheGenerator(eos_token_id, pad_token_id, **options)
