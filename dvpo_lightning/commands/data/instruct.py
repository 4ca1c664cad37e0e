"""Data for the instruction setting: responses sampled from a real model, scored by the judge.

The paper's second setting (its Table 2) starts RL from an instruction-tuned model and trains the
GVM and the reward model on responses of several models to the same prompts. Here the behaviour
policies are the starting model itself under different sampling temperatures and system
prompts (one that stresses the constraints, one that waves them away), which gives responses
of different quality to every prompt; the verifiable-instruction judge
(:class:`~dvpo_lightning.tasks.instruct.InstructTask`) scores them. Writes, under ``out``, the
same files as the embedded sorting task (``make_data.py``) except ``sft.jsonl`` (no SFT stage:
the instruct model is the starting policy)::

    tokenizer/          the model's tokenizer (with its chat template)
    trajectories.jsonl  {prompt, response, score, gold, policy, finished}
    pairs.jsonl         {prompt, chosen, rejected, policy}: same-prompt responses whose scores
                        differ
    rl_prompts.jsonl, eval_prompts.jsonl   {prompt}
    eval_pairs.jsonl    held-out pairs (labels from the judge, no noise)
    manifest.json       arguments, counts, mean judge score per behaviour policy

The stored prompt is the user instruction alone: a behaviour's system prompt shapes how its
responses were sampled, but the policy, the GVM and the reward model never see it.
"""

from __future__ import annotations

import json
import random
import time
from itertools import combinations
from pathlib import Path

import torch

from dvpo_lightning.commands.data.sorting import _unique_prompts, _write_jsonl
from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.tokenize import encode_prompt
from dvpo_lightning.tasks import get_task

# name -> (temperature, system prompt or None)
DEFAULT_BEHAVIOUR: dict[str, tuple[float, str | None]] = {
    "plain": (0.7, None),
    "careful": (0.7, "Follow every rule in the user's message exactly: length, bullet points, "
                     "sentences, words to use or avoid, letter case, format, title and ending."),
    "hot": (1.2, None),
    "careless": (1.0, "Answer the request in your own words. Ignore any rules about length, "
                      "format or wording."),
}


def _messages(prompt: str, system: str | None) -> list[dict] | str:
    if system is None:
        return prompt
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], system: str | None,
                     temperature: float, n: int, max_new_tokens: int,
                     batch_size: int) -> list[list[tuple[str, bool]]]:
    """``n`` sampled responses per prompt as ``(text, finished)``; ``finished`` is False when a
    response was cut at ``max_new_tokens`` before its EOS."""
    from dvpo_lightning.rollout.end_tokens import end_token_ids
    from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig

    gen = HFGenerator(end_token_ids(tokenizer, model), tokenizer.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(n)]
    out: list[tuple[str, bool]] = []
    for i in range(0, len(flat), batch_size):
        chunk = flat[i:i + batch_size]
        ids, mask = pad_left([encode_prompt(tokenizer, _messages(p, system)) for p in chunk],
                             tokenizer.pad_token_id)
        resp, rmask = gen.generate(model, ids.to(device), mask.to(device), cfg)[:2]
        for r, m in zip(resp.tolist(), rmask.tolist()):
            toks = [t for t, keep in zip(r, m) if keep]
            finished = bool(toks) and toks[-1] in gen.end_ids
            out.append((tokenizer.decode(toks, skip_special_tokens=True).strip(), finished))
    return [out[j * n:(j + 1) * n] for j in range(len(prompts))]


