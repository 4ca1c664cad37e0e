"""Model FLOPs of each phase of an RL step, for its share of the device's matmul peak.

A forward of ``rows`` sequences of ``seq`` tokens costs a third of
:func:`benchmarks.mfu.model_flops` (``2·N_body·tokens`` + the causal attention term + the
output head over the positions it runs on); a forward and backward costs all of it. Per RL step
of ``rows`` responses, prompts of ``prompt_len`` and responses of ``length`` tokens:

- **generate**: one policy forward over prompt + response per generation (with a KV cache,
  decoding touches each position once; the head runs on the ``length`` generated positions),
  two for ReMax (its greedy baseline);
- **score**: the reference's log-probs (a policy-shaped forward), the policy's own when
  ``logp_old`` is rescored rather than taken from the update (``ppo.behaviour_logps``; with
  ``engine`` the trainer rescores one row in eight, to watch the sampler gap), and one
  body-only forward per value-model call (GVM, reward model, critic; ReMax scores its greedy
  responses too);
- **update**: forward and backward of the policy per epoch, and of the critic for PPO.

Counted as the models are run, not as ideal work: an on-policy update's forward is in
``update``, where its time is. Vocabulary-sized softmaxes, the optimizer and sampling are not
counted (small beside the matmuls at these shapes).
"""

from __future__ import annotations

from benchmarks.mfu import model_flops


def phase_flops(config, rows: int, prompt_len: int, length: int, *, value_forwards: int,
                policy_rescored: float, generations: int, epochs: int,
                critic: bool) -> dict[str, float]:
    """``{"generate", "score", "update"}`` model FLOPs of one RL step (see the module);
    ``policy_rescored``: the share of the rows the policy scores for ``logp_old`` (0, 1, or a
    fraction: :func:`rescored_share`)."""
    seq = prompt_len + length
    lm = model_flops(config, rows, seq, length) / 3  # a policy-shaped forward
    body = model_flops(config, rows, seq, 0) / 3  # a value model's: a 1-wide head
    update = model_flops(config, rows, seq, length) + (model_flops(config, rows, seq, 0)
                                                       if critic else 0.0)
    return {"generate": generations * lm,
            "score": (1 + float(policy_rescored)) * lm + value_forwards * body,
            "update": epochs * update}


def rescored_share(behaviour_logps: str, on_policy: bool, rows: int) -> float:
    """The share of a rollout's ``rows`` the policy scores for ``logp_old`` outside the
    update: none when an on-policy update gives it (``auto``), ``ceil(rows / 8) / rows`` when
    the engine gives it (the rows that watch the sampler gap), else all."""
    from dvpo_lightning.rollout.experience_maker import ENGINE_CHECK_SHARE

    if behaviour_logps == "engine":
        return -(-rows // ENGINE_CHECK_SHARE) / rows
    return 0.0 if behaviour_logps == "auto" and on_policy else 1.0


def shares_of_peak(flops: dict[str, float], seconds: dict[str, float],
                   peak: float) -> dict[str, float | None]:
    """Each phase's achieved FLOP/s ÷ ``peak`` (None for a phase with no time)."""
    return {k: (f / seconds[k] / peak if seconds.get(k) else None) for k, f in flops.items()}
