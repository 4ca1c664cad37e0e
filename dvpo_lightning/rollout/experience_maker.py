"""One rollout: generate responses with the policy, then fetch exactly what the advantage
estimator declared it needs (:class:`~dvpo_lightning.rollout.experience.Need`), never more.

The maker owns the frozen models (reference policy, GVM, reward model) and the generation
engine; the trained policy and critic belong to the RL module, which passes them in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.models.lora import adapters_disabled
from dvpo_lightning.ops.sampling import LogitTransform
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator
from dvpo_lightning.rollout.experience import NEED_FIELD, Experience, Need
from dvpo_lightning.rollout.generation import Generator, HFGenerator, Samples
from dvpo_lightning.rollout.gold import gold_scores
from dvpo_lightning.rollout.scoring import by_rows, policy_logps, response_values, sequence_scores
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.rollout.tolerance import engine_dtype, resolve_logp_tolerance
from dvpo_lightning.rollout.zero3 import gathered_for_generation
from dvpo_lightning.runtime.timing import phase_clock
from dvpo_lightning.tasks.judges import Judge

# ppo.behaviour_logps: engine — the trainer still scores 1 row in ENGINE_CHECK_SHARE (at least
# one) to watch the sampler gap: an eighth of the pass it saves
ENGINE_CHECK_SHARE = 8


def check_rollout_batch(batch_size: int, group_size: int,
                        mini_batch_size: int | None = None) -> None:
    """Raise unless the prompts, the groups and the mini-batches of an RL step fit together.

    One RL step samples ``group_size`` responses (the estimator's) for each of ``batch_size``
    prompts (``data.batch_size``, per process): a rollout of ``batch_size · group_size``
    responses, which PPO mini-batches must split evenly.
    """
    if batch_size < 1:
        raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}. Fix: set "
                         "data.init_args.batch_size to a positive integer")
    rollout = batch_size * group_size
    if mini_batch_size is not None and (mini_batch_size < 1 or rollout % mini_batch_size):
        fits = [d for d in range(1, rollout + 1) if rollout % d == 0]
        raise ValueError(f"the rollout batch ({rollout} responses = data.init_args.batch_size "
                         f"{batch_size} × the estimator's group_size {group_size}) must be a "
                         f"multiple of model.init_args.ppo.mini_batch_size ({mini_batch_size}). "
                         f"Fix: set model.init_args.ppo.mini_batch_size to one of {fits}, or "
                         "change data.init_args.batch_size")


def repeat_prompts(batch: dict, group_size: int) -> dict:
    """``group_size`` adjacent copies of every prompt in ``batch`` (``prompt_ids``,
    ``prompt_mask`` ``(n, P)``, ``prompts``), with ``group_ids`` ``(n · group_size,)``: the
    copies of prompt ``i`` have id ``i``."""
    n = batch["prompt_ids"].shape[0]
    out = dict(batch)
    if group_size > 1:
        out["prompt_ids"] = batch["prompt_ids"].repeat_interleave(group_size, dim=0)
        out["prompt_mask"] = batch["prompt_mask"].repeat_interleave(group_size, dim=0)
        out["prompts"] = [p for p in batch["prompts"] for _ in range(group_size)]
    out["group_ids"] = torch.arange(n, device=batch["prompt_ids"].device).repeat_interleave(
        group_size)
    return out


class ExperienceMaker(nn.Module):
    """Rollouts of the policy, scored by the frozen models the estimator needs.

    Args:
        needs: what the estimator declared.
        group_size: responses sampled per prompt (the estimator's).
        frozen: ``reference`` (unless ``shared_reference``), ``gvm``, ``reward_model``, each
            only if needed, frozen (:func:`~dvpo_lightning.modules.rl_models.load_rl_models`).
        generator: the generation engine.
        settings: the rollout settings.
        tokenizer: the policy's tokenizer.
        judge: what scores every rollout and evaluation (None: no gold reward).
        shared_reference: the reference is the policy with its LoRA adapters off.
        fused_head: log-probs with the output head in row chunks (:func:`policy_logps`).
        offload: keep ``frozen`` in CPU memory outside :meth:`frozen_on`.
    """

    def __init__(self, needs: frozenset[Need], group_size: int, frozen: nn.ModuleDict,
                 generator: Generator, settings: RolloutSettings,
                 tokenizer: PreTrainedTokenizerBase, judge: Judge | None = None,
                 shared_reference: bool = False, fused_head: bool = True,
                 offload: bool = False) -> None:
        super().__init__()
        self.needs, self.group_size = needs, group_size
        self.frozen = frozen
        self.generator, self.settings, self.tokenizer, self.judge = (generator, settings,
                                                                    tokenizer, judge)
        self.shared_reference, self.fused_head, self.offload = (shared_reference, fused_head,
                                                                offload)

    # ------------------------------------------------------------------ the engine
    @property
    def end_ids(self) -> tuple[int, ...]:
        """The tokens that end a response (the engine's set,
        :mod:`~dvpo_lightning.rollout.end_tokens`)."""
        return self.generator.end_ids

    def longest_sequence(self, prompt_length: int) -> int:
        """Tokens of the longest prompt + response a rollout can hold."""
        return prompt_length + self.settings.max_new_tokens

    def check_servable(self, policy: nn.Module, device: torch.device, prompt_length: int) -> None:
        """Refuse, before the first rollout, what the engine cannot serve here (naming the
        fix): a prompt of ``prompt_length`` tokens and its longest response included."""
        self.generator.check_servable(policy, device, self.longest_sequence(prompt_length))

    def sampler_tolerance(self, precision: str, device: torch.device) -> tuple[float | None, str]:
        """The sampler probe's tolerance (``rollout.vllm.logp_tolerance``, ``auto`` resolved by
        the trainer's ``precision``, the engine's dtype and ``device``) and how it was chosen,
        for the error that names it."""
        options = self.settings.vllm
        tolerance = resolve_logp_tolerance(options.logp_tolerance, precision, options.dtype,
                                           device)
        chosen = (f" (auto for a {precision} trainer beside a "
                  f"{engine_dtype(options.dtype, precision)} engine on {device.type})"
                  if options.logp_tolerance == "auto" else "")
        return tolerance, chosen

    def follow_precision(self, precision: str) -> None:
        """Tell the engine the trainer's ``precision`` (``rollout.vllm.dtype: auto`` follows
        it; ``generate`` computes in the trainer's precision anyway)."""
        self.generator.follow_precision(precision)

    def forget_weights(self) -> None:
        """The policy's weights changed under the engine (a checkpoint was loaded): push them
        before the next rollout whatever the update count says."""
        self.generator.forget_weights()

    def sleep_engine(self) -> None:
        """Let a rollout engine that can free its memory between rollouts do so."""
        self.generator.sleep()

    @functools.cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """Held-out evaluation with the rollout's engine and these frozen models: the policy
        answers through the engine, the reference through ``generate`` when the engine serves
        only the policy (vLLM)."""
        reference_generator = (None if self.generator.name == "hf" else
                               HFGenerator(self.end_ids, self.tokenizer.pad_token_id))
        return HeldOutEvaluator(
            self.generator, self.settings.eval_sampling, self.tokenizer, self.judge,
            self.reference_logps, self.frozen["reward_model"] if "reward_model" in self.frozen
            else None, self.settings.score_batch_size, self.fused_head, reference_generator,
            self.frozen["gvm"] if "gvm" in self.frozen else None, self.settings.eval_seed,
            self.settings.eval_samples)

    # ------------------------------------------------------------------ the frozen models
    @property
    def policy_transform(self) -> LogitTransform | None:
        """The rollout sampler's transform of the policy's logits: ``logp_old`` and the update's
        log-probs are of the distribution the responses were drawn from (docs/sampling.md)."""
        return self.settings.sampling.policy_transform(self.generator.end_ids)

    def logps(self, model: nn.Module,
              sampling: LogitTransform | None = None) -> Callable[..., Tensor]:
        """``seq ↦ log π(y | x)`` of ``model`` (the log-probs alone, for :func:`by_rows`),
        under the sampler's transform ``sampling`` (None: the model's own softmax)."""
        return lambda *seq: policy_logps(model, *seq, fused_head=self.fused_head,
                                         sampling=sampling)[0]

    @contextlib.contextmanager
    def reference(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The reference policy: the frozen copy, or ``policy`` with its adapters off."""
        if self.shared_reference:
            with adapters_disabled(policy):
                yield policy
        else:
            yield self.frozen["reference"]

    def reference_logps(self, policy: nn.Module, *seq: Tensor,
                        sampling: LogitTransform | None = None) -> Tensor:
        """``log π_ref`` of the responses in ``seq`` (see :func:`policy_logps`), under
        ``sampling`` (the rollout's: its temperature alone, see
        :meth:`~dvpo_lightning.rollout.generation.SamplingConfig.reference_transform`)."""
        with self.reference(policy) as ref:
            return self.logps(ref, sampling)(*seq)

    def place_frozen(self, device: torch.device | str) -> None:
        """With ``offload``: move the frozen models to ``device`` (``"cpu"`` parks them)."""
        if self.offload:
            self.frozen.to(device)

    @contextlib.contextmanager
    def frozen_on(self, device: torch.device) -> Iterator[None]:
        """The frozen models on ``device`` inside the block; with ``offload`` they return to
        CPU memory after it (a no-op on CPU or without offloading)."""
        move = self.offload and device.type != "cpu"
        if move:
            self.place_frozen(device)
        try:
            yield
        finally:
            if move:
                self.place_frozen("cpu")

    def by_rows(self, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        """``fn(*tensors)`` in slices of ``score_batch_size`` rows (:func:`by_rows`)."""
        return by_rows(fn, self.settings.score_batch_size, *tensors)

    @torch.no_grad()
    def sample(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
               seeds: Sequence[int], weights_version: int | None = None) -> Samples:
        """Responses of ``policy`` to ``(n, P)`` prompts with the rollout's engine and sampling
        settings, row ``r`` drawn from ``seeds[r]`` alone (the global RNGs untouched): what a
        semi-online refresh labels (:mod:`~dvpo_lightning.refresh`)."""
        was_training = policy.training
        policy.eval()
        with gathered_for_generation(policy):
            samples = self.generator.generate(policy, prompt_ids, prompt_mask,
                                              self.settings.sampling, weights_version, seeds)
        self.sleep_engine()
        policy.train(was_training)
        return samples

    # ------------------------------------------------------------------ one rollout
    @torch.no_grad()
    def forward(self, policy: nn.Module, batch: dict, critic: nn.Module | None = None,
                weights_version: int | None = None,
                behaviour: Callable[..., Tensor] | None = None,
                engine_behaviour: bool = False) -> tuple[Experience, dict]:
        """Sample ``group_size`` responses to every prompt of ``batch`` and score them.

        Args:
            policy: the trained policy (generates; its log-probs are ``logp_old``).
            batch: ``prompt_ids``, ``prompt_mask`` ``(n, P)`` and the raw ``prompts``.
            critic: the trained critic, for estimators that need its values.
            weights_version: the policy's optimizer updates so far (an engine that holds its
                own copy of the weights reloads them when this changed).
            behaviour: ``(prompt_ids, prompt_mask, response_ids, response_mask) ↦ (B, T)``
                ``logp_old`` from the caller (the RL module's on-policy update forward); None:
                a no-grad pass of ``policy`` in eval mode, in slices of ``score_batch_size``.
            engine_behaviour: ``logp_old`` is the engine's own log-probs of its samples
                (``ppo.behaviour_logps: engine``; verl's "bypass" mode): no policy pass for
                it; the trainer scores only the first ``ceil(B / ENGINE_CHECK_SHARE)`` rows,
                so the sampler gap is still watched.

        Returns:
            The experience (``kl_penalty`` zeros: the RL module applies the KL; ``logp_sampler``
            when the engine reports its log-probs) and ``{"generate_s", "score_s",
            "weight_sync_s", "gold"}`` (``gold``: ``(B,)`` or None), with ``engine_behaviour``
            also ``"logp_trainer_rows"``: the trainer's log-probs of those first rows.
        """
        batch = repeat_prompts(batch, self.group_size)
        prompt = (batch["prompt_ids"], batch["prompt_mask"])
        t0 = phase_clock(prompt[0].device)  # (a GPU: synchronised at each phase boundary)
        policy.eval()
        with gathered_for_generation(policy):
            samples = self.generator.generate(policy, *prompt, self.settings.sampling,
                                              weights_version)
            sync_s = self.generator.last_push_s
            greedy = (self.generator.generate(policy, *prompt, self.settings.greedy_sampling,
                                              weights_version)[:2]
                      if Need.GREEDY_BASELINE in self.needs else None)
        self.sleep_engine()  # (vLLM on a GPU: its memory is the update's until the next rollout)
        t1 = phase_clock(prompt[0].device)
        response = samples[:2]
        seq = (*prompt, *response)
        checked = {}
        with self.frozen_on(prompt[0].device):
            if engine_behaviour:
                if samples.logps is None:
                    raise RuntimeError(f"the {self.generator.name} engine reported no log-probs of "
                                       "its samples: model.init_args.ppo.behaviour_logps=engine "
                                       "needs an engine that does (vllm)")
                logp_old = samples.logps
                rows = -(-logp_old.shape[0] // ENGINE_CHECK_SHARE)
                checked["logp_trainer_rows"] = self.by_rows(
                    self.logps(policy, self.policy_transform), *(t[:rows] for t in seq))
            else:
                logp_old = (behaviour(*seq) if behaviour is not None else
                            self.by_rows(self.logps(policy, self.policy_transform), *seq))
            logp_ref = self.by_rows(functools.partial(
                self.reference_logps, policy,
                sampling=self.settings.sampling.reference_transform()), *seq)
            fetch = self._fetch_table(seq, greedy, critic, batch["group_ids"])
            fetched = {NEED_FIELD[need]: fetch[need]() for need in sorted(self.needs)}
        policy.train()
        exp = Experience(*seq, logp_old, logp_ref, **fetched, logp_sampler=samples.logps)
        gold = (torch.tensor(gold_scores(self.judge, self.tokenizer, batch["prompts"], *response,
                                         self.generator.end_ids),
                             device=logp_old.device) if self.judge is not None else None)
        return exp, {"generate_s": t1 - t0, "score_s": phase_clock(prompt[0].device) - t1,
                     "weight_sync_s": sync_s, "gold": gold, **checked}

    def _fetch_table(self, seq: tuple, greedy: tuple | None, critic: nn.Module | None,
                     group_ids: Tensor) -> dict[Need, Callable[[], Tensor]]:
        """The one table from each need to its work (only the needed entries are called)."""
        def values(model: nn.Module) -> Tensor:
            return self.by_rows(functools.partial(response_values, model), *seq)

        def scores(*responses: Tensor) -> Tensor:
            rm = self.frozen["reward_model"]
            return self.by_rows(functools.partial(sequence_scores, rm), *seq[:2], *responses)

        return {Need.GVM_VALUES: lambda: values(self.frozen["gvm"]),
                Need.CRITIC_VALUES: lambda: values(critic),
                Need.SCORES: lambda: scores(*seq[2:]),
                Need.GREEDY_BASELINE: lambda: scores(*greedy),
                Need.GROUPS: lambda: group_ids}
