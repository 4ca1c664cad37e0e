"""What bfloat16 frozen models cost in accuracy, on the embedded study's trained models.

``model.models.frozen_dtype=bfloat16`` (or ``auto`` on hardware with bfloat16 kernels) runs the
frozen reference, GVM and reward model in half precision. This measures, for the same trained
weights in float32 and in bfloat16:

1. **pair accuracy** of every seed's GVM and reward model on the held-out pairs and on the
   shifted pairs (the report's protocol, ``report/value_accuracy.py``);
2. **the reference's log-probs** of the held-out responses (the SFT policy, the reference of
   every RL run): the mean ``|Δ log p|`` per token, and the KL per response that rounding alone
   adds at step 0 (the float32 policy scored against its bfloat16 copy: ``Σ_t Δ log p``);
3. **a short DVPO run** per seed (``configs/dvpo.yaml``): the test prompts'
   gold reward, KL and win rate, the sampler gap (engine against trainer log-probs of the
   *policy*, which stays in float32: it should not move), the score phase's seconds and the
   frozen weights' size.

4. **the score phase's time at a real shape** (``--shape smollm2-135m``): the frozen
   reference's log-probs and a GVM's values of a fixed batch (random weights of the shape,
   ``--rows`` × (``--prompt_len`` + ``--length``)), float32 and bfloat16 alternating
   (``--repeats`` each), so a drift of the machine's load hits both; and the bytes each holds.

The whole RL step at a real shape: ``benchmarks/cost.py --methods dvpo dvpo_bf16``.

    bash scripts/run.sh                      # the default study: runs/sorting, data/sorting
    .venv/bin/python -m benchmarks.frozen_bf16 --seeds 0 1 2 --out benchmarks/results/frozen_bf16

Writes ``frozen_bf16.json`` and ``frozen_bf16.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
PARTS = ("accuracy", "reference", "rl", "score")


def accuracy_effect(runs: Path, data: Path, seeds: list[int]) -> list[dict]:
    """Pair accuracy (every aggregation) of each seed's GVM and reward model, per dtype."""
    from dvpo_lightning.report.value_accuracy import pair_accuracies

    files = {"held_out": str(data / "eval_pairs.jsonl"),
             "shifted": str(data / "eval_pairs_shifted.jsonl")}
    rows = []
    for kind in ("gvm", "reward_model"):
        for seed in seeds:
            model = runs / kind / f"seed{seed}" / "model"
            for dtype in DTYPES:
                got = pair_accuracies(str(model), list(files.values()),
                                      tokenizer=str(data / "tokenizer"), dtype=dtype)
                for split, path in files.items():
                    rows.append({"model": kind, "seed": seed, "dtype": dtype, "pairs": split,
                                 **got[path]["accuracy"]})
    return rows


