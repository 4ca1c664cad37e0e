"""A fast rollout generator: a static KV cache and a hand-written, optionally compiled decode loop.

:class:`StaticCacheGenerator` has :class:`~dvpo_lightning.rollout.generation.HFGenerator`'s
interface and output (left-padded prompts in; right-padded responses, masked and padded after the
first EOS, out) and the same sampling math, but runs its own loop instead of ``model.generate``:

1. the prompts are left-padded to a *bucketed* width (a multiple of ``prompt_bucket``) and the
   batch is padded up to a multiple of ``batch_bucket`` (extra rows copy the last prompt and are
   never sampled);
2. one prefill forward writes the prompt into a transformers ``StaticCache`` sized to
   ``round_up(prompt width + max_new_tokens, prompt_bucket)`` tokens;
3. then one forward per new token, with ``(B, 1)`` inputs, positions that count real tokens only
   (left padding does not shift them, as in ``generate``) and a fixed ``(B, L)`` attention mask
   (the causal mask hides the slots not written yet);
4. each step's logits go through the same processors as ``generate``, in its order: float32 →
   EOS suppressed while fewer than ``min_new_tokens`` tokens exist → temperature → top-k →
   top-p → softmax → ``torch.multinomial(probs, 1)`` (greedy: arg-max); rows that ended get the
   pad token, and the loop stops when every row has produced EOS.

Why it is faster on a GPU: every decode step has the same shapes and reads and writes the same
cache tensors at the same addresses, so the step can be compiled with
``torch.compile(mode="reduce-overhead")`` into a CUDA graph that is replayed: one launch per step
instead of hundreds of small kernels launched from Python, no growing ``torch.cat`` of the cache
(the dynamic cache reallocates every layer's K/V at every step) and no allocator traffic. The
caches and compiled graphs are kept per model and per bucketed shape, so later rollouts of the
same shapes replay the graphs recorded by the first (no recompilation between RL steps; the
first call on a GPU pays the compile, 30–60 s). On a CPU there are no CUDA graphs and
compilation buys little for tiny models, so ``compile="auto"`` runs the same loop eagerly there:
on a CPU the point of this class is correctness (it is tested token for token against
``generate``).

Limits:

- the tokens equal ``generate``'s for the same seed on a CPU in practice (the tests compare
  token for token), but the logits are not bit-identical: attention also runs over the cache's
  masked, not yet written slots, which moves float32 results by ~1e-6, so a sampled token can
  in principle flip on a near-tie; on a GPU in bf16 (other kernels, compiled) the responses
  agree with ``generate``'s in distribution, not token for token;
- decoder-only transformers models whose class declares static-cache/compile support
  (``_can_compile_fullgraph``: Llama, Qwen2, Mistral, …), bare or LoRA-wrapped by peft;
  anything else (ZeRO-3-partitioned parameters, prompt-learning peft adapters, stateful or
  encoder-decoder models, a generation config asking for processors this loop does not
  implement, such as a repetition penalty) is handed to ``HFGenerator``, with one log line
  saying why;
- under autocast (Lightning's ``bf16-mixed``: float32 weights) the cache stores keys and values
  in the autocast dtype (attention casts them to it anyway); the buckets are keyed by it;
- the cache holds ``batch × L`` tokens for every layer for the whole call and is kept between
  calls (``max_cached`` per model; :meth:`StaticCacheGenerator.clear` frees them);
- on CUDA the all-rows-finished check runs every ``check_every`` steps (each check is a
  device→host sync), so up to ``check_every - 1`` steps may be wasted after the last EOS; the
  result is trimmed, so it is identical either way;
- each bucket and model compiles its own graph; dynamo's limit of graphs per function is
  raised to :data:`RECOMPILE_LIMIT` (its default, 8, would make later buckets decode eagerly);
- padded batch rows and the bucketed prompt width cost compute: choose buckets near the real
  shapes (RL rollouts usually have one batch size and a bounded prompt length).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import StaticCache

from dvpo_lightning.models.loading import forward_accepts, position_ids_from_mask, unwrapped
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig, mask_after_eos

_LOG = logging.getLogger(__name__)

# Generation-config fields whose logits processors this loop does not implement, with the value
# that disables each; a model whose generation config sets one is handed to HFGenerator.
_UNSUPPORTED_GENERATION_FIELDS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "min_p": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
    "guidance_scale": 1.0, "min_length": 0, "renormalize_logits": False,
    "watermarking_config": None,
}


class _AutocastStaticCache(StaticCache):
    """A transformers ``StaticCache`` that stores keys and values in ``kv_dtype``.

    Why: under autocast with float32 weights (Lightning's ``bf16-mixed``) the attention layers
    produce keys in float32 (the rotary multiply promotes the bf16 projection by the float32
    cos/sin) and values in bf16, and ``StaticCache`` allocates both from the keys' dtype on its
    first update, so the values' in-place ``index_copy_`` fails. Casting both to the autocast dtype
    first changes no result: attention under autocast (SDPA and the eager matmuls) casts its
    inputs to that dtype anyway, which is what ``generate``'s dynamic cache feeds it. It also
    halves the cache. (One class for every cache, so that a bucket dropped and made again does
    not recompile: the compiled step's guards check the cache's type.)
    """

    def __init__(self, config, max_cache_len: int, kv_dtype: torch.dtype) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.kv_dtype = kv_dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype),
                              layer_idx, *args, **kwargs)


# Graphs kept per decode-step function: every (model, batch, cache length) bucket is a graph of
# its own (``dynamic=False``), and past dynamo's default of 8 the next bucket would silently
# decode eagerly.
RECOMPILE_LIMIT = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _forward_last_logits(model: nn.Module, input_ids: Tensor, position_ids: Tensor,
                         attention_mask: Tensor, cache, extra: dict) -> Tensor:
    """One forward through the static cache; the float32 logits of the last position."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, **extra)
    return out.logits[:, -1, :].float()


def suppress_eos(logits: Tensor, eos_token_id: int) -> Tensor:
    """``logits`` with the EOS column set to -inf (a copy)."""
    is_eos = torch.arange(logits.shape[-1], device=logits.device) == eos_token_id
    return torch.where(is_eos, -float("inf"), logits)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept), -inf elsewhere."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is ≤ ``1 - p``.

    Ascending sort, cumulative softmax mass, drop while the mass is ≤ ``1 - p``, always keep
    the most likely token — the same arithmetic as ``generate``'s top-p warper, so that the
    probabilities (and hence ``torch.multinomial``'s draws) are bit-identical.
    """
    ascending, order = torch.sort(logits, descending=False)
    mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def select_tokens(logits: Tensor, cfg: SamplingConfig, n_generated: int,
                  eos_token_id: int) -> Tensor:
    """``(B,)`` next tokens from ``(B, V)`` float32 logits, as ``generate`` chooses them.

    Args:
        logits: the raw next-token logits (float32).
        cfg: the sampling settings.
        n_generated: tokens already generated in this response (the EOS ban holds while this is
            below ``cfg.min_new_tokens``).
        eos_token_id: the token banned before ``min_new_tokens``.
    """
    if n_generated < cfg.min_new_tokens:
        logits = suppress_eos(logits, eos_token_id)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    if cfg.temperature is not None and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = filter_top_k(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = filter_top_p(logits, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@dataclass
class _ShapeState:
    """A static cache and the decode-step buffers of one ``(batch, length)`` bucket."""

    cache: Any
    input_ids: Tensor  # (Bb, 1)
    position_ids: Tensor  # (Bb, 1)
    attention_mask: Tensor  # (Bb, L)
    cache_position: Tensor  # (1,)
    calls: int = 0


@dataclass
class _ModelState:
    """What is kept per model: its shape states (LRU) and its compiled decode step."""

    model_ref: weakref.ref
    shapes: OrderedDict = field(default_factory=OrderedDict)
    step: Any = None
    compiled: bool = False
    extra_kwargs: tuple[str, ...] = ()


class StaticCacheGenerator:
    """Rollouts through a static KV cache and a hand-written decode loop (see the module doc).

    Args:
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS (and used to pad prompts to the bucketed width).
        compile: ``True``: compile the decode step (``torch.compile``, by default
            ``mode="reduce-overhead", fullgraph=False, dynamic=False``: one static-shape CUDA
            graph per bucket on a GPU; graph breaks, e.g. peft hooks, are allowed); ``False``:
            eager;
            ``"auto"``: compile on CUDA only (on a CPU the loop runs eagerly: no CUDA graphs
            there, and compiling tiny models costs more than it saves).
        prompt_bucket: prompts are left-padded to a multiple of this width, and the cache length
            is rounded up to a multiple of it, so that varying prompt lengths reuse the same
            compiled graphs and caches. 1 disables bucketing.
        batch_bucket: the batch is padded up to a multiple of this many rows (the extra rows are
            computed but never sampled). 1 disables it.
        check_every: check whether every row has ended every this many steps (a device→host
            sync); None: every step on a CPU, every 16 steps on CUDA.
        max_cached: shape buckets (caches) kept per model, least recently used dropped first.
        compile_options: keyword arguments for ``torch.compile`` (replace the defaults).
    """

    def __init__(self, eos_token_id: int, pad_token_id: int, *,
                 compile: bool | Literal["auto"] = "auto", prompt_bucket: int = 64,
                 batch_bucket: int = 8, check_every: int | None = None, max_cached: int = 2,
                 compile_options: dict | None = None) -> None:
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        for name, value in (("prompt_bucket", prompt_bucket), ("batch_bucket", batch_bucket),
                            ("max_cached", max_cached)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every must be a positive integer or None, got {check_every!r}")
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.compile = compile
        self.prompt_bucket = prompt_bucket
        self.batch_bucket = batch_bucket
        self.check_every = check_every
        self.max_cached = max_cached
        self.compile_options = (dict(compile_options) if compile_options is not None
                                else {"mode": "reduce-overhead", "fullgraph": False,
                                      "dynamic": False})
        self.fallback = HFGenerator(eos_token_id, pad_token_id)
        self._states: dict[int, _ModelState] = {}
        self._logged: set[str] = set()

    # ------------------------------------------------------------------------------ support
    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        """Why ``model`` cannot use the static-cache loop (None when it can)."""
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return ("its parameters are DeepSpeed ZeRO-3 partitioned (a static cache and "
                    "compiled steps need whole, fixed parameters)")
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return "it has a prompt-learning peft adapter (virtual tokens change the cache layout)"
        base = unwrapped(model)
        config = getattr(base, "config", None)
        if config is None or not hasattr(base, "generation_config"):
            return f"{type(base).__name__} is not a transformers generative model"
        if getattr(config, "is_encoder_decoder", False):
            return "it is an encoder-decoder model"
        if getattr(base, "_is_stateful", False):
            return f"{type(base).__name__} is stateful (recurrent state, no KV cache)"
        if not getattr(base, "_can_compile_fullgraph", False):
            return (f"{type(base).__name__} does not declare static-cache support "
                    "(_can_compile_fullgraph is False)")
        supports_cache = getattr(base, "_supports_default_dynamic_cache", None)
        if callable(supports_cache) and not supports_cache():
            return f"{type(base).__name__} does not take a transformers Cache"
        gen_cfg = base.generation_config
        for name, off in _UNSUPPORTED_GENERATION_FIELDS.items():
            value = getattr(gen_cfg, name, None)
            if value is not None and value != off and not (off is None and value == []):
                return (f"its generation config sets {name}={value!r}, a logits processor the "
                        "static loop does not implement")
        return None

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            _LOG.warning(message)

    # ------------------------------------------------------------------------------ state
    def _model_state(self, model: nn.Module, device: torch.device) -> _ModelState:
        key = id(model)
        state = self._states.get(key)
        if state is not None and state.model_ref() is model:
            return state
        state = _ModelState(model_ref=weakref.ref(model))
        state.extra_kwargs = tuple(name for name in ("cache_position", "logits_to_keep")
                                   if forward_accepts(model, name))
        use_compile = self.compile is True or (self.compile == "auto" and device.type == "cuda")
        if use_compile:
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            state.step = torch.compile(_forward_last_logits, **self.compile_options)
            state.compiled = True
        else:
            state.step = _forward_last_logits
        self._states[key] = state
        weakref.finalize(model, self._states.pop, key, None)
        return state

    def _shape_state(self, model: nn.Module, state: _ModelState, batch: int, length: int,
                     device: torch.device) -> _ShapeState:
        autocast = (torch.get_autocast_dtype(device.type)
                    if torch.is_autocast_enabled(device.type) else None)
        key = (batch, length, device, autocast)
        shape = state.shapes.get(key)
        if shape is not None:
            state.shapes.move_to_end(key)
            shape.cache.reset()
            return shape
        while len(state.shapes) >= self.max_cached:
            state.shapes.popitem(last=False)
        config = unwrapped(model).config
        cache = (StaticCache(config=config, max_cache_len=length) if autocast is None
                 else _AutocastStaticCache(config, length, autocast))
        shape = _ShapeState(
            cache=cache,
            input_ids=torch.zeros((batch, 1), dtype=torch.long, device=device),
            position_ids=torch.zeros((batch, 1), dtype=torch.long, device=device),
            attention_mask=torch.ones((batch, length), dtype=torch.long, device=device),
            cache_position=torch.zeros((1,), dtype=torch.long, device=device),
        )
        if state.compiled:
            # The step reads these buffers in place: fixed addresses, no copies into the graph.
            for t in (shape.input_ids, shape.position_ids, shape.attention_mask,
                      shape.cache_position):
                torch._dynamo.mark_static_address(t)
        state.shapes[key] = shape
        return shape

    def clear(self) -> None:
        """Drop every kept cache and compiled step (frees their memory)."""
        self._states.clear()

    def cached_shapes(self, model: nn.Module) -> list[tuple[int, int]]:
        """The ``(batch, cache length)`` buckets kept for ``model``, least recently used first."""
        state = self._states.get(id(model))
        if state is None or state.model_ref() is not model:
            return []
        return [(b, length) for b, length, *_ in state.shapes]

    def cache_for(self, model: nn.Module, batch: int, length: int):
        """The kept ``StaticCache`` of ``model`` for a bucketed shape (None if there is none)."""
        state = self._states.get(id(model))
        if state is None or state.model_ref() is not model:
            return None
        for key, shape in state.shapes.items():
            if key[:2] == (batch, length):
                return shape.cache
        return None

    def bucketed_shape(self, batch: int, prompt_width: int, max_new_tokens: int
                       ) -> tuple[int, int, int]:
        """``(batch rows, prompt width, cache length)`` after bucketing."""
        rows = _round_up(batch, self.batch_bucket)
        width = _round_up(prompt_width, self.prompt_bucket)
        return rows, width, _round_up(width + max_new_tokens, self.prompt_bucket)

    # ------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 cfg: SamplingConfig) -> tuple[Tensor, Tensor]:
        """``(B, P)`` left-padded prompts → ``(B, T)`` response ids and ``(B, T) bool`` mask."""
        batch, width = prompt_ids.shape
        device = prompt_ids.device
        if cfg.max_new_tokens <= 0:
            response = torch.full((batch, 1), self.eos_token_id, dtype=prompt_ids.dtype,
                                  device=device)
            return response, torch.ones_like(response, dtype=torch.bool)
        if not cfg.greedy:  # the checks generate's warpers make
            if not cfg.temperature or cfg.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {cfg.temperature}")
            if cfg.top_p is not None and not 0 <= cfg.top_p <= 1:
                raise ValueError(f"top_p must be in [0, 1], got {cfg.top_p}")
            if cfg.top_k is not None and cfg.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {cfg.top_k}")
        reason = self.unsupported_reason(model)
        if reason is not None:
            self._log_once(f"StaticCacheGenerator: {type(model).__name__} falls back to "
                           f"HFGenerator because {reason}")
            return self.fallback.generate(model, prompt_ids, prompt_mask, cfg)

        rows, padded_width, length = self.bucketed_shape(batch, width, cfg.max_new_tokens)
        ids = torch.full((rows, padded_width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((rows, padded_width), dtype=torch.long, device=device)
        ids[:batch, padded_width - width:] = prompt_ids
        mask[:batch, padded_width - width:] = prompt_mask.long()
        if rows > batch:  # filler rows copy the last prompt: finite activations, never sampled
            ids[batch:] = ids[batch - 1]
            mask[batch:] = mask[batch - 1]

        state = self._model_state(model, device)
        shape = self._shape_state(model, state, rows, length, device)
        shape.calls += 1
        shape.attention_mask.fill_(1)
        shape.attention_mask[:, :padded_width] = mask
        n_real = mask.sum(dim=1, keepdim=True)

        # prefill (eager: its shape changes with the prompt width)
        extra: dict = {}
        if "cache_position" in state.extra_kwargs:
            extra["cache_position"] = torch.arange(padded_width, device=device)
        if "logits_to_keep" in state.extra_kwargs:
            extra["logits_to_keep"] = 1
        logits = _forward_last_logits(model, ids, position_ids_from_mask(mask),
                                      shape.attention_mask, shape.cache, extra)

        step_extra = ({"cache_position": shape.cache_position}
                      if "cache_position" in state.extra_kwargs else {})
        check_every = self.check_every or (16 if device.type == "cuda" else 1)
        tokens = torch.full((batch, cfg.max_new_tokens), self.pad_token_id, dtype=torch.long,
                            device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        pad = torch.tensor(self.pad_token_id, dtype=torch.long, device=device)
        n_steps = 0
        for k in range(cfg.max_new_tokens):
            nxt = select_tokens(logits[:batch], cfg, k, self.eos_token_id)
            nxt = torch.where(unfinished, nxt, pad)
            tokens[:, k] = nxt
            unfinished &= nxt != self.eos_token_id
            n_steps = k + 1
            if n_steps == cfg.max_new_tokens:
                break
            if n_steps % check_every == 0 and not bool(unfinished.any()):
                break
            # decode: feed token k at position n_real + k, cache slot padded_width + k
            shape.input_ids[:batch, 0] = nxt
            if rows > batch:
                shape.input_ids[batch:, 0] = self.pad_token_id
            torch.add(n_real, k, out=shape.position_ids)
            shape.cache_position.fill_(padded_width + k)
            if state.compiled:
                torch.compiler.cudagraph_mark_step_begin()
                logits = state.step(model, shape.input_ids, shape.position_ids,
                                    shape.attention_mask, shape.cache, step_extra).clone()
            else:
                logits = state.step(model, shape.input_ids, shape.position_ids,
                                    shape.attention_mask, shape.cache, step_extra)

        response = tokens[:, :n_steps]
        is_eos = response == self.eos_token_id
        if bool(is_eos.any(dim=1).all()):  # all ended: trim steps run after the last EOS
            last = int(is_eos.long().argmax(dim=1).max()) + 1
            response = response[:, :last]
        response_mask = mask_after_eos(response, self.eos_token_id)
        return response.masked_fill(~response_mask, self.pad_token_id), response_mask
