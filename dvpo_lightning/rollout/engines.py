"""The rollout engine a config names (``model.init_args.rollout.engine``), behind the one
:class:`~dvpo_lightning.rollout.generation.Generator` interface. No silent fallback: an engine
that cannot run here is an error that names the fix."""

from __future__ import annotations

from collections.abc import Sequence

from dvpo_lightning.rollout.generation import Generator, HFGenerator
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.rollout.vllm_engine import VLLMEngine

ENGINES = ("hf", "vllm")


def make_generator(settings: RolloutSettings, end_ids: int | Sequence[int],
                   pad_token_id: int) -> Generator:
    """``hf``: :class:`HFGenerator` (``model.generate``); ``vllm``: :class:`VLLMEngine` (raises
    naming the install command when vLLM is missing).

    Args:
        settings: the rollout settings (``engine``, and ``vllm`` for the vLLM engine).
        end_ids: the tokens that end a response, the tokenizer's EOS first
            (:func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`): both engines stop on
            exactly these.
        pad_token_id: written after the end token.
    """
    if settings.engine not in ENGINES:
        raise ValueError(f"model.init_args.rollout.engine={settings.engine!r} is not an engine; "
                         f"allowed values: {', '.join(repr(k) for k in ENGINES)}")
    if settings.engine == "vllm":
        return VLLMEngine(end_ids, pad_token_id, settings.vllm)  # logs itself when built
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info("rollout engine: Hugging Face generate (model.init_args.rollout.engine=hf; "
                   "vllm for the colocated vLLM engine)")
    return HFGenerator(end_ids, pad_token_id)
