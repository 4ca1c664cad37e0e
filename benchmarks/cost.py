"""Cost of an RL step per method (the paper's Table 7), measured side by side in one run.

    python -m benchmarks.cost --mode cpu [--out benchmarks/results/cost_cpu]
    python -m benchmarks.cost --mode gpu --shape smollm2-135m [--prompts 64 --group 4 ...]

Every method runs through the same path users run — ``DVPOModule`` + ``RolloutDataModule`` +
a Lightning ``Trainer`` — on the same rollout batch: ``prompts × group`` responses per RL step
(GRPO and RLOO: ``prompts`` prompts × ``group`` samples; DVPO, PPO, ReMax: ``prompts × group``
distinct prompts), every response forced to ``length`` tokens (EOS suppressed), the same
precision. Models have random weights of a real shape (weights do not change cost). Each
method runs in its own child process, so its peak memory is its own (GPU:
``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS); the parent writes
``cost.json`` and ``cost.md`` with each method's ratios to PPO.

``--generation hf vllm`` runs every method once per rollout engine (HF ``generate`` and the
colocated vLLM engine), side by side in the same run; ratios to PPO are within an engine, and
``step ÷ hf`` compares a method's two engines.

With ``--trl on`` (``auto``, the default: when ``import trl`` works) TRL's ``GRPOTrainer`` runs
too, twice, each in a child process of its own, on the same artifacts, prompts, batch, forced
length, KL and precision (``benchmarks/trl_grpo.py``): scoring with a reward model of the
policy's shape (``trl_rm``, the headline: RLHF from preferences) and with a constant reward
function (``trl``, TRL's lower bound: no reward model at all). ``cost.json`` then has both
records and, per method, ``throughput_ratio_to_trl_rm`` and ``throughput_ratio_to_trl``:
generated tokens per second of RL-step wall time, ours ÷ TRL's.

Every row is written (``cost.json`` and ``cost.md`` rewritten) as soon as its child ends, TRL's
right after the first method's. A child that fails (no vLLM, out of memory) becomes a row with
``"status": "failed"`` and its ``error`` (exit code, last lines of stderr); the other rows stand,
ratios are computed among the rows that finished, and the parent exits non-zero once everything
is written.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.decode import cpu_flags

METHODS = ("dvpo", "ppo", "grpo", "remax", "rloo")
GROUP_METHODS = {"grpo", "rloo"}
# opt-in rows (--methods): a method with one setting changed, its name "<method>_<variant>"
VARIANTS = {**{f"{m}_rescore": (m, ["--model.init_args.ppo.behaviour_logps=rescore"])
               for m in ("dvpo", "grpo")},
            # frozen models in bfloat16 (the policy and the critic stay in the run's precision)
            **{f"{m}_bf16": (m, ["--model.init_args.models.frozen_dtype=bfloat16"])
               for m in ("dvpo", "ppo", "grpo")},
            # logp_old from the engine (--generation vllm only)
            **{f"{m}_engine": (m, ["--model.init_args.ppo.behaviour_logps=engine"])
               for m in ("dvpo", "grpo")},
            # the frozen models and the vLLM engine in bfloat16, the policy (and critic) trained
            # in the run's precision: what a GPU run does (--generation vllm only)
            **{f"{m}_bf16_rollout": (m, ["--model.init_args.models.frozen_dtype=bfloat16",
                                         "--model.init_args.rollout.vllm.dtype=bfloat16"])
               for m in ("dvpo", "ppo", "grpo")}}
# variants that set the vLLM engine and mean nothing with HF generate
VLLM_ONLY = tuple(v for v in VARIANTS if v.endswith(("_engine", "_bf16_rollout")))
ENGINES = ("hf", "vllm")
# Llama-family shapes with random weights: tiny ones for CPU smoke runs (tiny32's heads are the
# smallest vLLM's CPU attention serves), two real ones.
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=256, vocab_size=512),
    "tiny32": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=2, intermediate_size=256, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "qwen2.5-0.5b-like": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}
FIELDS = ("step_s", "generate_s", "score_s", "update_s", "gen_tokens_per_step",
          "gen_tokens_per_s", "train_tokens_per_s", "peak_mem_gb", "params_loaded_m",
          "params_trained_m")


def make_tokenizer(vocab_size: int, out: Path):
    """A word-level tokenizer of ``vocab_size`` tokens (``t0 … tN``, specials first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"t{i}" for i in
                                                    range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


def make_artifacts(root: Path, shape: str, n_prompts: int, prompt_len: int, seed: int = 0):
    """Random-weight policy, reward model and GVM of ``shape``; a prompt file."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dvpo_lightning.models.value_model import ValueModel

    cfg = dict(SHAPES[shape])
    tok = make_tokenizer(cfg.pop("vocab_size"), root / "tokenizer")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True, **cfg)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(root / "policy"))
    tok.save_pretrained(str(root / "policy"))
    for name, kind in (("reward_model", "reward"), ("gvm", "gvm")):
        vm = ValueModel.from_pretrained(str(root / "policy"), tok, kind=kind,
                                        zero_init_head=False)
        vm.save_pretrained(root / name)
        tok.save_pretrained(str(root / name))
    rng = random.Random(seed)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(n_prompts):
            words = " ".join(f"t{rng.randrange(len(tok) - 4)}" for _ in range(prompt_len))
            f.write(json.dumps({"prompt": words}) + "\n")


def run_method(args) -> dict:
    """One method's RL steps in this process; returns its cost record."""
    import importlib.util
    import resource

    import torch

    from benchmarks.mfu import matmul_ceiling
    from benchmarks.phase_flops import phase_flops, rescored_share, shares_of_peak
    from dvpo_lightning.callbacks import CostMeter
    from dvpo_lightning.commands.fit import cli_main
    from dvpo_lightning.rollout.experience import Need

    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SystemExit("benchmarks.cost --generation vllm: vllm is not installed here (pip "
                         "install vllm); this row fails, the others stand")
    root = Path(args.workdir)
    method, variant = VARIANTS.get(args.method, (args.method, []))
    group = args.group if method in GROUP_METHODS else 1
    batch = args.prompts if method in GROUP_METHODS else args.prompts * args.group
    n_resp = args.prompts * args.group
    cfg = Path(__file__).resolve().parents[1] / "configs" / f"{method}.yaml"
    overrides = [
        "--config", str(cfg),
        *(["--config", str(cfg.parent / "deepspeed" / f"{args.deepspeed}.yaml")]
          if args.deepspeed else []),
        f"--model.init_args.policy={root / 'policy'}",
        f"--data.init_args.train_path={root / 'prompts.jsonl'}",
        f"--data.init_args.eval_path={root / 'prompts.jsonl'}", "--data.init_args.test_path=null",
        f"--data.init_args.tokenizer={root / 'tokenizer'}", f"--data.init_args.batch_size={batch}",
        "--data.init_args.chat_template=false", "--model.init_args.judge=null",
        f"--model.init_args.rollout.max_new_tokens={args.length}",
        f"--model.init_args.rollout.min_new_tokens={args.length}",
        f"--model.init_args.ppo.mini_batch_size={n_resp // args.minibatches}",
        "--model.init_args.ppo.epochs=1", "--model.init_args.export_dir=null",
        f"--trainer.max_steps={args.rl_steps}",
        "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root / f'run-{args.method}-{args.engine}'}",
        f"--trainer.precision={args.precision}",
        f"--trainer.accelerator={'gpu' if args.mode == 'gpu' else 'cpu'}", "--trainer.devices=1",
        f"--model.init_args.rollout.engine={args.engine}",
    ]
    if args.deepspeed and args.mode == "cpu":  # Lightning's strategy needs CUDA: on CPU (a
        # dry run of benchmarks/gpu_session.sh) the tests' DeepSpeed-over-gloo strategy
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        overrides += ["--trainer.strategy.class_path=cpu_deepspeed.CPUDeepSpeedStrategy",
                      "--trainer.strategy.init_args.process_group_backend=gloo"]
    if args.gradient_checkpointing:
        overrides.append("--model.init_args.models.gradient_checkpointing=true")
    if args.score_batch_size:
        overrides.append(f"--model.init_args.rollout.score_batch_size={args.score_batch_size}")
    overrides += variant
    if method in ("dvpo",):
        overrides.append(f"--model.init_args.value_model={root / 'gvm'}")
    else:
        overrides.append(f"--model.init_args.reward_model={root / 'reward_model'}")
    if method in GROUP_METHODS:
        overrides.append(f"--model.init_args.estimator.init_args.group_size={group}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli = cli_main(overrides, run=False)  # (CostMeter's clock waits for the GPU at both ends
    # of a step, and the module's at each phase boundary: runtime/timing.py)
    cli.trainer.fit(cli.model, cli.datamodule)
    c = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CostMeter)).summary(cli.model)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    tokens = c["gen_tokens_per_step"]
    module = cli.model
    needs = module.estimator.needs
    flops = phase_flops(
        module.policy.config, n_resp, args.prompt_len, args.length,
        value_forwards=sum(n in needs for n in (Need.GVM_VALUES, Need.CRITIC_VALUES,
                                                Need.SCORES, Need.GREEDY_BASELINE)),
        policy_rescored=rescored_share(module.ppo.behaviour_logps,
                                       module.ppo.on_policy(n_resp), n_resp),
        generations=2 if Need.GREEDY_BASELINE in needs else 1, epochs=module.ppo.epochs,
        critic=module.critic is not None)
    gpu = torch.cuda.is_available()
    matmul = matmul_ceiling(torch.device("cuda" if gpu else "cpu"),
                            torch.bfloat16 if "bf16" in str(args.precision) else torch.float32,
                            8192 if gpu else 1024, repeats=20, best=True)
    seconds = {k: c[f"{k}_s"] for k in flops}
    llm = getattr(module.experience.generator, "llm", None)  # the vLLM engine, as built
    return {"method": args.method, "engine": args.engine, "responses_per_step": n_resp,
            "engine_dtype": None if llm is None else
            str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "group": group,
            "prompts_per_step": batch, "s_per_prompt": c["step_s"] / batch,
            "length": args.length, "rl_steps": c["rl_steps"], "step_s": c["step_s"],
            "generate_s": c["generate_s"], "score_s": c["score_s"], "update_s": c["update_s"],
            "gen_tokens_per_step": tokens,
            "gen_tokens_per_s": tokens / max(c["generate_s"], 1e-9),
            "train_tokens_per_s": tokens / max(c["update_s"], 1e-9),  # response tokens, 1 epoch
            "peak_mem_gb": peak, "memory_kind": "cuda_max_allocated"
            if torch.cuda.is_available() else "peak_rss",
            "params_loaded_m": c["params_loaded_m"], "params_trained_m": c["params_trained_m"],
            "frozen_weights_gb": c["frozen_weights_gb"],
            # each phase's model FLOPs per step and its share of a matmul's rate in the run's
            # dtype on this device (benchmarks/phase_flops.py)
            "phase_tflop": {k: f / 1e12 for k, f in flops.items()},
            "matmul_peak_tflops": matmul / 1e12,
            "share_of_peak": shares_of_peak(flops, seconds, matmul)}


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _label(record: dict, with_engine: bool) -> str:
    return f"{record['method']} ({record['engine']})" if with_engine else record["method"]