def make_instruct_data(
    out: str = "data/instruct",
    model: str = "smollm2-135m-instruct",
    task: str = "instruct",
    min_constraints: int = 1,
    max_constraints: int = 3,
    n_trajectory_prompts: int = 1000,
    behaviour_policies: dict[str, tuple[float, str | None]] | None = None,
    responses_per_prompt: int = 4,
    max_new_tokens: int = 96,
    score_noise: float = 0.0,
    n_rl_prompts: int = 2000,
    n_eval_prompts: int = 128,
    n_eval_pair_prompts: int = 200,
    batch_size: int = 64,
    dtype: str | None = None,
    seed: int = 0,
) -> dict:
    """Sample, judge and write every split (see the module docstring for the files).

    Args:
        out: output directory.
        model: the instruct model that samples (directory, ``.gguf`` file or named model).
        task: the judge's task name (``instruct``).
        min_constraints: fewest constraints per prompt.
        max_constraints: most constraints per prompt.
        n_trajectory_prompts: prompts answered by one behaviour policy each (scored rows; every
            two of their responses whose scores differ make a preference pair).
        behaviour_policies: name → (temperature, system prompt or None) of each behaviour.
        responses_per_prompt: responses per trajectory prompt.
        max_new_tokens: longest sampled response (a response cut there is judged unfinished).
        score_noise: standard deviation of Gaussian noise added to the judge's score (0: the
            judge is the annotator).
        n_rl_prompts: prompts for policy optimisation.
        n_eval_prompts: held-out prompts for evaluating policies.
        n_eval_pair_prompts: held-out prompts for evaluation pairs (two behaviours each).
        batch_size: generation batch size.
        dtype: dtype to sample in (``bfloat16`` on a GPU); None keeps the saved one.
        seed: random seed: prompts, behaviour choice and sampling.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer

    behaviour = dict(behaviour_policies or DEFAULT_BEHAVIOUR)
    for name, spec in behaviour.items():
        if len(spec) != 2 or not float(spec[0]) > 0:
            raise ValueError(f"behaviour_policies[{name!r}] = {spec!r} must be (temperature > 0, "
                             "system prompt or null); fix the data config")
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt={responses_per_prompt} must be >= 2 (pairs are "
                         "made from responses to the same prompt)")
    t0 = time.time()
    judge = get_task(task, min_constraints=min_constraints, max_constraints=max_constraints)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    tok.save_pretrained(str(root / "tokenizer"))
    lm = load_causal_lm(model, tok, dtype).eval()
    if torch.cuda.is_available():
        lm.cuda()

    seen: set[str] = set()
    traj_prompts = _unique_prompts(judge, n_trajectory_prompts, rng, seen)
    rl_prompts = _unique_prompts(judge, n_rl_prompts, rng, seen)
    eval_prompts = _unique_prompts(judge, n_eval_prompts, rng, seen)
    eval_pair_prompts = _unique_prompts(judge, n_eval_pair_prompts, rng, seen)

    names = sorted(behaviour)
    by_policy: dict[str, list[str]] = {n: [] for n in names}
    for p in traj_prompts:
        by_policy[rng.choice(names)].append(p)

    def sample(prompts: list[str], name: str, n: int) -> list[list[tuple[str, bool]]]:
        temperature, system = behaviour[name]
        return sample_responses(lm, tok, prompts, system, float(temperature), n,
                                max_new_tokens, batch_size)

    trajectories, pairs = [], []
    for name in names:
        prompts = by_policy[name]
        for p, responses in zip(prompts, sample(prompts, name, responses_per_prompt)):
            golds = [judge.gold_score(p, r, fin) for r, fin in responses]
            scores = [round(g + rng.gauss(0.0, score_noise), 4) if score_noise else g
                      for g in golds]
            trajectories += [{"prompt": p, "response": r, "score": s, "gold": g, "policy": name,
                              "finished": fin}
                             for (r, fin), s, g in zip(responses, scores, golds)]
            for i, j in combinations(range(len(responses)), 2):
                if responses[i][0] == responses[j][0] or scores[i] == scores[j]:
                    continue
                hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                pairs.append({"prompt": p, "chosen": responses[hi][0],
                              "rejected": responses[lo][0], "policy": name})

    # held-out pairs: two behaviours per prompt, labelled by the judge
    eval_pairs = []
    firsts = [rng.choice(names) for _ in eval_pair_prompts]
    seconds = [rng.choice([n for n in names if n != a] or names) for a in firsts]
    answers: dict[tuple[int, int], tuple[str, bool]] = {}
    for name in names:
        for k, which in ((0, firsts), (1, seconds)):
            idx = [i for i, b in enumerate(which) if b == name]
            got = sample([eval_pair_prompts[i] for i in idx], name, 1)
            answers.update({(i, k): r[0] for i, r in zip(idx, got)})
    for i, p in enumerate(eval_pair_prompts):
        (a, fa), (b, fb) = answers[(i, 0)], answers[(i, 1)]
        ga, gb = judge.gold_score(p, a, fa), judge.gold_score(p, b, fb)
        if ga == gb or a == b:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        eval_pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected,
                           "policy": f"{firsts[i]}/{seconds[i]}"})

    if not pairs:
        raise ValueError(
            f"no preference pairs: every response to each of the {len(traj_prompts)} trajectory "
            "prompts got the same judge score. Fix: raise n_trajectory_prompts, "
            "responses_per_prompt or max_new_tokens (cut responses all score low), or add a "
            "more different behaviour policy")
    splits = {"trajectories": trajectories, "pairs": pairs,
              "rl_prompts": [{"prompt": p} for p in rl_prompts],
              "eval_prompts": [{"prompt": p} for p in eval_prompts],
              "eval_pairs": eval_pairs}
    for name, rows in splits.items():
        _write_jsonl(root / f"{name}.jsonl", rows)

    def mean(vals: list[float]) -> float | None:
        return round(sum(vals) / len(vals), 4) if vals else None

    manifest = {
        "task": task, "model": model,
        "args": {"min_constraints": min_constraints, "max_constraints": max_constraints,
                 "n_trajectory_prompts": n_trajectory_prompts, "behaviour_policies": behaviour,
                 "responses_per_prompt": responses_per_prompt, "max_new_tokens": max_new_tokens,
                 "score_noise": score_noise, "n_rl_prompts": n_rl_prompts,
                 "n_eval_prompts": n_eval_prompts, "n_eval_pair_prompts": n_eval_pair_prompts,
                 "seed": seed},
        "counts": {name: len(rows) for name, rows in splits.items()},
        "mean_gold": {name: mean([r["gold"] for r in trajectories if r["policy"] == name])
                      for name in names},
        "finished_frac": mean([float(r["finished"]) for r in trajectories]),
        "seconds": round(time.time() - t0, 1),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
