"""Generate every split of an embedded task, disjoint like the paper's Base setting.

Writes, under ``out``::

    tokenizer/            Hugging Face tokenizer (character level)
    sft.jsonl             {prompt, response}: demonstrations of a noisy teacher
    trajectories.jsonl    {prompt, response, score, gold, policy}: behaviour-policy samples with
                          an annotator's score (the gold score plus Gaussian noise)
    pairs.jsonl           {prompt, chosen, rejected, policy}: every pair of responses to the same
                          prompt whose annotated scores differ, labelled by those scores (how
                          UltraFeedback is binarized) — the same information as the scores
    rl_prompts.jsonl      {prompt}: prompts for policy optimisation
    eval_prompts.jsonl    {prompt}: held-out *test* prompts for evaluating policies (the final
                          numbers only)
    val_prompts.jsonl     {prompt}: held-out *validation* prompts, disjoint from the test
                          prompts: learning curves, tuning and every choice a study makes
                          (docs/study.md); not written when ``n_val_prompts`` is 0
    eval_pairs.jsonl      {prompt, chosen, rejected, policy}: held-out pairs, noise-free labels
    eval_pairs_shifted.jsonl
                          {prompt, chosen, rejected, policy}: held-out pairs like eval_pairs, from
                          behaviour policies with a flaw that no training split has (by default
                          swapped adjacent digits): a distribution shift for the value models;
                          not written when ``n_shifted_pair_prompts`` is 0
    manifest.json         the arguments, counts and mean gold score of every split

Every split draws from its own prompts: no prompt appears in two splits. The shifted split and
then the validation prompts are drawn after all the others, from the same random stream, so
adding them changes no other file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from dvpo_lightning.tasks import get_task
from dvpo_lightning.tasks.base import Task
from dvpo_lightning.tasks.tokenizer import save_char_tokenizer

# The flaw kinds of a behaviour policy, in the order of its rates: (random slip rate, dedup
# rate, stutter rate[, swap rate]); see ``SortingTask.noisy_response``.
FLAWS = ("slip", "dedup", "stutter", "swap")

# name -> (random slip rate, dedup rate, stutter rate) of each behaviour policy
DEFAULT_BEHAVIOUR = {
    "careful": (0.02, 0.2, 0.0),
    "teacher": (0.05, 0.6, 0.0),
    "sloppy": (0.2, 0.4, 0.05),
    "stubborn": (0.1, 0.9, 0.0),
    "stutterer": (0.05, 0.1, 0.3),
}

# name -> rates of each policy of the shifted held-out pairs: "careful" plus swapped adjacent
# digits, a flaw no default training policy has, so the swaps are the only shift.
DEFAULT_SHIFTED_BEHAVIOUR = {"swapper": (0.02, 0.2, 0.0, 0.3)}


def _unique_prompts(task: Task, n: int, rng: random.Random, seen: set[str]) -> list[str]:
    out: list[str] = []
    tries = 0
    while len(out) < n:
        p = task.sample_prompt(rng)
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(
                f"could only draw {len(out)} of {n} distinct prompts for task {task.name!r}; "
                "ask for fewer rows or widen the task (e.g. more digits)"
            )
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _check_rates(arg: str, policies: dict[str, tuple[float, ...]]) -> None:
    """Every policy has three or four rates in ``[0, 1]`` (the swap rate is optional)."""
    for name, rates in policies.items():
        if len(rates) not in (3, 4) or not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"{arg}[{name!r}] = {rates} must be three or four rates in "
                             "[0, 1]: (slip rate, dedup rate, stutter rate[, swap rate])")


def _flaws(rates: Sequence[float]) -> set[str]:
    """The flaw kinds (``FLAWS``) whose rate is above 0."""
    return {flaw for flaw, rate in zip(FLAWS, rates) if rate > 0}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _sample_pair(
    task: Task, prompt: str, rates: tuple[float, ...], rng: random.Random, tries: int
) -> tuple[tuple[str, float], tuple[str, float]] | None:
    """Two responses of one behaviour policy to ``prompt`` with different gold scores."""
    for _ in range(tries):
        a = task.noisy_response(prompt, rates[0], rng, *rates[1:])
        b = task.noisy_response(prompt, rates[0], rng, *rates[1:])
        sa, sb = task.gold_score(prompt, a), task.gold_score(prompt, b)
        if sa != sb:
            return (a, sa), (b, sb)
    return None


def _held_out_pairs(task: Task, prompts: list[str], policies: dict[str, tuple[float, ...]],
                    rng: random.Random) -> list[dict]:
    """One pair per prompt, of a random policy, labelled by the gold score (no noise); a prompt
    whose 20 tries all give equal gold scores is left out."""
    names = sorted(policies)
    rows = []
    for p in prompts:
        policy = rng.choice(names)
        got = _sample_pair(task, p, policies[policy], rng, tries=20)
        if got is None:
            continue
        (a, sa), (b, sb) = got
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected, "policy": policy})
    return rows


def make_task_data(
    out: str = "data/sorting",
    task: str = "sorting",
    min_digits: int = 4,
    max_digits: int = 8,
    n_sft: int = 20000,
    sft_error_rate: float = 0.05,
    sft_dedup_rate: float = 0.6,
    n_trajectory_prompts: int = 3000,
    behaviour_policies: dict[str, tuple[float, ...]] | None = None,
    responses_per_prompt: int = 4,
    score_noise: float = 0.1,
    n_rl_prompts: int = 4000,
    n_eval_prompts: int = 256,
    n_eval_pair_prompts: int = 1000,
    shifted_behaviour: dict[str, tuple[float, ...]] | None = None,
    n_shifted_pair_prompts: int = 1000,
    n_val_prompts: int = 256,
    seed: int = 0,
) -> dict:
    """Generate all splits of an embedded task (see the module docstring for the files).

    Args:
        out: output directory.
        task: embedded task name (``sorting``).
        min_digits: shortest prompt of the sorting task.
        max_digits: longest prompt of the sorting task.
        n_sft: SFT demonstrations.
        sft_error_rate: per-token random slip probability of the SFT teacher.
        sft_dedup_rate: probability that the SFT teacher leaves out a repeated digit (its
            systematic flaw; above 0.5 even greedy SFT inherits it, leaving RL headroom).
        n_trajectory_prompts: prompts with ``responses_per_prompt`` responses of one behaviour
            policy each (scored rows; consecutive responses whose gold scores differ make a
            preference pair).
        behaviour_policies: name → (slip rate, dedup rate, stutter rate[, swap rate]) of each
            behaviour policy (see ``SortingTask.noisy_response``).
        responses_per_prompt: responses per trajectory prompt.
        score_noise: standard deviation of the annotator's noise added to the gold score of
            every trajectory (pairs inherit it: a pair is labelled by the noisy scores).
        n_rl_prompts: prompts for policy optimisation.
        n_eval_prompts: held-out prompts for evaluating policies.
        n_eval_pair_prompts: held-out prompts for evaluation pairs (noise-free labels).
        shifted_behaviour: name → rates (as in ``behaviour_policies``) of each policy of the
            shifted held-out pairs (default ``DEFAULT_SHIFTED_BEHAVIOUR``). Each needs a flaw
            (a rate above 0) that neither the SFT teacher nor any behaviour policy has, and a
            name that is not a behaviour policy's.
        n_shifted_pair_prompts: held-out prompts for the shifted pairs
            (``eval_pairs_shifted.jsonl``, noise-free labels); 0: no shifted split, the file
            is not written (one left by an earlier run in ``out`` is removed).
        n_val_prompts: held-out validation prompts (``val_prompts.jsonl``), disjoint from the
            test prompts (``eval_prompts.jsonl``) and from every other split: what a study
            tunes and watches on; 0: none (the file is not written, a stale one removed).
        seed: random seed; the same arguments give the same files.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    behaviour = dict(behaviour_policies or DEFAULT_BEHAVIOUR)
    _check_rates("behaviour_policies", behaviour)
    shifted = dict(shifted_behaviour or DEFAULT_SHIFTED_BEHAVIOUR)
    _check_rates("shifted_behaviour", shifted)
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt={responses_per_prompt} must be >= 2")
    if n_val_prompts < 0:
        raise ValueError(f"n_val_prompts={n_val_prompts} must be >= 0 (0: no validation split)")
    if n_shifted_pair_prompts < 0:
        raise ValueError(f"n_shifted_pair_prompts={n_shifted_pair_prompts} must be >= 0 "
                         "(0: no shifted split)")
    training_flaws = _flaws((sft_error_rate, sft_dedup_rate)).union(
        *(_flaws(rates) for rates in behaviour.values()))
    if n_shifted_pair_prompts:
        for name, rates in shifted.items():
            if name in behaviour:
                raise ValueError(f"shifted_behaviour[{name!r}]: a behaviour policy has that "
                                 "name; shifted policies must be new ones, rename it")
            if not _flaws(rates) - training_flaws:
                raise ValueError(
                    f"shifted_behaviour[{name!r}] = {rates} has no flaw the training data "
                    f"lacks (its flaws {sorted(_flaws(rates))}, the training data's "
                    f"{sorted(training_flaws)}); give it a rate above 0 for a flaw no "
                    "behaviour policy has, e.g. the swap rate (4th number)")
    t = get_task(task, min_digits=min_digits, max_digits=max_digits)
    rng = random.Random(seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    save_char_tokenizer(t.alphabet, root / "tokenizer")

    seen: set[str] = set()
    sft_prompts = _unique_prompts(t, n_sft, rng, seen)
    traj_prompts = _unique_prompts(t, n_trajectory_prompts, rng, seen)
    rl_prompts = _unique_prompts(t, n_rl_prompts, rng, seen)
    eval_prompts = _unique_prompts(t, n_eval_prompts, rng, seen)
    eval_pair_prompts = _unique_prompts(t, n_eval_pair_prompts, rng, seen)

    sft = [{"prompt": p, "response": t.noisy_response(p, sft_error_rate, rng, sft_dedup_rate)}
           for p in sft_prompts]

    names = sorted(behaviour)
    trajectories, pairs = [], []
    for p in traj_prompts:
        policy = rng.choice(names)
        responses = [t.noisy_response(p, *behaviour[policy][:1], rng, *behaviour[policy][1:])
                     for _ in range(responses_per_prompt)]
        golds = [t.gold_score(p, r) for r in responses]
        scores = [round(g + rng.gauss(0.0, score_noise), 4) if score_noise else g for g in golds]
        trajectories += [{"prompt": p, "response": r, "score": s, "gold": g, "policy": policy}
                         for r, s, g in zip(responses, scores, golds)]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if responses[i] == responses[j] or scores[i] == scores[j]:
                    continue
                hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                pairs.append({"prompt": p, "chosen": responses[hi], "rejected": responses[lo],
                              "policy": policy})

    eval_pairs = _held_out_pairs(t, eval_pair_prompts, behaviour, rng)

    # Drawn last, from the same stream: every split above is what it is without this one.
    shifted_prompts = _unique_prompts(t, n_shifted_pair_prompts, rng, seen)
    shifted_pairs = _held_out_pairs(t, shifted_prompts, shifted, rng)
    # Drawn after that, likewise: the validation prompts change no split above either.
    val_prompts = _unique_prompts(t, n_val_prompts, rng, seen)

    splits = {
        "sft": sft,
        "trajectories": trajectories,
        "pairs": pairs,
        "rl_prompts": [{"prompt": p} for p in rl_prompts],
        "eval_prompts": [{"prompt": p} for p in eval_prompts],
        "eval_pairs": eval_pairs,
    }
    for name, rows in splits.items():
        _write_jsonl(root / f"{name}.jsonl", rows)
    if n_shifted_pair_prompts:
        _write_jsonl(root / "eval_pairs_shifted.jsonl", shifted_pairs)
    else:  # no shifted split: leave no stale file of an earlier run
        (root / "eval_pairs_shifted.jsonl").unlink(missing_ok=True)
    if n_val_prompts:
        _write_jsonl(root / "val_prompts.jsonl", [{"prompt": p} for p in val_prompts])
    else:
        (root / "val_prompts.jsonl").unlink(missing_ok=True)

    def mean_gold(rows: list[dict], key: str) -> float | None:
        vals = [t.gold_score(r["prompt"], r[key]) for r in rows]
        return round(sum(vals) / len(vals), 4) if vals else None

    manifest = {
        "task": task,
        "args": {
            "min_digits": min_digits,
            "max_digits": max_digits,
            "n_sft": n_sft,
            "sft_error_rate": sft_error_rate,
            "sft_dedup_rate": sft_dedup_rate,
            "n_trajectory_prompts": n_trajectory_prompts,
            "behaviour_policies": behaviour,
            "responses_per_prompt": responses_per_prompt,
            "score_noise": score_noise,
            "n_rl_prompts": n_rl_prompts,
            "n_eval_prompts": n_eval_prompts,
            "n_eval_pair_prompts": n_eval_pair_prompts,
            "shifted_behaviour": shifted,
            "n_shifted_pair_prompts": n_shifted_pair_prompts,
            "n_val_prompts": n_val_prompts,
            "seed": seed,
        },
        "counts": {name: len(rows) for name, rows in splits.items()},
        "val_prompts": len(val_prompts),  # (apart from "counts", like the shifted split)
        "mean_gold": {
            "sft_teacher": mean_gold(sft, "response"),
            "trajectories": mean_gold(trajectories, "response"),
            "pairs_chosen": mean_gold(pairs, "chosen"),
            "pairs_rejected": mean_gold(pairs, "rejected"),
        },
        "pair_label_agreement_with_gold": round(
            sum(t.gold_score(r["prompt"], r["chosen"]) > t.gold_score(r["prompt"], r["rejected"])
                for r in pairs) / max(len(pairs), 1), 4),
        # the shifted split apart from "counts": held out for a distribution-shift study
        "eval_pairs_shifted": {
            "count": len(shifted_pairs),
            "policies": {name: dict(zip(FLAWS, rates)) for name, rates in shifted.items()},
            "training_flaws": sorted(training_flaws),
            "flaws_not_in_training": sorted(
                set().union(*(_flaws(r) for r in shifted.values())) - training_flaws),
            "mean_gold": {"chosen": mean_gold(shifted_pairs, "chosen"),
                          "rejected": mean_gold(shifted_pairs, "rejected")},
        } if n_shifted_pair_prompts else None,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
