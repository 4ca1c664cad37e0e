"""What ends a response: one set of ids (the tokenizer's EOS, then the generation config's),
used by ``generate``, the response mask, the EOS rate and the gold scorer's "finished"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from dvpo_lightning.models import load_causal_lm, load_tokenizer
from dvpo_lightning.models.lora import LoraOptions, apply_lora
from dvpo_lightning.rollout.end_tokens import end_token_ids, finished
from dvpo_lightning.rollout.generation import HFGenerator, SamplingConfig, mask_after_eos


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_end_token_ids_known_answers(tok):
    t = SimpleNamespace(eos_token_id=2)
    assert end_token_ids(t) == (2,)
    assert end_token_ids(t, GenerationConfig(eos_token_id=2)) == (2,)
    assert end_token_ids(t, GenerationConfig(eos_token_id=[7, 2, 9, 7])) == (2, 7, 9)
    assert end_token_ids(SimpleNamespace(eos_token_id=None), GenerationConfig(
        eos_token_id=[5])) == (5,)
    with pytest.raises(ValueError, match=r"no token ends a response.*eos_token_id"):
        end_token_ids(SimpleNamespace(eos_token_id=None), GenerationConfig())
    # a model: its generation config (through a peft wrapper too)
    model = load_causal_lm("test-llama", tok)
    assert end_token_ids(tok, model) == (tok.eos_token_id,)  # the study's: one id, as before
    model.generation_config.eos_token_id = [tok.eos_token_id, 11]
    assert end_token_ids(tok, model) == (tok.eos_token_id, 11)
    assert end_token_ids(tok, apply_lora(model, LoraOptions(r=2, alpha=4))) == (
        tok.eos_token_id, 11)


def test_mask_and_finished_accept_a_set_of_end_ids():
    ids = torch.tensor([[5, 7, 6, 2], [5, 2, 7, 6], [5, 6, 6, 6], [9, 9, 9, 9]])
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    assert torch.equal(mask_after_eos(ids, (2, 7, 9)), want)
    assert torch.equal(mask_after_eos(ids, 2), mask_after_eos(ids, (2,)))
    assert finished(ids, want, (2, 7, 9)).tolist() == [True, True, False, True]
    assert finished(ids, mask_after_eos(ids, 2), 2).tolist() == [True, True, False, False]


def test_generate_stops_on_every_end_id_it_is_given_and_only_on_those(tok):
    """``HFGenerator`` passes its set to ``generate`` (which otherwise reads the model's own
    generation config): a model listing a second end token ends there only when the set has
    it."""
    torch.manual_seed(0)
    model = load_causal_lm("test-llama-32", tok).eval()
    ids = torch.tensor([tok("3172=", add_special_tokens=False)["input_ids"]] * 2)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cfg = SamplingConfig(10, greedy=True)
    free = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, ids, mask, cfg)
    x = int(free.response_ids[0, 2])  # a token the model emits, made an end token
    assert x != tok.eos_token_id and free.response_mask[0, :4].all()
    model.generation_config.eos_token_id = [tok.eos_token_id, x]
    only_eos = HFGenerator(tok.eos_token_id, tok.pad_token_id).generate(model, ids, mask, cfg)
    assert torch.equal(only_eos.response_ids, free.response_ids)  # the config's x: not ours
    both = HFGenerator(end_token_ids(tok, model), tok.pad_token_id).generate(model, ids, mask,
                                                                             cfg)
    first = int((free.response_ids[0] == x).nonzero()[0])
    assert both.response_mask[0].sum() == first + 1 and both.response_ids[0, first] == x
    assert finished(both.response_ids, both.response_mask, (tok.eos_token_id, x)).all()
