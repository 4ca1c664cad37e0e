"""What each training step cost, for every stage: seconds (RL: split into generate, score and
update), generated tokens, peak memory and parameter counts — the Table-7 analog's inputs — and,
for RL, the per-step rollout curve (gold reward, KL, reward-model score)."""

from __future__ import annotations

import resource

import lightning as L
import torch
from torch import nn

from dvpo_lightning.runtime.log_steps import logs_this_step
from dvpo_lightning.runtime.timing import phase_clock


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else 0.0


def frozen_weights_gb(module: nn.Module) -> float:
    """GiB the parameters without gradients hold (the frozen reference, GVM, reward model; a
    LoRA policy's base weights), in their dtype (``ds_numel`` for ZeRO-3 partitions)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
               for p in module.parameters() if not p.requires_grad) / 2**30


def count_params(module: nn.Module, trainable: bool = False) -> float:
    """Parameters of ``module`` in millions (``trainable``: only those with gradients). A
    ZeRO-3 partitioned parameter is empty on each rank; ``ds_numel`` is its full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
               if p.requires_grad or not trainable) / 1e6


class CostMeter(L.Callback):
    """Records every training step of the process: its wall time, and the floats the module's
    ``training_step`` returns in a dict (the RL module: ``generate_s``, ``score_s``,
    ``update_s``, ``gen_tokens``, ``gold``, ``kl``, ``score``). A step that returns nothing
    (an RL step skipped by a guard) is not recorded. The records are checkpointed, so a
    resumed run's curve is whole."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = phase_clock(pl_module.device)  # (a GPU: the previous step's work done)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not outputs:  # None, or {} from a manual-optimisation step that returned nothing
            return
        step_s = phase_clock(pl_module.device) - self._t0
        extra = {k: float(v) for k, v in outputs.items()
                 if k != "loss" and isinstance(v, (int, float, torch.Tensor))}
        self.records.append({"step_s": step_s, **extra})
        if logs_this_step(trainer):
            pl_module.log("perf/step_s", step_s, batch_size=1)

    def summary(self, pl_module: nn.Module) -> dict[str, float]:
        """Means over every step but the first (it pays one-time warm-up); memory is the CUDA
        peak on a GPU, else the process's peak resident set size (which includes the Python
        runtime and libraries: compare differences, not absolute values)."""
        log = self.records[1:] or self.records
        out = {"rl_steps": len(self.records), "step_s": _mean(log, "step_s"),
               "train_s": sum(r["step_s"] for r in self.records),
               "generate_s": _mean(log, "generate_s"), "score_s": _mean(log, "score_s"),
               "update_s": _mean(log, "update_s"),
               "gen_tokens_per_step": _mean(log, "gen_tokens"),
               "gen_tokens_total": sum(r.get("gen_tokens", 0.0) for r in self.records),
               "params_loaded_m": count_params(pl_module),
               "params_trained_m": count_params(pl_module, trainable=True),
               "frozen_weights_gb": frozen_weights_gb(pl_module),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if torch.cuda.is_available():
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state: dict) -> None:
        self.records = state.get("records", [])
