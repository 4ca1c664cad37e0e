"""Run by ``tests/test_vllm_engine.py`` in a fresh process (vLLM not yet imported, the
environment the test gives): builds a vLLM engine, pushes new weights, and prints, as JSON, the
process's state before and after and what the engine did.

Usage: ``python tests/vllm_process_worker.py TOKENIZER_DIR INIT_FILE`` (``INIT_FILE``: a path
for the process group's file rendezvous).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import lightning  # noqa: F401  (a training process has it: it sets its own variables)
import torch

from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.vllm_engine import VLLMEngine, VLLMOptions


def state() -> dict:
    return {"env": dict(os.environ), "precision": torch.get_float32_matmul_precision(),
            "gc_frozen": gc.get_freeze_count(), "threads": torch.get_num_threads()}


def main(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = load_causal_lm("test-llama-32", tok).eval()
    ids = torch.tensor([tok("3172=", add_special_tokens=False)["input_ids"]] * 2)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cfg = SamplingConfig(10, greedy=True)
    hf = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    import torch.distributed as dist  # a trainer's process group (Lightning's, under DDP)

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
    torch.set_float32_matmul_precision("medium")
    imported_before = "vllm" in sys.modules
    before = state()
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id, VLLMOptions(kv_cache_gb=0.5))
    engine.generate(model, ids, mask, cfg, weights_version=0)  # build, push, sample
    after = state()
    with torch.no_grad():  # an update; the push must reach the engine
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pushed = engine.generate(model, ids, mask, cfg, weights_version=1)
    from vllm.usage import usage_lib

    cache = engine.llm.llm_engine.vllm_config.cache_config
    config = model.config
    block_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads
                   * (config.hidden_size // config.num_attention_heads) * cache.block_size * 4)
    kv_cache_bytes = cache.num_gpu_blocks * block_bytes
    client = type(engine.llm.llm_engine.engine_core).__name__
    # what the collector runs when an engine is dropped (its client's finalizer): the trainer's
    # process group and a next engine must survive it
    engine.llm.llm_engine.engine_core._finalizer()
    del engine
    group_kept = dist.is_initialized()
    again = VLLMEngine(tok.eos_token_id, tok.pad_token_id, VLLMOptions(kv_cache_gb=0.5))
    second_equal = torch.equal(again.generate(model, ids, mask, cfg, weights_version=1)[0],
                               hf.generate(model, ids, mask, cfg)[0])
    print("RESULT " + json.dumps({
        "imported_before": imported_before, "before": before, "after": after,
        "usage_stats_enabled": usage_lib.is_usage_stats_enabled(),
        "engine_client": client,
        "pushed_equal": torch.equal(pushed.response_ids, hf.generate(model, ids, mask, cfg)[0]),
        "kv_cache_bytes": kv_cache_bytes, "group_kept": group_kept,
        "second_engine_equal": second_equal,
        "kv_block_bytes": block_bytes}))


if __name__ == "__main__":
    main(sys.argv[1])  # (sys.argv[2]: read in main)
