"""Build a run's refresher, check what it needs before models load, and give it its inputs."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.prompts import load_prompts
from dvpo_lightning.data.rollout import encode_prompts
from dvpo_lightning.data.tokenize import encode_prompt, encode_response
from dvpo_lightning.modules.gvm import trained_returns
from dvpo_lightning.refresh.labellers import load_labeller
from dvpo_lightning.refresh.refresher import GVMRefresher, Prompt
from dvpo_lightning.refresh.settings import RefreshSettings
from dvpo_lightning.rollout.experience import Need

KEY = "model.init_args.refresh"


def make_refresher(settings: RefreshSettings, needs: frozenset[Need], estimator: str,
                   value_model: str | None) -> GVMRefresher | None:
    """The run's refresher (None with the refresh off), after checking — before any model
    loads — that the estimator uses a GVM, the labeller resolves, and the prompt and replay
    files read. It trains on the return targets the GVM directory records
    (:func:`~dvpo_lightning.modules.gvm.trained_returns`)."""
    if not settings.on:
        return None
    if Need.GVM_VALUES not in needs or not value_model:
        raise ValueError(f"{KEY}.every={settings.every} refreshes the GVM, and the estimator "
                         f"{estimator} uses none. Fix: use the GVM estimator with "
                         f"model.init_args.value_model, or set {KEY}.every=0")
    labeller = load_labeller(settings.labeller, settings.noise)
    if settings.prompts_path:
        load_prompts(settings.prompts_path)
    if settings.replay:
        load_examples(settings.replay_path, "scored")
    return GVMRefresher(settings, labeller, trained_returns(value_model))


def refresh_inputs(settings: RefreshSettings, dm, tokenizer, longest: int,
                   ) -> tuple[list[Prompt], list[tuple[list[int], list[int], float]]]:
    """The fresh prompts (``refresh.prompts_path`` tokenised as the RL prompts are, or the RL
    prompt file's) and the replay rows that fit ``longest`` tokens, tokenised with the run's
    tokenizer and chat-template setting."""
    chat = getattr(dm, "chat_template", True)
    if settings.prompts_path:
        path = settings.prompts_path
        prompts = encode_prompts(dm, dm.load_prompts(path), path, dm.new_report(path),
                                 dm.max_length)
    else:
        prompts = list(getattr(dm, "train_set", None) or [])
    replay = []
    if settings.replay:
        rows = load_examples(settings.replay_path, "scored")
        if settings.replay_fraction < 1:  # (as ValueDataModule's train_fraction)
            prompts_in = list(dict.fromkeys(json.dumps(r["prompt"], sort_keys=True)
                                            for r in rows))
            keep = set(prompts_in[:math.ceil(settings.replay_fraction * len(prompts_in))])
            rows = [r for r in rows if json.dumps(r["prompt"], sort_keys=True) in keep]
        for r in rows:
            p = encode_prompt(tokenizer, r["prompt"], chat)
            q = encode_response(tokenizer, r["response"])
            if len(p) + len(q) <= longest:
                replay.append((p, q, float(r["score"])))
    return prompts, replay


def check_refresh(gvm: nn.Module, strategy) -> None:
    """Refuse what a refresh cannot train: a ZeRO-3 partitioned GVM, or one not in float32."""
    if getattr(strategy, "zero_stage_3", False):
        raise ValueError(f"{KEY}: the GVM cannot be refreshed under ZeRO-3 (its weights are "
                         "partitioned). Fix: use configs/deepspeed/zero1.yaml or zero2.yaml, or "
                         "no DeepSpeed")
    dtypes = {p.dtype for p in gvm.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"{KEY}: the GVM trains during a refresh and is in "
                         f"{sorted(map(str, dtypes))}, not float32. Fix: set "
                         "model.init_args.models.frozen_dtype=float32 (or null), and no "
                         "DeepSpeed bf16 cast of the frozen models")
