"""TRL's ``GRPOTrainer`` under the cost benchmark's protocol, for a side-by-side with our methods.

``benchmarks/cost.py --trl on`` calls :func:`prepare` in the parent (it reads our GRPO settings
and our prompt order, and writes them into the work directory) and :func:`run_trl` in a child
process of its own, like each of our methods. The child loads the same random-weight policy
directory and tokenizer, trains on the same prompts in the same order, ``prompts`` prompts ×
``group`` completions per optimizer step, every completion forced to ``length`` tokens
(``min_new_tokens`` = ``max_completion_length``), KL on (``beta`` = our ``kl.coef``, so TRL loads a
reference model), HF ``generate`` (no vLLM), one pass over each generation batch, the same
precision, and returns a record with the cost benchmark's fields. What is not identical is listed
in the record's ``notes`` (and in ``benchmarks/README.md``).

Timing: a step is ``on_step_begin`` → ``on_step_end`` of the HF ``Trainer`` loop (generation,
scoring, loss, backward, gradient clipping and the optimizer step; not the data loader nor
logging), CUDA-synchronised at both ends; ``generate_s`` is the time inside the policy's
``generate``; ``score_s`` the rest of TRL's ``_generate_and_score_completions`` (tokenising,
decoding, reference log-probs, rewards, advantages); ``update_s`` the rest of the step. As for
our methods, the first RL step is excluded from the means (warm-up).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path

SETTINGS_FILE = "trl_settings.json"
REWARD_MODEL = "trl_reward_model"  # the reward model of the trl_rm row, written by prepare
# our loss_aggregation → TRL 1.16 loss_type with the same normaliser (see _compute_loss there):
# token_mean: Σ tokens / tokens in the batch (dapo); seq_mean_token_mean: mean over sequences of
# per-sequence token means (grpo); seq_mean_token_sum: mean over sequences of token sums (luspo).
LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum": "luspo"}
SCALE_REWARDS = {"std": "group", "none": "none"}
PRECISIONS = {  # our --precision → (GRPOConfig flags, model dtype)
    "32-true": ({"bf16": False, "fp16": False}, "float32"),
    "32": ({"bf16": False, "fp16": False}, "float32"),
    "bf16-mixed": ({"bf16": True, "fp16": False}, "float32"),
    "16-mixed": ({"bf16": False, "fp16": True}, "float32"),
    "bf16-true": ({"bf16": False, "fp16": False}, "bfloat16"),
}


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def our_grpo_settings(config: Path) -> dict:
    """What our GRPO run uses: ``configs/grpo.yaml`` over the classes' defaults."""
    import yaml

    from dvpo_lightning.data.rollout import RolloutDataModule
    from dvpo_lightning.estimators import GRPO
    from dvpo_lightning.models.options import ModelOptions
    from dvpo_lightning.modules.kl_penalty import KLSettings
    from dvpo_lightning.modules.optim import RLOptimSettings, adamw
    from dvpo_lightning.modules.ppo import PPOSettings
    from dvpo_lightning.rollout.settings import RolloutSettings

    doc = yaml.safe_load(Path(config).read_text())
    given = dict(doc["model"]["init_args"])
    estimator = given.pop("estimator", {}) or {}
    kl, ppo = KLSettings(**given.get("kl", {})), PPOSettings(**given.get("ppo", {}))
    rollout = RolloutSettings(**given.get("rollout", {}))
    models = ModelOptions(**given.get("models", {}))
    optim = RLOptimSettings(**given.get("optim", {}))
    est = {**_defaults(GRPO), **(estimator.get("init_args") or {})}
    data = {**_defaults(RolloutDataModule), **(doc.get("data", {}).get("init_args") or {})}
    return {"kl_coef": kl.coef, "kl_estimator": kl.estimator, "kl_where": kl.where,
            "clip_eps": ppo.clip_eps, "clip_eps_high": ppo.clip_eps_high,
            "loss_aggregation": ppo.loss_aggregation,
            "whiten_advantages": ppo.whiten_advantages,
            "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
            "lr": optim.lr, "weight_decay": optim.weight_decay,
            "adam_betas": list(_defaults(adamw)["betas"]),
            "max_grad_norm": ppo.max_grad_norm, "scale": est["scale"],
            "data_seed": data["seed"], "data_shuffle": data["shuffle"],
            "gradient_checkpointing": models.gradient_checkpointing,
            "attn_implementation": models.attn_implementation,
            "lora": models.lora is not None, "generation": rollout.engine}


