"""Bad input fails early with a message that states the rule, the offending value and the fix.

One test per case of the reliability issue. Cases tested elsewhere are not repeated here:
missing file, unsupported suffix, malformed JSON, empty file, missing fields, wrong types and an
empty response (``test_data_formats.py``); the length policy's counts and ``length_policy=
'error'`` (``test_tokenize_collate.py``); a group-size mismatch and a mini-batch that does not
divide the rollout batch at fit start (``test_rl_training.py``).
"""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import normalizers
from transformers import LlamaConfig

from dvpo_lightning.commands.parser import add_key_suggestions, suggest_key
from dvpo_lightning.data import DataFormatError, load_examples
from dvpo_lightning.data.rollout import EpochShuffleSampler, RolloutDataModule
from dvpo_lightning.data.sft import SFTDataModule
from dvpo_lightning.data.tokenize import LengthReport, fit_length
from dvpo_lightning.models.compat import check_compatible, check_fits_context
from dvpo_lightning.rollout.experience_maker import check_rollout_batch
from dvpo_lightning.runtime.hardware import check_strategy, check_trainer_config
from dvpo_lightning.tasks.tokenizer import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def message(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    return str(info.value)


def assert_parts(msg: str, *parts: str) -> None:
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# --- files and rows ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_unreadable_file(tmp_path, monkeypatch, suffix):
    path = write_jsonl(tmp_path / f"rows{suffix}", [{"prompt": "a"}])
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)  # what Path.read_text calls
    msg = message(DataFormatError, load_examples, path, "prompt")
    assert msg == (f"{path}: cannot be read (PermissionError: Permission denied). Fix: check "
                   "that you may read it (permissions, ownership) and that its drive is mounted")


def test_wrong_format_names_what_it_expects(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}])
    msg = message(DataFormatError, load_examples, path, "sft", format="alpaca")
    assert msg == (f"{path}, row 0 (line 1): field 'instruction' is missing (this row has: "
                   "prompt, response; format 'alpaca' expects: instruction, input (optional), "
                   "output). Fix: add 'instruction' to every row, or pass the right format= if "
                   "the file is in another format")


@pytest.mark.parametrize("kind,row,field", [
    ("sft", {"prompt": "", "response": "r"}, "prompt"),
    ("sft", {"prompt": "p", "completion": " \n"}, "completion"),
    ("sft", {"instruction": "\t", "output": "o"}, "instruction"),
    ("prompt", {"prompt": [{"role": "user", "content": " "}]}, "prompt[0].content"),
    ("pairwise", {"prompt": "p", "chosen": "", "rejected": "r"}, "chosen"),
    ("scored", {"instruction": "q", "completions": [{"response": "", "overall_score": 1}]},
     "completions[0].response"),
])
def test_empty_prompt_or_response(tmp_path, kind, row, field):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    msg = message(DataFormatError, load_examples, path, kind)
    assert msg == (f"{path}, row 0 (line 1): field '{field}' is empty or whitespace only. "
                   "Fix: fill it in or remove the row")


def test_text_that_is_not_unicode(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "bad \\ud800 text"}\n')
    msg = message(DataFormatError, load_examples, path, "prompt")
    assert msg == (f"{path}, row 1 (line 2): field 'prompt' holds an unpaired surrogate "
                   "('\\ud800' at character 4), which is not Unicode text. Fix: fix the text's "
                   "\\uXXXX escapes, or remove the row")


def test_prompt_that_encodes_to_no_tokens(tmp_path):
    report = LengthReport("f.jsonl", 8, "truncate")
    msg = message(DataFormatError, fit_length, [], [5, 2], 8, "truncate", report, 3)
    assert msg == ("f.jsonl, row 3: field 'prompt' encodes to no tokens with this tokenizer. "
                   "Fix: remove the row, or give it a prompt with visible text")
    # a tokenizer that normalises the text away, through the RL prompt DataModule
    tok = build_char_tokenizer("0123456789=")
    tok.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    tok.save_pretrained(str(tmp_path / "tok"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "12="}, {"prompt": "\u200b"}])
    dm = RolloutDataModule(train_path=str(prompts), eval_path=str(prompts),
                           tokenizer=str(tmp_path / "tok"), batch_size=1, chat_template=False)
    msg = message(DataFormatError, dm.setup, "fit")
    assert msg.startswith(f"{prompts}, row 1: field 'prompt' encodes to no tokens")


