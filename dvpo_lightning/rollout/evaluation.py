"""Held-out evaluation of a policy, the one implementation every stage uses: the RL module at
each validation, and :class:`~dvpo_lightning.callbacks.GoldEval` for the SFT policy.

:class:`HeldOutEvaluator` generates responses to held-out prompts and measures each of them;
:class:`EvalRows` merges the rows of every process (several processes each evaluate a shard);
:class:`EvalHistory` turns an RL run's evaluations into its learning curve, with the reference
policy as step 0 and the win rate against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.ops.kl import kl_estimate
from dvpo_lightning.rollout.common_noise import stream_seeds
from dvpo_lightning.rollout.end_tokens import finished
from dvpo_lightning.rollout.generation import Generator, SamplingConfig
from dvpo_lightning.rollout.gold import gold_scores
from dvpo_lightning.rollout.scoring import by_rows, policy_logps, sequence_scores
from dvpo_lightning.runtime.distributed import gather_by_index, rank_and_world
from dvpo_lightning.tasks.judges import Judge


class HeldOutEvaluator:
    """Per-response measures of a policy's answers to held-out prompts.

    Every measure whose ingredients exist: ``response_len`` and ``eos_frac`` always;
    ``kl_to_ref`` (k1 summed over the response, the policy's log-probs of the distribution
    ``sampling`` draws from, the reference's at its temperature: docs/sampling.md) with
    ``reference_logps``; ``rm_score`` (the reward model's score) with a ``reward_model``;
    ``gvm_value`` (the GVM's value of the finished response, ``u_L``) with a ``value_model``;
    ``gold_reward`` (float64: the judge's own values) with a ``judge``, and ``exact`` (score
    1) when that judge is an embedded task's. Without a judge there is no gold reward: the
    run's own models' scores are named as theirs.

    Args:
        generator: the rollout engine (it answers for the policy).
        sampling: how held-out responses are sampled.
        tokenizer: the policy's tokenizer.
        judge: what scores a response (:func:`~dvpo_lightning.tasks.judges.load_judge`).
        reference_logps: ``(policy, *seq, sampling=transform) ↦ log π_ref (B, T)``.
        reward_model: a frozen reward model.
        value_model: a frozen Global Value Model.
        score_batch_size: rows per scoring pass (None: the whole batch).
        fused_head: log-probs with the output head in row chunks.
        reference_generator: the engine that answers for the reference (``generate``, when the
            rollout engine serves only the policy); None: ``generator``.
        eval_seed: common random numbers: the answer to item ``i`` is drawn from the noise
            stream of ``(eval_seed, i)`` (:mod:`~dvpo_lightning.rollout.common_noise`); None:
            the engine's own draws (the global RNG).
        samples: answers per prompt (``rollout.eval_samples``); above 1 every measure is
            ``(B, samples)``.
    """

    def __init__(self, generator: Generator, sampling: SamplingConfig,
                 tokenizer: PreTrainedTokenizerBase, judge: Judge | None = None,
                 reference_logps: Callable[..., Tensor] | None = None,
                 reward_model: nn.Module | None = None, score_batch_size: int | None = None,
                 fused_head: bool = True, reference_generator: Generator | None = None,
                 value_model: nn.Module | None = None, eval_seed: int | None = None,
                 samples: int = 1) -> None:
        self.generator, self.sampling, self.tokenizer, self.judge = (generator, sampling,
                                                                    tokenizer, judge)
        self.reference_generator = reference_generator or generator
        self.reference_logps, self.reward_model = reference_logps, reward_model
        self.value_model, self.eval_seed, self.samples = value_model, eval_seed, samples
        self.rows, self.fused_head = score_batch_size, fused_head

    @torch.no_grad()
    def evaluate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 prompts: list, is_reference: bool = False,
                 weights_version: int | None = None,
                 index: Tensor | None = None) -> dict[str, Tensor]:
        """``{measure: (B,)}`` for ``model``'s responses to ``prompts`` (left-padded ids).

        ``is_reference``: ``model`` is the reference itself, so its log-probs are the
        reference's (no second pass), and ``reference_generator`` answers.
        ``weights_version``: the policy's optimizer updates so far (see
        :class:`~dvpo_lightning.rollout.generation.Generator`).
        ``index``: ``(B,)`` each prompt's row in its held-out file, whose noise stream answers
        it under ``eval_seed`` (required then)."""
        generator = self.reference_generator if is_reference else self.generator
        b, k = prompt_ids.shape[0], self.samples
        if k > 1:  # each prompt k times, its answers consecutive
            prompt_ids, prompt_mask = (prompt_ids.repeat_interleave(k, 0),
                                       prompt_mask.repeat_interleave(k, 0))
            prompts = [p for p in prompts for _ in range(k)]
        extra = {}
        if self.eval_seed is not None:
            if index is None:
                raise ValueError("held-out evaluation with model.init_args.rollout.eval_seed set "
                                 "needs each prompt's index in its file (the noise stream's key). "
                                 "Fix: pass index=, e.g. the batch's 'prompt_index' "
                                 "(RolloutDataModule / DPODataModule give it)")
            extra["seeds"] = stream_seeds(self.eval_seed, index, k)
        resp, rmask = generator.generate(model, prompt_ids, prompt_mask, self.sampling,
                                         weights_version, **extra)[:2]
        seq = (prompt_ids, prompt_mask, resp, rmask)
        out = {"response_len": rmask.sum(1).float(),
               "eos_frac": finished(resp, rmask, generator.end_ids).float()}
        if self.reference_logps is not None:
            policy_t = self.sampling.policy_transform(generator.end_ids)
            ref_t = self.sampling.reference_transform()  # (docs/sampling.md)

            def own(t):
                return by_rows(lambda *s: policy_logps(model, *s, fused_head=self.fused_head,
                                                       sampling=t)[0], self.rows, *seq)

            logp = own(policy_t)
            if is_reference:
                ref = logp if ref_t == policy_t else own(ref_t)
            else:
                ref = by_rows(lambda *s: self.reference_logps(model, *s, sampling=ref_t),
                              self.rows, *seq)
            out["kl_to_ref"] = (kl_estimate(logp, ref, "k1", rmask) * rmask).sum(1)
        if self.reward_model is not None:
            out["rm_score"] = by_rows(lambda *s: sequence_scores(self.reward_model, *s),
                                      self.rows, *seq)
        if self.value_model is not None:
            out["gvm_value"] = by_rows(lambda *s: sequence_scores(self.value_model, *s),
                                       self.rows, *seq)
        if self.judge is not None:
            gold = torch.tensor(gold_scores(self.judge, self.tokenizer, prompts, resp, rmask,
                                            generator.end_ids),
                                dtype=torch.float64, device=resp.device)
            out["gold_reward"] = gold
            if self.judge.embedded:
                out["exact"] = (gold == 1.0).float()
        return {m: v.view(b, k) for m, v in out.items()} if k > 1 else out


def concat_rows(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batches of per-response measures → one ``(N,)`` tensor per measure."""
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


class EvalRows:
    """One validation's per-item measures, batch by batch, each row with its item's index in
    the held-out set; :meth:`gathered` merges every process's rows.

    With several processes each evaluates its shard of the held-out prompts (or pairs):
    Lightning's ``DistributedSampler``, which repeats a few items to give every shard as
    many. The means, the win-rate pairing and the reference's scores must be over the whole
    set, once each, as in one process.

    Args:
        key: the batch entry holding each item's index (``prompt_index``, ``pair_index``).
    """

    def __init__(self, key: str = "prompt_index") -> None:
        self.key = key
        self.batches: list[dict[str, Tensor]] = []
        self.index: list[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.batches)

    def add(self, measures: dict[str, Tensor], batch: dict) -> None:
        """Keep ``measures`` (``{measure: (B,)}``) of ``batch``'s items, indexed by
        :meth:`index_of`."""
        self.index.append(self.index_of(batch, len(next(iter(measures.values())))))
        self.batches.append(measures)

    def index_of(self, batch: dict, n: int) -> Tensor:
        """``(n,)`` the held-out rows of ``batch``'s ``n`` items: its ``key`` entry; without
        one, the rows count on from the previous batch's, which is right in one process
        only."""
        index = batch.get(self.key)
        if index is None:
            rank, world = rank_and_world()
            if world > 1:
                raise ValueError(
                    f"the held-out evaluation over {world} processes needs each item's "
                    f"'{self.key}' in its validation batch, to merge the processes' rows and "
                    "drop the items Lightning's DistributedSampler repeats. Fix: use "
                    "RolloutDataModule / DPODataModule, or collate held-out prompts with "
                    "dvpo_lightning.data.rollout.collate_numbered_prompts")
            start = sum(len(i) for i in self.index)
            index = torch.arange(start, start + n)
        return index

    def gathered(self) -> dict[str, Tensor]:
        """``{measure: (N,)}`` over every process's items, one row per item, in the held-out
        set's order (collective: every rank calls it)."""
        first = next(iter(self.batches[0].values()))
        return gather_by_index(concat_rows(self.batches),
                               torch.cat(self.index).to(first.device))


def per_item(measures: dict[str, Tensor]) -> dict[str, list]:
    """``{measure: [one value per item, in the held-out file's order]}`` of gathered rows
    (with ``rollout.eval_samples`` above 1, each item's list of its samples' values)."""
    return {k: v.double().tolist() for k, v in measures.items()}


class EvalHistory:
    """An RL run's held-out evaluations: the reference's once (its step 0: the policy at RL
    step 0 is the reference), then the policy's at every validation, with the win rate
    against the reference's answer to the same prompt (a tie counts ½). The reference's and
    the last validation's per-prompt values are kept too (:func:`per_item`): the evaluation's
    own noise and paired differences are computed from them."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.reference: dict[str, float] | None = None
        self.reference_gold: Tensor | None = None
        self.reference_items: dict[str, list[float]] | None = None
        self.final_items: dict[str, list[float]] | None = None

    def set_reference(self, measures: dict[str, Tensor]) -> None:
        """Record the reference's evaluation as the curves' first point."""
        gold = measures.get("gold_reward")
        self.reference_gold = gold.float() if gold is not None else None
        self.reference_items = per_item(measures)
        self.reference = {k: float(v.float().mean()) for k, v in measures.items()}
        first = {"rl_step": 0, **{f"eval/{k}": v for k, v in self.reference.items()}}
        if gold is not None:  # (a win rate needs a judge)
            first["eval/win_rate_vs_ref"] = 0.5
        self.rows.insert(0, first)

    def metrics(self, measures: dict[str, Tensor]) -> dict[str, Tensor]:
        """``eval/<measure>`` means, and ``eval/win_rate_vs_ref`` once the reference's gold
        scores exist."""
        out = {f"eval/{k}": v.float().mean() for k, v in measures.items()}
        if "gold_reward" in measures and self.reference_gold is not None:
            g = measures["gold_reward"].float()
            ref = self.reference_gold.to(g.device)
            out["eval/win_rate_vs_ref"] = ((g > ref).float() + 0.5 * (g == ref).float()).mean()
        return out

    def append(self, rl_step: int, metrics: dict[str, Tensor],
               measures: dict[str, Tensor] | None = None) -> None:
        """Add a validation's means (``metrics``) to the curve; ``measures``: its gathered
        per-prompt values, kept as the last validation's."""
        self.rows.append({"rl_step": rl_step, **{k: float(v) for k, v in metrics.items()}})
        if measures is not None:
            self.final_items = per_item(measures)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "reference": self.reference,
                "reference_gold": self.reference_gold,
                "reference_items": self.reference_items, "final_items": self.final_items}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state.get("rows", [])
        self.reference = state.get("reference")
        self.reference_gold = state.get("reference_gold")
        self.reference_items = state.get("reference_items")
        self.final_items = state.get("final_items")
