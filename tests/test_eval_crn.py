"""Common random numbers in held-out evaluation (``rollout.eval_seed``): ``generate`` samples
by the Gumbel-max trick from a noise stream fixed by ``(eval_seed, prompt index)``. Checked
with real tiny models: (a) a prompt's answer is the same whatever the batch's order and size;
(b) the sampled tokens are distributed as ``softmax(transform(logits))`` (chi-square, many
seeds); (c) the global RNG is untouched; (d) every sampled token is in the sampler's kept set,
so the KL's log-probs score the distribution sampled; and the default (no seed) path draws
exactly what it did."""

from __future__ import annotations

import pytest
import torch
from test_sampled_logps import logits_of, model32

from dvpo_lightning.data.collate import pad_left
from dvpo_lightning.models import load_tokenizer
from dvpo_lightning.ops.sampling import transform_logits
from dvpo_lightning.rollout.common_noise import GumbelMax, stream_seeds
from dvpo_lightning.rollout.evaluation import HeldOutEvaluator
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig
from dvpo_lightning.rollout.settings import RolloutSettings

pytestmark = pytest.mark.filterwarnings("ignore")
CFG = SamplingConfig(10, temperature=0.7, top_p=0.95, top_k=30)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["3172=", "90=", "5555123=", "41=", "807=", "2=", "66=", "12345="]
    return pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                    tok.pad_token_id)


def gen(tok):
    return HFGenerator(tok.eos_token_id, tok.pad_token_id)


def rows_of(tok, ids, mask, order, seeds, model, cfg=CFG, chunk=3):
    """Each prompt's response tokens (a list per prompt), generated ``chunk`` prompts at a
    time in ``order`` (left padding trimmed per chunk: other batch shapes)."""
    out = {}
    for s in range(0, len(order), chunk):
        pick = order[s:s + chunk]
        m = mask[pick]
        keep = m.any(0)
        r = gen(tok).generate(model, ids[pick][:, keep], m[:, keep], cfg,
                              seeds=[seeds[i] for i in pick])
        for i, row, rm in zip(pick, r.response_ids, r.response_mask):
            out[i] = row[rm].tolist()
    return out


def test_same_seed_and_index_give_the_same_answer_whatever_the_batch(tok, prompts):
    ids, mask = prompts
    model = model32(tok)
    seeds = stream_seeds(7, range(len(ids)))
    whole = rows_of(tok, ids, mask, list(range(len(ids))), seeds, model, chunk=len(ids))
    shuffled = rows_of(tok, ids, mask, [5, 2, 7, 0, 3, 6, 1, 4], seeds, model, chunk=3)
    assert whole == shuffled
    other = rows_of(tok, ids, mask, list(range(len(ids))), stream_seeds(8, range(len(ids))),
                    model, chunk=len(ids))
    assert other != whole  # another eval_seed: other draws