# --- the model's context -------------------------------------------------------------------


def test_sequence_longer_than_the_context():
    config = LlamaConfig(max_position_embeddings=64)
    msg = message(ValueError, check_fits_context, 100, config, "data.init_args.max_length")
    assert msg == ("data.init_args.max_length (100 tokens) is longer than the model's context "
                   "(max_position_embeddings=64 in LlamaConfig). Fix: set "
                   "data.init_args.max_length to at "
                   "most 64, or use a model with a longer context")
    check_fits_context(64, config)
    msg = message(ValueError, check_fits_context, 600, "test-llama",
                  "data.init_args.max_prompt_length + model.max_new_tokens")
    assert_parts(msg, "(600 tokens)", "max_position_embeddings=512 in test-llama",
                 "Fix: set data.init_args.max_prompt_length + model.max_new_tokens to at most 512")


def test_model_directory_context_and_missing_directory(artifacts, tmp_path):
    msg = message(ValueError, check_fits_context, 4096, artifacts.policy)
    assert_parts(msg, "data.init_args.max_length (4096 tokens)",
                 f"max_position_embeddings=512 in {artifacts.policy}", "at most 512")
    msg = message(FileNotFoundError, check_fits_context, 8, str(tmp_path / "nope"))
    assert_parts(msg, "nope' does not exist", "Fix: check the path")


def test_sft_fit_refuses_data_longer_than_the_context(task_data, tokenizer_dir, tmp_path,
                                                     make_trainer):
    from dvpo_lightning.modules import SFTModule

    module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir)
    data = SFTDataModule(train_path=str(Path(task_data) / "sft.jsonl"), tokenizer=tokenizer_dir,
                         batch_size=4, max_length=1024)
    trainer = make_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"data.init_args.max_length \(1024 tokens\) is longer "
                                          "than the "
                                         r"model's context \(max_position_embeddings=512"):
        trainer.fit(module, data)
    assert trainer.global_step == 0


# --- a GVM / RM / reference that does not match the policy ----------------------------------


def _model_dir(path: Path, vocab_size: int, tokenizer=None) -> str:
    LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=1, intermediate_size=8).save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return str(path)


def test_matching_artifacts_pass(artifacts):
    check_compatible(artifacts.policy, artifacts.gvm, "gvm")
    check_compatible(artifacts.policy, artifacts.reward_model, "reward_model")
    check_compatible(artifacts.policy, "test-llama", "critic")  # built from the tokenizer


def test_other_tokenizer(artifacts, tokenizer_dir, tmp_path):
    other = _model_dir(tmp_path / "rm", 64, build_char_tokenizer("abcdefghij"))
    msg = message(ValueError, check_compatible, artifacts.policy, other, "reward_model")
    assert_parts(msg, f"the reward model in {other} was trained with another tokenizer: 14 "
                 "tokens (vocab sha256 ", "against 15 (vocab sha256 ", "in the run's tokenizer "
                 f"{artifacts.policy}", "token '0': id 4 in the "
                 "run's, absent here", "Fix: point model.init_args.reward_model at a reward model "
                 "trained from the policy's backbone and tokenizer")


def test_embedding_table_smaller_than_the_vocabulary(tokenizer_dir, tmp_path):
    from dvpo_lightning.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    other = _model_dir(tmp_path / "gvm", 5)
    msg = message(ValueError, check_compatible, tok, other, "gvm")
    assert_parts(msg, f"the GVM in {other} has an embedding table of vocab_size=5, smaller than "
                 f"the run's tokenizer ({len(tok)} tokens", "token ids >= 5 would index past "
                 "it", "Fix: point model.init_args.value_model at a GVM trained from the policy's")


def test_other_eos_token(tokenizer_dir, tmp_path):
    from dvpo_lightning.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    same_vocab = load_tokenizer(tokenizer_dir)
    same_vocab.eos_token = "<unk>"
    other = _model_dir(tmp_path / "ref", len(tok), same_vocab)
    msg = message(ValueError, check_compatible, tok, other, "reference")
    assert_parts(msg, f"the reference policy in {other} ends sequences with EOS id "
                 f"{same_vocab.eos_token_id}, the run's tokenizer with {tok.eos_token_id}",
                 "Fix: point model.init_args.reference at the SFT policy the run starts from")
    assert_parts(message(ValueError, check_compatible, tok, other, "judge"),
                 "role='judge' is not one of", "'gvm'")


