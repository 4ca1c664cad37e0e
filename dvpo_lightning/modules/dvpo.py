"""One RL LightningModule for DVPO and every baseline: only the estimator differs.

One ``training_step`` = generate → score / value → advantages → K PPO epochs over
mini-batches → log. Which frozen parts are loaded and run is decided by what the estimator
declares it needs (:class:`~dvpo_lightning.estimators.Need`), never by its name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from dvpo_lightning.data.rollout import check_rollout_batch
from dvpo_lightning.estimators.base import AdvantageEstimator, Need
from dvpo_lightning.models.compat import check_compatible, check_fits_context
from dvpo_lightning.models.identity import check_same_models, fingerprint
from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from dvpo_lightning.models.lora import LoraOptions, adapters_disabled, merged_copy, save_adapter
from dvpo_lightning.models.value_model import ValueModel, freeze
from dvpo_lightning.modules.optim import adamw
from dvpo_lightning.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate
from dvpo_lightning.ops.losses import aggregate, clipped_value_loss, ppo_clip_loss
from dvpo_lightning.ops.masked import masked_mean
from dvpo_lightning.rollout.engines import make_generator
from dvpo_lightning.rollout.experience import Experience
from dvpo_lightning.rollout.generation import SamplingConfig
from dvpo_lightning.rollout.gold import gold_scores
from dvpo_lightning.rollout.scoring import (
    by_rows,
    policy_logps,
    response_values,
    sequence_scores,
)
from dvpo_lightning.rollout.zero3 import gathered_for_generation
from dvpo_lightning.runtime.artifacts import export_atomic
from dvpo_lightning.runtime.checkpointing import (
    drop_reloaded,
    reloaded_weights,
    restore_reloaded,
    rng_states,
    set_rng_states,
)
from dvpo_lightning.runtime.distributed import all_reduce_sum, global_whiten, loss_counts
from dvpo_lightning.runtime.guards import (
    KLBoundError,
    NonFiniteError,
    nonfinite_message,
    nonfinite_names,
)
from dvpo_lightning.runtime.loggers import has_wandb, log_files, log_table
from dvpo_lightning.tasks import get_task


class DVPOModule(L.LightningModule):
    """PPO-style policy optimisation with a pluggable advantage estimator.

    Args:
        policy: the SFT policy directory (the starting point, and the reference by default).
        estimator: the advantage estimator (``class_path``): ``GVM`` (DVPO), ``GAE`` (PPO),
            ``GRPO``, ``ReMax`` or ``RLOO``.
        tokenizer: tokenizer directory; defaults to the policy's.
        reference: the frozen reference policy for the KL; defaults to ``policy`` (with
            ``lora``: the policy itself with its adapters switched off, no second copy).
        value_model: the frozen Global Value Model directory (estimators needing GVM values).
        reward_model: the frozen scalar reward model directory (estimators needing scores).
        lora: train LoRA adapters on the policy instead of every weight; the export merges
            them (and writes the adapter alone to ``<export_dir>/adapter``).
        critic_lora: LoRA adapters for the PPO critic's backbone (its head trains fully).
        attn_implementation: attention kernel of every model loaded (``eager``, ``sdpa``,
            ``flash_attention_2``); None lets transformers choose.
        gradient_checkpointing: recompute the trained models' activations in the backward
            pass (less memory, ~30 % more update time).
        offload_frozen: keep the frozen reference, GVM and RM in CPU memory and move them to
            the accelerator only for the scoring phase of a rollout and for evaluation (frees
            their memory during generation and the update; costs a host-device copy per
            step). Not with DeepSpeed ZeRO-3, whose partitioned weights cannot move.
        frozen_dtype: dtype of the frozen reference, GVM and RM (``bfloat16``, ``float16``;
            None keeps the loaded dtype): half precision halves their memory on a GPU.
        critic_init: initial weights of the PPO critic (estimators that train one); defaults
            to ``reward_model`` (as in the paper's PPO), else the policy.
        task: embedded task whose gold scorer is logged for rollouts and evaluations (None
            for data without a gold judge).
        generation: rollout generation engine: ``hf`` (``model.generate``), ``static`` (a
            static KV cache and, on CUDA, the decode step compiled into CUDA graphs:
            :mod:`~dvpo_lightning.rollout.fast_generation`), or ``auto`` (static on CUDA, hf
            elsewhere); static falls back to hf where it cannot run (ZeRO-3 partitions).
        max_new_tokens: longest response.
        min_new_tokens: shortest response: EOS is suppressed before it (cost benchmarks set it
            to ``max_new_tokens`` to force every response's length).
        temperature: sampling temperature of rollouts; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: top-k sampling (0 disables it).
        kl_coef: KL coefficient β (initial value when ``adaptive_kl``).
        kl_estimator: ``k1``, ``k2`` or ``k3`` estimator of KL(π‖π_ref) per token.
        kl_in_reward: put ``−β·KL_t`` in the per-token reward (PPO style); False adds
            ``β·KL`` to the loss instead (GRPO style).
        adaptive_kl: adapt β towards ``kl_target`` (Ziegler et al.) instead of keeping it fixed.
        kl_target: target KL per sequence of the adaptive controller.
        kl_horizon: horizon of the adaptive controller.
        ppo_epochs: passes over each rollout batch (K).
        mini_batch_size: responses per mini-batch (per process); None = the whole batch.
        grad_accum: mini-batches accumulated per optimizer step.
        score_batch_size: rows per forward pass when scoring a rollout or an evaluation batch
            (policy and reference log-probs, GVM / critic values, RM scores); None: the whole
            batch in one pass. Generation always runs on the whole batch; this bounds the
            scoring passes' activation memory (large vocabularies, long responses).
        fused_head: compute log-probs with the output head inside float32 row chunks, so the
            ``(B, T, V)`` logits never exist at once (Llama / Mistral / Qwen2 / Qwen3 outside
            ZeRO-3; others fall back to ``logits_to_keep``): less memory, one more head
            matmul in the backward. See :func:`~dvpo_lightning.rollout.scoring.policy_logps`.
        clip_eps: PPO clip ε (lower side; and upper unless ``clip_eps_high``).
        clip_eps_high: upper clip ε (asymmetric clipping); None = ``clip_eps``.
        value_clip: clip range of the critic's value loss (PPO).
        vf_coef: weight of the critic's value loss in the joint loss.
        loss_aggregation: ``token_mean``, ``seq_mean_token_mean`` or ``seq_mean_token_sum``.
        whiten_advantages: whiten advantages over the batch (all processes) after the
            estimator.
        ratio_skip_threshold: skip a mini-batch whose mean ratio π/π_old exceeds this.
        max_grad_norm: gradient-norm clip (None disables it).
        lr: policy learning rate.
        critic_lr: critic learning rate (its own parameter group); defaults to ``lr``.
        weight_decay: AdamW weight decay.
        export_dir: where to write the trained policy at the end of ``fit``.
        eval_greedy: evaluate held-out prompts with greedy decoding (else sampling).
        summary_file: JSON summary written into the run directory at the end of ``fit``.
        on_nonfinite: a NaN / inf in the rollout, advantages, loss or gradient: ``stop`` the
            run (nothing is saved after it) or ``skip`` the step (logged).
        max_kl: bound on the rollout's mean KL to the reference per response (None: none).
        on_kl_exceeded: past ``max_kl``: ``stop`` the run or ``warn`` (logged either way).
    """

    def __init__(
        self,
        policy: str,
        estimator: AdvantageEstimator,
        tokenizer: str | None = None,
        reference: str | None = None,
        value_model: str | None = None,
        reward_model: str | None = None,
        critic_init: str | None = None,
        lora: LoraOptions | None = None,
        critic_lora: LoraOptions | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        offload_frozen: bool = False,
        frozen_dtype: str | None = None,
        task: str | None = None,
        generation: str = "hf",
        max_new_tokens: int = 16,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        kl_in_reward: bool = True,
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        grad_accum: int = 1,
        score_batch_size: int | None = None,
        fused_head: bool = True,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        value_clip: float = 0.2,
        vf_coef: float = 0.5,
        loss_aggregation: str = "token_mean",
        whiten_advantages: bool = False,
        ratio_skip_threshold: float = 10.0,
        max_grad_norm: float | None = 1.0,
        lr: float = 1e-5,
        critic_lr: float | None = None,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        eval_greedy: bool = False,
        summary_file: str = "rl_summary.json",
        on_nonfinite: str = "stop",
        max_kl: float | None = None,
        on_kl_exceeded: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator"])
        self.automatic_optimization = False
        self.estimator = estimator
        needs = estimator.needs
        self._check_args(needs)
        self.tokenizer = load_tokenizer(tokenizer or policy)
        for role, path in (  # vocabularies must agree; checked on files, before any weights
                ("policy", policy), ("reference", reference),
                ("gvm", value_model if Need.GVM_VALUES in needs else None),
                ("reward_model", reward_model if Need.SCORES in needs
                 or Need.GREEDY_BASELINE in needs else None),
                ("critic", critic_init if Need.CRITIC_VALUES in needs else None)):
            if path:
                check_compatible(self.tokenizer, path, role)
        self.sampling = SamplingConfig(max_new_tokens, temperature or 1.0, top_p, top_k,
                                       greedy=temperature == 0, min_new_tokens=min_new_tokens)
        self.generator = make_generator(generation, self.tokenizer.eos_token_id,
                                        self.tokenizer.pad_token_id)

        attn = attn_implementation
        trained = nn.ModuleDict({"policy": load_causal_lm(
            policy, self.tokenizer, attn_implementation=attn,
            gradient_checkpointing=gradient_checkpointing, lora=lora)})
        if Need.CRITIC_VALUES in needs:
            trained["critic"] = ValueModel.from_pretrained(
                critic_init or reward_model or policy, self.tokenizer, kind="critic",
                attn_implementation=attn, gradient_checkpointing=gradient_checkpointing,
                lora=critic_lora)
        self.trained = trained
        # With LoRA and no separate reference, the reference is the policy without adapters.
        self.shared_reference = lora is not None and reference is None
        frozen = nn.ModuleDict()
        if not self.shared_reference:
            frozen["reference"] = freeze(load_causal_lm(reference or policy, self.tokenizer,
                                                        attn_implementation=attn))
        if Need.GVM_VALUES in needs:
            frozen["gvm"] = freeze(ValueModel.from_pretrained(value_model, self.tokenizer,
                                                              attn_implementation=attn))
        if Need.SCORES in needs or Need.GREEDY_BASELINE in needs:
            frozen["reward_model"] = freeze(ValueModel.from_pretrained(
                reward_model, self.tokenizer, attn_implementation=attn))
        if frozen_dtype:
            frozen.to(resolve_dtype(frozen_dtype))
        self.frozen = frozen
        self.kl_ctl = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl
                       else FixedKLController(kl_coef))
        self.task = get_task(task) if task else None
        self.history: list[dict] = []
        self.rl_step = 0  # rollout batches trained on (a checkpointed counter)
        self.cost_log: list[dict[str, float]] = []  # per RL step: seconds, generated tokens
        self.guard_skips = 0
        self._rng_to_restore: dict | None = None
        self._ref_eval: dict[str, float] | None = None

    def _check_args(self, needs: frozenset[Need]) -> None:
        hp = self.hparams
        if Need.GVM_VALUES in needs and not hp.value_model:
            raise ValueError(f"{type(self.estimator).__name__} needs a frozen GVM: set "
                             "model.value_model to the GVM directory (stage 1 output)")
        if (Need.SCORES in needs or Need.GREEDY_BASELINE in needs) and not hp.reward_model:
            raise ValueError(f"{type(self.estimator).__name__} needs a reward model: set "
                             "model.reward_model to the reward-model directory")
        if hp.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"model.kl_estimator={hp.kl_estimator!r} is not one of k1, k2, k3")
        if hp.ppo_epochs < 1 or hp.grad_accum < 1:
            raise ValueError("model.ppo_epochs and model.grad_accum must be >= 1")
        if hp.score_batch_size is not None and hp.score_batch_size < 1:
            raise ValueError(f"model.score_batch_size={hp.score_batch_size} must be >= 1, or "
                             "null to score a whole batch in one pass")
        for key, allowed in (("on_nonfinite", ("stop", "skip")),
                             ("on_kl_exceeded", ("stop", "warn"))):
            if hp[key] not in allowed:
                raise ValueError(f"model.{key}={hp[key]!r} is not one of {', '.join(allowed)}")

    @functools.cached_property
    def frozen_identity(self) -> dict[str, dict | None]:
        """What a resumed run must load again: role → ``{path, sha256 of the weights}``.
        Hashed at the first checkpoint save or load, not at start-up (large weights)."""
        hp = self.hparams
        return {"reference": fingerprint(hp.reference or hp.policy),
                "gvm": fingerprint(hp.value_model) if "gvm" in self.frozen else None,
                "reward_model": fingerprint(hp.reward_model)
                if "reward_model" in self.frozen else None}

    @property
    def policy(self) -> nn.Module:
        return self.trained["policy"]

    def _logps(self, model: nn.Module):
        """``seq ↦ log π(y | x)`` of ``model`` (the log-probs alone, for :func:`by_rows`)."""
        fused = self.hparams.fused_head
        return lambda *seq: policy_logps(model, *seq, fused_head=fused)[0]

    def reference_logps(self, *seq: Tensor) -> Tensor:
        """``log π_ref`` of the responses in ``seq`` (see :func:`policy_logps`)."""
        if self.shared_reference:
            with adapters_disabled(self.policy):
                return self._logps(self.policy)(*seq)
        return self._logps(self.frozen["reference"])(*seq)

    @property
    def model(self) -> nn.Module:
        """The trained policy (what evaluation callbacks generate with)."""
        return self.trained["policy"]

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        check_rollout_batch(getattr(dm, "batch_size", 1), getattr(dm, "group_size", 1),
                            self.estimator.group_size, self.hparams.mini_batch_size)
        if self.hparams.offload_frozen and getattr(self.trainer.strategy, "zero_stage_3", False):
            raise ValueError("model.offload_frozen=true cannot move ZeRO-3 partitioned weights "
                             "between devices. Fix: set it to false and use "
                             "configs/deepspeed/zero3_offload.yaml (DeepSpeed's own offload)")
        longest = getattr(dm, "max_length", 0) + self.hparams.max_new_tokens
        for part in (*self.trained.values(), *self.frozen.values()):
            check_fits_context(longest, getattr(part, "backbone", part).config,
                               "data.max_prompt_length + model.max_new_tokens")

    @property
    def _offloading(self) -> bool:
        return bool(self.hparams.offload_frozen) and self.device.type != "cpu"

    @contextlib.contextmanager
    def frozen_on_device(self):
        """The frozen models on the compute device inside the block; with ``offload_frozen``
        they go back to CPU memory after it (a no-op on CPU or without offloading)."""
        offload = self._offloading
        if offload:
            self.frozen.to(self.device)
        try:
            yield
        finally:
            if offload:
                self.frozen.to("cpu")

    def _offload_frozen_now(self) -> None:
        if self._offloading:
            self.frozen.to("cpu")  # Lightning moved the whole module to the device at set-up

    def on_validation_start(self) -> None:  # the whole evaluation uses them: move once
        if self._offloading:
            self.frozen.to(self.device)

    def on_validation_end(self) -> None:
        self._offload_frozen_now()

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def make_experience(self, batch: dict) -> tuple[Experience, dict]:
        """Generate, then fetch exactly what the estimator needs."""
        needs = self.estimator.needs
        timing = {}
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        self.policy.eval()
        with gathered_for_generation(self.policy):
            response_ids, response_mask = self.generator.generate(
                self.policy, prompt_ids, prompt_mask, self.sampling)
            baseline_ids = baseline_mask = None
            if Need.GREEDY_BASELINE in needs:
                baseline_ids, baseline_mask = self.generator.generate(
                    self.policy, prompt_ids, prompt_mask,
                    SamplingConfig(self.sampling.max_new_tokens, greedy=True,
                                   min_new_tokens=self.sampling.min_new_tokens))
        timing["generate"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        seq = (prompt_ids, prompt_mask, response_ids, response_mask)
        rows = self.hparams.score_batch_size
        with self.frozen_on_device():
            logp_old = by_rows(self._logps(self.policy), rows, *seq)
            logp_ref = by_rows(self.reference_logps, rows, *seq)
            values = scores = baseline = None
            if Need.GVM_VALUES in needs:
                values = by_rows(functools.partial(response_values, self.frozen["gvm"]),
                                 rows, *seq)
            if Need.CRITIC_VALUES in needs:
                values = by_rows(functools.partial(response_values, self.trained["critic"]),
                                 rows, *seq)
            if Need.SCORES in needs or Need.GREEDY_BASELINE in needs:
                rm_score = functools.partial(sequence_scores, self.frozen["reward_model"])
                if Need.SCORES in needs:
                    scores = by_rows(rm_score, rows, *seq)
                if Need.GREEDY_BASELINE in needs:
                    baseline = by_rows(rm_score, rows, prompt_ids, prompt_mask, baseline_ids,
                                       baseline_mask)
        kl = kl_estimate(logp_old, logp_ref, self.hparams.kl_estimator, response_mask)
        kl_penalty = kl * self.kl_ctl.coef if self.hparams.kl_in_reward else torch.zeros_like(kl)
        self.policy.train()
        timing["score"] = time.perf_counter() - t1
        exp = Experience(prompt_ids, prompt_mask, response_ids, response_mask, logp_old,
                         logp_ref, kl_penalty, values, scores,
                         batch["group_ids"] if Need.GROUPS in needs else None, baseline)
        info = {"kl": kl, "timing": timing}
        if self.task is not None:
            info["gold"] = self._gold(batch["prompts"], response_ids, response_mask)
        return exp, info

    def _gold(self, prompts: list, response_ids: Tensor, response_mask: Tensor) -> Tensor:
        return torch.tensor(gold_scores(self.task, self.tokenizer, prompts, response_ids,
                                        response_mask), device=response_ids.device)

    # ------------------------------------------------------------------ update
    def training_step(self, batch: dict, batch_idx: int) -> None:
        t_start = time.perf_counter()
        try:
            exp, info = self.make_experience(batch)
        except RuntimeError as e:  # sampling from NaN / inf logits fails inside generate
            if "probability tensor contains" not in str(e):
                raise
            self._guard("generation", {"logits": torch.tensor(float("nan"))})
            return self._skip_step()
        mask = exp.response_mask
        values_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        if self._guard("the rollout", {
                "scores": exp.scores, "baseline_scores": exp.baseline_scores,
                "values": exp.values, "logp_old": exp.logp_old, "logp_ref": exp.logp_ref,
                "kl": info["kl"]}, {"values": values_mask, "logp_old": mask, "logp_ref": mask,
                                    "kl": mask}):
            return self._skip_step()
        seq_kl = (info["kl"] * mask).sum(1)
        self._check_kl(float(all_reduce_sum(seq_kl.sum()) / all_reduce_sum(
            torch.tensor(float(exp.batch_size), device=mask.device))))
        self.estimator.check(exp)
        advantages, returns = self.estimator(exp)
        if self.hparams.whiten_advantages:
            advantages = global_whiten(advantages, exp.response_mask)
        if self._guard("the advantage estimate", {"advantages": advantages, "returns": returns},
                       {"advantages": mask, "returns": mask}):
            return self._skip_step()
        t_update = time.perf_counter()
        stats = self.ppo_update(exp, advantages, returns)
        self.rl_step += 1
        self.kl_ctl.update(float(seq_kl.mean()), exp.batch_size)
        bs = exp.batch_size
        logs = {
            "rollout/kl_to_ref": seq_kl.mean(),
            "rollout/response_len": mask.sum(1).float().mean(),
            "rollout/eos_frac": (exp.response_ids == self.tokenizer.eos_token_id).any(1)
            .float().mean(),
            "adv/mean": masked_mean(advantages, mask),
            "adv/std": (masked_mean(advantages ** 2, mask)
                        - masked_mean(advantages, mask) ** 2).clamp(min=0).sqrt(),
            "train/kl_coef": torch.tensor(self.kl_ctl.coef),
            "timing/generate_s": torch.tensor(info["timing"]["generate"]),
            "timing/score_s": torch.tensor(info["timing"]["score"]),
            "timing/update_s": torch.tensor(time.perf_counter() - t_update),
            "perf/step_s": torch.tensor(time.perf_counter() - t_start),
            "perf/gen_tokens_per_s": mask.sum() / max(info["timing"]["generate"], 1e-9),
            "guard/skipped_steps": torch.tensor(float(self.guard_skips)),
            **stats,
        }
        if exp.scores is not None:
            logs["rollout/score_mean"] = exp.scores.mean()
            logs["rollout/score_std"] = exp.scores.std() if bs > 1 else torch.tensor(0.0)
        if "gold" in info:
            logs["rollout/gold_reward"] = info["gold"].mean()
        if exp.values is not None and self.estimator.trains_critic:
            v = exp.values[:, :-1]
            var_r = returns[mask].var()
            logs["critic/explained_variance"] = 1 - (returns - v)[mask].var() / (var_r + 1e-8)
        if torch.cuda.is_available():
            logs["perf/peak_mem_gb"] = torch.tensor(torch.cuda.max_memory_allocated() / 2**30)
        self.log_dict({k: v.float() if isinstance(v, Tensor) else v for k, v in logs.items()},
                      batch_size=bs, prog_bar=False)
        self.log("rl_step", float(self.rl_step), prog_bar=True, batch_size=bs)
        self.cost_log.append({
            "step_s": float(logs["perf/step_s"]),
            **{f"{k}_s": v for k, v in info["timing"].items()},
            "update_s": float(logs["timing/update_s"]), "gen_tokens": float(mask.sum()),
            **({"gold": float(info["gold"].mean())} if "gold" in info else {}),
            "kl": float(seq_kl.mean()),
            **({"score": float(exp.scores.mean())} if exp.scores is not None else {})})

    def ppo_update(self, exp: Experience, advantages: Tensor, returns: Tensor) -> dict:
        """K epochs of clipped policy-gradient (and critic) updates over mini-batches."""
        hp = self.hparams
        opt = self.optimizers()
        b = exp.batch_size
        mb = hp.mini_batch_size or b
        n_mb = b // mb
        acc: dict[str, list[Tensor]] = {}
        skipped = 0
        step_in_accum = 0
        for _ in range(hp.ppo_epochs):
            perm = torch.randperm(b, device=exp.response_ids.device)
            for i in range(n_mb):
                idx = perm[i * mb:(i + 1) * mb]
                sub = exp.index(idx)
                adv, ret, mask = advantages[idx], returns[idx], sub.response_mask
                seq = (sub.prompt_ids, sub.prompt_mask, sub.response_ids, mask)
                n_tok, n_seq = loss_counts(mask)
                logp, entropy = policy_logps(self.policy, *seq, with_entropy=True,
                                             fused_head=hp.fused_head)
                pg_loss, st = ppo_clip_loss(logp, sub.logp_old, adv, mask, hp.clip_eps,
                                            hp.clip_eps_high, hp.loss_aggregation, n_tok, n_seq)
                loss = pg_loss
                if not hp.kl_in_reward:
                    kl_tok = kl_estimate(logp, sub.logp_ref, hp.kl_estimator, mask)
                    kl_loss = aggregate(kl_tok, mask, hp.loss_aggregation, n_tok, n_seq)
                    loss = loss + self.kl_ctl.coef * kl_loss
                    acc.setdefault("train/kl_loss", []).append(kl_loss.detach())
                if "critic" in self.trained:
                    v_new = response_values(self.trained["critic"], *seq)[:, :-1]
                    v_loss = clipped_value_loss(v_new, sub.values[:, :-1], ret, mask,
                                                hp.value_clip, hp.loss_aggregation, n_tok, n_seq)
                    loss = loss + hp.vf_coef * v_loss
                    acc.setdefault("train/value_loss", []).append(v_loss.detach())
                # one all-reduce decides both skips, so every rank skips together
                bad_loss = nonfinite_names({"loss": loss.detach()})
                explode, nonfinite = all_reduce_sum(torch.tensor(
                    [float(st["ratio_mean"] > hp.ratio_skip_threshold), float(bool(bad_loss))],
                    device=mask.device)).tolist()
                if nonfinite:
                    self._on_nonfinite(bad_loss, "the PPO update")
                if nonfinite or explode:
                    skipped += 1
                    continue
                self.manual_backward(loss / hp.grad_accum)
                step_in_accum += 1
                if step_in_accum == hp.grad_accum:
                    acc.setdefault("train/grad_norm", []).append(self._clip_and_step(opt))
                    step_in_accum = 0
                acc.setdefault("train/policy_loss", []).append(pg_loss.detach())
                acc.setdefault("train/entropy", []).append(masked_mean(entropy.detach(), mask))
                for k in ("approx_kl", "clipfrac"):
                    acc.setdefault(f"train/{k}", []).append(st[k])
            if step_in_accum:  # an epoch's last, partial accumulation (or one cut by a skip)
                acc.setdefault("train/grad_norm", []).append(self._clip_and_step(opt))
                step_in_accum = 0
        out = {k: torch.stack([x.float() for x in v]).mean() for k, v in acc.items()}
        out["train/skipped_minibatches"] = torch.tensor(float(skipped))
        return out

    def _clip_and_step(self, opt) -> Tensor:
        """Clip (Lightning's way: correct under AMP, a no-op under DeepSpeed, which clips
        itself) and step; returns the gradient norm before clipping, for the log. A
        non-finite gradient stops the run or, with ``on_nonfinite=skip``, drops the step."""
        grads = [p.grad for p in self.trained.parameters() if p.grad is not None]
        norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads else torch.zeros(()))
        # local check: after DDP's all-reduce every rank holds the same gradient
        if self._guard("the PPO update", {"grad_norm": norm}, reduce=False):
            opt.zero_grad(set_to_none=True)
            return torch.zeros(())
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm,
                                gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm.detach()

    def _guard(self, where: str, tensors: dict[str, Tensor | None],
               masks: dict[str, Tensor] | None = None, reduce: bool = True) -> bool:
        """True when a tensor is non-finite (on any process, with ``reduce``) and the step is
        to be skipped; raises :class:`NonFiniteError` when the run is to stop."""
        names = nonfinite_names(tensors, masks)
        bad = bool(names)
        if reduce:
            device = next(self.trained.parameters()).device
            bad = float(all_reduce_sum(torch.tensor(float(bad), device=device))) > 0
        return bad and self._on_nonfinite(names, where)

    def _on_nonfinite(self, names: list[str], where: str) -> bool:
        """Stop (``on_nonfinite=stop``: raise) or count and warn, returning True (skip)."""
        names = names or ["a tensor on another process"]
        if self.hparams.on_nonfinite == "stop":
            raise NonFiniteError(nonfinite_message(
                names, where, self.rl_step + 1,
                "stopping before anything is saved: the last checkpoint is the last good one"))
        rank_zero_warn(nonfinite_message(names, where, self.rl_step + 1, "skipping it"))
        self.guard_skips += 1
        return True

    def _skip_step(self) -> None:
        """Count a skipped rollout as consumed (its prompts are not replayed) and log it."""
        self.rl_step += 1
        self.log("guard/skipped_steps", float(self.guard_skips), batch_size=1)

    def _check_kl(self, kl: float) -> None:
        """Compare the rollout's mean KL per response with ``max_kl`` (stop or warn)."""
        bound = self.hparams.max_kl
        if bound is None or kl <= bound:
            return
        msg = (f"the rollout's KL to the reference, {kl:.4f} nats per response at RL step "
               f"{self.rl_step + 1}, exceeds model.max_kl={bound}: the policy is drifting from "
               "the reference. Raise model.kl_coef, lower model.lr, or raise model.max_kl")
        self.log("guard/kl_exceeded", 1.0, batch_size=1)
        if self.hparams.on_kl_exceeded == "stop":
            raise KLBoundError(msg + "; the last checkpoint is the last good one.")
        rank_zero_warn(msg + " (on_kl_exceeded=warn: going on).")

    def configure_optimizers(self):
        hp = self.hparams
        def trainable(m: nn.Module) -> list:
            return [p for p in m.parameters() if p.requires_grad]  # (LoRA: the adapters)

        groups = [{"params": trainable(self.trained["policy"]), "lr": hp.lr}]
        if "critic" in self.trained:
            groups.append({"params": trainable(self.trained["critic"]),
                           "lr": hp.critic_lr or hp.lr})
        return adamw(groups, hp.lr, hp.weight_decay)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate_batch(self, model: nn.Module, batch: dict,
                        is_reference: bool = False) -> dict[str, Tensor]:
        """Held-out metrics of ``model``'s responses; ``is_reference``: ``model`` is the
        reference itself, so its log-probs are the reference's (no second pass)."""
        cfg = SamplingConfig(self.sampling.max_new_tokens, self.sampling.temperature,
                             self.sampling.top_p, self.sampling.top_k,
                             greedy=self.hparams.eval_greedy or self.sampling.greedy)
        ids, pmask = batch["prompt_ids"], batch["prompt_mask"]
        resp, rmask = self.generator.generate(model, ids, pmask, cfg)
        seq = (ids, pmask, resp, rmask)
        rows = self.hparams.score_batch_size
        logp = by_rows(self._logps(model), rows, *seq)
        logp_ref = logp if is_reference else by_rows(self.reference_logps, rows, *seq)
        out = {"kl_to_ref": (kl_estimate(logp, logp_ref, "k1", rmask) * rmask).sum(1),
               "response_len": rmask.sum(1).float()}
        if "reward_model" in self.frozen:
            out["rm_score"] = by_rows(functools.partial(
                sequence_scores, self.frozen["reward_model"]), rows, *seq)
        if self.task is not None:
            out["gold_reward"] = self._gold(batch["prompts"], resp, rmask)
        return out

    def on_validation_epoch_start(self) -> None:
        self._val_rows: list[dict[str, Tensor]] = []
        self._ref_rows: list[dict[str, Tensor]] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.eval()
        with gathered_for_generation(self.policy):
            self._val_rows.append(self._evaluate_batch(self.policy, batch))
        if self._ref_eval is None and self.task is not None:
            if self.shared_reference:
                with adapters_disabled(self.policy), gathered_for_generation(self.policy):
                    self._ref_rows.append(self._evaluate_batch(self.policy, batch, True))
            else:
                self._ref_rows.append(self._evaluate_batch(self.frozen["reference"], batch,
                                                           True))
        self.policy.train()

    def on_validation_epoch_end(self) -> None:
        cat = {k: torch.cat([r[k] for r in self._val_rows]) for k in self._val_rows[0]}
        if self._ref_rows and self._ref_eval is None and not self.trainer.sanity_checking:
            ref = {k: torch.cat([r[k] for r in self._ref_rows]) for k in self._ref_rows[0]}
            self._ref_gold = ref["gold_reward"]
            self._ref_eval = {k: float(v.float().mean()) for k, v in ref.items()}
            # The policy at RL step 0 is the reference itself: the curves' first point.
            self.history.insert(0, {"step": 0, "rl_step": 0,
                                    **{f"eval/{k}": v for k, v in self._ref_eval.items()},
                                    "eval/win_rate_vs_ref": 0.5})
        metrics = {f"eval/{k}": v.float().mean() for k, v in cat.items()}
        if "gold_reward" in cat and self._ref_eval is not None:
            ref = self._ref_gold.to(cat["gold_reward"].device)
            g = cat["gold_reward"]
            metrics["eval/win_rate_vs_ref"] = ((g > ref).float() + 0.5 * (g == ref).float()).mean()
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k == "eval/gold_reward")
        if not self.trainer.sanity_checking:
            self.history.append({"step": int(self.global_step), "rl_step": self.rl_step,
                                 **{k: float(v) for k, v in metrics.items()}})

    # ------------------------------------------------------------------ state and export
    def _loaded_weights(self) -> dict[str, Tensor]:
        """State-dict entries a checkpoint need not hold: the frozen models and, with LoRA,
        the trained parts' frozen base weights — all reloaded from their directories (whose
        hashes a resume checks)."""
        out = {f"frozen.{k}": v for k, v in self.frozen.state_dict().items()}
        out.update(reloaded_weights(self.trained, "trained."))
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_reloaded(checkpoint, self._loaded_weights())
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["eval_history"] = self.history
        checkpoint["rl_state"] = {"rl_step": self.rl_step, "cost_log": self.cost_log,
                                  "ref_eval": self._ref_eval,
                                  "ref_gold": getattr(self, "_ref_gold", None),
                                  "guard_skips": self.guard_skips,
                                  "frozen_identity": self.frozen_identity,
                                  # Lightning does not save the global RNGs; sampling needs them
                                  "rng": rng_states()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_reloaded(checkpoint, self._loaded_weights())
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.history = checkpoint.get("eval_history", [])
        state = checkpoint.get("rl_state", {})
        check_same_models(state.get("frozen_identity", {}), self.frozen_identity)
        self.guard_skips = state.get("guard_skips", 0)
        self._rng_to_restore = state.get("rng")
        self.rl_step = state.get("rl_step", 0)
        self.cost_log = state.get("cost_log", [])
        self._ref_eval = state.get("ref_eval")
        if state.get("ref_gold") is not None:
            self._ref_gold = state["ref_gold"]

    def on_train_start(self) -> None:
        self._offload_frozen_now()
        # Restored here, not in on_load_checkpoint: nothing may draw from the RNGs between
        # this point and the next rollout, in the resumed run as in the uninterrupted one.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_fit_end(self) -> None:
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective: all ranks
        if not self.trainer.is_global_zero:
            return
        summary = {"estimator": type(self.estimator).__name__,
                   "estimator_args": {k: v for k, v in vars(self.estimator).items()
                                      if not k.startswith("_")},
                   "global_step": int(self.global_step), "rl_steps": self.rl_step,
                   "kl_coef": self.hparams.kl_coef, "cost": self.cost_summary(),
                   "train_curve": self.cost_log,
                   "reference_eval": self._ref_eval, "final_eval": self.history[-1]
                   if self.history else None, "history": self.history}
        if self.history:
            columns = list(self.history[-1])
            log_table(self.trainer, "eval/history", columns,
                      [[h.get(c) for c in columns] for h in self.history])
            if has_wandb(self.trainer):  # this run's learning curves as a picture
                from dvpo_lightning.report.plots import plot_learning_curves
                from dvpo_lightning.report.runs import Run

                png = plot_learning_curves([Run(summary["estimator"], 0, "", summary)],
                                           out / "learning_curves.png")
                log_files(self.trainer, {"eval/learning_curves": png})
        out.mkdir(parents=True, exist_ok=True)
        (out / self.hparams.summary_file).write_text(json.dumps(summary, indent=2, default=str))
        if summary["final_eval"]:
            rank_zero_info("final held-out evaluation: " + ", ".join(
                f"{k} {v:.4f}" for k, v in summary["final_eval"].items()
                if k not in ("step", "rl_step"))
                + (f" (reference gold {self._ref_eval['gold_reward']:.4f})"
                   if self._ref_eval else ""))
        if self.hparams.export_dir:
            def write(d):
                merged_copy(self.policy).save_pretrained(str(d))
                save_adapter(self.policy, str(Path(d) / "adapter"))
                self.tokenizer.save_pretrained(str(d))
                if "critic" in self.trained:  # judged against the GVM after training
                    self.trained["critic"].save_pretrained(Path(d) / "critic")
                    self.tokenizer.save_pretrained(str(Path(d) / "critic"))

            export_atomic(self.hparams.export_dir, write,
                          {"kind": "policy", "stage": "rl", "summary": summary})

    def cost_summary(self) -> dict[str, float]:
        """What an RL step cost on this process (the Table-7 analog's inputs).

        Step times are means over every step but the first (it pays one-time warm-up);
        memory is the CUDA peak when on a GPU, else the process's peak resident set size
        (which includes the Python runtime and libraries, so compare differences, not
        absolute values). Parameter counts are in millions.
        """
        log = self.cost_log[1:] or self.cost_log

        def mean(key: str) -> float:
            return sum(r[key] for r in log) / len(log) if log else 0.0

        def count(mods: list[nn.Module], trainable: bool = False) -> float:
            # a ZeRO-3 partitioned parameter is empty here; ds_numel is its full size
            return sum(getattr(p, "ds_numel", p.numel()) for m in mods for p in m.parameters()
                       if p.requires_grad or not trainable) / 1e6

        out = {"rl_steps": len(self.cost_log), "step_s": mean("step_s"),
               "generate_s": mean("generate_s"), "score_s": mean("score_s"),
               "update_s": mean("update_s"), "gen_tokens_per_step": mean("gen_tokens"),
               "gen_tokens_total": sum(r["gen_tokens"] for r in self.cost_log),
               "params_loaded_m": count([self.trained, self.frozen]),
               "params_trained_m": count([self.trained], trainable=True),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if torch.cuda.is_available():
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out
