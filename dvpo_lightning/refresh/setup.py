"""Build a run's refresher, check what it needs before models load, and give it its inputs."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.prompts import load_prompts
from dvpo_lightning.data.rollout import encode_prompts
from dvpo_lightning.data.tokenize import LengthReport, encode_prompt, encode_response
from dvpo_lightning.refresh.labellers import load_labeller
from dvpo_lightning.refresh.objectives import GVMObjective, RewardObjective
from dvpo_lightning.refresh.online import OnlinePairs
from dvpo_lightning.refresh.refresher import Prompt, Refresher
from dvpo_lightning.refresh.settings import OnlineSettings, RefreshSettings
from dvpo_lightning.rollout.experience import Need

KEY = "model.init_args.refresh"


def make_refresher(settings: RefreshSettings, needs: frozenset[Need], estimator: str,
                   value_model: str | None, reward_model: str | None = None,
                   ) -> Refresher | None:
    """The run's refresher (None with the refresh off), after checking — before any model
    loads — that the estimator scores with a frozen model, the labeller resolves, and the
    prompt and replay files read. A GVM (DVPO) is refreshed on the return targets its
    directory records (:func:`~dvpo_lightning.modules.gvm.trained_returns`); a reward model
    (PPO, GRPO, ReMax, RLOO, REINFORCE++) on the Bradley–Terry loss."""
    if not settings.on:
        return None
    if Need.GVM_VALUES in needs and value_model:
        from dvpo_lightning.modules.gvm import trained_returns  # (modules/ imports this file)

        objective = GVMObjective(trained_returns(value_model))
    elif (Need.SCORES in needs or Need.GREEDY_BASELINE in needs) and reward_model:
        objective = RewardObjective()
    else:
        raise ValueError(f"{KEY}.every={settings.every} refreshes the frozen GVM or reward "
                         f"model, and the estimator {estimator} uses neither. Fix: use an "
                         f"estimator that scores with one, or set {KEY}.every=0")
    labeller = load_labeller(settings.labeller, settings.noise)
    if settings.prompts_path:
        load_prompts(settings.prompts_path)
    if settings.replay:
        load_examples(settings.replay_path, objective.replay_kind)
    return Refresher(settings, labeller, objective)


def make_online(settings: OnlineSettings) -> OnlinePairs | None:
    """Online DPO's label rounds (None with ``online.every: 0``), after checking — before any
    model loads — that the labeller resolves and the prompt file reads."""
    if not settings.on:
        return None
    labeller = load_labeller(settings.labeller, settings.noise, f"{settings.KEY}.labeller",
                             "the online DPO round after step {step}")
    load_prompts(settings.prompts_path)
    return OnlinePairs(settings, labeller)


def online_prompts(online: OnlinePairs, dm) -> list[Prompt]:
    """``online.prompts_path`` tokenised as DPO's held-out prompts are (a prompt longer than
    ``data.init_args.max_prompt_length`` keeps its last tokens)."""
    path = online.settings.prompts_path
    report = LengthReport(path, dm.max_prompt_length, "truncate")
    dm.length_reports.append(report)
    return encode_prompts(dm, dm.load_prompts(path), path, report, dm.max_prompt_length)


def refresh_inputs(refresher: Refresher, dm, tokenizer, longest: int,
                   ) -> tuple[list[Prompt], list[tuple]]:
    """The fresh prompts (``refresh.prompts_path`` tokenised as the RL prompts are, or the RL
    prompt file's) and the replay items that fit ``longest`` tokens (a pair: both of its
    sequences), tokenised with the run's tokenizer and chat-template setting."""
    settings, objective = refresher.settings, refresher.objective
    chat = getattr(dm, "chat_template", True)
    if settings.prompts_path:
        path = settings.prompts_path
        prompts = encode_prompts(dm, dm.load_prompts(path), path, dm.new_report(path),
                                 dm.max_length)
    else:
        prompts = list(getattr(dm, "train_set", None) or [])
    replay = []
    if settings.replay:
        rows = load_examples(settings.replay_path, objective.replay_kind)
        if settings.replay_fraction < 1:  # (as ValueDataModule's train_fraction)
            prompts_in = list(dict.fromkeys(json.dumps(r["prompt"], sort_keys=True)
                                            for r in rows))
            keep = set(prompts_in[:math.ceil(settings.replay_fraction * len(prompts_in))])
            rows = [r for r in rows if json.dumps(r["prompt"], sort_keys=True) in keep]
        for r in rows:
            item = objective.replay_item(r, lambda p: encode_prompt(tokenizer, p, chat),
                                         lambda q: encode_response(tokenizer, q))
            p, responses = item[0], [x for x in item[1:] if isinstance(x, list)]
            if all(len(p) + len(q) <= longest for q in responses):
                replay.append(item)
    return prompts, replay


def check_refresh(model: nn.Module, strategy) -> None:
    """Refuse what a refresh cannot train: a ZeRO-3 partitioned model, or one not in float32."""
    if getattr(strategy, "zero_stage_3", False):
        raise ValueError(f"{KEY}: a frozen model cannot be refreshed under ZeRO-3 (its weights "
                         "are partitioned). Fix: use configs/deepspeed/zero1.yaml or zero2.yaml, "
                         "or no DeepSpeed")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"{KEY}: the refreshed model trains during a refresh and is in "
                         f"{sorted(map(str, dtypes))}, not float32. Fix: set "
                         "model.init_args.models.frozen_dtype=float32 (or null), and no "
                         "DeepSpeed bf16 cast of the frozen models")
