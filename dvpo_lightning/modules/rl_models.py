"""Load the models of an RL run — exactly those its estimator needs — after checking, on files
and before any weights load, that every one reads the policy's token ids."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.models.compat import check_compatible
from dvpo_lightning.models.loading import load_causal_lm, resolve_dtype
from dvpo_lightning.models.options import ModelOptions
from dvpo_lightning.models.value_model import ValueModel, freeze
from dvpo_lightning.rollout.experience import Need


@dataclass
class RLModels:
    """What :func:`load_rl_models` returns.

    Attributes:
        trained: ``policy`` (and ``critic`` for estimators that train one), in one container
            so one optimizer (DeepSpeed accepts exactly one) holds both parameter groups.
        frozen: ``reference`` (unless shared), ``gvm``, ``reward_model``: each only if needed.
        identity: role → the path whose weights a resumed run must find again.
        shared_reference: the reference is the policy with its LoRA adapters switched off
            (no second copy; ``frozen`` then has no ``reference``).
    """

    trained: nn.ModuleDict
    frozen: nn.ModuleDict
    identity: dict[str, str | None]
    shared_reference: bool


def needed_paths(needs: frozenset[Need], estimator: str, value_model: str | None,
                 reward_model: str | None) -> tuple[str | None, str | None]:
    """``(gvm, reward model)`` paths the estimator needs (None where it needs none); raises
    naming the missing key when a needed path was not given."""
    wants_rm = Need.SCORES in needs or Need.GREEDY_BASELINE in needs
    if Need.GVM_VALUES in needs and not value_model:
        raise ValueError(f"{estimator} needs a frozen GVM: set model.init_args.value_model to the "
                         "GVM directory (stage 1 output)")
    if wants_rm and not reward_model:
        raise ValueError(f"{estimator} needs a reward model: set model.init_args.reward_model to "
                         "the reward-model directory")
    return (value_model if Need.GVM_VALUES in needs else None,
            reward_model if wants_rm else None)


def load_rl_models(needs: frozenset[Need], estimator: str, tokenizer: PreTrainedTokenizerBase,
                   policy: str, reference: str | None, value_model: str | None,
                   reward_model: str | None, critic_init: str | None,
                   options: ModelOptions) -> RLModels:
    """Check, then load, the trained and frozen models of an RL run.

    Args:
        needs: what the estimator declared (:class:`~dvpo_lightning.rollout.experience.Need`).
        estimator: its name, for messages.
        tokenizer: the run's (the policy's) tokenizer.
        policy: the starting policy.
        reference: the reference policy; None: the starting policy (with LoRA: the policy
            itself with its adapters off).
        value_model: the frozen GVM (estimators that need its values).
        reward_model: the frozen scalar reward model (estimators that need scores).
        critic_init: the critic's starting weights (estimators that train one); default: the
            reward model (as in the paper's PPO), else the policy.
        options: how every model loads and runs.
    """
    gvm, rm = needed_paths(needs, estimator, value_model, reward_model)
    trains_critic = Need.CRITIC_VALUES in needs
    critic = (critic_init or reward_model or policy) if trains_critic else None
    for role, path in (("policy", policy), ("reference", reference), ("gvm", gvm),
                       ("reward_model", rm), ("critic", critic_init if trains_critic else None)):
        if path:
            check_compatible(tokenizer, path, role)

    attn = options.attn_implementation
    # Load order is part of a run's random stream (fresh heads draw from it): keep it.
    trained = nn.ModuleDict({"policy": load_causal_lm(
        policy, tokenizer, options.dtype, attn, options.gradient_checkpointing, options.lora)})
    if critic is not None:
        trained["critic"] = ValueModel.from_pretrained(
            critic, tokenizer, kind="critic", dtype=options.dtype, attn_implementation=attn,
            gradient_checkpointing=options.gradient_checkpointing, lora=options.critic_lora)
    shared_reference = options.lora is not None and reference is None
    frozen = nn.ModuleDict()
    if not shared_reference:
        frozen["reference"] = freeze(load_causal_lm(reference or policy, tokenizer,
                                                    attn_implementation=attn))
    if gvm:
        frozen["gvm"] = freeze(ValueModel.from_pretrained(gvm, tokenizer,
                                                          attn_implementation=attn))
    if rm:
        frozen["reward_model"] = freeze(ValueModel.from_pretrained(rm, tokenizer,
                                                                   attn_implementation=attn))
    dtype = resolve_dtype(options.frozen_dtype)  # (auto: resolved on the device, in setup)
    if dtype is not None:
        frozen.to(dtype)
    return RLModels(trained, frozen, {"reference": reference or policy, "gvm": gvm,
                                      "reward_model": rm}, shared_reference)