def test_data_tokenizer_is_not_the_policys(artifacts, tmp_path):
    other = build_char_tokenizer("0123456789+")  # the same size, "+" where "=" was
    msg = message(ValueError, check_compatible, other, artifacts.policy, "policy")
    assert_parts(msg, f"the policy in {artifacts.policy} was trained with another tokenizer",
                 "in the run's tokenizer (in memory)", "token '+': id 14 in the run's, absent "
                 "here",
                 "Fix: set data.init_args.tokenizer to the policy's directory")


# --- batch size and group size -------------------------------------------------------------


def test_rollout_batch_rules():
    assert message(ValueError, check_rollout_batch, 3, 2, 4) == (
        "the rollout batch (6 responses = data.init_args.batch_size 3 × the estimator's group_size "
        "2) "
        "must be a multiple of model.init_args.ppo.mini_batch_size (4). Fix: set "
        "model.init_args.ppo.mini_batch_size to one of [1, 2, 3, 6], or change "
        "data.init_args.batch_size")
    assert_parts(message(ValueError, check_rollout_batch, 0, 1),
                 "data.init_args.batch_size must be >= 1, got 0")
    check_rollout_batch(4, 4, 8)
    check_rollout_batch(4, 4, None)


def test_fewer_prompts_than_one_batch():
    msg = message(ValueError, EpochShuffleSampler, 5, 0, batch_size=4, world_size=2)
    assert msg == ("one RL step takes data.init_args.batch_size × processes = 4 × 2 = 8 prompts, "
                   "but the "
                   "prompt file has only 5. Fix: lower data.init_args.batch_size to at most 2, or "
                   "add "
                   "prompts")


# --- strategy and precision vs hardware ----------------------------------------------------


@pytest.mark.parametrize("strategy,precision,accelerator,cuda,bf16,parts", [
    ("deepspeed_stage_2", "bf16-mixed", "cpu", False, False,
     ["DeepSpeed (ZeRO stage 2) needs a CUDA GPU, but the run is on CPU",
      "Fix: set trainer.strategy=auto (or ddp) on CPU"]),
    ("deepspeed_stage_3_offload", "32-true", "auto", False, False,
     ["DeepSpeed (ZeRO stage 3) needs a CUDA GPU", "CUDA available: False"]),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
      "init_args": {"stage": 4}}, "16-mixed", "gpu", True, True,
     ["DeepSpeed ZeRO stage 4 does not exist; the stages are 0, 1, 2, 3",
      "Fix: use strategy deepspeed_stage_1"]),
    ("auto", "bf16-mixed", "gpu", True, False,
     ["trainer.precision='bf16-mixed' needs a GPU with bfloat16 support",
      "Fix: set trainer.precision=16-mixed"]),
    ("ddp", 16, "cpu", False, False,
     ["trainer.precision=16 (float16) does not run on CPU",
      "Fix: set trainer.precision=bf16-mixed or 32-true on CPU"]),
    ("auto", "32-true", "gpu", False, False,
     ["trainer.accelerator='gpu' needs a CUDA GPU, and none is visible",
      "Fix: set trainer.accelerator=cpu"]),
    ({"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy", "init_args": {"stage": 3}},
     "16-mixed", "cpu", False, False,
     ["the CPU DeepSpeed test strategy runs precision 32-true or bf16-mixed",
      "Fix: set trainer.precision=32-true"]),
])
def test_strategy_precision_hardware(strategy, precision, accelerator, cuda, bf16, parts):
    assert_parts(message(ValueError, check_strategy, strategy, precision, accelerator, cuda,
                         bf16), *parts)


def test_strategies_the_hardware_runs():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    check_strategy("deepspeed_stage_2", "bf16-mixed", "gpu", True, True)
    check_strategy("deepspeed", "16-mixed", "auto", True, False)
    check_strategy("auto", "32-true", "cpu", False, False)
    check_strategy("ddp", "bf16-mixed", "cpu", False, False)
    check_strategy({"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy"}, "32-true", "cpu",
                   False, False)
    check_strategy(DeepSpeedStrategy(stage=3), "bf16-mixed", "gpu", True, True)
    msg = message(ValueError, check_strategy, DeepSpeedStrategy(stage=3), "bf16-mixed", "cpu",
                  False, False)
    assert_parts(msg, "DeepSpeed (ZeRO stage 3) needs a CUDA GPU")


