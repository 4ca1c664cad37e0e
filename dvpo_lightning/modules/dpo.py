"""Direct Preference Optimization as a training stage: the policy learns from preference pairs
directly, against the frozen starting policy as the reference, and is evaluated on held-out
prompts exactly as the RL runs are (gold reward, win rate against the starting policy, KL to
it, response length), so the study compares it with them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dvpo_lightning.models.compat import check_compatible, check_fits_context
from dvpo_lightning.models.frozen_dtype import cast_frozen
from dvpo_lightning.models.identity import check_same_models, fingerprint
from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from dvpo_lightning.models.lora import adapters_disabled
from dvpo_lightning.models.options import ModelOptions
from dvpo_lightning.models.value_model import freeze
from dvpo_lightning.modules.evaluation import HeldOutEvaluation, test_loader
from dvpo_lightning.modules.optim import OptimSettings
from dvpo_lightning.modules.stage import SingleModelStage
from dvpo_lightning.ops.dpo import DPO_LOSSES, dpo_loss
from dvpo_lightning.ops.sampling import LogitTransform
from dvpo_lightning.refresh.settings import OnlineSettings
from dvpo_lightning.refresh.setup import make_online, online_prompts
from dvpo_lightning.rollout.end_tokens import end_token_ids
from dvpo_lightning.rollout.evaluation import EvalRows, HeldOutEvaluator
from dvpo_lightning.rollout.generation import HFGenerator
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.settings import RolloutSettings
from dvpo_lightning.runtime.checkpointing import drop_reloaded, reloaded_weights, restore_reloaded
from dvpo_lightning.runtime.deepspeed import casts_every_parameter
from dvpo_lightning.runtime.log_steps import logs_this_step
from dvpo_lightning.runtime.timing import phase_clock
from dvpo_lightning.tasks.judges import load_judge


@dataclass(frozen=True)
class DPOSettings:
    """The preference objective (:func:`~dvpo_lightning.ops.dpo.dpo_loss`).

    Args:
        beta: β, the strength of the implicit KL regularisation to the reference: the implicit
            reward is ``β·(log π − log π_ref)`` (IPO: the paper's τ). 0.1 is the usual value.
        loss_type: ``sigmoid`` (DPO, Rafailov et al. 2023) or ``ipo`` (Azar et al. 2023, with
            log-ratios averaged over response tokens, as TRL computes it).
        label_smoothing: ε, the assumed probability that a pair's label is flipped
            (conservative DPO); ``sigmoid`` only; 0 is plain DPO.
    """

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        rules = [(self.beta > 0, "beta must be > 0"),
                 (self.loss_type in DPO_LOSSES, f"loss_type must be one of {DPO_LOSSES}"),
                 (0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
                 (not self.label_smoothing or self.loss_type == "sigmoid",
                  "label_smoothing applies to loss_type sigmoid only (set it to 0 for ipo)")]
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"model.init_args.dpo: {'; '.join(broken)} (got {self}). Fix the "
                             "model.init_args.dpo.* keys named")


torch.serialization.add_safe_globals([DPOSettings, RolloutSettings])  # in checkpointed hparams


def check_dpo_options(models: ModelOptions, rollout: RolloutSettings) -> None:
    """Refuse the RL-only settings a DPO run cannot honour (rather than ignore them)."""
    refused = [(models.critic_lora is not None,
                "model.init_args.models.critic_lora (DPO trains no critic)"),
               (models.offload_frozen,
                "model.init_args.models.offload_frozen (the reference scores every training "
                "batch; keep it on the device)"),
               (rollout.engine != "hf",
                f"model.init_args.rollout.engine={rollout.engine!r} (DPO generates only to "
                "evaluate, with generate: use 'hf')")]
    named = [what for bad, what in refused if bad]
    if named:
        raise ValueError(f"DPOModule cannot use {'; '.join(named)}. Fix: remove these keys from "
                         "model.init_args")


SIDES = ("logp_c", "logp_r", "ref_c", "ref_r", "len_c", "len_r")  # by_side's, in order


def by_side(logp: Tensor, ref_logp: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, ...]:
    """``2N`` rows, the ``n = N`` chosen ones first → ``(logp_c, logp_r, ref_c, ref_r, len_c,
    len_r)``, each ``(N,)``."""
    return (logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], lengths[:n], lengths[n:])


class DPOModule(SingleModelStage):
    """DPO / IPO on preference pairs; ``self.model`` is the trained policy.

    The reference is the starting policy, frozen: with ``models.lora`` the policy itself with
    its adapters off (no second copy), otherwise a frozen copy loaded from ``policy``. Neither
    is stored in checkpoints; a resume reloads it and refuses a ``policy`` directory whose
    weights changed.

    Validation (``trainer.val_check_interval`` counts training batches: optimizer steps without
    gradient accumulation) computes the DPO metrics on the held-out pairs (``val/...``) and,
    with held-out prompts, the RL runs' held-out evaluation (``eval/...``), recorded in an
    :class:`EvalHistory` whose ``rl_step`` key holds the optimizer step (for DPO an optimizer
    update, not a rollout); the starting policy's own evaluation is its step 0 and the win
    rate is against it.

    Args:
        policy: the starting policy (the SFT model's directory, a GGUF file, a named model);
            also the reference.
        tokenizer: the tokenizer; None: the policy's. The CLI links it to ``data.tokenizer``.
        judge: what scores the held-out answers (as the RL module's ``judge``: a registered
            judge or ``package.module:function``); None for data without one: no gold reward
            nor win rate.
        dpo: the preference objective.
        optim: the optimizer and its warm-up / cosine schedule (``lr`` 1e-6: TRL's default).
        export_dir: where to write the trained policy at the end of ``fit``; None writes
            nothing.
        models: how the policy and the reference load and run (LoRA, attention kernel,
            gradient checkpointing, the reference's dtype, the fused output head); the RL
            runs' key.
        rollout: how held-out answers are sampled (``max_new_tokens``, ``temperature``,
            ``top_p``, ``top_k``, ``eval_greedy``, ``score_batch_size``): the RL runs' key, so
            one override evaluates every method alike; with ``online`` on, the training
            sampler's settings also sample the responses a round labels.
        online: online (iterative) DPO: pairs of the policy's own responses labelled during
            the run join the training batches (:mod:`~dvpo_lightning.refresh.online`); off
            (``every: 0``) by default.
    """

    STEP_UNIT = "step"  # val_check_interval and max_steps count optimizer steps

    def __init__(self, policy: str, tokenizer: str | None = None, judge: str | None = None,
                 dpo: DPOSettings = DPOSettings(),
                 optim: OptimSettings = OptimSettings(lr=1e-6, warmup_steps=10),
                 export_dir: str | None = None, models: ModelOptions = ModelOptions(),
                 rollout: RolloutSettings = RolloutSettings(),
                 online: OnlineSettings = OnlineSettings()) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_dpo_options(models, rollout)
        self.judge = load_judge(judge) if judge else None  # (before the models load)
        self.online = make_online(online)  # (None: offline DPO)
        self.tokenizer = load_tokenizer(tokenizer or policy)
        check_compatible(self.tokenizer, policy, "policy")
        attn = models.attn_implementation
        self.model = load_causal_lm(policy, self.tokenizer, models.dtype, attn,
                                    models.gradient_checkpointing, models.lora)
        self.model.train()  # (loaded in eval mode: LoRA dropout, gradient checkpointing need it)
        self.reference: nn.Module | None = None
        if models.lora is None:
            self.reference = freeze(load_causal_lm(policy, self.tokenizer,
                                                   attn_implementation=attn))
            dtype = resolve_dtype(models.frozen_dtype)  # (auto: resolved in setup)
            if dtype is not None:
                self.reference.to(dtype)
        # (settings kept as objects: under LightningCLI self.hparams holds the config dict)
        self.settings, self.model_options, self.rollout = dpo, models, rollout
        self.optim, self.export_dir = optim, export_dir
        self.heldout = HeldOutEvaluation()  # the RL runs' held-out evaluation, state, summary
        self.pair_history: list[dict] = []  # the held-out pair metrics at every validation

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[nn.Module]:
        """The reference: the frozen copy, or the policy with its adapters off."""
        if self.reference is not None:
            yield self.reference
        else:
            with adapters_disabled(self.model):
                yield self.model

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        self.check_context(self.model.config)  # the pairs
        if self.reference is not None:  # (frozen_dtype=auto: bfloat16 where it has kernels)
            _, line = cast_frozen(
                nn.ModuleDict({"reference": self.reference}), self.model_options.frozen_dtype,
                self.trainer.strategy.root_device,
                follows_strategy=casts_every_parameter(self.trainer.strategy,
                                                       self.trainer.precision))
            if line:
                rank_zero_info(line)
        dm = self.trainer.datamodule
        if self.online is not None:
            self.online.attach_prompts(online_prompts(self.online, dm))
        if (getattr(dm, "eval_path", None) or getattr(dm, "test_path", None)
                or self.online is not None):
            check_fits_context(dm.max_prompt_length + self.rollout.max_new_tokens,
                               self.model.config,
                               "data.init_args.max_prompt_length + "
                               "model.init_args.rollout.max_new_tokens")

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint: the training loader draws its seed from
        # them when it is made, before this hook; from here on a resumed run draws what the
        # uninterrupted one did after the checkpoint (the held-out answers are sampled).
        self.heldout.restore_rng()

    # ------------------------------------------------------------------ the objective
    def pair_logps(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Summed response log-probs of every row ``(2N,)`` under the policy (with gradient)
        and the reference, and each row's response length ``(2N,)``."""
        seq = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
               batch["response_mask"])
        fused = self.model_options.fused_head
        logp = policy_logps(self.model, *seq, fused_head=fused)[0].sum(1)
        with torch.no_grad(), self.reference_policy() as ref:
            ref_logp = policy_logps(ref, *seq, fused_head=fused)[0].sum(1)
        return logp, ref_logp, batch["response_mask"].sum(1)

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's loss and DPO metrics."""
        return self.objective(*by_side(*self.pair_logps(batch), int(batch["n_pairs"])))

    def objective(self, *sides: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`dpo_loss` of :func:`by_side`'s six ``(N,)`` tensors."""
        s = self.settings
        logp_c, logp_r, ref_c, ref_r, len_c, len_r = sides
        return dpo_loss(logp_c, logp_r, ref_c, ref_r, s.beta, s.loss_type, s.label_smoothing,
                        len_c, len_r)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        step = self.global_step
        self.buy_pairs(step)  # (before this step's update: a checkpoint never holds half a round)
        loss, stats = self(batch)
        n = int(batch["n_pairs"])
        bought = (self.online.batch(step, batch_idx, self.tokenizer.pad_token_id)
                  if self.online is not None else None)
        if bought is not None:  # online DPO: the mean loss over both sets of pairs
            m = int(bought["n_pairs"])
            online_loss, online_stats = self(bought)
            loss = (n * loss + m * online_loss) / (n + m)
            self.log_dict({"train/online/loss": online_loss,
                           "train/online/accuracy": online_stats["rewards/accuracies"]},
                          batch_size=m)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if logs_this_step(self.trainer):
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        # (the CostMeter keeps these floats as the run's per-step curve)
        return {"loss": loss, "margin": float(stats["rewards/margins"]),
                "accuracy": float(stats["rewards/accuracies"])}

    def buy_pairs(self, step: int) -> None:
        """Online DPO: the label round due after optimizer step ``step``, once, and its log:
        the policy's implicit-reward accuracy on the new pairs before it trains on them
        (``online/reward_acc_before``) besides the round's entries. Pairs of one answer twice
        are not kept (:meth:`~dvpo_lightning.refresh.online.OnlinePairs.distinct`); their
        labels are spent all the same."""
        if (self.online is None or not self.online.due(step)
                or self.online.done_after(step)):
            return
        t0 = phase_clock(self.device)
        was_training = self.model.training
        self.model.eval()  # (as the held-out sampler: no dropout)
        def sample(ids: Tensor, mask: Tensor, seeds: list[int]):
            return self.generator.generate(self.model, ids, mask, self.rollout.sampling,
                                           seeds=seeds)

        bought = self.online.buy(sample, self.tokenizer, self.generator.end_ids, step,
                                 self.device)
        pairs = self.online.distinct(bought)
        acc = self.implicit_accuracy(bought.batch, pairs)
        self.model.train(was_training)
        self.online.keep(bought, pairs, step, {"online/reward_acc_before": acc,
                                               "online/seconds": phase_clock(self.device) - t0})
        self.log_dict({k: v for k, v in self.online.history[-1].items() if k != "step"},
                      batch_size=1)

    @torch.no_grad()
    def implicit_accuracy(self, batch: dict, pairs: list[tuple[int, int]]) -> float:
        """The share of ``pairs`` ``(chosen row, rejected row)`` of ``batch`` (the shared
        layout) whose chosen row has the larger implicit reward ``log π − log π_ref`` (summed
        over the response; a tie counts one half); NaN without pairs."""
        if not pairs:
            return float("nan")
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        logp, ref_logp, _ = self.pair_logps({k: v[rows] for k, v in batch.items()})
        reward = logp - ref_logp
        chosen, rejected = reward[:len(pairs)], reward[len(pairs):]
        return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())

    # ------------------------------------------------------------------ evaluation
    @functools.cached_property
    def generator(self) -> HFGenerator:
        """``generate`` with the policy's end tokens: the held-out answers and online DPO's."""
        return HFGenerator(end_token_ids(self.tokenizer, self.model),
                           self.tokenizer.pad_token_id)

    @functools.cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """The RL runs' held-out evaluation: ``generate``, the judge, the KL to
        the reference."""
        tok = self.tokenizer
        return HeldOutEvaluator(
            self.generator, self.rollout.eval_sampling, tok,
            self.judge, self.reference_logps, None, self.rollout.score_batch_size,
            self.model_options.fused_head, eval_seed=self.rollout.eval_seed,
            samples=self.rollout.eval_samples)

    def reference_logps(self, policy: nn.Module, *seq: Tensor,
                        sampling: LogitTransform | None = None) -> Tensor:
        """``log π_ref`` ``(B, T)`` of the responses in ``seq`` (``policy`` is ``self.model``),
        under the held-out sampler's ``sampling`` transform (the DPO loss never passes one)."""
        with self.reference_policy() as ref:
            return policy_logps(ref, *seq, fused_head=self.model_options.fused_head,
                                sampling=sampling)[0]

    @property
    def evals(self):
        """The held-out evaluations so far (:class:`EvalHistory`)."""
        return self.heldout.history

    def on_validation_epoch_start(self) -> None:
        self._val_pairs = EvalRows("pair_index")  # by_side's six (N,) of every pair
        self.heldout.start()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "n_pairs" in batch:  # held-out pairs
            self._val_pairs.add(dict(zip(SIDES, by_side(*self.pair_logps(batch),
                                                        int(batch["n_pairs"])))), batch)
            return
        self.heldout.step(self.evaluator, self.model, self.reference_policy, batch)

    def on_validation_epoch_end(self) -> None:
        final = not self.trainer.sanity_checking
        if self._val_pairs:
            self._log_pairs(final)
        self.heldout.end(self, self.global_step)  # (as in the RL module)

    def on_train_end(self) -> None:
        """With ``data.test_path``: the policy and the reference answer the test prompts once
        (before the summary is written at the end of ``fit``)."""
        loader = test_loader(self.trainer)
        if loader is not None:
            was_training = self.model.training
            self.model.eval()  # (as Lightning's validation loop sets it)
            self.heldout.test(self.evaluator, self.model, self.reference_policy, loader,
                              self.device, self.global_step,
                              samples=self.rollout.test_samples)
            self.model.train(was_training)

    def _log_pairs(self, final: bool) -> None:
        """The loss and DPO metrics over every held-out pair at once (exact means), every
        process's pairs each once."""
        sides = self._val_pairs.gathered()  # (collective: every rank)
        loss, stats = self.objective(*(sides[k] for k in SIDES))
        logged = {"val/loss": loss, **{f"val/{k}": v for k, v in stats.items()}}
        for k, v in logged.items():
            self.log(k, v, prog_bar=k == "val/rewards/accuracies", add_dataloader_idx=False)
        if final:
            self.pair_history.append({"rl_step": self.global_step,
                                      **{k: float(v) for k, v in logged.items()}})

    # ------------------------------------------------------------------ state
    @functools.cached_property
    def frozen_identity(self) -> dict[str, dict | None]:
        """``{"reference": {path, sha256}}``: the weights the reference (and, with LoRA, the
        frozen base) is reloaded from; hashed at the first checkpoint save or load."""
        return {"reference": fingerprint(self.hparams.policy)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every frozen parameter: the reference copy, or with LoRA the policy's base weights
        drop_reloaded(checkpoint, reloaded_weights(self, ""))
        checkpoint["dpo_state"] = {"pair_history": self.pair_history,
                                   "frozen_identity": self.frozen_identity,
                                   **self.heldout.state_dict()}  # (evals, rng)
        if self.online is not None:  # (the pairs bought, the rounds' stream and history)
            checkpoint["dpo_state"]["online"] = self.online.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_reloaded(checkpoint, reloaded_weights(self, ""))
        state = checkpoint.get("dpo_state", {})
        check_same_models(state.get("frozen_identity", {}), self.frozen_identity)
        self.heldout.load_state_dict(state)
        self.pair_history = state.get("pair_history", [])
        if self.online is not None and "online" in state:
            self.online.load_state_dict(state["online"])

    # ------------------------------------------------------------------ summary and export
    def summary(self) -> dict:
        """The RL module's summary shape (``rl_step`` / ``rl_steps`` count optimizer updates;
        ``kl_coef`` is β), plus the held-out pair metrics."""
        return {"estimator": "DPO", "estimator_args": dataclasses.asdict(self.settings),
                "rl_steps": int(self.global_step), "policy_updates": int(self.global_step),
                "kl_coef": self.settings.beta, **self.heldout.summary(),
                "pair_eval": self.pair_history[-1] if self.pair_history else None,
                "pair_history": self.pair_history,
                **({"online": self.online.summary()} if self.online is not None else {})}

    def summary_tables(self) -> dict[str, tuple[list[str], list[list]]]:
        tables = self.heldout.tables()
        if self.pair_history:
            columns = list(self.pair_history[-1])
            tables["val/pair_history"] = (columns, [[r.get(c) for c in columns]
                                                    for r in self.pair_history])
        return tables

    def summary_pictures(self, log_dir: Path, summary: dict) -> dict[str, Path]:
        """This run's learning curves, for W&B."""
        from dvpo_lightning.report.plots import run_learning_curves

        return run_learning_curves(summary, log_dir)

    def summary_line(self, summary: dict) -> str:
        pairs = summary["pair_eval"]
        parts = [line] if (line := self.heldout.line(summary)) else []
        if pairs:
            parts.append("held-out pairs: " + ", ".join(
                f"{k} {v:.4f}" for k, v in pairs.items() if k != "rl_step"))
        return "\n".join(parts)

    def export_manifest(self, summary: dict) -> dict:
        return {"kind": "policy", "stage": "dpo", "hparams": dict(self.hparams),
                "global_step": self.global_step, "summary": summary}