def _error(r: dict) -> str:
    """A failed row's reason in one line: its exit code and the last line of its stderr."""
    e = r["error"]
    last = next((x for x in reversed(e["stderr_tail"]) if x.strip()), "no stderr")
    code = "" if e["returncode"] is None else f"exit {e['returncode']}: "
    return (code + last).replace("|", "/")[:300]


TRL_ROWS = {"trl_rm": "reward model", "trl": "constant reward"}  # record key → its reward


def markdown(records: list[dict], meta: dict, trls: dict[str, dict] | None = None) -> str:
    """The cost table with ratios to PPO (and, with TRL records, their rows and ratios to
    them); failed rows are listed under it with their error."""
    good = [r for r in records if ok(r)]
    engines = list(dict.fromkeys(r["engine"] for r in good))
    several = len(engines) > 1
    trls = trls or {}
    trl_ok = {k: t for k, t in trls.items() if ok(t)}
    kind = good[0]["memory_kind"] if good else next(
        iter(trl_ok.values()), {}).get("memory_kind", "—")
    lines = [f"# Cost per RL step — {meta['device']}, shape {meta['shape']}, "
             f"{meta['responses_per_step']} responses × {meta['length']} tokens, "
             f"{meta['precision']}", "",
             *([f"**{meta['jobs']} children at once: a smoke run, the timings are no "
                "measurement.**", ""] if meta.get("jobs", 1) > 1 else []),
             "| method | engine | s / step | generate s | score s | update s | gen tok/s | "
             f"train tok/s | peak mem (GB, {kind}) | params loaded (M) | "
             "params trained (M) | frozen weights (GB) | time ÷ PPO | mem ÷ PPO |"
             + (" step ÷ hf | generate ÷ hf |" if several else "")
             + "".join(f" throughput ÷ TRL ({TRL_ROWS[k]}) |" for k in trl_ok),
             "|---|" + "---|" * (13 + 2 * several + len(trl_ok))]
    rows = [(r["method"], r) for r in good]
    rows += [(f"TRL GRPOTrainer {t['trl_version']} ({TRL_ROWS[k]})", {**t, "engine": "hf"})
             for k, t in trl_ok.items()]
    for name, r in rows:
        engine = r["engine"] + (f" ({r['engine_dtype']})" if r.get("engine_dtype") else "")
        line = (f"| {name} | {engine} | {r['step_s']:.3f} | {_fmt(r['generate_s'], '.3f')} | "
                f"{_fmt(r['score_s'], '.3f')} | {r['update_s']:.3f} | "
                f"{_fmt(r['gen_tokens_per_s'], '.0f')} | "
                f"{r['train_tokens_per_s']:.0f} | {r['peak_mem_gb']:.3f} | "
                f"{r['params_loaded_m']:.1f} | {r['params_trained_m']:.1f} | "
                f"{_fmt(r.get('frozen_weights_gb'), '.3f')} | "
                f"{_fmt(r.get('time_ratio_to_ppo'), '.2f')} | "
                f"{_fmt(r.get('mem_ratio_to_ppo'), '.2f')} |")
        if several:
            line += (f" {_fmt(r.get('step_ratio_to_hf'), '.2f')} |"
                     f" {_fmt(r.get('generate_ratio_to_hf'), '.2f')} |")
        for t in trl_ok.values():
            line += f" {r['e2e_tokens_per_s'] / t['e2e_tokens_per_s']:.2f} |"
        lines.append(line)
    shared = [r for r in good if r.get("share_of_peak")]
    if shared:
        lines += ["", "Each phase's model FLOPs per step as a share of a matmul's rate in the "
                  "run's dtype on this device (benchmarks/phase_flops.py):", "",
                  "| method | engine | matmul peak (TFLOP/s) | generate | score | update |",
                  "|---|---|---|---|---|---|"]
        for r in shared:
            lines.append(f"| {r['method']} | {r['engine']} | {r['matmul_peak_tflops']:.3f} | "
                         + " | ".join(_fmt(None if r["share_of_peak"][k] is None
                                           else 100 * r["share_of_peak"][k], ".1f") + " %"
                                      for k in ("generate", "score", "update")) + " |")
    bad = [(r["method"], r) for r in records if not ok(r)]
    bad += [(f"TRL GRPOTrainer ({TRL_ROWS[k]})", t) for k, t in trls.items() if not ok(t)]
    if bad:
        lines += ["", "Failed (no figures; ratios are among the rows above only):", ""]
        lines += [f"- {name} ({r['engine']}): {_error(r)}" for name, r in bad]
    lines += ["", f"Step times exclude the first step (warm-up); {meta['rl_steps']} RL steps "
              "per method and engine, each in its own process, one after another. Ratios to "
              "PPO are within an engine."]
    paired = [r for r in good if r.get("ppo_row", "ppo") != "ppo"]
    if paired:
        lines[-1] += (" A row with a setting changed is against PPO with the same setting: "
                      + ", ".join(f"{r['method']} ÷ {r['ppo_row']}" for r in paired) + ".")
    grpo = [r for r in good if "per_prompt_ratio_to_grpo" in r]
    if grpo:
        lines += ["", "Time per prompt ÷ GRPO (the paper's per-prompt comparison: GRPO samples "
                  "a group per prompt, the others one response): " + ", ".join(
                      f"{_label(r, several)} {r['per_prompt_ratio_to_grpo']:.2f}"
                      for r in grpo) + "."]
    if trl_ok:
        lines += ["", "Throughput ÷ TRL: generated tokens per second of RL-step wall time "
                  "(tokens per step ÷ s / step), ours ÷ TRL GRPOTrainer's, on the same policy, "
                  "prompts, batch and forced length with KL on. TRL generates with HF "
                  "`generate` (TRL 1.16 supports vLLM only up to 0.31) and scores with a "
                  "reward model of the policy's shape (a sequence classifier, the headline) or "
                  "a constant reward function (no reward model: TRL's lower bound); with one "
                  "optimizer step per generation batch, both sides take the old log-probs from "
                  "the update's own forward: see `notes` in cost.json and benchmarks/README.md."]
    lines += ["", f"CPU flags: {meta.get('cpu_flags', 'unknown')}; torch threads: "
              f"{meta.get('threads', '?')}."]
    return "\n".join(lines) + "\n"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def trl_version(mode: str) -> tuple[str | None, str | None]:
    """``(trl.__version__, None)`` when the TRL comparison runs (``--trl``); ``(None, None)``
    when it does not; ``(None, error)`` when ``--trl on`` asked for it and TRL does not import
    (the TRL row then fails and the others stand)."""
    if mode == "off":
        return None, None
    try:
        import trl
    except ImportError as e:
        return None, (f"--trl on needs TRL (pip install trl): {e}" if mode == "on" else None)
    return trl.__version__, None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="model shape (default: tiny on cpu, smollm2-135m on gpu)")
    p.add_argument("--methods", nargs="+", choices=(*METHODS, *VARIANTS),
                   default=list(METHODS), help="methods to run; <method>_rescore: with "
                   "model.ppo.behaviour_logps=rescore (a separate old-log-prob pass even "
                   "on-policy), for the before/after of that setting")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (cpu 4, gpu 64)")
    p.add_argument("--group", type=int, default=4, help="responses per prompt")
    p.add_argument("--length", type=int, default=None, help="forced response length "
                   "(cpu 16, gpu 256)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--rl_steps", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=1, help="PPO mini-batches per step")
    p.add_argument("--precision", default=None, help="cpu 32-true, gpu bf16-mixed")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--generation", nargs="+", choices=ENGINES, default=["hf"],
                   help="our methods' rollout engine(s) (model.rollout.engine), each a run of "
                        "every method; TRL always uses HF generate (TRL 1.16 supports vLLM "
                        "only up to 0.31)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass (ours and TRL's)")
    p.add_argument("--score_batch_size", type=int, default=None,
                   help="rows per scoring forward pass (DVPOModule's score_batch_size; "
                        "default: the whole rollout batch)")
    p.add_argument("--deepspeed", choices=("zero1", "zero2", "zero3", "zero3_offload"),
                   default=None, help="run our methods under configs/deepspeed/<this>.yaml "
                   "(GPU; TRL is then not run: it would not use the same strategy)")
    p.add_argument("--trl", choices=("auto", "on", "off"), default="auto",
                   help="also run TRL's GRPOTrainer under the same protocol (auto: when trl "
                   "imports)")
    p.add_argument("--jobs", type=int, default=1,
                   help="children run at once; above 1 only for a smoke run (tests): children "
                        "side by side slow each other down, so the timings are no measurement")
    p.add_argument("--method", help=argparse.SUPPRESS)  # child process: run one method
    p.add_argument("--engine", default="hf", help=argparse.SUPPRESS)  # … with this engine
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.method is None and "vllm" not in a.generation and set(a.methods) & set(VLLM_ONLY):
        p.error(f"--methods {' '.join(m for m in a.methods if m in VLLM_ONLY)}: these rows set "
                f"the vLLM engine, and --generation is {' '.join(a.generation)}. Fix: add "
                "--generation vllm (they run with vLLM only)")
    gpu = a.mode == "gpu"
    a.shape = a.shape or ("smollm2-135m" if gpu else "tiny")
    a.prompts = a.prompts or (64 if gpu else 4)
    a.length = a.length or (256 if gpu else 16)
    a.precision = a.precision or ("bf16-mixed" if gpu else "32-true")
    a.out = a.out or f"benchmarks/results/cost_{a.mode}"
    return a


