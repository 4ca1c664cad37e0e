"""Does a vLLM engine built in the training process slow the trainer's own work? Interleaved A/B.

    python -m benchmarks.engine_process_ab --runs 5                 # tiny shape, CPU (minutes)
    python -m benchmarks.engine_process_ab --shape smollm2-135m --runs 5 --batch 16 \\
        --prompt_len 64 --response_len 128 --out benchmarks/results/engine_process_ab

Each run is a fresh child process that times the two trainer phases of a small RL step on the
same fixed batch (random weights of a real shape, fixed seed; the work does not depend on
whether an engine exists):

- ``score``: the policy's and the reference's log-probs of the responses (no grad, as the
  experience maker scores a rollout);
- ``update``: one plain policy-gradient step per mini-batch (forward with
  grad, backward, AdamW step), as many mini-batches as ``--minibatches``.

Arm ``A`` (``no_engine``) only does that; arm ``B`` (``engine``) first builds a
:class:`~dvpo_lightning.rollout.vllm_engine.VLLMEngine` on the policy and samples one rollout
(build, weight push, generation), then times the same phases. The arms alternate
``A B A B …`` (``--runs`` each), so a drift of the machine's load hits both alike. Each run
reports the median over ``--repeats`` repetitions after one warm-up; the summary gives per arm
the median and spread over runs and ``B ÷ A``. Writes ``engine_process_ab.json`` (every run)
and ``engine_process_ab.md`` into ``--out``.

Run it on a quiet machine: on a shared CPU the spread between runs is larger than the effect
being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("no_engine", "engine")
PHASES = ("score_s", "update_s")


def _child(args) -> dict:
    """One run of one arm (in this process); returns its phase timings."""
    import torch

    from benchmarks.decode import build_model
    from dvpo_lightning.rollout.scoring import policy_logps

    torch.set_num_threads(args.threads)
    policy = build_model(args.shape, "cpu", torch.float32).train()
    reference = build_model(args.shape, "cpu", torch.float32).eval().requires_grad_(False)
    vocab = policy.config.vocab_size
    g = torch.Generator().manual_seed(0)
    b, p, t = args.batch, args.prompt_len, args.response_len
    seq = (torch.randint(3, vocab, (b, p), generator=g), torch.ones(b, p, dtype=torch.bool),
           torch.randint(3, vocab, (b, t), generator=g), torch.ones(b, t, dtype=torch.bool))
    advantages = torch.randn(b, t, generator=g)
    built_s = 0.0
    if args.arm == "engine":
        from dvpo_lightning.rollout.generation import SamplingConfig
        from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions

        t0 = time.perf_counter()
        engine = VLLMEngine(2, 0, VLLMOptions(kv_cache_gb=args.kv_cache_gb))
        policy.eval()
        engine.generate(policy, seq[0][:2], seq[1][:2], SamplingConfig(4), weights_version=0)
        policy.train()
        built_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def score() -> None:
        with torch.no_grad():
            policy_logps(policy, *seq)
            policy_logps(reference, *seq)

    def update() -> None:
        for idx in torch.arange(b).chunk(args.minibatches):
            logp, _ = policy_logps(policy, *(s[idx] for s in seq))
            loss = -(logp * advantages[idx]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    out = {"arm": args.arm, "engine_build_s": built_s}
    for name, fn in (("score_s", score), ("update_s", update)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def _run_child(arm: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.engine_process_ab", "--child", "--arm", arm,
           *(f"--{k}={v}" for k, v in (
               ("shape", args.shape), ("batch", args.batch), ("prompt_len", args.prompt_len),
               ("response_len", args.response_len), ("minibatches", args.minibatches),
               ("repeats", args.repeats), ("threads", args.threads),
               ("kv_cache_gb", args.kv_cache_gb)))]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                         cwd=Path(__file__).resolve().parents[1])
    if run.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Per arm and phase: median, min, max over runs; per phase ``engine ÷ no_engine`` of the
    medians."""
    out: dict = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        out[arm] = {ph: {"median": statistics.median(r[ph] for r in rows),
                         "min": min(r[ph] for r in rows), "max": max(r[ph] for r in rows),
                         "runs": len(rows)} for ph in PHASES}
    out["ratio"] = {ph: out["engine"][ph]["median"] / out["no_engine"][ph]["median"]
                    for ph in PHASES}
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"Engine in the process, interleaved A/B: shape {meta['shape']}, batch "
             f"{meta['batch']} × ({meta['prompt_len']} + {meta['response_len']}) tokens, "
             f"{meta['runs']} runs per arm, median of {meta['repeats']} repetitions per run, "
             f"{meta['threads']} thread(s), {meta['machine']}.", "",
             "| phase | no engine: median s (min–max) | engine: median s (min–max) | "
             "engine ÷ no engine |", "|---|---|---|---|"]
    for ph in PHASES:
        a, b = summary["no_engine"][ph], summary["engine"][ph]
        lines.append(f"| {ph[:-2]} | {a['median']:.4f} ({a['min']:.4f}–{a['max']:.4f}) | "
                     f"{b['median']:.4f} ({b['min']:.4f}–{b['max']:.4f}) | "
                     f"{summary['ratio'][ph]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="test", help="a shape of benchmarks/decode.py")
    ap.add_argument("--runs", type=int, default=5, help="runs per arm (interleaved)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--response_len", type=int, default=32)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv_cache_gb", type=float, default=0.25)
    ap.add_argument("--out", default="benchmarks/results/engine_process_ab")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return None
    runs = [_run_child(arm, args) for _ in range(args.runs) for arm in ARMS]
    meta = {k: getattr(args, k) for k in ("shape", "runs", "batch", "prompt_len",
                                          "response_len", "minibatches", "repeats", "threads")}
    meta.update(machine=f"{platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs", python=platform.python_version())
    summary = summarize(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summary, "runs": runs}
    (out / "engine_process_ab.json").write_text(json.dumps(doc, indent=2))
    (out / "engine_process_ab.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return doc


if __name__ == "__main__":
    main()