@torch.no_grad()
def reference_effect(runs: Path, data: Path, seeds: list[int]) -> list[dict]:
    """The SFT policy's log-probs of the held-out pairs' responses, float32 against its
    bfloat16 copy: ``|Δ log p|`` per token and ``Σ_t Δ log p`` per response."""
    from dvpo_lightning.data.formats import load_examples
    from dvpo_lightning.data.pairwise import collate_pairs, encode_pairs
    from dvpo_lightning.data.tokenize import LengthReport
    from dvpo_lightning.models.loading import load_causal_lm, load_tokenizer
    from dvpo_lightning.rollout.scoring import policy_logps

    tok = load_tokenizer(str(data / "tokenizer"))
    path = str(data / "eval_pairs.jsonl")
    items = encode_pairs(load_examples(path, "pairwise"), tok, True, 512, "truncate",
                         LengthReport(path, 512, "truncate"))
    out = []
    for seed in seeds:
        model = load_causal_lm(str(runs / "sft" / f"seed{seed}" / "model"), tok).eval()
        half = load_causal_lm(str(runs / "sft" / f"seed{seed}" / "model"), tok).eval()
        half.to(torch.bfloat16)
        gaps, per_response, tokens = [], [], 0
        for i in range(0, len(items), 64):
            b = collate_pairs(items[i:i + 64], tok.pad_token_id)
            seq = (b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
            full, rounded = policy_logps(model, *seq)[0], policy_logps(half, *seq)[0]
            mask = b["response_mask"].bool()
            gaps.append((full - rounded).abs()[mask])
            per_response.append(((full - rounded) * mask).sum(1))
            tokens += int(mask.sum())
        gap, kl = torch.cat(gaps), torch.cat(per_response)
        out.append({"seed": seed, "tokens": tokens, "responses": int(kl.numel()),
                    "mean_abs_dlogp": float(gap.mean()), "max_abs_dlogp": float(gap.max()),
                    "kl_per_response_mean": float(kl.mean()),
                    "kl_per_response_abs_max": float(kl.abs().max())})
    return out


def rl_effect(runs: Path, data: Path, seeds: list[int], steps: int, engine: str,
              out: Path) -> list[dict]:
    """One DVPO run per seed and frozen dtype; the test evaluation, the sampler gap and the
    score phase's time from the run's summary and its CSV log."""
    rows = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for seed in seeds:
        for dtype in DTYPES:
            root = out / "rl" / dtype / f"seed{seed}"
            cmd = [sys.executable, "-m", "dvpo_lightning", "fit",
                   "--config", str(REPO / "configs" / "dvpo.yaml"),
                   f"--seed_everything={seed}", f"--trainer.default_root_dir={root}",
                   f"--trainer.max_steps={steps}", "--trainer.enable_checkpointing=false",
                   f"--trainer.val_check_interval={min(steps, 10)}",
                   "--trainer.enable_progress_bar=false",
                   "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                   f"--trainer.logger.save_dir={root}", "--trainer.logger.name=csv",
                   "--trainer.logger.version=run",
                   f"--model.init_args.policy={runs / 'sft' / f'seed{seed}' / 'model'}",
                   f"--model.init_args.value_model={runs / 'gvm' / f'seed{seed}' / 'model'}",
                   "--model.init_args.export_dir=null",
                   f"--data.init_args.train_path={data / 'rl_prompts.jsonl'}",
                   f"--data.init_args.eval_path={data / 'val_prompts.jsonl'}",
                   f"--data.init_args.test_path={data / 'eval_prompts.jsonl'}",
                   f"--data.init_args.tokenizer={data / 'tokenizer'}",
                   f"--model.init_args.rollout.engine={engine}",
                   *(["--model.init_args.models.frozen_dtype=bfloat16"]
                     if dtype == "bfloat16" else [])]
            shutil.rmtree(root, ignore_errors=True)  # (a rerun starts clean)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the {dtype} DVPO run (seed {seed}) failed:\n"
                                   + done.stderr[-3000:])
            log_dir = root / "csv" / "run"  # (the summary is written to the logger's dir)
            summary = json.loads((log_dir / "summary.json").read_text())
            log = list(csv.DictReader((log_dir / "metrics.csv").open()))
            gap = [float(r["rollout/sampler_logp_diff_mean"]) for r in log
                   if r.get("rollout/sampler_logp_diff_mean")]
            test, cost = summary["test_eval"], summary["cost"]
            rows.append({"seed": seed, "dtype": dtype, "engine": engine, "rl_steps": steps,
                         "gold": test["eval/gold_reward"], "kl": test["eval/kl_to_ref"],
                         "win_rate": test["eval/win_rate_vs_ref"],
                         "sampler_gap_mean": sum(gap) / len(gap) if gap else None,
                         "sampler_gap_max": max(gap) if gap else None,
                         "score_s": cost["score_s"], "step_s": cost["step_s"],
                         "frozen_weights_gb": cost["frozen_weights_gb"],
                         "wall_s": time.perf_counter() - t0})
    return rows


