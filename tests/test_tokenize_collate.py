"""Token layout shared by every stage: padding, alignment of log-probs and values, the length
policy, chat templates, and what the stage-1 DataModules build from the task files."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.data.collate import collate_prompt_response, join
from dvpo_lightning.data.errors import DataFormatError
from dvpo_lightning.data.pairwise import PairwiseDataModule, collate_pairs
from dvpo_lightning.data.rollout import RolloutDataModule
from dvpo_lightning.data.sft import SFTDataModule
from dvpo_lightning.data.tokenize import (
    UNK_SHARE_LIMIT,
    LengthReport,
    check_length_policy,
    check_unknown_share,
    encode_prompt,
    encode_response,
    fit_length,
)
from dvpo_lightning.data.value import ValueDataModule
from dvpo_lightning.models import ValueModel, load_causal_lm, load_tokenizer
from dvpo_lightning.ops.token_logps import token_logps
from dvpo_lightning.rollout.scoring import policy_logps, response_values
from dvpo_lightning.tasks.tokenizer import build_char_tokenizer

PAD = 0
PROMPTS = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
RESPONSES = [[14, 15], [22, 23, 24, 25], [36]]
P, T = 5, 4  # widest prompt, longest response

# A tiny chat template for the character tokenizer: BOS, each message then "|", then "=".
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")


# --- layout ---------------------------------------------------------------------------------


def test_collate_puts_last_prompt_token_at_p_minus_1():
    b = collate_prompt_response(PROMPTS, RESPONSES, PAD)
    assert b["prompt_ids"].shape == (3, P) and b["response_ids"].shape == (3, T)
    assert b["prompt_ids"][:, P - 1].tolist() == [13, 21, 35]
    assert b["prompt_ids"].tolist() == [[0, 0, 11, 12, 13], [0, 0, 0, 0, 21],
                                        [31, 32, 33, 34, 35]]
    assert b["prompt_mask"].sum(1).tolist() == [3, 1, 5]
    assert not b["prompt_mask"][0, :2].any() and b["prompt_mask"][0, 2:].all()
    assert b["response_ids"].tolist() == [[14, 15, 0, 0], [22, 23, 24, 25], [36, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[True, True, False, False], [True] * 4,
                                           [True, False, False, False]]
    ids, mask = join(*layout(b))
    assert ids.shape == (3, P + T) and mask.sum(1).tolist() == [5, 5, 6]


def layout(b: dict) -> tuple:
    return b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"]


def test_collate_pairs_puts_chosen_first():
    items = [([1], [2, 3], [1], [4]), ([5, 6], [7], [5, 6], [8, 9, 10])]
    b = collate_pairs(items, PAD)
    assert int(b["n_pairs"]) == 2
    assert b["response_ids"].tolist() == [[2, 3, 0], [7, 0, 0], [4, 0, 0], [8, 9, 10]]
    assert b["prompt_ids"][:, -1].tolist() == [1, 6, 1, 6]


def test_values_slice_is_u0_to_uT():
    """A 'model' whose output at each position is the token there: ``u_0`` must be the last
    prompt token and ``u_t`` the response token ``y_t`` (the state after reading it)."""
    b = collate_prompt_response(PROMPTS, RESPONSES, PAD)
    u = response_values(lambda ids, mask: ids.float(), *layout(b))
    assert u.shape == (3, T + 1)
    assert u[:, 0].tolist() == [13.0, 21.0, 35.0]
    for i, resp in enumerate(RESPONSES):
        assert u[i, 1:1 + len(resp)].tolist() == [float(t) for t in resp]


def test_response_token_logps_match_loop():
    g = torch.Generator().manual_seed(0)
    b = collate_prompt_response(PROMPTS, RESPONSES, PAD)
    V = 40
    logits = torch.randn(3, P + T, V, generator=g)
    got, _ = token_logps(logits, b["response_ids"], offset=P - 1)
    assert got.shape == (3, T) and got.dtype == torch.float32
    for i, resp in enumerate(RESPONSES):
        for t, y in enumerate(resp):  # y_{t+1} is predicted by the logits at column P-1+t
            want = torch.log_softmax(logits[i, P - 1 + t], -1)[y]
            assert_close(got[i, t], want)


def _unpadded_rows(tokenizer):
    prompts = [encode_prompt(tokenizer, p, False) for p in ("3172=", "90=", "5555123=")]
    responses = [encode_response(tokenizer, r) for r in ("1237", "0", "12")]
    return prompts, responses


def test_batched_policy_logps_match_unpadded_rows(tokenizer_dir):
    """Left padding + position ids from the mask give each row the log-probs it has alone."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = load_causal_lm("test-llama", tok).eval()
    prompts, responses = _unpadded_rows(tok)
    b = collate_prompt_response(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        batched, _ = policy_logps(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"],
                                  b["response_mask"])
        for i, (p, r) in enumerate(zip(prompts, responses)):
            row = torch.tensor([p + r])
            lp = model(input_ids=row).logits[0].log_softmax(-1)
            want = torch.stack([lp[len(p) - 1 + t, y] for t, y in enumerate(r)])
            assert_close(batched[i, :len(r)], want, atol=1e-5, rtol=1e-4)


def test_batched_values_match_unpadded_rows(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    vm = ValueModel.from_pretrained("test-llama", tok, zero_init_head=False).eval()
    prompts, responses = _unpadded_rows(tok)
    b = collate_prompt_response(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        u = response_values(vm, *layout(b))  # (B, T + 1)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            row = torch.tensor([p + r])
            alone = vm(row, torch.ones_like(row, dtype=torch.bool))[0]
            assert_close(u[i, :len(r) + 1], alone[len(p) - 1:], atol=1e-5, rtol=1e-4)


# --- length policy --------------------------------------------------------------------------


def test_fit_length_known_answers():
    rep = LengthReport("f.jsonl", 7, "truncate")
    assert fit_length([1, 2, 3], [4, 5], 7, "truncate", rep, 0) == ([1, 2, 3], [4, 5])
    assert fit_length([1, 2, 3, 4, 5], [6, 7, 8, 9], 7, "truncate", rep, 1) == (
        [1, 2, 3, 4, 5], [6, 7])
    # a prompt longer than the limit keeps its last tokens and one response token
    assert fit_length(list(range(10)), [20, 21], 7, "truncate", rep, 2) == (
        [4, 5, 6, 7, 8, 9], [20])
    assert (rep.total, rep.truncated, rep.dropped, rep.examples) == (3, 2, 0, [1, 2])
    assert "2 truncated and 0 dropped" in rep.summary()

    drop = LengthReport("f.jsonl", 7, "drop")
    assert fit_length([1, 2, 3, 4, 5], [6, 7, 8], 7, "drop", drop, 4) is None
    assert fit_length([1], [2], 7, "drop", drop, 5) == ([1], [2])
    assert (drop.total, drop.truncated, drop.dropped, drop.examples) == (2, 0, 1, [4])

    err = LengthReport("f.jsonl", 7, "error")
    with pytest.raises(ValueError) as e:
        fit_length([1, 2, 3, 4, 5], [6, 7, 8, 9], 7, "error", err, 3)
    assert str(e.value) == (
        "f.jsonl, row 3: prompt + response is 9 tokens, longer than max_length=7 "
        "(length_policy='error'). Fix: raise max_length, or set length_policy to 'truncate' "
        "or 'drop'")
    with pytest.raises(ValueError, match=r"length_policy='cut' is not one of \('truncate'"):
        check_length_policy("cut")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SFT_ROWS = [{"prompt": "3172=", "response": "1237"},       # 5 + 5 = 10 tokens
            {"prompt": "90=", "response": "09"},           # 3 + 3 = 6
            {"prompt": "554321=", "response": "123455"}]   # 7 + 7 = 14


@pytest.mark.parametrize("policy,kept,truncated,dropped", [
    ("truncate", 3, 2, 0), ("drop", 1, 0, 2)])
def test_sft_datamodule_length_policy_is_reported(tmp_path, tokenizer_dir, policy, kept,
                                                  truncated, dropped):
    path = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(train_path=path, val_path=path, tokenizer=tokenizer_dir, max_length=8,
                       length_policy=policy)
    dm.setup("fit")
    assert len(dm.train_set) == kept
    train_report = dm.length_reports[0]
    assert (train_report.total, train_report.truncated, train_report.dropped) == (
        3, truncated, dropped)
    assert train_report.examples == [0, 2]
    for p, r in dm.train_set.items:
        assert len(p) + len(r) <= 8
    if policy == "truncate":  # the cut response loses its EOS
        p, r = dm.train_set.items[0]
        assert r[-1] != dm.tokenizer.eos_token_id and len(p) == 5


def test_sft_datamodule_length_error_names_file_and_row(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    dm = SFTDataModule(train_path=path, val_path=path, tokenizer=tokenizer_dir, max_length=8,
                       length_policy="error")
    with pytest.raises(ValueError, match=rf"{path}, row 0: prompt \+ response is 10 tokens, "
                                         r"longer than max_length=8 \(length_policy='error'\)"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="length_policy='cut'"):
        SFTDataModule(train_path=path, tokenizer=tokenizer_dir, length_policy="cut")


# --- chat templates -------------------------------------------------------------------------


@pytest.fixture()
def chat_tokenizer_dir(tmp_path) -> str:
    tok = build_char_tokenizer("0123456789=|")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tmp_path / "chat_tok"))
    return str(tmp_path / "chat_tok")


def test_encode_prompt_applies_chat_template(chat_tokenizer_dir):
    tok = load_tokenizer(chat_tokenizer_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tok.bos_token_id]
    msgs = [{"role": "user", "content": "31"}]
    assert encode_prompt(tok, msgs) == bos + ids("31|=")
    assert encode_prompt(tok, "31") == bos + ids("31|=")  # a string is one user message
    assert encode_prompt(tok, "31", chat_template=False) == ids("31")
    two = [{"role": "system", "content": "9"}, {"role": "user", "content": "31"}]
    assert encode_prompt(tok, two) == bos + ids("9|31|=")


def test_sft_datamodule_uses_chat_template_on_messages(tmp_path, chat_tokenizer_dir):
    rows = [{"messages": [{"role": "user", "content": "3172"},
                          {"role": "assistant", "content": "1237"}]},
            {"messages": [{"role": "system", "content": "9"}, {"role": "user", "content": "21"},
                          {"role": "assistant", "content": "12"}]}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = SFTDataModule(train_path=path, val_path=path, tokenizer=chat_tokenizer_dir)
    dm.setup("fit")
    tok = dm.tokenizer
    decoded = [(tok.decode(p), tok.decode(r)) for p, r in dm.train_set.items]
    assert decoded == [("<bos>3172|=", "1237<eos>"), ("<bos>9|21|=", "12<eos>")]
    batch = dm.collate(dm.train_set.items)
    assert batch["prompt_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids("=")] * 2


def test_plain_tokenizer_renders_messages_without_template(tokenizer_dir):
    from dvpo_lightning.data import render_messages_plain

    tok = load_tokenizer(tokenizer_dir)
    assert not getattr(tok, "chat_template", None)
    msgs = [{"role": "user", "content": "31="}]
    assert encode_prompt(tok, msgs) == tok(render_messages_plain(msgs),
                                           add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "31=") == tok("31=", add_special_tokens=False)["input_ids"]


# --- what the DataModules build from the task files ------------------------------------------


def test_pairwise_and_value_datamodules_on_task_data(task_data, tokenizer_dir):
    pairs = os.path.join(task_data, "pairs.jsonl")
    evals = os.path.join(task_data, "eval_pairs.jsonl")
    pw = PairwiseDataModule(train_path=pairs, val_path=evals, tokenizer=tokenizer_dir,
                            batch_size=4, max_length=32)
    pw.setup("fit")
    b = next(iter(pw.val_dataloader()))
    assert int(b["n_pairs"]) == 4 and b["response_ids"].shape[0] == 8
    eos = pw.tokenizer.eos_token_id
    lengths = b["response_mask"].sum(1)
    assert (b["response_ids"].gather(1, (lengths - 1)[:, None]) == eos).all()

    vd = ValueDataModule(train_path=pairs, val_path=evals, tokenizer=tokenizer_dir,
                         train_kind="pairwise", chosen_return=1.0, rejected_return=-1.0,
                         batch_size=6, max_length=32)
    vd.setup("fit")
    assert len(vd.train_set) == 2 * len(pw.train_set)
    assert sorted({it[2] for it in vd.train_set.items}) == [-1.0, 1.0]
    tb = vd.collate_train(vd.train_set.items[:6])
    assert tb["returns"].tolist() == [1.0, -1.0] * 3 and tb["returns"].dtype == torch.float32


def test_tau_conditioning_prepends_a_same_policy_trajectory(task_data, tokenizer_dir):
    traj = [json.loads(x) for x in open(os.path.join(task_data, "trajectories.jsonl"))]
    vd = ValueDataModule(train_path=os.path.join(task_data, "trajectories.jsonl"),
                         val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                         tokenizer=tokenizer_dir, tau_conditioning=True, max_length=64)
    vd.setup("fit")
    tok = vd.tokenizer
    by_text = {r["prompt"] + r["response"]: r["policy"] for r in traj}
    for (prompt_ids, _, _), row in list(zip(vd.train_set.items, traj))[:50]:
        text = tok.decode(prompt_ids)  # "<tau prompt><tau response><eos><prompt>"
        tau, _, own = text.partition("<eos>")
        assert own == row["prompt"]
        assert tau in by_text and by_text[tau] == row["policy"]
        assert not tau.startswith(row["prompt"])  # another prompt than the row's own
    b = next(iter(vd.val_dataloader()))
    assert b["prompt_ids"].shape[1] > 10  # held-out pairs are conditioned too


def test_tau_conditioning_needs_policy(tmp_path, tokenizer_dir, task_data):
    path = _write_jsonl(tmp_path / "scored.jsonl",
                        [{"prompt": "21=", "response": "12", "score": 1.0}])
    vd = ValueDataModule(train_path=path, val_path=os.path.join(task_data, "eval_pairs.jsonl"),
                         tokenizer=tokenizer_dir, tau_conditioning=True)
    with pytest.raises(ValueError, match="row 0: field 'policy' is missing"):
        vd.setup("fit")


# --- files written for another tokenizer, files of another kind -----------------------------


def _tokenizer(unk=3, eos=2, pad=0, bos=1):
    from types import SimpleNamespace

    return SimpleNamespace(unk_token="<unk>", unk_token_id=unk, eos_token_id=eos,
                           pad_token_id=pad, bos_token_id=bos)


def test_unknown_share_limit_known_answers():
    assert UNK_SHARE_LIMIT == 0.5
    check_unknown_share(_tokenizer(), [[3, 3, 5], [5, 2]], "f.jsonl", "tok")  # 2 of 5
    check_unknown_share(_tokenizer(), [[3, 3], [5, 2]], "f.jsonl", "tok")  # 2 of 4: at the limit
    with pytest.raises(DataFormatError) as e:
        check_unknown_share(_tokenizer(), [[3, 3, 3], [5, 2]], "f.jsonl", "tok")  # 3 of 5
    assert str(e.value) == (
        "f.jsonl: 3 of its 5 tokens (60%) are the unknown token '<unk>' of the tokenizer tok "
        "(more than 50% is refused). Fix: this data was written for another tokenizer; point "
        "data.init_args.tokenizer at the model's tokenizer, or use data written for this one")
    check_unknown_share(_tokenizer(unk=None), [[7, 7]], "f.jsonl", "tok")  # no unk token
    check_unknown_share(_tokenizer(unk=2), [[2, 2]], "f.jsonl", "tok")  # unk is EOS (GPT-2)
    check_unknown_share(_tokenizer(), [], "f.jsonl", "tok")  # nothing to count


@pytest.mark.parametrize("which", ["rollout", "pairwise", "value"])
def test_every_datamodule_refuses_text_of_another_tokenizer(tmp_path, tokenizer_dir, task_data,
                                                            which):
    english = {"prompt": "Write a poem about the sea", "response": "The waves roll in.",
               "chosen": "The waves roll in.", "rejected": "The gulls cry.", "score": 1.0}
    path = _write_jsonl(tmp_path / "english.jsonl", [english] * 4)
    evals = os.path.join(task_data, "eval_pairs.jsonl")
    dm = {"rollout": lambda: RolloutDataModule(path, os.path.join(task_data, "eval_prompts.jsonl"),
                                               tokenizer_dir, batch_size=2),
          "pairwise": lambda: PairwiseDataModule(path, evals, tokenizer=tokenizer_dir),
          "value": lambda: ValueDataModule(path, evals, tokenizer=tokenizer_dir)}[which]()
    with pytest.raises(DataFormatError) as e:
        dm.check_files()
    assert re.match(rf"{re.escape(path)}: \d+ of its \d+ tokens \((9\d|100)%\) are the unknown "
                    rf"token '<unk>' of the tokenizer {re.escape(tokenizer_dir)} ", str(e.value))


def test_digits_with_a_few_letters_pass(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"{i}12{i}=", "response": "12"} for i in range(9)]
    rows.append({"prompt": "sort 12=", "response": "12"})
    path = _write_jsonl(tmp_path / "sft.jsonl", rows)
    dm = SFTDataModule(train_path=path, tokenizer=tokenizer_dir, val_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 10


def test_value_datamodule_names_its_own_options_for_other_kinds(tmp_path, tokenizer_dir,
                                                                task_data):
    scored = os.path.join(task_data, "trajectories.jsonl")
    pairs = os.path.join(task_data, "pairs.jsonl")
    vd = ValueDataModule(scored, pairs, tokenizer=tokenizer_dir, train_kind="pairwise")
    with pytest.raises(DataFormatError, match="looks like a scored file .* Fix: set "
                                              "data.init_args.train_kind=scored to train on "
                                              "the scores"):
        vd.check_files()
    vd = ValueDataModule(scored, scored, tokenizer=tokenizer_dir, train_kind="scored")
    with pytest.raises(DataFormatError, match="looks like a scored file .* Fix: "
                                              "data.init_args.val_path takes held-out pairs"):
        vd.check_files()
    rd = RolloutDataModule(_write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i",
                                                                "output": "o"}]),
                           os.path.join(task_data, "eval_prompts.jsonl"), tokenizer_dir)
    with pytest.raises(DataFormatError, match="looks like an SFT file .* Fix: demonstrations "
                                              "belong to SFTDataModule"):
        rd.check_files()


def test_setup_reuses_the_checked_files(task_data, tokenizer_dir, monkeypatch):
    import dvpo_lightning.data.base as base

    reads = []
    for reader in ("load_examples", "load_prompts"):  # (prompts: a prompt or preference file)
        real = getattr(base, reader)
        monkeypatch.setattr(base, reader, lambda path, *a, _real=real, **k:
                            reads.append(path) or _real(path, *a, **k))
    prompts = os.path.join(task_data, "rl_prompts.jsonl")
    evals = os.path.join(task_data, "eval_prompts.jsonl")
    rd = RolloutDataModule(prompts, evals, tokenizer_dir, batch_size=4)
    rd.check_files()
    assert reads == [prompts, evals] and rd.sampler is None  # (the sampler needs the trainer)
    rd.setup("fit")
    assert reads == [prompts, evals] and rd.sampler is not None
    assert next(iter(rd.train_dataloader()))["prompt_ids"].shape[0] == 4
