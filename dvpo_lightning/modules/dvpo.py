"""One RL LightningModule for DVPO and every baseline: only the estimator differs.

An RL step reads as the algorithm: make experience → guard → advantages → normalise → K PPO
epochs over mini-batches → move β → log. Each part it uses does one job: the experience maker
(frozen models, generation, the one table of estimator needs), the KL penalty (estimator,
where β acts, controller, bound), the step guard, and the callbacks every stage shares (run
summary, cost accounting, export).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dvpo_lightning.estimators.base import AdvantageEstimator
from dvpo_lightning.models.compat import check_fits_context
from dvpo_lightning.models.frozen_dtype import cast_frozen
from dvpo_lightning.models.identity import check_same_models, fingerprint
from dvpo_lightning.models.loading import load_tokenizer
from dvpo_lightning.models.options import ModelOptions
from dvpo_lightning.modules.evaluation import HeldOutEvaluation, test_loader
from dvpo_lightning.modules.kl_penalty import KLPenalty, KLSettings
from dvpo_lightning.modules.optim import RLOptimSettings, adamw
from dvpo_lightning.modules.ppo import PPOSettings, check_behaviour_source, minibatch_loss
from dvpo_lightning.modules.reward_scale import RewardScale, RewardSettings
from dvpo_lightning.modules.rl_models import load_rl_models
from dvpo_lightning.modules.stage import stage_callbacks
from dvpo_lightning.ops.masked import masked_mean
from dvpo_lightning.refresh.refresher import Refresher
from dvpo_lightning.refresh.settings import RefreshSettings
from dvpo_lightning.refresh.setup import check_refresh, make_refresher, refresh_inputs
from dvpo_lightning.rollout.end_tokens import end_token_ids, finished
from dvpo_lightning.rollout.engines import make_generator
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator
from dvpo_lightning.rollout.experience import Experience
from dvpo_lightning.rollout.experience_maker import ExperienceMaker, check_rollout_batch
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.runtime.checkpointing import drop_reloaded, reloaded_weights, restore_reloaded
from dvpo_lightning.runtime.deepspeed import (
    FrozenInFloat32,
    casts_every_parameter,
    configure_deepspeed,
    deepspeed_engine,
    deepspeed_step,
    local_grad_norm,
    start_forward,
    zero_engine,
)
from dvpo_lightning.runtime.distributed import (
    all_reduce_max,
    all_reduce_sum,
    global_mean,
    global_whiten,
)
from dvpo_lightning.runtime.guards import (
    GuardSettings,
    NonFiniteError,
    SamplerMismatchError,
    StepGuard,
    nonfinite_message,
    nonfinite_names,
)
from dvpo_lightning.runtime.steps import one_global_step
from dvpo_lightning.runtime.timing import phase_clock
from dvpo_lightning.tasks.judges import load_judge


class DVPOModule(L.LightningModule):
    """PPO-style policy optimisation with a pluggable advantage estimator.

    ``trainer.max_steps`` and ``trainer.val_check_interval`` both count RL steps (rollouts),
    across passes over the prompt file (``STEP_UNIT``).

    Args:
        policy: the starting policy (the SFT model's directory, a GGUF file, a named model);
            also the reference unless ``reference`` is set.
        estimator: the advantage estimator (``class_path``): ``GVM`` (DVPO), ``GAE`` (PPO),
            ``GRPO``, ``ReMax``, ``RLOO``, ``REINFORCEPP`` or ``REINFORCEPPBaseline``; what it
            declares it needs decides what loads.
        reference: the frozen reference policy of the KL; None: the starting policy (with
            ``models.lora``: the policy itself with its adapters off, no second copy).
        value_model: the frozen Global Value Model (estimators that need its values).
        reward_model: the frozen scalar reward model (estimators that need scores).
        critic_init: the PPO critic's starting weights; None: the reward model (as in the
            paper's PPO), else the policy.
        tokenizer: the tokenizer; None: the policy's. The CLI links it to ``data.tokenizer``.
        judge: what scores every rollout and held-out answer as the gold reward: a registered
            judge (the embedded tasks' ``sorting``, ``instruct``) or a ``package.module:function``
            taking ``(prompt, response)`` (:mod:`dvpo_lightning.tasks.judges`); None for data
            without one (evaluation then reports the KL, lengths and the run's own GVM / reward
            model scores).
        optim: the optimizer (AdamW, the policy's and the critic's learning rates).
        export_dir: where the trained policy (and the critic, in ``critic/``) is written at
            the end of ``fit``; None writes nothing.
        models: how the models load and run (LoRA, attention kernel, precision, offloading).
        rollout: how responses are generated and scored.
        kl: the KL to the reference.
        ppo: the clipped policy-gradient update.
        guards: the numerical guards.
        reward: how the frozen scorer's output reaches the estimator (one scale for every
            method: :mod:`~dvpo_lightning.modules.reward_scale`).
        refresh: refresh the frozen GVM (semi-online DVPO) or reward model (the other methods)
            from new labels every few RL steps (off by default: it stays frozen;
            :mod:`~dvpo_lightning.refresh`).
    """

    STEP_UNIT = "RL step"

    def __init__(
        self,
        policy: str,
        estimator: AdvantageEstimator,
        reference: str | None = None,
        value_model: str | None = None,
        reward_model: str | None = None,
        critic_init: str | None = None,
        tokenizer: str | None = None,
        judge: str | None = None,
        optim: RLOptimSettings = RLOptimSettings(),
        export_dir: str | None = None,
        models: ModelOptions = ModelOptions(),
        rollout: RolloutSettings = RolloutSettings(),
        kl: KLSettings = KLSettings(),
        ppo: PPOSettings = PPOSettings(),
        guards: GuardSettings = GuardSettings(),
        reward: RewardSettings = RewardSettings(),
        refresh: RefreshSettings = RefreshSettings(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator"])
        check_behaviour_source(ppo, rollout.engine)
        scorer = load_judge(judge) if judge else None  # (a bad name fails before models load)
        # (the labeller, the replay and prompt files: checked before models load too)
        refresher = make_refresher(refresh, estimator.needs, type(estimator).__name__,
                                   value_model, reward_model)
        tok = load_tokenizer(tokenizer or policy)
        loaded = load_rl_models(estimator.needs, type(estimator).__name__, tok, policy,
                                reference, value_model, reward_model, critic_init, models)
        experience = ExperienceMaker(
            estimator.needs, estimator.group_size, loaded.frozen,
            make_generator(rollout, end_token_ids(tok, loaded.trained["policy"]),
                           tok.pad_token_id), rollout, tok,
            scorer, loaded.shared_reference, models.fused_head,
            models.offload_frozen)
        self._assemble(loaded.trained, experience, estimator, loaded.identity, optim, export_dir,
                       models, kl, ppo, guards, reward, refresher)

    @classmethod
    def from_parts(cls, trained: nn.ModuleDict, experience: nn.Module,
                   estimator: AdvantageEstimator, **settings) -> DVPOModule:
        """A module around parts built elsewhere: tests drive the RL step with a small stand-in
        experience source this way, in milliseconds, without model directories.

        Args:
            trained: ``policy`` (and ``critic``), modules that
                :func:`~dvpo_lightning.rollout.scoring.policy_logps` can run.
            experience: an :class:`ExperienceMaker` (a test's subclass overrides ``forward``,
                ``(policy, batch, critic, weights_version) ↦ (Experience, info)``).
            estimator: the advantage estimator.
            **settings: ``optim``, ``kl``, ``ppo``, ``guards``, ``reward``, ``models`` as in
                ``__init__``, and ``refresher``: a :class:`Refresher` (or None).
        """
        self = cls.__new__(cls)
        L.LightningModule.__init__(self)
        defaults = {"optim": RLOptimSettings(), "export_dir": None, "models": ModelOptions(),
                    "kl": KLSettings(), "ppo": PPOSettings(), "guards": GuardSettings(),
                    "reward": RewardSettings(), "refresher": None}
        unknown = set(settings) - set(defaults)
        if unknown:
            raise TypeError(f"DVPOModule.from_parts: unknown settings {sorted(unknown)}; "
                            f"valid: {sorted(defaults)}")
        hp = {**defaults, **settings}
        self.save_hyperparameters(hp)
        self._assemble(trained, experience, estimator, {}, hp["optim"], hp["export_dir"],
                       hp["models"], hp["kl"], hp["ppo"], hp["guards"], hp["reward"],
                       hp["refresher"])
        return self

    def _assemble(self, trained: nn.ModuleDict, experience: nn.Module,
                  estimator: AdvantageEstimator, identity: dict[str, str | None],
                  optim: RLOptimSettings, export_dir: str | None, models: ModelOptions,
                  kl: KLSettings, ppo: PPOSettings, guards: GuardSettings,
                  reward: RewardSettings = RewardSettings(),
                  refresher: Refresher | None = None) -> None:
        # (settings are kept as objects: under LightningCLI self.hparams holds the config dict)
        self.automatic_optimization = False
        self.trained, self.experience, self.estimator = trained, experience, estimator
        self.tokenizer = experience.tokenizer
        self.model_options, self.ppo = models, ppo
        self.optim, self.export_dir = optim, export_dir
        self.kl, self.guard = KLPenalty(kl), StepGuard(guards)
        self.reward_scale = RewardScale(reward)
        self.heldout = HeldOutEvaluation()  # the held-out evaluation, its state and summary
        self.weights_version = 0  # optimizer updates of the policy (a rollout engine's sync key)
        # the on-policy update's forward, run in the rollout for logp_old: (logp, entropy) with
        # their graph, and its seconds (ppo.behaviour_logps: auto)
        self._update_pass: tuple[Tensor, Tensor] | None = None
        self._update_pass_s = 0.0
        self.identity_paths = identity  # role → path a resumed run must find again
        self.refresher = refresher  # (None: the frozen models stay frozen)

    @property
    def policy(self) -> nn.Module:
        return self.trained["policy"]

    @property
    def critic(self) -> nn.Module | None:
        return self.trained["critic"] if "critic" in self.trained else None

    @property
    def frozen(self) -> nn.ModuleDict:
        """The frozen reference, GVM and reward model (those the run needs)."""
        return self.experience.frozen

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if hasattr(dm, "batch_size"):  # (no DataModule, e.g. a bare DataLoader: none to check)
            check_rollout_batch(dm.batch_size, self.estimator.group_size,
                                self.ppo.mini_batch_size)
        if self.model_options.offload_frozen and getattr(self.trainer.strategy,
                                                          "zero_stage_3", False):
            raise ValueError("model.init_args.models.offload_frozen=true cannot move ZeRO-3 "
                             "partitioned weights between devices. Fix: set it to false and use "
                             "configs/deepspeed/zero3_offload.yaml (DeepSpeed's own offload)")
        device, prompt_length = self.trainer.strategy.root_device, getattr(dm, "max_length", 0)
        self.experience.follow_precision(self.trainer.precision)  # (vllm.dtype: auto)
        self.logp_tolerance, self._tolerance_origin = self.experience.sampler_tolerance(
            self.trainer.precision, device)
        longest = self.experience.longest_sequence(prompt_length)
        for part in (*self.trained.values(), *self.frozen.values()):
            check_fits_context(longest, getattr(part, "backbone", part).config,
                               "data.init_args.max_prompt_length + "
                               "model.init_args.rollout.max_new_tokens")
        # (vLLM: refuse before the first rollout, not in it)
        self.experience.check_servable(self.policy, device, prompt_length)
        if self.refresher is not None:
            self.refresher.attach(*refresh_inputs(self.refresher, dm, self.tokenizer,
                                                  self.experience.longest_sequence(prompt_length)))
        frozen_dtype, line = cast_frozen(  # (frozen_dtype=auto: bfloat16 where it has kernels)
            self.frozen, self.model_options.frozen_dtype, device,
            follows_strategy=casts_every_parameter(self.trainer.strategy, self.trainer.precision))
        if line:
            rank_zero_info(line)
        self._deepspeed = configure_deepspeed(
            self.trainer.strategy, self.trainer.precision, self.ppo.max_grad_norm,
            self.ppo.grad_accum, frozen_dtype, len(self.frozen) > 0)
        if self._deepspeed is not None:
            rank_zero_info(self._deepspeed.message(list(self.frozen)))
            if self._deepspeed.keeps_frozen_float32:  # (the engine is built after setup)
                self._frozen_fp32 = FrozenInFloat32(self.frozen)

    def on_fit_start(self) -> None:
        keeper = getattr(self, "_frozen_fp32", None)
        if keeper is not None:  # DeepSpeed has cast the whole module by now
            keeper.restore()
            self._frozen_fp32 = None
        if self.refresher is not None:  # (after every cast: the model as it will train)
            check_refresh(self.frozen[self.refresher.role], self.trainer.strategy)

    def configure_optimizers(self):
        def trainable(m: nn.Module) -> list:
            return [p for p in m.parameters() if p.requires_grad]  # (LoRA: the adapters)

        o = self.optim
        groups = [{"params": trainable(self.policy), "lr": o.lr}]
        if self.critic is not None:
            groups.append({"params": trainable(self.critic), "lr": o.critic_lr or o.lr})
        return adamw(groups, o.lr, o.weight_decay, strategy=self.trainer.strategy)

    def configure_callbacks(self) -> list[L.Callback]:
        return stage_callbacks(self.export_dir)

    def on_train_start(self) -> None:
        self.trained.train()  # (loaded in eval mode, which Lightning 2.x keeps: the critic's
        # dropout and gradient checkpointing need train mode; the policy's rollouts switch)
        self.experience.place_frozen("cpu")  # offloading: Lightning moved them to the device
        # Restored here, not in on_load_checkpoint: nothing may draw from the RNGs between
        # this point and the next rollout, in the resumed run as in the uninterrupted one.
        self.heldout.restore_rng()

    # ------------------------------------------------------------------ one RL step
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, float] | None:
        step = self.global_step + 1  # this RL step's number (global_step counts RL steps)
        try:
            out = self._rl_step(batch, step)
        finally:
            self._update_pass = None  # (a skipped step drops the forward's graph here)
        self.refresh_scorer(step)  # (before the step's checkpoint: a resume never repeats it)
        return out

    def refresh_scorer(self, step: int) -> None:
        """Refresh the frozen GVM (semi-online DVPO) or reward model from new labels when a
        refresh is due after RL step ``step`` (:class:`~dvpo_lightning.refresh.refresher.
        Refresher`), and log it."""
        if self.refresher is None or not self.refresher.due(step):
            return
        sample = functools.partial(self.experience.sample, self.policy,
                                   weights_version=self.weights_version)
        with self.experience.frozen_on(self.device):
            logs = self.refresher(self.frozen[self.refresher.role], sample, self.tokenizer,
                                  self.experience.end_ids, step, self.device)
        self.log_dict(logs, batch_size=1)

    def _rl_step(self, batch: dict, step: int) -> dict[str, float] | None:
        """The RL step: rollout, reward scale, KL, guards, advantages, the PPO update."""
        with one_global_step(self.optimizers()):
            exp, info = self.make_experience(batch, step)
            if exp is None:
                return self._skipped()
            exp = self.reward_scale(exp, self.estimator.needs)  # (before β acts on it)
            exp, kl = self.kl.in_reward(exp)
            info.update(self._sampler_gap(exp, step, info.pop("logp_trainer_rows", None)))
            if self._rollout_is_bad(exp, kl, step):
                return self._skipped()
            # one observation of the rollout's KL per response, over every process's
            # responses: the bound, the controller and the log all read it
            kl_mean, n_responses = global_mean((kl * exp.response_mask).sum(1))
            if self.kl.check_bound(kl_mean, step):
                self.log("guard/kl_exceeded", 1.0, batch_size=1)
            advantages, returns = self.advantages(exp)
            if self.guard.check("the advantage estimate", step, {
                    "advantages": advantages, "returns": returns},
                    {"advantages": exp.response_mask, "returns": exp.response_mask},
                    reduce_on=self.device):
                return self._skipped()
            t_update = phase_clock(self.device)
            stats = self.ppo_update(exp, advantages, returns)
            # (the update's forward, when the rollout ran it, is the update's time)
            info["update_s"] = phase_clock(self.device) - t_update + self._update_pass_s
            info["score_s"] -= self._update_pass_s
            self.kl.update(kl_mean, n_responses)
        return self._log_step(exp, advantages, returns, kl_mean, info, stats)

    def _rollout_is_bad(self, exp: Experience, kl: Tensor, step: int) -> bool:
        """The step guard on everything the rollout produced (True: skip the step)."""
        mask = exp.response_mask
        return self.guard.check("the rollout", step, {
            "scores": exp.scores, "baseline_scores": exp.baseline_scores, "values": exp.values,
            "logp_old": exp.logp_old, "logp_ref": exp.logp_ref, "kl": kl},
            {"values": _with_first_column(mask), "logp_old": mask, "logp_ref": mask,
             "kl": mask}, reduce_on=self.device)

    def advantages(self, exp: Experience) -> tuple[Tensor, Tensor]:
        """The estimator's ``(advantages, returns)``, whitened over every process's tokens
        when the estimator or ``ppo.whiten_advantages`` asks (once, never twice)."""
        advantages, returns = self.estimator(exp)
        if self.ppo.whiten_advantages or self.estimator.whitens:
            advantages = global_whiten(advantages, exp.response_mask)
        return advantages, returns

    def make_experience(self, batch: dict, step: int) -> tuple[Experience | None, dict]:
        """The experience maker's rollout; (None, {}) when sampling met NaN / inf logits and
        the guard skips the step."""
        self._update_pass_s = 0.0
        behaviour = self._update_forward if self._fuses_update_forward(batch) else None
        # (passed only when set: a test's ExperienceMaker subclass need not know the keyword)
        engine = {"engine_behaviour": True} if self.ppo.behaviour_logps == "engine" else {}
        try:
            return self.experience(self.policy, batch, self.critic, self.weights_version,
                                   behaviour=behaviour, **engine)
        except RuntimeError as e:  # sampling from NaN / inf logits fails inside generate
            if "probability tensor contains" not in str(e):
                raise
            self.policy.train()
            self.guard.check("generation", step, {"logits": torch.tensor(float("nan"))},
                             reduce_on=self.device)
            return None, {}

    def _fuses_update_forward(self, batch: dict) -> bool:
        """``ppo.behaviour_logps: auto`` and this rollout's update on-policy: ``logp_old``
        comes from the update's own forward pass (:meth:`_update_forward`)."""
        responses = batch["prompt_ids"].shape[0] * self.experience.group_size
        return self.ppo.behaviour_logps == "auto" and self.ppo.on_policy(responses)

    def _update_forward(self, *seq: Tensor) -> Tensor:
        """The on-policy update's forward pass, run when the rollout needs ``logp_old``: the
        policy in train mode with gradients, as the update runs it; ``logp_old`` is its
        log-probs detached (so the ratio is exactly 1), and :meth:`ppo_update` back-propagates
        through the same pass instead of running it again (TRL's GRPOTrainer does the same
        at one iteration per batch)."""
        t0 = phase_clock(self.device)
        was_training = self.policy.training
        with torch.enable_grad():
            self.policy.train()
            start_forward(deepspeed_engine(self.trainer))
            logp, entropy = policy_logps(self.policy, *seq, with_entropy=True,
                                         fused_head=self.model_options.fused_head,
                                         sampling=self.experience.policy_transform)
        self.policy.train(was_training)  # (the rollout's scoring goes on in its own mode)
        self._update_pass = (logp, entropy)
        self._update_pass_s = phase_clock(self.device) - t0
        return logp.detach()

    def ppo_update(self, exp: Experience, advantages: Tensor, returns: Tensor) -> dict:
        """K epochs of clipped policy-gradient (and critic) updates over mini-batches; the
        means of their diagnostics."""
        s, opt = self.ppo, self.optimizers()
        b = exp.batch_size
        # the distribution the rollout sampled from, as logp_old (docs/sampling.md)
        sampling = self.experience.policy_transform
        stats: dict[str, list[Tensor]] = defaultdict(list)
        skipped = pending = 0
        engine = deepspeed_engine(self.trainer)
        ran, self._update_pass = self._update_pass, None  # (used once: its graph is freed)
        for _ in range(s.epochs):
            for idx in torch.randperm(b, device=exp.response_ids.device).split(
                    s.mini_batch_size or b):
                if ran is None:
                    start_forward(engine)
                forward = None if ran is None else (ran[0][idx], ran[1][idx])
                ran = None
                loss, ratio_mean, st = minibatch_loss(
                    self.policy, self.critic, exp.index(idx), advantages[idx], returns[idx], s,
                    self.kl, self.model_options.fused_head, sampling, forward)
                if self._skip_minibatch(loss, ratio_mean):
                    skipped += 1
                    continue
                self.manual_backward(loss / s.grad_accum)
                pending += 1
                if pending == s.grad_accum:
                    stats["train/grad_norm"].append(self._clip_and_step(opt))
                    pending = 0
                for k, v in st.items():
                    stats[k].append(v)
            if pending:  # an epoch's last, partial accumulation (or one cut by a skip)
                stats["train/grad_norm"].append(self._clip_and_step(opt))
                pending = 0
        out = {k: torch.stack([x.float() for x in v]).mean() for k, v in stats.items()}
        out["train/skipped_minibatches"] = torch.tensor(float(skipped))
        return out

    def _skip_minibatch(self, loss: Tensor, ratio_mean: Tensor) -> bool:
        """A non-finite loss (the guard stops or skips) or a mean ratio past the threshold;
        one all-reduce decides both, so every rank skips together."""
        bad_loss = nonfinite_names({"loss": loss.detach()})
        explode, nonfinite = all_reduce_sum(torch.tensor(
            [float(ratio_mean > self.guard.settings.ratio_skip_threshold), float(bool(bad_loss))],
            device=loss.device)).tolist()
        if nonfinite:
            self.guard.on_nonfinite(bad_loss, "the PPO update", self.global_step + 1)
        return bool(nonfinite or explode)

    def _clip_and_step(self, opt) -> Tensor:
        """Clip to ``ppo.max_grad_norm`` and step; returns the gradient norm before clipping,
        for the log. A non-finite gradient stops the run or, with ``on_nonfinite=skip``,
        drops the step.

        Under a plain strategy or DDP the norm comes from ``p.grad`` and Lightning clips.
        Under DeepSpeed ZeRO the engine holds the gradients (``p.grad`` is None), clips to the
        ``gradient_clipping`` :func:`configure_deepspeed` set, and skips a non-finite step
        itself: the norm and the verdict are read from it after its step."""
        step = self.global_step + 1
        engine = zero_engine(self.trainer)
        if engine is not None:
            norm, stepped = deepspeed_step(opt, engine)
            if not torch.isfinite(norm):
                if stepped:
                    raise NonFiniteError(nonfinite_message(
                        ["grad_norm"], "the PPO update", step,
                        "DeepSpeed applied that step (its overflow check is off), so the "
                        "weights are lost: the last checkpoint is the last good one"))
                self.guard.on_nonfinite(["grad_norm"], "the PPO update", step)
                return torch.zeros(())
            self.weights_version += 1
            return norm
        norm = local_grad_norm(self.trained.parameters())
        # decided locally: after DDP's all-reduce every rank holds the same gradient
        if self.guard.check("the PPO update", step, {"grad_norm": norm}):
            opt.zero_grad(set_to_none=True)
            return torch.zeros(())
        if self.ppo.max_grad_norm is not None:  # (DeepSpeed without ZeRO: a no-op, the engine
            self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm,  # clips)
                                gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.weights_version += 1
        return norm.detach()

    def _sampler_gap(self, exp: Experience, step: int,
                     trainer_rows: Tensor | None = None) -> dict[str, float]:
        """How far the rollout engine's log-probs of its samples are from the trainer's
        ``logp_old`` (mean and max of ``|Δ|`` over the tokens of every process); past
        ``rollout.vllm.logp_tolerance`` (``auto``: see :mod:`~dvpo_lightning.rollout.tolerance`)
        the run stops. {} for an engine that reports none. ``trainer_rows``: with
        ``ppo.behaviour_logps: engine`` ``logp_old`` is the engine's, and the trainer's
        log-probs of the first rows (``(k, T)``) are compared instead."""
        if exp.logp_sampler is None:
            return {}
        trainer = exp.logp_old if trainer_rows is None else trainer_rows
        rows = trainer.shape[0]
        mask = exp.response_mask[:rows]
        gap = (exp.logp_sampler[:rows] - trainer).abs() * mask
        total = all_reduce_sum(torch.stack([gap.sum(), mask.sum().to(gap.dtype)]))
        mean = float(total[0] / total[1].clamp(min=1))
        largest = float(all_reduce_max(gap.max()))
        tolerance, chosen = self.logp_tolerance, self._tolerance_origin
        if tolerance is not None and mean > tolerance:
            raise SamplerMismatchError(
                "the rollout engine's log-probs of its own samples differ from the trainer's by "
                f"{mean:.4g} per token on average (max {largest:.4g}) at RL step {step}, past "
                f"model.init_args.rollout.vllm.logp_tolerance={tolerance:g}{chosen}: the engine is "
                "likely sampling from stale or partly loaded weights (a missed push), or its "
                "precision differs from the trainer's. Fix: check the weight sync; for a known "
                "precision gap (bf16 kernels) raise the tolerance and set "
                "model.init_args.ppo.tis_cap; the last checkpoint is the last good one")
        return {"sampler_logp_diff_mean": mean, "sampler_logp_diff_max": largest}

    def _skipped(self) -> None:
        """A rollout the guards skipped still counts as an RL step (its prompts are not
        replayed); it is logged, and nothing is returned for the per-step curve."""
        self.log("guard/skipped_steps", float(self.guard.skips), batch_size=1)

    def _log_step(self, exp: Experience, advantages: Tensor, returns: Tensor, kl_mean: float,
                  info: dict, stats: dict) -> dict[str, float]:
        """Log the step's dashboard; return its record for the per-step curve and the cost.
        ``kl_mean``: the rollout's KL per response over every process's responses."""
        mask = exp.response_mask
        tokens = mask.sum()
        adv_mean = masked_mean(advantages, mask)
        logs = {
            "rollout/kl_to_ref": kl_mean,
            "rollout/response_len": mask.sum(1).float().mean(),
            "rollout/eos_frac": finished(exp.response_ids, mask,
                                         self.experience.end_ids).float().mean(),
            "adv/mean": adv_mean,
            "adv/std": (masked_mean(advantages ** 2, mask) - adv_mean ** 2).clamp(min=0).sqrt(),
            "train/kl_coef": self.kl.coef,
            "timing/generate_s": info["generate_s"], "timing/score_s": info["score_s"],
            "timing/update_s": info["update_s"],
            "timing/weight_sync_s": info.get("weight_sync_s", 0.0),
            "perf/gen_tokens_per_s": tokens / max(info["generate_s"], 1e-9),
            "guard/skipped_steps": float(self.guard.skips),
            **stats,
        }
        record = {k: info[k] for k in ("generate_s", "score_s", "update_s")}
        record["gen_tokens"] = float(tokens)
        if info["gold"] is not None:
            logs["rollout/gold_reward"] = record["gold"] = float(info["gold"].mean())
        for key in ("sampler_logp_diff_mean", "sampler_logp_diff_max"):
            if key in info:
                logs[f"rollout/{key}"] = info[key]
        record["kl"] = kl_mean
        if exp.scores is not None:
            logs["rollout/score_mean"] = record["score"] = float(exp.scores.mean())
            logs["rollout/score_std"] = float(exp.scores.std()) if exp.batch_size > 1 else 0.0
        if exp.values is not None and self.estimator.trains_critic:
            v = exp.values[:, :-1]
            logs["critic/explained_variance"] = 1 - (returns - v)[mask].var() / (
                returns[mask].var() + 1e-8)
        if torch.cuda.is_available():
            logs["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.log_dict({k: float(v) for k, v in logs.items()}, batch_size=exp.batch_size)
        return record

    # ------------------------------------------------------------------ evaluation
    @property
    def evaluator(self) -> HeldOutEvaluator:
        """Held-out evaluation with the rollout's engine and the run's frozen models (the
        experience maker's)."""
        return self.experience.evaluator

    def on_validation_start(self) -> None:  # the whole evaluation uses them: move once
        self.experience.place_frozen(self.device)

    def on_validation_end(self) -> None:
        self.experience.place_frozen("cpu")
        self.experience.sleep_engine()

    @property
    def evals(self):
        """The held-out evaluations so far (:class:`EvalHistory`)."""
        return self.heldout.history

    def _reference(self):
        return self.experience.reference(self.policy)

    def on_validation_epoch_start(self) -> None:
        self.heldout.start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.eval()
        self.heldout.step(self.evaluator, self.policy, self._reference, batch,
                          self.weights_version)
        self.policy.train()

    def on_validation_epoch_end(self) -> None:
        self.heldout.end(self, self.global_step)

    def on_train_end(self) -> None:
        """With ``data.test_path``: the policy and the reference answer the test prompts once
        (before the summary is written at the end of ``fit``)."""
        loader = test_loader(self.trainer)
        if loader is None:
            return
        self.on_validation_start()
        self.policy.eval()
        self.heldout.test(self.evaluator, self.policy, self._reference, loader, self.device,
                          self.global_step, self.weights_version,
                          self.experience.settings.test_samples)
        self.policy.train()
        self.on_validation_end()

    # ------------------------------------------------------------------ state
    @functools.cached_property
    def frozen_identity(self) -> dict[str, dict | None]:
        """role → ``{path, sha256 of the weights}``; hashed at the first checkpoint save or
        load, not at start-up (large weights)."""
        return {role: fingerprint(path) for role, path in self.identity_paths.items()}

    def _reloaded(self, saving: bool = False) -> dict[str, Tensor]:
        """State-dict entries a checkpoint need not hold: the frozen models and, with LoRA,
        the trained parts' frozen base weights — reloaded from their directories, whose
        hashes a resume checks. ``saving`` with a refresh on: not the refreshed model, whose
        weights the checkpoint keeps."""
        kept = f"{self.refresher.role}." if saving and self.refresher is not None else None
        out = {f"experience.frozen.{k}": v for k, v in self.frozen.state_dict().items()
               if not (kept and k.startswith(kept))}
        out.update(reloaded_weights(self.trained, "trained."))
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_reloaded(checkpoint, self._reloaded(saving=True))
        checkpoint["rl_state"] = {"kl": self.kl.state_dict(),
                                  "policy_updates": self.weights_version,
                                  "guard": self.guard.state_dict(),
                                  "reward_scale": self.reward_scale.state_dict(),
                                  "frozen_identity": self.frozen_identity,
                                  **self.heldout.state_dict()}  # (evals, rng)
        if self.refresher is not None:
            checkpoint["rl_state"]["refresh"] = self.refresher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_reloaded(checkpoint, self._reloaded())
        state = checkpoint.get("rl_state", {})
        check_same_models(state.get("frozen_identity", {}), self.frozen_identity)
        self.kl.load_state_dict(state["kl"])
        self.heldout.load_state_dict(state)
        self.guard.load_state_dict(state["guard"])
        self.reward_scale.load_state_dict(state.get("reward_scale", {}))
        self.weights_version = state.get("policy_updates", 0)
        self.experience.forget_weights()  # other weights, maybe the same count
        if self.refresher is not None and "refresh" in state:
            self.refresher.load_state_dict(state["refresh"])

    # ------------------------------------------------------------------ summary and export
    def summary(self) -> dict:
        """The run's numbers (RunSummary adds the cost and the per-step curve)."""
        return {"estimator": type(self.estimator).__name__,
                "estimator_args": {k: v for k, v in vars(self.estimator).items()
                                   if not k.startswith("_")},
                "rl_steps": int(self.global_step), "policy_updates": self.weights_version,
                "kl_coef": self.kl.settings.coef,
                "reward_scale": {"normalize": self.reward_scale.settings.normalize,
                                 **self.reward_scale.state_dict()},
                **({"refresh": self.refresher.summary()} if self.refresher is not None else {}),
                **self.heldout.summary()}

    def summary_tables(self) -> dict[str, tuple[list[str], list[list]]]:
        return self.heldout.tables()

    def summary_pictures(self, log_dir: Path, summary: dict) -> dict[str, Path]:
        """This run's learning curves, for W&B."""
        from dvpo_lightning.report.plots import run_learning_curves

        return run_learning_curves(summary, log_dir)

    def summary_line(self, summary: dict) -> str:
        return self.heldout.line(summary)

    def export_parts(self) -> dict[str, nn.Module]:
        """The policy; the critic too (judged against the GVM after training); a refreshed
        GVM or reward model in ``gvm/`` or ``reward_model/``."""
        refreshed = ({self.refresher.role: self.frozen[self.refresher.role]}
                     if self.refresher is not None else {})
        return {"": self.policy, **({"critic": self.critic} if self.critic is not None else {}),
                **refreshed}

    def export_manifest(self, summary: dict) -> dict:
        return {"kind": "policy", "stage": "rl", "summary": summary}


def _with_first_column(mask: Tensor) -> Tensor:
    """``(B, T + 1)``: the response mask with ``u_0``'s column (always valid) in front."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