@torch.no_grad()
def score_phase_effect(shape: str, rows: int, prompt_len: int, length: int,
                       repeats: int) -> dict:
    """Seconds of the score phase's frozen work (reference log-probs + GVM values) on one
    fixed batch, float32 and bfloat16 interleaved: per dtype the median and range."""
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.cost import SHAPES
    from dvpo_lightning.models.value_model import ValueModel
    from dvpo_lightning.rollout.scoring import policy_logps, response_values

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    full = (LlamaForCausalLM(config).eval(), ValueModel(LlamaForCausalLM(config).model).eval())
    models = {"float32": full,  # the same weights, rounded
              "bfloat16": tuple(copy.deepcopy(m).to(torch.bfloat16) for m in full)}
    vocab = config.vocab_size
    seq = (torch.randint(0, vocab, (rows, prompt_len)),
           torch.ones(rows, prompt_len, dtype=torch.bool),
           torch.randint(0, vocab, (rows, length)), torch.ones(rows, length, dtype=torch.bool))

    def once(dtype: str) -> float:
        reference, gvm = models[dtype]
        t0 = time.perf_counter()
        policy_logps(reference, *seq)
        response_values(gvm, *seq)
        return time.perf_counter() - t0

    for dtype in DTYPES:  # warm-up
        once(dtype)
    times = {d: [] for d in DTYPES}
    for _ in range(repeats):
        for dtype in DTYPES:
            times[dtype].append(once(dtype))
    out = {"shape": shape, "rows": rows, "prompt_len": prompt_len, "length": length,
           "repeats": repeats, "threads": torch.get_num_threads()}
    for dtype in DTYPES:
        out[dtype] = {"median_s": statistics.median(times[dtype]), "min_s": min(times[dtype]),
                      "max_s": max(times[dtype]), "times_s": times[dtype],
                      "weights_gb": sum(p.numel() * p.element_size() for m in models[dtype]
                                        for p in m.parameters()) / 2**30}
    out["bf16_over_fp32"] = out["bfloat16"]["median_s"] / out["float32"]["median_s"]
    return out


