"""Measure what common random numbers buy in held-out evaluation (docs/evaluation.md).

Not collected by default (no ``test_`` file prefix); run it with
``python -m pytest -s -q tests/measure_eval_noise.py`` (half a minute on 2 CPU cores). Two
policies close to each other (the tiny task's SFT model, and the same with each weight
multiplied by ``1 + s·N(0, 1)``, s = 0.02 and 0.2) answer the 16 held-out prompts 40 times
each, sampled at T = 1: with independent draws (the global RNG, another seed each time) and
with ``eval_seed`` (the same seed for both policies, another each time). Printed: the
standard deviation across the repeats of one policy's mean gold reward and of the difference
of the two means.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.formats import load_examples
from dvpo_lightning.data.tokenize import encode_prompt
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.tasks.judges import load_judge

REPEATS = 40


@pytest.mark.parametrize("scale", [0.02, 0.2])
def test_measure(scale, task_data, tokenizer_dir, sft_model_dir):
    tok = load_tokenizer(tokenizer_dir)
    a = load_causal_lm(sft_model_dir, tok).eval()
    b = load_causal_lm(sft_model_dir, tok).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    prompts = [r["prompt"] for r in load_examples(f"{task_data}/eval_prompts.jsonl", "prompt")]
    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    index = torch.arange(len(prompts))
    judge, cfg = load_judge("sorting"), SamplingConfig(16)

    def gold(model, seed, crn):
        ev = HeldOutEvaluator(HFGenerator(tok.eos_token_id, tok.pad_token_id), cfg, tok, judge,
                              eval_seed=seed if crn else None)
        torch.manual_seed(seed)
        return float(ev.evaluate(model, ids, mask, prompts, index=index)["gold_reward"].mean())

    for crn in (False, True):
        pa = [gold(a, r, crn) for r in range(REPEATS)]
        pb = [gold(b, r + (0 if crn else 10_000), crn) for r in range(REPEATS)]
        diff = [x - y for x, y in zip(pa, pb)]
        print(f"s={scale} {'eval_seed' if crn else 'independent'}: {len(prompts)} prompts, "
              f"{REPEATS} repeats: mean gold A {statistics.mean(pa):.4f} "
              f"(sd {statistics.stdev(pa):.4f}), A - B {statistics.mean(diff):+.4f} "
              f"(sd {statistics.stdev(diff):.4f})")
