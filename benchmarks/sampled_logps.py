"""Which distribution the log-probs are of, measured: the vLLM engine against the trainer at a
sampling setting, and the KL to the reference that the convention gives at RL step 0.

    python -m benchmarks.sampled_logps                                   # SmolLM2-135M-Instruct
    python -m benchmarks.sampled_logps --model test-llama-32 --prompts 4  # tiny, random

For ``--prompts`` instructions (chat template), the colocated vLLM engine (float32, CPU or GPU)
samples ``--new_tokens`` tokens at ``--temperature`` / ``--top_p`` / ``--top_k``; with the
policy's weights pushed, the trainer then scores the same tokens. Printed, as mean per token:

- ``engine_vs_trainer``: |engine log-prob − ``logp_old``| (the sampler probe; float noise);
- ``engine_vs_raw``: |engine log-prob − raw ``log_softmax(z)``| (what the trainer scored before
  the transform: the size of the defect it fixes);
- ``kl0_k1``: ``logp_old − logp_ref`` with the reference = the policy, under this project's
  convention (policy: the full transform; reference: temperature only): ``−log`` of the
  tempered probability mass the truncation keeps, the KL penalty's value at step 0;
- ``kl0_k1_raw_ref``: the same with an untempered reference (``log_softmax(z)``);
- ``score_s`` / ``score_s_raw``: the trainer's scoring pass with and without the transform
  (median of ``--repeats`` interleaved passes).

See docs/sampling.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.data.tokenize import encode_prompt
from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.rollout.generation import SamplingConfig
from dvpo_lightning.rollout.scoring import policy_logps
from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?",
           "Give me three tips for learning to cook.", "Explain photosynthesis to a child.",
           "Write a short story about a robot who learns to paint.",
           "List five fruits and their colours.", "How do I make a cup of tea?",
           "Describe the weather on a rainy day in London."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", default=None, help="for a tiny config (default: the model)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--top_k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="timed scoring passes of each kind")
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.tokenizer or args.model)
    torch.manual_seed(args.seed)
    model = load_causal_lm(args.model, tok, dtype="float32").eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    texts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[:args.prompts]
    ids, mask = pad_left([encode_prompt(tok, t) for t in texts], tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    cfg = SamplingConfig(args.new_tokens, args.temperature, args.top_p, args.top_k)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id, VLLMOptions(dtype="float32"))
    samples = engine.generate(model, ids, mask, cfg, weights_version=0)
    seq = (ids, mask, samples.response_ids, samples.response_mask)
    m = samples.response_mask
    n = m.sum()

    def per_token(x: torch.Tensor) -> float:
        return float((x * m).sum() / n)

    transform = cfg.policy_transform((tok.eos_token_id,))
    times: dict[str, list[float]] = {"score_s": [], "score_s_raw": []}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: the two share the machine's state
            for key, sampling in (("score_s", transform), ("score_s_raw", None)):
                t0 = time.perf_counter()
                logp = policy_logps(model, *seq, sampling=sampling)[0]
                times[key].append(time.perf_counter() - t0)
                if sampling is None:
                    raw = logp
                else:
                    old = logp
        ref = policy_logps(model, *seq, sampling=cfg.reference_transform())[0]
    out = {"model": args.model, "device": device.type, "tokens": int(n),
           "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                        "top_k": args.top_k},
           "engine_vs_trainer": per_token((samples.logps - old).abs()),
           "engine_vs_raw": per_token((samples.logps - raw).abs()),
           "kl0_k1": per_token(old - ref), "kl0_k1_raw_ref": per_token(old - raw),
           **{k: sorted(v)[len(v) // 2] for k, v in times.items()}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
