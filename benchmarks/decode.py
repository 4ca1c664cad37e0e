"""Time per decode step of rollout generation: HF ``generate`` vs the colocated vLLM engine.

    python -m benchmarks.decode --shape test                      # CPU smoke run (seconds)
    python -m benchmarks.decode --shape smollm2-135m --batch_sizes 64 256 \\
        --prompt_len 128 --new_tokens 256 --out benchmarks/results/decode_smollm2

For one model shape (random weights: cost does not depend on them) and each batch size, both
paths generate ``new_tokens`` sampled tokens per row with the length forced
(``min_new_tokens = max_new_tokens``: EOS suppressed) after a warm-up (which builds the vLLM
engine, pushes the weights and, on CUDA, captures its graphs):

- ``hf``: :class:`~dvpo_lightning.rollout.generation.HFGenerator` (eager ``generate``, dynamic
  cache);
- ``vllm``: :class:`~dvpo_lightning.rollout.vllm_engine.VLLMEngine` (vLLM in this process, its
  weights pushed from the same model; eager on a CPU, CUDA graphs on a GPU), in the same dtype.

Time per decode step = (median time of the full generation − median time of a one-token
generation, i.e. the prefill and its first sample) ÷ (``new_tokens`` − 1). The bandwidth floor
of a step is the bytes a step must read — every weight once (tied embeddings counted once) plus
the KV cache at the mean context length, ``prompt_len + new_tokens / 2`` — divided by the
device's measured copy bandwidth (a large device-to-device tensor copy; on a CPU a memcpy;
read + write bytes ÷ time). "Fraction of the floor" = floor ÷ measured step time (1.0 would be
bandwidth-bound perfection). Writes ``decode.json`` and ``decode.md`` into ``--out`` after
every row. ``hf`` is timed first, before the vLLM engine is built, so a vLLM that fails (not
installed, out of memory) cannot lose its rows: the vLLM rows then carry the error, and the
command exits non-zero once everything is written.

``--ops N`` also profiles one whole ``hf`` generation per batch size (``torch.profiler``, after
the timing) and records its ``N`` operators with the most time of their own, each as a share of
all operators' own time (Python between operators is not in it): which kernels a decode step
is made of — the weight-reading matrix multiplies, the sampler's random draws, the KV cache's
concatenations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

PAD, BOS, EOS = 0, 1, 2
SHAPES = {
    # test-llama-32's shape (dvpo_lightning/models/tiny.py; vLLM's CPU attention needs a head
    # dimension of 32 or more) with a small vocabulary: CPU smoke runs.
    "test": dict(family="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=64),
    "smollm2-135m": dict(family="llama", hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         vocab_size=49152),
    "qwen2.5-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         vocab_size=151936),
}
PATHS = ("hf", "vllm")
# Every record has these, all positive numbers.
FIELDS = ("batch_size", "step_ms", "total_s", "prefill_s", "tokens_per_s", "floor_ms",
          "fraction_of_floor", "weight_bytes", "kv_bytes_per_step", "bandwidth_gb_s")


def build_model(shape: str, device, dtype):
    """A random-weight causal LM of ``shape`` (tied embeddings) on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = config_cls(max_position_embeddings=4096, tie_word_embeddings=True,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter (a tied embedding/LM head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(config, batch: int, context: float, element_size: int) -> float:
    """K and V bytes read by one decode step at ``context`` cached tokens per row."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return batch * context * per_token * element_size


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, n_bytes: int, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by a large tensor copy on ``device``."""
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n_bytes / statistics.median(times)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_generator(path: str, args):
    """The generator of ``path`` (vLLM's engine is built here, before any timing of it)."""
    from dvpo_lightning.rollout.generation import HFGenerator
    from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions

    if path == "hf":
        return HFGenerator(EOS, PAD)
    return VLLMEngine(EOS, PAD, VLLMOptions(
        dtype=args.dtype, max_num_seqs=max(args.batch_sizes),
        max_model_len=args.prompt_len + args.new_tokens + 8))


def failed_row(batch: int, path: str, error: BaseException) -> dict:
    """A row for a path that raised: which one, and why (the traceback goes to stderr)."""
    traceback.print_exception(error)
    return {"batch_size": batch, "path": path, "status": "failed",
            "error": f"{type(error).__name__}: {error}"[:1000]}


def measure(args, on_record=None) -> dict:
    """Every path over every batch size, ``hf`` first (so a path that fails later cannot lose
    its rows); ``on_record(records, params_m)`` is called after each row. A path that raises
    (vLLM not installed, out of memory) gets a failed row per batch size, and the rest run."""
    import torch

    from dvpo_lightning.rollout.generation import SamplingConfig

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    model = build_model(args.shape, device, dtype)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    w_bytes = weight_bytes(model)
    bandwidth = copy_bandwidth(device, args.copy_mib * 2**20)
    full = SamplingConfig(args.new_tokens, min_new_tokens=args.new_tokens)
    one = SamplingConfig(1, min_new_tokens=1)
    records: list[dict] = []
    hf_rows: dict[int, dict] = {}
    for path in sorted(args.paths, key=lambda x: x != "hf"):
        try:
            gen = make_generator(path, args)
        except Exception as e:  # noqa: BLE001 (its rows say why)
            gen, error = None, e
        for batch in args.batch_sizes:
            if gen is None:
                rec = failed_row(batch, path, error)
            else:
                try:
                    rec = time_path(gen, model, batch, path, args, full, one, device, dtype,
                                    w_bytes, bandwidth)
                except Exception as e:  # noqa: BLE001
                    rec = failed_row(batch, path, e)
            records.append(rec)
            if rec["status"] == "ok":
                print(f"[decode] batch {batch} {path}: {rec['step_ms']:.3f} ms / step, floor "
                      f"{rec['floor_ms']:.3f} ms ({rec['fraction_of_floor']:.1%})", flush=True)
                hf = hf_rows.setdefault(batch, rec) if path == "hf" else hf_rows.get(batch)
                if path == "vllm" and hf is not None:
                    for key, name in (("step_ms", "speedup_vs_hf"),
                                      ("total_s", "total_speedup_vs_hf")):
                        rec[name] = hf[key] / rec[key]
            else:
                print(f"[decode] batch {batch} {path} FAILED: {rec['error']}", flush=True)
            if on_record is not None:
                on_record(records, params_m)
    return {"records": records, "params_m": params_m}


def time_path(gen, model, batch: int, path: str, args, full, one, device, dtype, w_bytes: int,
              bandwidth: float) -> dict:
    """One path's record at one batch size: warm-up, then the medians."""
    import torch

    config = model.config
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=g)
    ids = ids.to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    context = args.prompt_len + args.new_tokens / 2
    kv = kv_bytes_per_step(config, batch, context, torch.finfo(dtype).bits // 8)
    floor_s = (w_bytes + kv) / bandwidth

    def run(cfg):
        resp, rmask = gen.generate(model, ids, mask, cfg, weights_version=0)[:2]
        assert resp.shape == (batch, cfg.max_new_tokens) and bool(rmask.all())

    for _ in range(args.warmup):
        run(full)
        run(one)
    graphs_before = _unique_graphs()
    total = timed(lambda: run(full), device, args.repeats)
    prefill = timed(lambda: run(one), device, args.repeats)
    step = max(total - prefill, 1e-9) / max(args.new_tokens - 1, 1)
    ops = {"ops": op_shares(lambda: run(full), device, args.ops)} if (
        args.ops and path == "hf") else {}
    return {**ops, "batch_size": batch, "path": path, "status": "ok", "step_ms": step * 1e3,
            "total_s": total, "prefill_s": prefill,
            "tokens_per_s": batch * args.new_tokens / total,
            "floor_ms": floor_s * 1e3, "fraction_of_floor": floor_s / step,
            "weight_bytes": w_bytes, "kv_bytes_per_step": kv,
            "bandwidth_gb_s": bandwidth / 1e9,
            "graphs_compiled_while_timed": _unique_graphs() - graphs_before}


def op_shares(fn, device, top: int) -> list[dict]:
    """The ``top`` operators with the most time of their own in one call of ``fn``
    (``torch.profiler``; on a GPU their device time): ``{"op", "calls", "self_s", "share"}``,
    ``share`` of the summed own time of every operator."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU,
                             *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0),
                    key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_s": getattr(e, attr) / 1e6,
             "share": getattr(e, attr) / total} for e in events[:top]]


def _unique_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (recompilations included)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# Decode step — {meta['device']}, shape {meta['shape']}, {meta['dtype']}, "
             f"prompt {meta['prompt_len']} + {meta['new_tokens']} forced tokens", "",
             "| batch | path | s (whole generation) | ms / step | tokens / s | floor ms / step | "
             "floor ÷ step | step speed-up vs hf | whole speed-up vs hf |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status", "ok") != "ok":
            error = r["error"].replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['batch_size']} | {r['path']} | failed: {error} | — | — | — | — "
                         "| — | — |")
            continue
        speedup = f"{r['speedup_vs_hf']:.2f}" if "speedup_vs_hf" in r else "—"
        whole = f"{r['total_speedup_vs_hf']:.2f}" if "total_speedup_vs_hf" in r else "—"
        lines.append(f"| {r['batch_size']} | {r['path']} | {r['total_s']:.2f} | "
                     f"{r['step_ms']:.3f} | {r['tokens_per_s']:.0f} | {r['floor_ms']:.3f} | "
                     f"{r['fraction_of_floor']:.3f} | {speedup} | {whole} |")
    lines += ["", f"Step = (full generation − one-token generation) ÷ (new tokens − 1), medians "
              f"of {meta['repeats']} runs after {meta['warmup']} warm-up run(s). Floor = "
              "(weight bytes + KV bytes at the mean context) ÷ measured copy bandwidth "
              f"({meta['bandwidth_gb_s']:.0f} GB/s, read + write). {meta['threads']} torch "
              f"thread(s); CPU flags: {meta['cpu_flags']}. The hf path is timed first, before "
              "the vLLM engine is built."]
    for r in records:
        if r.get("ops"):
            lines += ["", f"Where one whole {r['path']} generation's time goes, batch "
                      f"{r['batch_size']} (--ops; share of all operators' own time, not of wall "
                      "time): " + ", ".join(f"`{o['op']}` {o['share']:.1%} ({o['calls']} calls)"
                                            for o in r["ops"])]
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    """The instruction sets that change CPU kernel speed (AVX2, AVX-512, AMX), from lscpu."""
    import re
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    flags = re.search(r"^Flags:\s*(.*)$", text, re.M)
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    have = set(flags.group(1).split()) if flags else set()
    return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="test")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                   help="default: 2 4 for the test shape, 64 256 otherwise")
    p.add_argument("--prompt_len", type=int, default=None, help="default: test 8, else 128")
    p.add_argument("--new_tokens", type=int, default=None, help="default: test 8, else 256")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copy_mib", type=int, default=None,
                   help="size of the bandwidth copy (default: 1024 on cuda, 256 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ops", type=int, default=0,
                   help="also profile one hf generation: its N costliest operators")
    p.add_argument("--out", default=None, help="output directory")
    a = p.parse_args(argv)
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = a.device.startswith("cuda")
    test = a.shape == "test"
    a.batch_sizes = a.batch_sizes or ([2, 4] if test else [64, 256])
    a.prompt_len = a.prompt_len or (8 if test else 128)
    a.new_tokens = a.new_tokens or (8 if test else 256)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.copy_mib = a.copy_mib or (1024 if cuda else 256)
    a.out = a.out or f"benchmarks/results/decode_{a.shape}_{'gpu' if cuda else 'cpu'}"
    if a.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (a step time needs a decode step)")
    return a


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the ``decode.json`` document, rewritten after each row."""
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks.decode --device cuda needs a CUDA GPU")
    t0 = time.time()
    device = ("CPU " + (platform.processor() or platform.machine())
              if not args.device.startswith("cuda") else torch.cuda.get_device_name(0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()

    def write(records: list[dict], params_m: float) -> dict:
        ok = [r for r in records if r.get("status", "ok") == "ok"]
        meta = {"device": device, "shape": args.shape, "dtype": args.dtype,
                "params_m": params_m, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
                "warmup": args.warmup, "repeats": args.repeats,
                "bandwidth_gb_s": ok[0]["bandwidth_gb_s"] if ok else 0.0,
                "threads": torch.get_num_threads(), "cpu_flags": flags,
                "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
                "date": time.strftime("%Y-%m-%d")}
        doc = {"meta": meta, "records": records}
        (out / "decode.json").write_text(json.dumps(doc, indent=2))
        (out / "decode.md").write_text(markdown(records, meta))
        return doc

    result = measure(args, on_record=write)
    doc = write(result["records"], result["params_m"])
    print(markdown(doc["records"], doc["meta"]))
    return doc


if __name__ == "__main__":
    failed = [r for r in main()["records"] if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"benchmarks.decode: {len(failed)} row(s) failed ("
                         + ", ".join(f"batch {r['batch_size']} {r['path']}" for r in failed)
                         + "); the others are in decode.json")