def test_the_global_rng_is_untouched_and_the_default_path_unchanged(tok, prompts):
    ids, mask = prompts
    model = model32(tok)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    gen(tok).generate(model, ids, mask, CFG, seeds=stream_seeds(1, range(len(ids))))
    assert torch.equal(torch.get_rng_state(), before)
    # without seeds: generate's own sampling from the global RNG, as before
    torch.manual_seed(3)
    got = gen(tok).generate(model, ids, mask, CFG).response_ids
    torch.manual_seed(3)
    want = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True,
                          max_new_tokens=10, temperature=0.7, top_p=0.95, top_k=30,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = want[:, ids.shape[1]:]
    assert torch.equal(got[:, :want.shape[1]][got[:, :want.shape[1]] != tok.pad_token_id],
                       want[want != tok.pad_token_id])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the kept set was sampled"
    expected = n * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_sampled_tokens_follow_softmax_of_the_transformed_logits(tok, prompts):
    """The first response token of one prompt under 3000 streams, through ``generate``: its
    frequencies against ``softmax(f(z))`` (top-k 30, top-p 0.95, T 0.7 on a 96-token head).
    Chi-square below the 0.999 quantile (df ≤ 30: about 60); a sampler of the raw softmax
    fails it by far."""
    model = model32(tok)
    n = 3000
    ids, mask = prompts[0][:1].repeat(n, 1), prompts[1][:1].repeat(n, 1)
    cfg = SamplingConfig(1, temperature=0.7, top_p=0.95, top_k=30)
    first = gen(tok).generate(model, ids, mask, cfg, seeds=stream_seeds(0, range(n)))
    counts = torch.bincount(first.response_ids[:, 0], minlength=96).double()
    z = logits_of(model, ids[:1], mask[:1], first.response_ids[:1], first.response_mask[:1])
    f = transform_logits(z[0, 0].clone(), cfg.policy_transform((tok.eos_token_id,)))
    stat, df = chi_square(counts, f.softmax(-1).double())
    assert df >= 5 and stat < 60, (stat, df)
    raw = z[0, 0].softmax(-1).double()
    assert float(((counts - n * raw) ** 2 / (n * raw)).sum()) > 200  # the test can fail


def test_gumbel_max_on_fixed_logits_is_exact():
    """The processor alone, 20000 streams on one row of logits with ties and a truncation."""
    from dvpo_lightning.ops.sampling import LogitTransform

    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(1, 12, generator=g)).round()
    tr = LogitTransform(0.8, top_k=6, top_p=0.9)
    n = 20000
    picked = GumbelMax(tr, stream_seeds(4, range(n)), torch.device("cpu"))(
        None, logits.repeat(n, 1)).argmax(-1)
    probs = transform_logits(logits[0].clone(), tr).softmax(-1).double()
    stat, df = chi_square(torch.bincount(picked, minlength=12).double(), probs)
    assert stat < 40, (stat, df)


def test_crn_samples_lie_in_the_kept_set_and_the_kl_scores_them(tok, prompts):
    """Every sampled token is in the sampler's kept set at its position (top-k 3), so the
    policy's log-probs under ``policy_transform`` are those of the distribution sampled:
    finite, and the reference answering itself at T alone has KL ``Σ −log kept mass > 0``."""
    ids, mask = prompts
    model = model32(tok)
    cfg = SamplingConfig(10, temperature=0.5, top_k=3)
    r = gen(tok).generate(model, ids, mask, cfg, seeds=stream_seeds(2, range(len(ids))))
    z = logits_of(model, ids, mask, r.response_ids, r.response_mask)
    rank = (z > z.gather(2, r.response_ids[..., None])).sum(-1)
    assert (rank[r.response_mask] < 3).all()
    ev = HeldOutEvaluator(gen(tok), cfg, tok, eval_seed=2,
                          reference_logps=lambda m, *s, sampling=None: 1 / 0)
    out = ev.evaluate(model, ids, mask, [""] * len(ids), is_reference=True,
                      index=torch.arange(len(ids)))
    assert torch.isfinite(out["kl_to_ref"]).all() and (out["kl_to_ref"] > 0).all()
    with pytest.raises(ValueError, match="eval_seed"):
        ev.evaluate(model, ids, mask, [""] * len(ids))


def test_eval_seed_setting():
    assert RolloutSettings().eval_seed is None
    with pytest.raises(ValueError, match="eval_seed must be >= 0"):
        RolloutSettings(eval_seed=-1)