def test_trainer_config_on_this_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    trainer = {"strategy": "deepspeed_stage_2", "precision": "bf16-mixed", "accelerator": "auto"}
    assert_parts(message(ValueError, check_trainer_config, trainer), "needs a CUDA GPU")
    check_trainer_config({"strategy": "auto", "precision": "32-true", "accelerator": "cpu"})


# --- unknown config keys -------------------------------------------------------------------


def test_suggest_key():
    valid = ["kl_coef", "kl_estimator", "lr", "critic_lr"]
    assert suggest_key("kl_cof", valid) == "kl_coef"
    assert suggest_key("KL-COEF", valid) == "kl_coef"
    assert suggest_key("lrr", valid) == "lr"
    assert suggest_key("zzz", valid) is None
    dotted = ["trainer.max_steps", "trainer.max_epochs", "data.init_args.max_length"]
    assert suggest_key("trainer.max_stepz", dotted) == "trainer.max_steps"
    # a key that lives in a settings group is found there, misspelt or not
    grouped = ["backbone", "optim", "optim.lr", "optim.warmup_steps", "models", "models.lora"]
    assert suggest_key("lr", grouped) == "optim.lr"
    assert suggest_key("lrr", grouped) == "optim.lr"
    assert suggest_key("warmup", grouped) == "optim.warmup_steps"
    assert suggest_key("lora.r", grouped) == "models.lora.r"


# jsonargparse 4's three shapes of the message, as printed
CLASS_OPTION = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'dvpo_lightning.modules.DVPOModule':
        Parser key "estimator":
          Problem with given class_path 'dvpo_lightning.estimators.GVM':
            Option 'versio' is not accepted
    - Problem with given class_path 'dvpo_lightning.modules.SFTModule':
        Option 'kl_cof' is not accepted"""


def test_add_key_suggestions_to_jsonargparse_messages():
    out = add_key_suggestions(CLASS_OPTION)
    assert out.startswith(CLASS_OPTION)
    assert_parts(out, "unknown key 'versio' for GVM: did you mean 'version'?",
                 "unknown key 'kl_cof' for SFTModule; the valid keys are: backbone, tokenizer, "
                 "optim, optim.lr, ")
    parser = SimpleNamespace(_actions=[SimpleNamespace(option_strings=["-h", "--help"]),
                                       SimpleNamespace(option_strings=["--trainer.max_steps"]),
                                       SimpleNamespace(option_strings=["--data.max_length"])])
    for msg in ("unrecognized arguments: --trainer.max_stepz 3",
                "Subcommand 'fit' does not accept option 'trainer.max_stepz'",
                "Group 'trainer' does not accept option 'max_stepz'"):
        assert add_key_suggestions(msg, parser) == (
            f"{msg}\nunknown key 'trainer.max_stepz' in the config: did you mean "
            "'trainer.max_steps'?")
    assert add_key_suggestions(out) == out  # hints are added once


@pytest.mark.parametrize("bad,hint", [
    ("--model.init_args.lrr=0.1", "unknown key 'lrr' for SFTModule: did you mean 'optim.lr'?"),
    ("--model.init_args.lora.r=4",
     "unknown key 'lora.r' in the config: did you mean 'models.lora.r'?"),
    ("--data.init_args.batch_sise=4",
     "unknown key 'batch_sise' for SFTDataModule: did you mean 'batch_size'?"),
    ("--trainer.max_stepz=3",
     "unknown key 'trainer.max_stepz' in the config: did you mean 'trainer.max_steps'?"),
])
def test_cli_suggests_the_closest_key(bad, hint, capsys):
    from dvpo_lightning.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs" / "sft.yaml"), bad])
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


def test_cli_checks_the_hardware_before_loading_models(capsys):
    """``DVPOCLI.before_instantiate_classes`` refuses before any model is loaded: the
    backbone ``nope`` does not exist and is never reached."""
    import torch

    from dvpo_lightning.commands.fit import cli_main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")

    args = ["--config", str(REPO / "configs" / "sft.yaml"), "--model.init_args.backbone=nope",
            "--trainer.strategy=deepspeed_stage_2", "--trainer.precision=bf16-mixed"]
    with pytest.raises(ValueError, match=r"DeepSpeed \(ZeRO stage 2\) needs a CUDA GPU"):
        cli_main(args, run=False)
