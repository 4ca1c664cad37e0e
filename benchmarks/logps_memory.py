"""Peak memory of per-token log-probs: the plain float32 log-softmax vs ``token_logps``.

    python -m benchmarks.logps_memory --out DIR                                   # CPU, small
    python -m benchmarks.logps_memory --batch 32 --length 257 --vocab 151936 --out DIR   # GPU

One forward + backward from hidden states through an output head ``(hidden, vocab)`` to the
log-probs of ``length − 1`` targets, the logits in bf16 (as under autocast). ``plain`` is
``logits[:, :-1].float().log_softmax(-1).gather(...)``; ``chunked`` is
``dvpo_lightning.ops.token_logps.token_logps`` on those logits; ``fused`` is ``head_token_logps``
(the head inside the chunks: the whole logits never exist). Each runs in its own process;
the figure is the peak above the state before the head (GPU: ``torch.cuda.max_memory_allocated``;
CPU: peak RSS, which includes allocator slack). Writes ``logps_memory.json`` and
``logps_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "chunked", "fused")


def measure(mode: str, batch: int, length: int, vocab: int, hidden: int, device: str) -> dict:
    """Peak extra memory (GB) of one forward + backward of ``mode`` in this process."""
    import resource

    import torch

    from dvpo_lightning.ops.token_logps import head_token_logps, token_logps

    torch.manual_seed(0)
    dev = torch.device(device)
    h = torch.randn(batch, length, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16) / hidden**0.5
    targets = torch.randint(0, vocab, (batch, length - 1), device=dev)
    gpu = dev.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "fused":
        logp, _ = head_token_logps(h, weight, targets)
    else:
        logits = h @ weight.T
        if mode == "plain":
            logp = logits[:, :-1].float().log_softmax(-1).gather(2, targets[..., None]).squeeze(-1)
        else:
            logp, _ = token_logps(logits, targets)
    logp.sum().backward()
    if gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_extra_gb": (peak - start) / 2**30,
            "seconds": time.perf_counter() - t0,
            "logits_gb": batch * length * vocab * 2 / 2**30}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logps_memory",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=257, help="logit columns per row (T + 1)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="benchmarks/results/logps_memory")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = [a.batch, a.length, a.vocab, a.hidden, a.device]
    if a.mode:
        print(json.dumps(measure(a.mode, *shape)))
        return {}
    base = [sys.executable, "-m", "benchmarks.logps_memory", "--batch", str(a.batch),
            "--length", str(a.length), "--vocab", str(a.vocab), "--hidden", str(a.hidden),
            "--device", a.device]
    rows = [json.loads(subprocess.run([*base, "--mode", m], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]) for m in MODES]
    result = {"batch": a.batch, "length": a.length, "vocab": a.vocab, "device": a.device,
              "date": time.strftime("%Y-%m-%d"), "rows": rows,
              **{f"{r['mode']}_over_plain": (r["peak_extra_gb"] / rows[0]["peak_extra_gb"]
                                             if rows[0]["peak_extra_gb"] > 0 else None)
                 for r in rows[1:]}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logps_memory.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Log-prob memory — {a.device}, {a.batch} × {a.length} × {a.vocab} bf16 logits",
             "", "| mode | peak extra (GB) | logits (GB) | s |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['peak_extra_gb']:.3f} | {r['logits_gb']:.3f} | "
              f"{r['seconds']:.3f} |" for r in rows]
    lines.append("")
    for r in rows[1:]:
        ratio = result[f"{r['mode']}_over_plain"]
        lines.append(f"{r['mode']} ÷ plain: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    (out / "logps_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
