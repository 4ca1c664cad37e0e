"""The PPO-style update every RL method shares: its settings and the loss of one mini-batch.

``L = L_clip(π) [+ β·KL(π‖π_ref) when β acts on the loss] [+ c_v·L_V(critic) for PPO]``,
each term aggregated over the mini-batch by the same rule and normalised by the *global* token
(or sequence) count, so the update does not depend on how the batch is split across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dvpo_lightning.modules.kl_penalty import KLPenalty
from dvpo_lightning.ops.losses import clipped_value_loss, ppo_clip_loss
from dvpo_lightning.ops.masked import masked_mean
from dvpo_lightning.ops.sampling import LogitTransform
from dvpo_lightning.rollout.experience import Experience
from dvpo_lightning.rollout.scoring import policy_logps, response_values
from dvpo_lightning.runtime.distributed import loss_counts


@dataclass(frozen=True)
class PPOSettings:
    """The clipped policy-gradient update (and the critic's, for PPO).

    Args:
        epochs: passes over each rollout batch (K).
        mini_batch_size: responses per mini-batch, per process; None: the whole rollout.
        grad_accum: mini-batches accumulated per optimizer step.
        clip_eps: clip ε of the ratio π/π_old (its lower side, and the upper one unless
            ``clip_eps_high``).
        clip_eps_high: upper clip ε (asymmetric "clip-higher", DAPO); None: ``clip_eps``.
        value_clip: clip range of the critic's value loss (PPO).
        vf_coef: weight of the critic's value loss in the joint loss (PPO).
        loss_aggregation: how token losses become one number: ``token_mean`` (every token of
            the mini-batch weighs the same), ``seq_mean_token_mean`` (every response does) or
            ``seq_mean_token_sum`` (Dr. GRPO: no length normalisation).
        whiten_advantages: whiten the advantages over the whole rollout (all processes) after
            the estimator.
        max_grad_norm: clip the gradient norm to this; None: no clipping.
        tis_cap: truncated importance sampling: weight each token's policy loss by
            ``min(π_old / π_sampler, tis_cap)``, where ``π_sampler`` is what the rollout engine
            sampled with (vLLM reports it), correcting for an engine whose probabilities differ
            from the trainer's (bf16 kernels); None: off (a float32 engine on a CPU matches the
            trainer to ~1e-6). Has no effect with ``rollout.engine: hf``.
        behaviour_logps: where ``logp_old`` comes from. ``auto``: when the update is on-policy
            (one epoch, one mini-batch, no accumulation) from the update's own forward pass,
            detached, as TRL's GRPOTrainer does: the ratio is exactly 1 there, so a separate
            pass would only recompute it, and the rollout needs one policy forward fewer;
            otherwise a separate no-grad pass after sampling. ``rescore``: always the separate
            pass (the policy in eval mode, so a model with dropout gets dropout-free
            ``logp_old``). ``engine``: the rollout engine's own log-probs of its samples
            (``rollout.engine: vllm``; verl's "bypass" mode): no pass for them, and the ratio's
            clip also bounds the engine–trainer gap; the trainer still scores one row in
            eight to watch that gap against ``rollout.vllm.logp_tolerance``. Its cost and
            effect: docs/algorithm.md#where-logp_old-comes-from.
    """

    epochs: int = 4
    mini_batch_size: int | None = None
    grad_accum: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    value_clip: float = 0.2
    vf_coef: float = 0.5
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean",
                              "seq_mean_token_sum"] = "token_mean"
    whiten_advantages: bool = False
    max_grad_norm: float | None = 1.0
    tis_cap: float | None = None
    behaviour_logps: Literal["auto", "rescore", "engine"] = "auto"

    def on_policy(self, rollout_size: int) -> bool:
        """Whether one update of ``rollout_size`` responses (per process) is on-policy: one
        epoch, one mini-batch of all of them, one optimizer step."""
        return (self.epochs == 1 and self.grad_accum == 1
                and (self.mini_batch_size is None or self.mini_batch_size >= rollout_size))

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError(f"model.init_args.ppo.epochs ({self.epochs}) and "
                             f"model.init_args.ppo.grad_accum ({self.grad_accum}) must be >= 1")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"model.init_args.ppo.tis_cap={self.tis_cap} must be > 0, or null for "
                             "no importance correction")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"model.init_args.ppo.mini_batch_size={self.mini_batch_size} must be "
                             ">= 1, or null for the whole rollout batch")
        if self.behaviour_logps == "engine" and self.tis_cap is not None:
            raise ValueError(
                f"model.init_args.ppo.tis_cap={self.tis_cap} with "
                "model.init_args.ppo.behaviour_logps=engine: logp_old is then the engine's own "
                "log-probs, so the importance weight π_old / π_sampler is 1 and the cap does "
                "nothing. Fix: set model.init_args.ppo.tis_cap to null, or behaviour_logps to "
                "auto to correct the gap instead")


def check_behaviour_source(ppo: PPOSettings, engine: str) -> None:
    """``ppo.behaviour_logps: engine`` needs an engine that reports its samples' log-probs;
    raises before any model loads otherwise."""
    if ppo.behaviour_logps == "engine" and engine != "vllm":
        raise ValueError(
            "model.init_args.ppo.behaviour_logps=engine takes logp_old from the rollout engine's "
            f"own log-probs, and model.init_args.rollout.engine={engine} reports none. Fix: set "
            "model.init_args.rollout.engine=vllm, or model.init_args.ppo.behaviour_logps=auto")


torch.serialization.add_safe_globals([PPOSettings])  # in checkpointed hparams


def minibatch_loss(policy: nn.Module, critic: nn.Module | None, sub: Experience,
                   advantages: Tensor, returns: Tensor, settings: PPOSettings, kl: KLPenalty,
                   fused_head: bool = True, sampling: LogitTransform | None = None,
                   forward: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The joint loss of one mini-batch.

    Args:
        policy: the trained policy.
        critic: the trained critic (PPO), else None.
        sub: the mini-batch's experience.
        advantages: ``(b, T)`` float, ``Â_t``.
        returns: ``(b, T)`` float, the critic's regression targets (PPO).
        settings: the update's settings.
        kl: the run's KL penalty (adds its loss term when β acts on the loss).
        fused_head: log-probs with the output head in row chunks.
        sampling: the rollout sampler's transform of the logits (``logp_old``'s): the ratio's
            new log-probs are of the same distribution (docs/sampling.md); None: raw softmax.
        forward: the policy's ``(logp, entropy)`` ``(b, T)`` of ``sub``, with their graph, when
            the rollout already ran this forward pass (``behaviour_logps: auto`` on-policy);
            None: run it here.

    Returns:
        ``(loss, ratio_mean, stats)``: the loss to back-propagate, the mean ratio π/π_old (the
        ratio guard reads it) and detached ``train/*`` diagnostics.
    """
    mask = sub.response_mask
    seq = (sub.prompt_ids, sub.prompt_mask, sub.response_ids, mask)
    agg = settings.loss_aggregation
    n_tok, n_seq = loss_counts(mask)
    logp, entropy = forward if forward is not None else policy_logps(
        policy, *seq, with_entropy=True, fused_head=fused_head, sampling=sampling)
    weights = None
    if settings.tis_cap is not None and sub.logp_sampler is not None:
        weights = torch.exp(sub.logp_old - sub.logp_sampler).clamp(max=settings.tis_cap)
    pg_loss, st = ppo_clip_loss(logp, sub.logp_old, advantages, mask, settings.clip_eps,
                                settings.clip_eps_high, agg, n_tok, n_seq, weights)
    loss = pg_loss
    stats = {"train/policy_loss": pg_loss.detach(),
             "train/entropy": masked_mean(entropy.detach(), mask),
             "train/approx_kl": st["approx_kl"], "train/clipfrac": st["clipfrac"]}
    kl_loss = kl.loss(logp, sub.logp_ref, mask, agg, n_tok, n_seq)
    if kl_loss is not None:
        loss = loss + kl.coef * kl_loss
        stats["train/kl_loss"] = kl_loss.detach()
    if critic is not None:
        v_new = response_values(critic, *seq)[:, :-1]
        v_loss = clipped_value_loss(v_new, sub.values[:, :-1], returns, mask,
                                    settings.value_clip, agg, n_tok, n_seq)
        loss = loss + settings.vf_coef * v_loss
        stats["train/value_loss"] = v_loss.detach()
    return loss, st["ratio_mean"], stats
