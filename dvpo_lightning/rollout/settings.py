"""How responses are generated and scored: the rollout settings of an RL run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from dvpo_lightning.rollout.generation import SamplingConfig
from dvpo_lightning.rollout.vllm_engine import VLLMOptions


@dataclass(frozen=True)
class RolloutSettings:
    """How responses are generated and scored, in rollouts and in held-out evaluation.

    Args:
        engine: the rollout engine: ``hf`` (``model.generate``: the exact reference, the
            fallback) or ``vllm`` (a vLLM engine in this process, fed the policy's weights after
            every update; its settings are ``vllm``).
        max_new_tokens: longest response, in tokens.
        min_new_tokens: shortest rollout response: EOS is suppressed before it (cost
            benchmarks set it to ``max_new_tokens`` to force every response's length).
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: top-k sampling (0 disables it). The trainer's log-probs of the policy (old and
            new) are of the distribution these three define, the reference's at the
            temperature alone (docs/sampling.md).
        eval_greedy: decode held-out prompts greedily (else sample as rollouts do).
        eval_seed: common random numbers for held-out evaluation: the answer to held-out prompt
            ``i`` is sampled from a noise stream fixed by ``(eval_seed, i)`` alone, the same for
            every method, the reference and the SFT policy, every validation, batch and process
            count, and the global RNG is left alone (docs/evaluation.md); None: evaluation
            samples from the global RNG, as before.
        eval_samples: answers per held-out prompt (sample ``k`` of prompt ``i`` from the stream
            of ``(eval_seed, i, k)``): each measure is then ``(prompts, eval_samples)``, its
            mean over both, and the win rate pairs sample ``k`` with the reference's sample
            ``k``. More samples shrink the evaluation's own noise; 1: one answer, as before.
        test_samples: answers per prompt in the final test evaluation (``data.test_path``,
            read once at the end of ``fit``); None: ``eval_samples``. The test prompts are
            answered once, so more samples there cost little and shrink the final numbers'
            own noise, with the validation curves, tuning and training left as they are.
        score_batch_size: rows per forward pass when scoring a rollout or an evaluation batch
            (policy and reference log-probs, GVM / critic values, RM scores); None: the whole
            batch at once. Generation always runs on the whole batch; this bounds the scoring
            passes' activation memory (large vocabularies, long responses).
        vllm: the vLLM engine's settings (``engine: vllm``).
    """

    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eval_greedy: bool = False
    eval_seed: int | None = None
    eval_samples: int = 1
    test_samples: int | None = None
    score_batch_size: int | None = None
    vllm: VLLMOptions = VLLMOptions()

    def __post_init__(self) -> None:
        rules = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens,
             "min_new_tokens must be between 0 and max_new_tokens"),
            (self.temperature >= 0, "temperature must be >= 0 (0: greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0: off)"),
            (self.eval_seed is None or self.eval_seed >= 0,
             "eval_seed must be >= 0, or null to sample evaluations from the global RNG"),
            (self.eval_samples >= 1, "eval_samples must be >= 1"),
            (self.test_samples is None or self.test_samples >= 1,
             "test_samples must be >= 1, or null for eval_samples"),
            (self.score_batch_size is None or self.score_batch_size >= 1,
             "score_batch_size must be >= 1, or null to score a whole batch at once"),
        ]
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"model.init_args.rollout: {'; '.join(broken)} (got {self}). Fix the "
                             "model.init_args.rollout.* keys named")

    @property
    def sampling(self) -> SamplingConfig:
        """What a rollout samples with."""
        return SamplingConfig(self.max_new_tokens, self.temperature or 1.0, self.top_p,
                              self.top_k, greedy=self.temperature == 0,
                              min_new_tokens=self.min_new_tokens)

    @property
    def greedy_sampling(self) -> SamplingConfig:
        """ReMax's greedy baseline response (same forced length as the rollout's)."""
        return replace(self.sampling, greedy=True)

    @property
    def eval_sampling(self) -> SamplingConfig:
        """Held-out evaluation: greedy with ``eval_greedy``, and never a forced length."""
        cfg = self.sampling
        return replace(cfg, greedy=self.eval_greedy or cfg.greedy, min_new_tokens=0)