STDERR_TAIL = 40  # lines of a failed child's stderr kept in its row


def run_child(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Run one child to its end, its stderr passed through as it comes; return its exit code
    and the last :data:`STDERR_TAIL` lines of its stderr."""
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                          errors="replace") as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n")[:500])
    return proc.returncode, list(tail)


def failed_row(method: str, engine: str, returncode: int | None, lines: list[str]) -> dict:
    """A row for a child that did not finish: what ran and why it stopped."""
    return {"method": method, "engine": engine, "status": "failed",
            "error": {"returncode": returncode, "stderr_tail": lines}}


def ok(r: dict | None) -> bool:
    return r is not None and r.get("status", "ok") == "ok"


def ppo_row(method: str, rows: dict) -> str | None:
    """The PPO row ``method`` is measured against among ``rows`` (one engine's, by name): PPO
    with the same setting where it ran (``dvpo_bf16`` → ``ppo_bf16``), else plain ``ppo``."""
    base = VARIANTS[method][0] if method in VARIANTS else None  # dvpo_bf16 → dvpo
    same = "ppo" + method[len(base):] if base else "ppo"
    return same if same in rows else ("ppo" if "ppo" in rows else None)


def derive(records: list[dict], trls: dict[str, dict]) -> None:
    """Ratios between rows that finished (in place; a failed row gets none and is no one's
    reference)."""
    good = [r for r in records if ok(r)]
    for r in good + [t for t in trls.values() if ok(t)]:
        # end to end: generated tokens per second of RL-step wall time
        r["e2e_tokens_per_s"] = r["gen_tokens_per_step"] / max(r["step_s"], 1e-9)
    for r in good:  # ratios within an engine; a method's engines against each other
        same = {x["method"]: x for x in good if x["engine"] == r["engine"]}
        ppo = ppo_row(r["method"], same)
        if ppo is not None:
            r["ppo_row"] = ppo
            r["time_ratio_to_ppo"] = r["step_s"] / same[ppo]["step_s"]
            r["mem_ratio_to_ppo"] = r["peak_mem_gb"] / same[ppo]["peak_mem_gb"]
        if "grpo" in same:  # the paper's "time per prompt": one response vs GRPO's group
            r["per_prompt_ratio_to_grpo"] = r["s_per_prompt"] / same["grpo"]["s_per_prompt"]
        hf = next((x for x in good if x["method"] == r["method"] and x["engine"] == "hf"), None)
        if hf is not None and r["engine"] != "hf":
            r["step_ratio_to_hf"] = r["step_s"] / hf["step_s"]
            r["generate_ratio_to_hf"] = r["generate_s"] / max(hf["generate_s"], 1e-9)
        for key, t in trls.items():  # throughput_ratio_to_trl_rm, throughput_ratio_to_trl
            if ok(t):
                r[f"throughput_ratio_to_{key}"] = r["e2e_tokens_per_s"] / t["e2e_tokens_per_s"]
        trl = trls.get("trl")
        if ok(trl) and r["gen_tokens_per_s"] and trl["gen_tokens_per_s"]:  # generation alone
            r["gen_throughput_ratio_to_trl"] = r["gen_tokens_per_s"] / trl["gen_tokens_per_s"]


def write(out: Path, meta: dict, records: list[dict], trls: dict[str, dict], t0: float) -> dict:
    """``cost.json`` and ``cost.md`` with every row so far (rewritten after each child)."""
    derive(records, trls)
    meta["seconds"] = round(time.time() - t0, 1)
    doc = {"meta": meta, "methods": records, **trls}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(doc, indent=2))
    (out / "cost.md").write_text(markdown(records, meta, trls))
    return doc


def failures(doc: dict) -> list[dict]:
    """The rows of ``doc`` (ours and TRL's) that failed."""
    rows = doc["methods"] + [doc[k] for k in TRL_ROWS if k in doc]
    return [r for r in rows if not ok(r)]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the ``cost.json`` document. Every row is written when its child
    ends; a child that fails becomes a row with its error, and the others stand."""
    args = parse(argv)
    if args.method:  # child
        if args.method in TRL_ROWS:
            from benchmarks.trl_grpo import run_trl

            rec = run_trl(args)
        else:
            rec = run_method(args)
        Path(args.workdir, f"{args.method}-{args.engine}.json").write_text(json.dumps(rec))
        return rec
    if args.mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.cost --mode gpu needs a CUDA GPU; use --mode cpu here")
    if args.deepspeed:  # (--mode cpu: through the tests' CPU strategy, for dry runs)
        if args.trl == "on":
            raise SystemExit("benchmarks.cost: --trl on and --deepspeed do not go together (TRL "
                             "would run without DeepSpeed); drop one")
        args.trl = "off"
    version, trl_error = trl_version(args.trl)
    t0 = time.time()
    device = "CPU " + (platform.processor() or platform.machine())
    if args.mode == "gpu":
        import torch

        device = torch.cuda.get_device_name(0)
    meta = {"device": device, "shape": args.shape, "precision": args.precision,
            "responses_per_step": args.prompts * args.group, "length": args.length,
            "rl_steps": args.rl_steps, "generation": args.generation,
            "cpu_flags": cpu_flags(), "threads": torch_threads(),
            "gradient_checkpointing": args.gradient_checkpointing,
            "score_batch_size": args.score_batch_size, "deepspeed": args.deepspeed,
            "jobs": args.jobs,
            "seconds": 0.0, "date": time.strftime("%Y-%m-%d"), "trl_version": version}
    out = Path(args.out)
    records: list[dict] = []
    trls = ({k: failed_row(k, "hf", None, [trl_error]) for k in TRL_ROWS} if trl_error
            else {})
    with tempfile.TemporaryDirectory(prefix="dvpo-cost-") as tmp:
        root = Path(tmp)
        n_prompts = max(args.prompts * args.group * (args.rl_steps + 1), 8)
        make_artifacts(root, args.shape, n_prompts, args.prompt_len)
        child = list(argv if argv is not None else sys.argv[1:])
        # the children find this checkout first, and whatever the parent's path had after it
        path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        jobs = [(m, engine) for engine in args.generation for m in args.methods
                if engine == "vllm" or m not in VLLM_ONLY]
        if version:  # right after the first method: a run cut short still has the comparison
            jobs[1:1] = [(k, "hf") for k in TRL_ROWS]
        for m in [m for m, _ in jobs if m in TRL_ROWS]:
            try:
                from benchmarks.trl_grpo import prepare

                prepare(root, args, Path(__file__).resolve().parents[1] / "configs"
                        / "grpo.yaml")
            except (Exception, SystemExit) as e:  # noqa: BLE001 (its row says why)
                trls[m] = failed_row(m, "hf", None, [f"{type(e).__name__}: {e}"])
        jobs = [job for job in jobs if job[0] not in trls]  # (a TRL row that failed to prepare)
        slots: list[dict | None] = [None] * len(jobs)

        def one(i: int) -> None:
            """Run job ``i``'s child; its row into its slot (the rows keep the jobs' order)."""
            m, engine = jobs[i]
            cmd = [sys.executable, "-m", "benchmarks.cost", *child, "--method", m,
                   "--engine", engine, "--workdir", str(root)]
            name = (f"TRL GRPOTrainer {version} ({TRL_ROWS[m]})" if m in TRL_ROWS
                    else f"{m} ({engine})")
            result = root / f"{m}-{engine}.json"
            result.unlink(missing_ok=True)
            rc, tail = run_child(cmd, env)
            if rc == 0 and result.exists():
                rec = {**json.loads(result.read_text()), "status": "ok"}
                print(f"[cost] {name}: {rec['step_s']:.3f} s / RL step", flush=True)
            else:
                rec = failed_row(m, engine, rc, tail)
                print(f"[cost] {name} FAILED (exit {rc}): {tail[-1] if tail else 'no stderr'}",
                      flush=True)
            slots[i] = rec

        def collect() -> None:  # (after each child: what has ended is written)
            records[:] = [r for (m, _), r in zip(jobs, slots) if r and m not in TRL_ROWS]
            trls.update({m: r for (m, _), r in zip(jobs, slots) if r and m in TRL_ROWS})
            write(out, meta, records, trls, t0)

        write(out, meta, records, trls, t0)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for done in concurrent.futures.as_completed([pool.submit(one, i)
                                                        for i in range(len(jobs))]):
                done.result()
                collect()
    doc = write(out, meta, records, trls, t0)
    print(markdown(records, meta, trls))
    return doc


if __name__ == "__main__":
    result = main()
    bad = failures(result) if "methods" in result else []  # (a child returns its record)
    if bad:
        raise SystemExit(f"benchmarks.cost: {len(bad)} row(s) failed: "
                         + ", ".join(f"{r['method']} ({r['engine']}) exit "
                                     f"{r['error']['returncode']}" for r in bad)
                         + "; the others are in cost.json")
