"""Rollout pieces: EOS masking, generation, the forward passes' token alignment, prompt data.

Alignment (docs/algorithm.md): ``logp[:, t-1] = log π(y_t | s_t)`` is read at the position before
``y_t``; ``values[:, k] = u_k`` with ``u_0`` at the last prompt token. Every batched result is
compared with a plain loop over unpadded rows, so left padding of prompts and right padding of
responses must both be handled (positions, masks, slicing).
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.data.collate import pad_left, pad_right
from dvpo_lightning.data.rollout import EpochShuffleSampler, RolloutDataModule
from dvpo_lightning.models import ValueModel, load_causal_lm, load_tokenizer
from dvpo_lightning.rollout import Experience
from dvpo_lightning.rollout.experience_maker import repeat_prompts
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig, mask_after_eos
from dvpo_lightning.rollout.scoring import policy_logps, response_values, sequence_scores

EOS = 2


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    return load_causal_lm("test-llama", tok).eval()


@pytest.fixture(scope="module")
def eos_policy(tok):
    """A random policy whose EOS logit is inflated, so sampled responses end at varied places."""
    torch.manual_seed(0)
    model = load_causal_lm("test-llama", tok).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 4  # tied with the LM head
    return model


def _prompts(tok, lengths, seed=0):
    """Random prompts (non-special tokens) of the given lengths, as lists of ids."""
    g = torch.Generator().manual_seed(seed)
    lo = len(tok.all_special_ids)
    return [torch.randint(lo, len(tok), (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------- mask_after_eos
def test_mask_after_eos_known_answers():
    ids = torch.tensor([
        [EOS, 5, 6, 7],  # EOS first: only the EOS is kept
        [5, EOS, 6, 7],  # EOS in the middle: kept, everything after masked
        [5, 6, 7, 8],  # no EOS: all kept (truncated response)
        [5, 6, EOS, EOS],  # a second EOS is masked like any token after the first
        [5, 6, 7, EOS],  # EOS last
    ])
    expect = torch.tensor([
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=torch.bool)
    got = mask_after_eos(ids, EOS)
    assert got.dtype == torch.bool
    assert torch.equal(got, expect)


# ---------------------------------------------------------------------------- HFGenerator
def test_generate_masks_up_to_first_eos_and_pads_after(tok, eos_policy):
    gen = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    prompt_ids, prompt_mask = pad_left(_prompts(tok, [3, 5, 7, 4, 6, 2, 5, 3]), tok.pad_token_id)
    torch.manual_seed(1)
    resp, mask = gen.generate(eos_policy, prompt_ids, prompt_mask, SamplingConfig(10))[:2]
    assert resp.dtype == torch.long and mask.dtype == torch.bool
    assert resp.shape == mask.shape and resp.shape[0] == 8 and 1 <= resp.shape[1] <= 10
    cases = set()
    for r, m in zip(resp.tolist(), mask.tolist()):
        first = r.index(tok.eos_token_id) if tok.eos_token_id in r else None
        if first is None:
            assert all(m), f"no EOS, yet masked: {r} {m}"
            cases.add("unfinished")
        else:
            assert m == [True] * (first + 1) + [False] * (len(r) - first - 1), (r, m)
            assert r[first + 1:] == [tok.pad_token_id] * (len(r) - first - 1), r
            cases.add("first" if first == 0 else "middle" if first < len(r) - 1 else "last")
    # the seed must produce the interesting cases, or this test checks nothing
    assert {"unfinished", "middle"} <= cases, cases


def test_greedy_generation_is_batching_invariant(tok, policy):
    """Left-padded prompts of different lengths continue exactly as each prompt alone."""
    gen = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    cfg = SamplingConfig(8, greedy=True)
    prompts = _prompts(tok, [2, 7, 4, 5], seed=3)
    ids, mask = pad_left(prompts, tok.pad_token_id)
    assert not mask.all(), "the batch must contain left padding"
    resp, rmask = gen.generate(policy, ids, mask, cfg)[:2]
    for i, p in enumerate(prompts):
        one = torch.tensor([p])
        alone, amask = gen.generate(policy, one, torch.ones_like(one, dtype=torch.bool),
                                    cfg)[:2]
        assert resp[i][rmask[i]].tolist() == alone[0][amask[0]].tolist(), f"row {i}"


def test_min_equal_max_new_tokens_forces_the_length(tok, eos_policy):
    gen = HFGenerator(tok.eos_token_id, tok.pad_token_id)
    ids, mask = pad_left(_prompts(tok, [3, 5, 7, 4, 6, 2, 5, 3]), tok.pad_token_id)
    torch.manual_seed(1)
    free_mask = gen.generate(eos_policy, ids, mask, SamplingConfig(6)).response_mask
    assert not free_mask.all(), "this policy ends some responses early when not forced"
    torch.manual_seed(1)
    resp, rmask = gen.generate(eos_policy, ids, mask, SamplingConfig(6, min_new_tokens=6))[:2]
    assert resp.shape == (8, 6)
    assert rmask.all(), rmask
    assert not (resp == tok.eos_token_id).any()


# ---------------------------------------------------------------------------- forward passes
def _ragged_batch(tok, prompt_lengths, response_lengths, seed=0):
    prompts = _prompts(tok, prompt_lengths, seed)
    responses = _prompts(tok, response_lengths, seed + 100)
    responses[0][-1] = tok.eos_token_id  # a finished response among unfinished ones
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id)
    r_ids, r_mask = pad_right(responses, tok.pad_token_id)
    return prompts, responses, (p_ids, p_mask, r_ids, r_mask)


def test_policy_logps_match_a_loop_over_unpadded_rows(tok, policy):
    prompts, responses, seq = _ragged_batch(tok, [3, 6, 1, 4], [4, 2, 5, 1])
    logp, entropy = policy_logps(policy, *seq, with_entropy=True)
    assert logp.shape == entropy.shape == seq[2].shape and logp.dtype == torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([p + r])).logits[0].float()
        logprobs = logits.log_softmax(-1)
        # y_t (t = 1..T) is predicted by the logits at position len(p) - 1 + (t - 1)
        rows = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        expect = logprobs[rows, torch.tensor(r)]
        assert_close(logp[i, :len(r)], expect, atol=1e-5, rtol=1e-5)
        assert (logp[i, len(r):] == 0).all(), "padding must hold zero log-probs"
        expect_h = -(logprobs[rows].exp() * logprobs[rows]).sum(-1)
        assert_close(entropy[i, :len(r)], expect_h, atol=1e-5, rtol=1e-5)


def test_response_values_start_at_the_last_prompt_token(tok):
    torch.manual_seed(0)
    vm = ValueModel.from_pretrained("test-llama", tok, kind="gvm", zero_init_head=False).eval()
    prompts, responses, seq = _ragged_batch(tok, [2, 5, 3], [3, 1, 4], seed=5)
    with torch.no_grad():
        values = response_values(vm, *seq)
        scores = sequence_scores(vm, *seq)
    t = seq[2].shape[1]
    assert values.shape == (3, t + 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = torch.tensor([p + r])
        with torch.no_grad():
            v = vm(full, torch.ones_like(full, dtype=torch.bool))[0]
        u = v[len(p) - 1:]  # u_0 at the last prompt token, u_t at y_t
        assert len(u) == len(r) + 1
        assert_close(values[i, :len(r) + 1], u, atol=1e-5, rtol=1e-5)
        assert_close(scores[i], u[-1], atol=1e-5, rtol=1e-5)  # r(x, y) = u_T


# ---------------------------------------------------------------------------- Experience
def _experience(**overrides):
    b, p, t = 3, 2, 4
    fields = dict(
        prompt_ids=torch.zeros(b, p, dtype=torch.long),
        prompt_mask=torch.ones(b, p, dtype=torch.bool),
        response_ids=torch.zeros(b, t, dtype=torch.long),
        response_mask=torch.ones(b, t, dtype=torch.bool), logp_old=torch.zeros(b, t),
        logp_ref=torch.zeros(b, t), kl_penalty=torch.zeros(b, t), values=torch.zeros(b, t + 1),
        scores=torch.zeros(b), group_ids=torch.zeros(b, dtype=torch.long),
        baseline_scores=torch.zeros(b))
    fields.update(overrides)
    return Experience(**fields)


def test_experience_accepts_consistent_fields():
    exp = _experience()
    assert (exp.batch_size, exp.response_length) == (3, 4)
    sub = exp.index(torch.tensor([2, 0]))
    assert sub.batch_size == 2 and sub.values.shape == (2, 5)


@pytest.mark.parametrize("field, bad, message", [
    ("prompt_ids", torch.zeros(2, 2, dtype=torch.long), "Experience.prompt_ids has 2 rows"),
    ("prompt_mask", torch.ones(3, 5, dtype=torch.bool), "Experience.prompt_mask has shape"),
    ("response_mask", torch.ones(3, 5, dtype=torch.bool), "Experience.response_mask has shape"),
    ("logp_old", torch.zeros(3, 5), "Experience.logp_old has shape"),
    ("logp_ref", torch.zeros(3), "Experience.logp_ref has shape"),
    ("kl_penalty", torch.zeros(2, 4), "Experience.kl_penalty has shape"),
    ("values", torch.zeros(3, 4), r"Experience.values has shape \(3, 4\), expected \(3, 5\)"),
    ("scores", torch.zeros(3, 1), "Experience.scores has shape"),
    ("group_ids", torch.zeros(4, dtype=torch.long), "Experience.group_ids has shape"),
    ("baseline_scores", torch.zeros(2), "Experience.baseline_scores has shape"),
    ("response_mask", torch.ones(3, 4), "Experience.response_mask must be bool"),
    ("prompt_mask", torch.ones(3, 2, dtype=torch.long), "Experience.prompt_mask must be bool"),
])
def test_experience_errors_name_the_field(field, bad, message):
    with pytest.raises(ValueError, match=message):
        _experience(**{field: bad})


# ---------------------------------------------------------------------------- prompt data
def _datamodule(task_data, tokenizer_dir, **kwargs):
    args = dict(batch_size=4, max_eval_prompts=4, seed=1)
    args.update(kwargs)
    dm = RolloutDataModule(os.path.join(task_data, "rl_prompts.jsonl"),
                           os.path.join(task_data, "eval_prompts.jsonl"), tokenizer_dir, **args)
    dm.setup("fit")
    return dm


def _epoch_prompts(loader) -> list[str]:
    return [p for batch in loader for p in batch["prompts"]]


def test_rollout_batches_hold_each_prompt_once_and_the_maker_repeats_it(task_data,
                                                                        tokenizer_dir):
    dm = _datamodule(task_data, tokenizer_dir)
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    assert ids.shape[0] == mask.shape[0] == len(batch["prompts"]) == 4
    assert len(set(batch["prompts"])) == 4, "distinct prompts"
    assert (mask[:, -1]).all(), "prompts are left padded: the last column is always real"
    tok = dm.tokenizer
    for i in range(4):
        assert tok.decode(ids[i][mask[i]]) == batch["prompts"][i]
    grouped = repeat_prompts(batch, 3)  # what the experience maker samples from
    assert grouped["group_ids"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert grouped["prompt_ids"].shape[0] == len(grouped["prompts"]) == 12
    for g in range(4):
        rows = slice(3 * g, 3 * g + 3)
        assert (grouped["prompt_ids"][rows] == ids[g]).all()
        assert (grouped["prompt_mask"][rows] == mask[g]).all()
        assert grouped["prompts"][rows] == [batch["prompts"][g]] * 3
    assert repeat_prompts(batch, 1)["group_ids"].tolist() == [0, 1, 2, 3]
    val = next(iter(dm.val_dataloader()))
    assert len(val["prompts"]) == 4 and "group_ids" not in val


def test_prompt_order_is_seeded_and_changes_across_epochs(task_data, tokenizer_dir):
    dm = _datamodule(task_data, tokenizer_dir)
    loader = dm.train_dataloader()
    epoch0, epoch1 = _epoch_prompts(loader), _epoch_prompts(loader)
    n = len(dm.train_set)
    assert len(epoch0) == n and len(set(epoch0)) == n, "an epoch visits every prompt once"
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = _datamodule(task_data, tokenizer_dir).train_dataloader()
    assert _epoch_prompts(again) == epoch0 and _epoch_prompts(again) == epoch1
    other = _datamodule(task_data, tokenizer_dir, seed=2).train_dataloader()
    assert _epoch_prompts(other) != epoch0
    unshuffled = _datamodule(task_data, tokenizer_dir, shuffle=False)
    assert _epoch_prompts(unshuffled.train_dataloader()) == [p for _, p in unshuffled.train_set]


def test_sampler_state_resumes_at_the_same_position(task_data, tokenizer_dir):
    dm = _datamodule(task_data, tokenizer_dir)
    for _ in dm.train_dataloader():  # a full epoch
        pass
    it = iter(dm.train_dataloader())
    for _ in range(3):  # 3 batches into the second
        next(it)
    state = dm.state_dict()
    assert state == {"sampler": {"epoch": 1, "position": 12}}
    expected = [next(it)["prompts"] for _ in range(2)]

    resumed = RolloutDataModule(dm.train_path, dm.eval_path, dm.tokenizer_path, batch_size=4,
                                seed=1)
    resumed.load_state_dict(state)  # before setup, as Lightning does when restoring
    it2 = iter(resumed.train_dataloader())
    assert [next(it2)["prompts"] for _ in range(2)] == expected


def test_sampler_hands_out_whole_batches_and_never_an_empty_epoch():
    s = EpochShuffleSampler(10, seed=0, batch_size=4)
    assert len(s) == 8
    it = iter(s)
    first = [next(it) for _ in range(3)]
    assert s.state_dict() == {"epoch": 0, "position": 3}
    epoch0 = first + [next(it) for _ in range(5)]  # stop like Lightning: no request past the end
    assert len(set(epoch0)) == 8
    epoch1 = list(s)  # a new iterator starts the next epoch, not an empty remainder
    assert len(epoch1) == 8 and epoch1 != epoch0
    assert s.state_dict() == {"epoch": 1, "position": 8}
    s2 = EpochShuffleSampler(10, seed=0, batch_size=4)
    s2.load_state_dict({"epoch": 0, "position": 8})  # a checkpoint at the end of epoch 0
    assert list(s2) == epoch1


class _RecordPrompts(L.LightningModule):
    """A stand-in module that records the prompts of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["prompts"])
        return self.layer(torch.ones(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_every_trainer_epoch_gets_a_fresh_permutation(task_data, tokenizer_dir, tmp_path,
                                                      make_trainer):
    rows = open(os.path.join(task_data, "rl_prompts.jsonl")).readlines()[:10]
    (tmp_path / "p.jsonl").write_text("".join(rows))
    dm = RolloutDataModule(str(tmp_path / "p.jsonl"), os.path.join(task_data, "eval_prompts.jsonl"),
                           tokenizer_dir, batch_size=4)
    module = _RecordPrompts()
    make_trainer(tmp_path, max_steps=6, max_epochs=3).fit(module, dm)
    assert sorted(module.seen) == [0, 1, 2], "no empty epochs"
    for prompts in module.seen.values():
        assert len(prompts) == 8 and len(set(prompts)) == 8
    assert module.seen[0] != module.seen[1] != module.seen[2]
    assert dm.state_dict() == {"sampler": {"epoch": 2, "position": 8}}