def test_vllm_requests_take_the_stream_seeds(tok, prompts):
    """With the vLLM engine each request's seed is its prompt's stream seed: the same answer
    whatever the batch's order and the global RNG, which is not drawn from."""
    from test_vllm_engine import model32 as vllm_model

    from dvpo_lightning.rollout.vllm_engine import VLLMEngine

    ids, mask = prompts
    model = vllm_model(tok)
    engine = VLLMEngine(tok.eos_token_id, tok.pad_token_id)
    seeds = stream_seeds(9, range(len(ids)))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    whole = engine.generate(model, ids, mask, CFG, weights_version=0, seeds=seeds)
    assert torch.equal(torch.get_rng_state(), before)
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    torch.manual_seed(2)
    again = engine.generate(model, ids[order], mask[order], CFG, weights_version=0,
                            seeds=[seeds[i] for i in order])
    for j, i in enumerate(order):
        assert (whole.response_ids[i][whole.response_mask[i]].tolist()
                == again.response_ids[j][again.response_mask[j]].tolist())
    other = engine.generate(model, ids, mask, CFG, weights_version=0,
                            seeds=stream_seeds(10, range(len(ids))))
    assert not torch.equal(other.response_ids, whole.response_ids)


def test_the_sft_policys_gold_eval_shares_the_rl_evaluations_numbers(task_data, tokenizer_dir,
                                                                     sft_model_dir):
    """``GoldEval``'s evaluation with ``eval_seed`` (at T = 1, as the SFT stage samples) gives
    the RL evaluator's answers to the same prompts, whatever the global RNG: the means of the
    same per-prompt values; without it, another global seed gives other answers."""
    from dvpo_lightning.callbacks.gold_eval import evaluate_policy
    from dvpo_lightning.data.formats import load_examples
    from dvpo_lightning.data.tokenize import encode_prompt
    from dvpo_lightning.models import load_causal_lm
    from dvpo_lightning.tasks.judges import load_judge

    tok = load_tokenizer(tokenizer_dir)
    model = load_causal_lm(sft_model_dir, tok).eval()
    judge, cfg = load_judge("sorting"), SamplingConfig(16)
    prompts = [r["prompt"] for r in load_examples(f"{task_data}/eval_prompts.jsonl", "prompt")]

    def sft(seed, eval_seed):
        torch.manual_seed(seed)
        return evaluate_policy(model, tok, judge, prompts, cfg, batch_size=5,
                               eval_seed=eval_seed)

    ids, mask = pad_left([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    rl = HeldOutEvaluator(gen(tok), cfg, tok, judge, eval_seed=4).evaluate(
        model, ids, mask, prompts, index=torch.arange(len(prompts)))
    a, b = sft(0, 4), sft(1, 4)
    assert a == b
    for k in ("gold_reward", "response_len", "eos_frac"):
        assert a[k] == pytest.approx(sum(rl[k].tolist()) / len(prompts), abs=1e-12)
    assert sft(0, None) != sft(1, None)


def test_several_samples_per_prompt(tok, prompts):
    """``eval_samples`` k: each measure ``(B, k)``, sample 0 the one-sample evaluation's answer
    (stream ``(seed, i, 0)``), the others other draws; the win rate pairs sample with sample."""
    from dvpo_lightning.rollout.evaluation import EvalHistory

    ids, mask = prompts
    model = model32(tok)
    index = torch.arange(len(ids))

    def run(samples, m=model):
        ev = HeldOutEvaluator(gen(tok), CFG, tok, eval_seed=6, samples=samples)
        return ev.evaluate(m, ids, mask, [""] * len(ids), index=index)

    one, three = run(1), run(3)
    assert three["response_len"].shape == (len(ids), 3)
    assert torch.equal(three["response_len"][:, 0], one["response_len"])
    assert not torch.equal(three["response_len"][:, 1], three["response_len"][:, 0])
    history = EvalHistory()
    ref = {"gold_reward": torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)}
    history.set_reference(ref)
    got = history.metrics({"gold_reward": torch.tensor([[1.0, 0.0], [0.5, 1.0]],
                                                       dtype=torch.float64)})
    assert float(got["eval/win_rate_vs_ref"]) == (1 + 0 + 0.5 + 1) / 4
    assert RolloutSettings(eval_samples=2).eval_samples == 2
    with pytest.raises(ValueError, match="eval_samples must be >= 1"):
        RolloutSettings(eval_samples=0)