def ordered_prompts(prompts_file: Path, batch: int, seed: int, shuffle: bool,
                    n: int) -> list[str]:
    """The first ``n`` prompts in the order our GRPO run reads them (its sampler, one process)."""
    from dvpo_lightning.data.sampler import EpochShuffleSampler

    rows = [json.loads(line)["prompt"] for line in Path(prompts_file).read_text().splitlines()
            if line.strip()]
    sampler = EpochShuffleSampler(len(rows), seed, shuffle, batch)
    order: list[int] = []
    while len(order) < n:
        order += list(sampler)
    return [rows[i] for i in order[:n]]


def prepare(root: Path, args, config: Path) -> None:
    """Parent side: write our GRPO settings and prompt order for the TRL child."""
    s = our_grpo_settings(config)
    if s["kl_where"] != "loss" or s["kl_estimator"] != "k3":
        raise SystemExit(f"{config}: TRL's GRPOTrainer puts a k3 KL in the loss; our GRPO config "
                         "must too (kl: {where: loss, estimator: k3}) for a like-for-like run")
    if not s["temperature"]:
        raise SystemExit(f"{config}: greedy rollouts (temperature 0) have no TRL equivalent; "
                         "GRPOTrainer always samples")
    # what the command line set for our runs (cost.py passes them to every method)
    s["generation"] = " and ".join(getattr(args, "generation", [s["generation"]]))
    s["gradient_checkpointing"] |= bool(getattr(args, "gradient_checkpointing", False))
    s["prompts"] = ordered_prompts(root / "prompts.jsonl", args.prompts, s["data_seed"],
                                   s["data_shuffle"], args.prompts * args.rl_steps)
    (root / SETTINGS_FILE).write_text(json.dumps(s))
    if not (root / REWARD_MODEL).exists():
        write_reward_model(root)