def _mean(rows: list[dict], key: str, **where) -> float:
    vals = [r[key] for r in rows if all(r[k] == v for k, v in where.items())]
    return sum(vals) / len(vals)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Frozen models in bfloat16 — {m['device']}, seeds {m['seeds']}", ""]
    acc = result["accuracy"]
    if acc:
        aggs = ["mean", "final"]  # the report's two (every aggregation: the JSON)
        lines += ["## Pair accuracy (mean over seeds; token mean and final value)", "",
                  "| model | pairs | " + " | ".join(f"{a} fp32 | {a} bf16" for a in aggs)
                  + " | largest per-seed change |",
                  "|---|---|" + "---|---|" * len(aggs) + "---|"]
        for kind in dict.fromkeys(r["model"] for r in acc):
            for split in dict.fromkeys(r["pairs"] for r in acc):
                cells = []
                for a in aggs:
                    cells += [f"{_mean(acc, a, model=kind, pairs=split, dtype=d):.4f}"
                              for d in DTYPES]
                change = max(abs(x[a] - y[a]) for x in acc for y in acc for a in aggs
                             if x["model"] == y["model"] == kind and x["pairs"] == y["pairs"]
                             == split and x["seed"] == y["seed"] and x["dtype"] != y["dtype"])
                lines.append(f"| {kind} | {split} | " + " | ".join(cells) + f" | {change:.4f} |")
        lines.append("")
    ref = result["reference"]
    if ref:
        lines += ["## The reference's log-probs, float32 against bfloat16", "",
                  "| seed | tokens | mean abs Δ log p | max abs Δ log p | "
                  "KL per response from rounding | largest abs |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['tokens']} | {r['mean_abs_dlogp']:.5f} | "
                  f"{r['max_abs_dlogp']:.4f} | {r['kl_per_response_mean']:.5f} | "
                  f"{r['kl_per_response_abs_max']:.4f} |" for r in ref]
        lines.append("")
    rl = result["rl"]
    if rl:
        lines += [f"## DVPO, {rl[0]['rl_steps']} RL steps ({rl[0]['engine']} engine), test "
                  "prompts", "",
                  "| seed | frozen dtype | gold | KL | win rate | sampler gap (mean) | "
                  "score s / step | frozen weights (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in rl:
            gap = "—" if r["sampler_gap_mean"] is None else f"{r['sampler_gap_mean']:.2e}"
            lines.append(f"| {r['seed']} | {r['dtype']} | {r['gold']:.4f} | {r['kl']:.4f} | "
                         f"{r['win_rate']:.4f} | {gap} | {r['score_s']:.4f} | "
                         f"{1024 * r['frozen_weights_gb']:.3f} |")
        for d in DTYPES:
            lines.append(f"| mean | {d} | {_mean(rl, 'gold', dtype=d):.4f} | "
                         f"{_mean(rl, 'kl', dtype=d):.4f} | {_mean(rl, 'win_rate', dtype=d):.4f} "
                         f"| | {_mean(rl, 'score_s', dtype=d):.4f} | |")
        lines.append("")
    score = result.get("score_phase")
    if score:
        lines += [f"## The score phase's frozen work at the {score['shape']} shape", "",
                  f"The reference's log-probs and a GVM's values of {score['rows']} rows × "
                  f"({score['prompt_len']} + {score['length']}) tokens, random weights, "
                  f"{score['threads']} thread(s); float32 and bfloat16 alternating, "
                  f"{score['repeats']} times each (median, min–max):", "",
                  "| frozen dtype | seconds | weights (GB) |", "|---|---|---|"]
        for d in DTYPES:
            r = score[d]
            lines.append(f"| {d} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) | "
                         f"{r['weights_gb']:.3f} |")
        lines += ["", f"bfloat16 ÷ float32: {score['bf16_over_fp32']:.2f}", ""]
    lines.append(f"Commit {m['commit']}; {m['when']}; {m['note']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/sorting", help="the study's runs directory")
    p.add_argument("--data", default="data/sorting", help="the study's data directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rl_steps", type=int, default=60, help="0 skips the DVPO runs")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                   help="vllm needs heads of 32+ dims on a CPU (not the embedded task)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="which measurements (score: a real shape, random weights)")
    p.add_argument("--shape", default="smollm2-135m", help="the score part's model shape")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/frozen_bf16")
    p.add_argument("--note", default="", help="what else ran on the machine, for the table")
    args = p.parse_args(argv)
    runs, data, out = (Path(x).resolve() for x in (args.runs, args.data, args.out))
    out.mkdir(parents=True, exist_ok=True)
    trained = {"accuracy", "reference", "rl"} & set(args.parts)
    needs = [data / "eval_pairs.jsonl", *(runs / k / f"seed{s}" / "model" for k in
                                          ("sft", "gvm", "reward_model") for s in args.seeds)]
    for need in needs if trained else []:
        if not need.exists():
            raise SystemExit(f"frozen_bf16: {need} is missing; run the default study first "
                             "(bash scripts/run.sh) or point --runs / --data at one")
    from dvpo_lightning.models.frozen_dtype import bf16_kernels
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    kernels = bf16_kernels(torch.device("cpu"))
    result = {"meta": {"device": f"CPU ({kernels or 'no bfloat16 kernels'}), "
                                 f"{torch.get_num_threads()} torch threads",
                       "seeds": args.seeds, "commit": commit,
                       "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "note": args.note},
              "accuracy": accuracy_effect(runs, data, args.seeds)
              if "accuracy" in args.parts else [],
              "reference": reference_effect(runs, data, args.seeds)
              if "reference" in args.parts else [],
              "rl": rl_effect(runs, data, args.seeds, args.rl_steps, args.engine, out)
              if "rl" in args.parts and args.rl_steps else [],
              "score_phase": score_phase_effect(args.shape, args.rows, args.prompt_len,
                                                args.length, args.repeats)
              if "score" in args.parts else None}
    (out / "frozen_bf16.json").write_text(json.dumps(result, indent=1))
    (out / "frozen_bf16.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
