"""Model-FLOPs utilisation of the policy update (PPO-clip on one mini-batch), per step.

    python -m benchmarks.mfu --shape qwen2.5-0.5b --batch 32 --seq 384 --out DIR   # GPU
    python -m benchmarks.mfu --shape tiny --batch 4 --seq 32 --out /tmp/mfu         # CPU smoke

One step is what ``DVPOModule`` runs per mini-batch: the policy's forward over prompt +
response (``rollout.scoring.policy_logps``: the output head over the response columns only,
inside float32 chunks unless ``--fused_head off``), the PPO-clip loss
(``losses.ppo_clip_loss``, token mean), backward, gradient clipping and an AdamW step, in
bf16 autocast on a GPU. Model FLOPs per step = 6 · N · tokens + 6 · hidden · vocab · head
positions + the attention term 12 · layers · hidden · seq² · batch / 2 (causal), N the
body's parameters without the embedding, the (tied) output head counted on the positions it
runs over (the response's T per row, T + 1 unfused; the fused head's recomputation in the
backward is not counted, as activation checkpointing's is not); MFU = model FLOPs per second
÷ the device's dense matmul ceiling, measured here by timing a large matmul in the same dtype
(so MFU is against what this device reaches, not its datasheet). Writes ``mfu.json`` and ``mfu.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.cost import SHAPES


def model_flops(config, batch: int, seq: int, head_positions: int | None = None) -> float:
    """Forward + backward FLOPs of one step: ``6·N_body·batch·seq + 6·hidden·vocab·batch·
    head_positions + 6·layers·hidden·seq²·batch``.

    ``head_positions``: the positions per row the output head runs over (``seq`` when None;
    ``policy_logps`` runs it over the response's ``T`` fused, ``T + 1`` unfused, so the
    prompt's head FLOPs are neither done nor counted).
    """
    h, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * config.intermediate_size  # qkv, o, mlp
    head = h * v * (seq if head_positions is None else head_positions)  # tied to the embedding
    attention = 12 * layers * h * seq * seq * batch / 2  # QK^T and AV, fwd+bwd, causal half
    return 6 * batch * (layers * per_layer * seq + head) + attention


def matmul_ceiling(device, dtype, size: int, repeats: int = 10, best: bool = False) -> float:
    """Dense matmul FLOP/s reached on ``device`` in ``dtype``: the median of ``repeats``, or
    with ``best`` the fastest (a peak: on a shared machine a neighbour's load only slows a
    repeat down, so the fastest is the closest to what the hardware reaches)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * size**3 / (min(times) if best else statistics.median(times))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dvpo_lightning.models.loading import forward_accepts
    from dvpo_lightning.ops.losses import ppo_clip_loss
    from dvpo_lightning.rollout.scoring import fused_head_parts, policy_logps

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    half = device.type == "cuda"
    torch.manual_seed(0)
    cfg = dict(SHAPES[args.shape])
    config = LlamaConfig(max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, **cfg)
    if args.attn:
        config._attn_implementation = args.attn
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    p = args.seq // 3  # a third prompt, two thirds response (the RL layout)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.seq), device=device)
    prompt, response = ids[:, :p], ids[:, p:]
    pmask = torch.ones_like(prompt, dtype=torch.bool)
    rmask = torch.ones_like(response, dtype=torch.bool)
    adv = torch.randn(response.shape, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            logp, _ = policy_logps(model, prompt, pmask, response, rmask,
                                   fused_head=args.fused_head == "on")
            loss = ppo_clip_loss(logp, logp.detach() + 0.01, adv, rmask)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.repeats):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    fused = args.fused_head == "on" and fused_head_parts(model) is not None
    head_positions = (args.seq - p if fused else args.seq - p + 1
                      if forward_accepts(model, "logits_to_keep") else args.seq)
    flops = model_flops(config, args.batch, args.seq, head_positions)
    ceiling = matmul_ceiling(device, torch.bfloat16 if half else torch.float32,
                             args.matmul_size or (8192 if half else 1024))
    out = {"shape": args.shape, "device": torch.cuda.get_device_name(0) if half else "cpu",
           "dtype": "bf16-autocast" if half else "float32", "batch": args.batch, "seq": args.seq,
           "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn or "default",
           "head_positions": head_positions, "fused_head": fused,
           "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
           "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
           "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
           "matmul_ceiling_tflops": ceiling / 1e12, "mfu": flops / step_s / ceiling,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if half else None,
           "date": time.strftime("%Y-%m-%d")}
    return out


def markdown(r: dict) -> str:
    return "\n".join([
        f"# Policy-update MFU — {r['device']}, shape {r['shape']}, {r['batch']} × {r['seq']} "
        f"tokens, {r['dtype']}", "",
        "| s / step | tokens / s | model TFLOP / step | achieved TFLOP/s | matmul ceiling "
        "TFLOP/s | MFU |", "|---|---|---|---|---|---|",
        f"| {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['model_tflops_per_step']:.3f} | "
        f"{r['achieved_tflops']:.2f} | {r['matmul_ceiling_tflops']:.2f} | {r['mfu']:.1%} |", "",
        "Median over the timed steps after warm-up; the ceiling is a matmul timed on the same "
        "device and dtype."])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mfu", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attn", default=None, help="eager | sdpa | flash_attention_2 (default: HF's)")
    p.add_argument("--fused_head", choices=("on", "off"), default="on",
                   help="log-probs with the head inside the chunks (DVPOModule's fused_head)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--matmul_size", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/mfu")
    p.add_argument("--append", default=None, metavar="FILE",
                   help="also append the record to FILE as one JSON line (one file for several "
                        "runs: benchmarks/gpu_session.sh)")
    args = p.parse_args(argv)
    r = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mfu.json").write_text(json.dumps(r, indent=2))
    (out / "mfu.md").write_text(markdown(r))
    if args.append:
        with open(args.append, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(markdown(r))
    return r


if __name__ == "__main__":
    main()