def write_reward_model(root: Path) -> None:
    """A reward model of the policy's shape for TRL (``<root>/trl_reward_model``): a sequence
    classifier with one label, random weights (cost does not depend on them), the policy's
    tokenizer — what ``GRPOTrainer`` loads from a path in ``reward_funcs`` and runs on every
    completion, as our methods run their reward model or GVM."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(root / "policy"), num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(str(root / REWARD_MODEL))
    AutoTokenizer.from_pretrained(str(root / "tokenizer")).save_pretrained(
        str(root / REWARD_MODEL))


def run_trl(args) -> dict:
    """Child side: ``args.rl_steps`` RL steps of TRL's GRPOTrainer; returns the cost record."""
    import resource

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    root = Path(args.workdir)
    s = json.loads((root / SETTINGS_FILE).read_text())
    gpu = torch.cuda.is_available() and args.mode == "gpu"
    if args.precision not in PRECISIONS:
        raise SystemExit(f"--precision {args.precision}: the TRL run knows {sorted(PRECISIONS)}")
    flags, dtype = PRECISIONS[args.precision]
    n_resp = args.prompts * args.group
    per_step = n_resp // args.minibatches  # completions per optimizer step
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    log: list[dict] = []  # one row per optimizer step
    gen_calls: list[float] = []

    def constant_reward(completions, **kwargs):  # cost does not depend on the reward
        return [0.0] * len(completions)

    # trl_rm: a reward model of the policy's shape (the headline); trl: the constant function
    with_model = args.method == "trl_rm"
    reward = str(root / REWARD_MODEL) if with_model else constant_reward

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync()
            row = log[-1]
            row["gen_score_s"] = time.perf_counter() - t0
            lengths = out["completion_mask"].sum(1)
            row["gen_tokens"] = float(lengths.sum())
            row["len_min"], row["len_max"] = float(lengths.min()), float(lengths.max())
            row["prompt_tokens"] = float(out["prompt_mask"].sum())
            row["prompts"] = [x["prompt"] for x in inputs]
            return out

        def training_step(self, *a, **kw):
            out = super().training_step(*a, **kw)
            times = self._metrics["train"].get("step_time")
            if times:  # TRL's own timing of its training_step (no clip, no optimizer step)
                log[-1]["trl_step_time"] = times[-1]
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            log.append({"t0": time.perf_counter(), "generate_s": 0.0, "gen_score_s": 0.0})

        def on_step_end(self, a, state, control, **kw):
            sync()
            log[-1]["step_s"] = time.perf_counter() - log[-1]["t0"]

    # TRL defaults to activation (gradient) checkpointing; ours follows its config (off by
    # default). transformers 5 renamed the flag (the old name is a deprecated alias).
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in fields
            else "gradient_checkpointing")
    config = GRPOConfig(
        output_dir=str(root / f"trl_run_{args.method}"), report_to=[], save_strategy="no",
        eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=s["data_seed"], use_cpu=not gpu,
        max_steps=args.rl_steps * args.minibatches, gradient_accumulation_steps=1,
        per_device_train_batch_size=per_step, generation_batch_size=n_resp,
        num_generations=args.group, num_iterations=1, shuffle_dataset=False,
        max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length},
        temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
        use_vllm=False, use_transformers_continuous_batching=False,
        beta=s["kl_coef"], use_bias_correction_kl=False, epsilon=s["clip_eps"],
        epsilon_high=s["clip_eps_high"] if s["clip_eps_high"] is not None else s["clip_eps"],
        loss_type=LOSS_TYPES[s["loss_aggregation"]], scale_rewards=SCALE_REWARDS[s["scale"]],
        learning_rate=s["lr"], weight_decay=s["weight_decay"], adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1], optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=s["max_grad_norm"] or 0.0,
        model_init_kwargs={"dtype": dtype, **({"attn_implementation": s["attn_implementation"]}
                                              if s["attn_implementation"] else {})},
        log_completions=False, **{ckpt: s["gradient_checkpointing"]}, **flags)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    dataset = Dataset.from_list([{"prompt": p} for p in s["prompts"]])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = TimedGRPOTrainer(model=str(root / "policy"), reward_funcs=reward,
                               args=config, train_dataset=dataset, processing_class=tokenizer,
                               callbacks=[StepTimer()])
    policy = trainer.model
    generate = policy.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        sync()
        gen_calls.append(time.perf_counter() - t0)
        if log:
            log[-1]["generate_s"] += gen_calls[-1]
        return out

    policy.generate = timed_generate
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() / 2**30 if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    # an RL step = the `minibatches` optimizer steps that share one generation batch
    mb = args.minibatches
    steps = [{k: sum(r.get(k, 0.0) for r in log[i:i + mb])
              for k in ("step_s", "generate_s", "gen_score_s", "gen_tokens", "prompt_tokens",
                        "trl_step_time")}
             for i in range(0, len(log) - len(log) % mb, mb)]
    timed = steps[1:] or steps  # the first RL step pays one-time warm-up, as for ours

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    def count(model) -> float:
        return sum(p.numel() for p in model.parameters()) / 1e6 if model is not None else 0.0

    # the prompts TRL generated for: each of ours, in our order, `group` times in a row
    seen = [p for r in log for p in r.get("prompts", [])]
    same_prompts = (seen == [p for p in s["prompts"][:len(seen) // args.group]
                             for _ in range(args.group)]) and len(seen) == n_resp * len(steps)
    step_s, gen_s = mean("step_s"), mean("generate_s")
    score_s = mean("gen_score_s") - gen_s
    update_s = step_s - mean("gen_score_s")
    tokens = mean("gen_tokens")
    notes = [
        "reward: a sequence-classification reward model of the policy's shape (random weights, "
        "one label), which TRL loads from a path and runs on every completion after decoding "
        "and re-tokenising it, as our methods run their reward model or GVM (in score_s and "
        "params_loaded_m)" if with_model else
        "reward: a constant Python function (cost does not depend on it), so TRL loads and runs "
        "no reward model; our GRPO loads one and scores every response with it (in its score_s "
        "and params_loaded_m): TRL's lower bound",
        "old log-probs: with one optimizer step per generation batch and num_iterations=1 "
        "both skip the extra policy forward for the behaviour log-probs and use the update's "
        "own, detached (ours: model.ppo.behaviour_logps=auto, the default; the <method>_rescore "
        "rows run the separate pass)" if mb == 1 else
        "old log-probs: with several optimizer steps per generation batch TRL runs the policy "
        "forward for the behaviour log-probs, as ours does",
        "log-probs: both compute the completion tokens' log-probs only, with the LM head inside "
        "chunks (TRL: its patched fused head; ours: token_logps.head_token_logps, float32 "
        "chunks of ~1024 tokens, the head recomputed in the backward)",
        f"loss: our loss_aggregation={s['loss_aggregation']} → TRL "
        f"loss_type={LOSS_TYPES[s['loss_aggregation']]} (same normaliser); k3 KL in the loss "
        "with use_bias_correction_kl=False (as ours); clip, advantages' group scaling, "
        "learning rate, AdamW betas, weight decay and gradient-norm clip from configs/grpo.yaml",
        "generation: TRL tokenises the prompt text itself and calls the policy's HF generate "
        "with its GenerationConfig (sampling, KV cache, EOS suppressed by min_new_tokens via "
        "generation_kwargs, disable_compile=True); it then decodes the completions to text for "
        "the reward functions (in score_s)",
        "step boundaries: TRL's step is on_step_begin → on_step_end of the HF Trainer loop "
        "(CUDA-synchronised), including gradient clipping, optimizer and LR-scheduler steps, "
        "excluding the data loader and logging; ours is the Lightning training_step",
        "memory: " + ("torch.cuda.max_memory_allocated, as ours" if gpu else
                      "peak RSS of the child, which includes the libraries it imported (trl, "
                      "datasets, accelerate; ours import Lightning): compare with care"),
    ]
    if s["lora"]:
        notes.append("LoRA: our GRPO config trains LoRA adapters; TRL here trains every weight "
                     "(params_trained_m differs)")
    if s["generation"] != "hf":
        notes.append(f"generation: our methods ran with rollout.engine={s['generation']} "
                     "(vLLM in the training process); TRL with HF generate, as TRL 1.16 "
                     "supports vLLM only up to 0.31")
    if s["whiten_advantages"]:
        notes.append("advantages: our GRPO config whitens advantages over the batch; TRL does "
                     "not (cost-neutral)")
    if not same_prompts:
        notes.append("prompts: TRL did not see our prompts in our order (see "
                     "same_prompts_as_ours)")
    if not gen_calls:
        gen_s = score_s = None
        notes.append("generate_s, score_s: the policy's generate was never seen by the "
                     "timing wrapper, so generation could not be timed apart")
    rec = {"method": "trl_grpo", "label": "TRL GRPOTrainer", "trl_version": trl.__version__,
           "reward": "model" if with_model else "constant",
           "responses_per_step": n_resp, "group": args.group, "length": args.length,
           "rl_steps": len(steps), "step_s": step_s, "generate_s": gen_s, "score_s": score_s,
           "update_s": update_s, "gen_tokens_per_step": tokens,
           "gen_tokens_per_s": tokens / max(gen_s, 1e-9) if gen_s is not None else None,
           "train_tokens_per_s": tokens / max(update_s, 1e-9),
           "peak_mem_gb": peak, "memory_kind": "cuda_max_allocated" if gpu else "peak_rss",
           "params_loaded_m": count(trainer.model) + count(trainer.ref_model) + sum(
               count(f) for f in trainer.reward_funcs if isinstance(f, torch.nn.Module)),
           "params_trained_m": sum(p.numel() for p in trainer.model.parameters()
                                   if p.requires_grad) / 1e6,
           "frozen_weights_gb": sum(
               p.numel() * p.element_size()
               for m in (trainer.ref_model, *trainer.reward_funcs) if isinstance(m, torch.nn.Module)
               for p in m.parameters()) / 2**30,
           "prompt_tokens_per_step": mean("prompt_tokens"),
           "same_prompts_as_ours": same_prompts,
           "response_len_min": min(r["len_min"] for r in log if "len_min" in r),
           "response_len_max": max(r["len_max"] for r in log if "len_max" in r),
           # TRL's own `step_time` metric (its training_step: no clip, no optimizer step)
           "trl_step_time_s": mean("trl_step_time") if all("trl_step_time" in r for r in log)
           else None,
           "activation_checkpointing": bool(
               policy.is_activation_checkpointing if hasattr(type(policy),
                                                             "is_activation_checkpointing")
               else getattr(policy, "is_gradient_checkpointing", False)),
           "reference_model_loaded": trainer.ref_model is not None,
           "config": {k: getattr(config, k) for k in (
               "per_device_train_batch_size", "generation_batch_size", "steps_per_generation",
               "num_generations", "num_iterations", "max_completion_length", "generation_kwargs",
               "beta", "loss_type", "scale_rewards", "epsilon", "epsilon_high", "temperature",
               "top_p", "top_k", "learning_rate", "max_grad_norm", "bf16", "fp16",
               ckpt, "use_vllm", "max_steps")},
           "notes": notes}
    return rec
