"""Held-out gold evaluation of a stage's policy (the SFT policy in the study): a callback that
drives the one held-out evaluator (:class:`~dvpo_lightning.rollout.evaluation.HeldOutEvaluator`)
over a prompts file at every validation and at the end of ``fit``; with several processes each
answers its share of the prompts and the means are over all of them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.tokenize import encode_prompt
from dvpo_lightning.rollout.end_tokens import end_token_ids
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator, concat_rows
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.runtime.distributed import gather_by_index, rank_and_world
from dvpo_lightning.tasks.judges import Judge, load_judge


@torch.no_grad()
def evaluate_policy(model, tokenizer, judge: Judge, prompts: list,
                    cfg: SamplingConfig, batch_size: int = 128,
                    eval_seed: int | None = None) -> dict[str, float]:
    """Mean gold reward (``judge``'s score), exact-answer rate (an embedded task's judge),
    EOS rate and response length of ``model``'s responses to ``prompts`` (``generate``,
    ``batch_size`` prompts at a time).

    With several processes it is collective (every rank calls it): rank ``r`` answers every
    ``world``-th prompt from the ``r``-th (the first few repeated to give every rank as many,
    as Lightning's ``DistributedSampler`` does), and the means are over every rank's answers,
    each prompt once: the same numbers on every rank.

    ``eval_seed``: common random numbers, prompt ``i`` answered from the noise stream of
    ``(eval_seed, i)``, as the RL runs' ``rollout.eval_seed`` (None: the global RNG)."""
    evaluator = HeldOutEvaluator(HFGenerator(end_token_ids(tokenizer, model),
                                             tokenizer.pad_token_id),
                                 cfg, tokenizer, judge, eval_seed=eval_seed)
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    n = len(prompts)
    padded = [i % n for i in range(n + -n % world)]  # (one process: every prompt, in order)
    mine = padded[rank::world]
    was_training = model.training
    model.eval()
    rows, index = [], []
    for i in range(0, len(mine), batch_size):
        chunk = [prompts[j] for j in mine[i:i + batch_size]]
        ids, mask = pad_left([encode_prompt(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
        index.append(torch.tensor(mine[i:i + batch_size], device=device))
        rows.append(evaluator.evaluate(model, ids.to(device), mask.to(device), chunk,
                                       index=index[-1]))
    if was_training:
        model.train()
    measures = gather_by_index(concat_rows(rows), torch.cat(index))
    return {k: sum(measures[k].tolist()) / len(prompts)  # in Python floats, the scorer's own
            for k in ("gold_reward", "exact", "eos_frac", "response_len") if k in measures}


class GoldEval(L.Callback):
    """Evaluate the module's ``model`` on held-out prompts at every validation and at the end.

    Args:
        judge: what scores the answers (a registered judge such as ``sorting``, or
            ``package.module:function``, :mod:`dvpo_lightning.tasks.judges`).
        prompts_path: held-out prompts file.
        max_prompts: evaluate on the first this-many prompts.
        max_new_tokens: longest response.
        greedy: greedy decoding (else sampling at temperature 1).
        eval_seed: common random numbers: prompt ``i`` is answered from the noise stream of
            ``(eval_seed, i)``, the RL runs' ``model.rollout.eval_seed``, so the SFT policy's
            evaluation shares their random numbers (docs/evaluation.md); None: the global RNG.
        summary_file: JSON file name written into the log directory at the end of ``fit``.
    """

    def __init__(self, judge: str = "sorting",
                 prompts_path: str = "data/sorting/eval_prompts.jsonl", max_prompts: int = 256,
                 max_new_tokens: int = 16, greedy: bool = False,
                 summary_file: str = "gold_eval.json", eval_seed: int | None = None) -> None:
        self.judge = load_judge(judge)
        self.prompts_path, self.max_prompts = prompts_path, max_prompts
        self.cfg = SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy)
        self.summary_file, self.eval_seed = summary_file, eval_seed
        self.last: dict[str, float] = {}

    def _prompts(self) -> list:
        return [r["prompt"] for r in load_examples(self.prompts_path, "prompt")][: self.max_prompts]

    def _run(self, pl_module) -> dict[str, float]:
        return evaluate_policy(pl_module.model, pl_module.tokenizer, self.judge, self._prompts(),
                               self.cfg, eval_seed=self.eval_seed)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.last = self._run(pl_module)
        for k, v in self.last.items():
            pl_module.log(f"eval/{k}", v, prog_bar=k == "gold_reward")

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank
        self.last = self._run(pl_module)  # collective: every rank answers its share
        if not trainer.is_global_zero:
            return
        rank_zero_info("held-out gold evaluation: " + ", ".join(
            f"{k} {v:.4f}" for k, v in self.last.items()))
        out.mkdir(parents=True, exist_ok=True)
        (out / self.summary_file).write_text(json.dumps(
            {**self.last, "global_step": trainer.global_step}, indent=2))
