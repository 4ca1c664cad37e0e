"""W&B logging that never blocks: online with credentials and a reachable server, else offline.

``AutoWandbLogger`` is the CLI's default logger (``cli.py``), so every ``fit`` logs its metrics
and its resolved config (``LogConfigCallback``) without any set-up. An offline run is an
ordinary W&B run directory; ``wandb sync <dir>`` uploads it later (the logger prints the
command at the end of training).
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

DEFAULT_BASE_URL = "https://api.wandb.ai"


def _has_credentials(host: str) -> bool:
    """An API key in the environment or a netrc entry for ``host`` (what ``wandb login``
    writes); read without prompting."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC") or os.path.join(Path.home(), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def auto_mode() -> tuple[str, str]:
    """``(mode, why)``: ``WANDB_MODE`` if set; else ``online`` with credentials and a reachable
    server (``WANDB_BASE_URL``, default api.wandb.ai), else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    if not _has_credentials(urlparse(base_url).hostname or ""):
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    if not _reachable(base_url):
        return "offline", f"{base_url} is not reachable"
    return "online", "API key found and server reachable"


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that picks online or offline by itself and never prompts for a login.

    Offline when ``WANDB_MODE=offline``, when there is no API key (``WANDB_API_KEY`` or a
    netrc entry from ``wandb login``) or when the server cannot be reached. The run
    directory goes under ``trainer.default_root_dir`` unless ``save_dir`` is given (the CLI
    sets it), so ``trainer.log_dir`` and the stage's own outputs stay where they were.
    ``WANDB_RUN_GROUP`` / ``WANDB_TAGS`` / ``WANDB_PROJECT`` from the environment apply when
    the arguments are unset (as in a W&B sweep agent).
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        entity: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs,
    ) -> None:
        """
        Args:
            project: W&B project (default: ``WANDB_PROJECT`` or ``dvpo_lightning``).
            name: run name (default: W&B's generated one).
            group: run group, e.g. one sweep (default: ``WANDB_RUN_GROUP``).
            tags: run tags.
            notes: a longer description of the run.
            job_type: kind of run, e.g. ``sft``, ``gvm``, ``rl``.
            entity: W&B user or team (default: the API key's).
            save_dir: parent of the ``wandb/`` run directory (None: ``trainer.default_root_dir``).
            offline: force offline (True) or online (False); None: decide (see class docstring).
            log_model: upload checkpoints as W&B artifacts (online only).
        """
        if offline is None:
            mode, self.mode_reason = auto_mode()
        else:
            mode, self.mode_reason = ("offline" if offline else "online"), "offline argument"
        self.mode = mode
        if mode != "online" and log_model:
            log_model = False  # checkpoints cannot be uploaded offline; say so, never fail
            rank_zero_info("W&B: log_model needs an online run; checkpoints are not uploaded")
        init = {k: v for k, v in dict(group=group, tags=tags, notes=notes, job_type=job_type,
                                          entity=entity).items() if v is not None}
        # mode goes to wandb.init (WandbLogger's offline=True would rewrite os.environ)
        super().__init__(name=name, save_dir=save_dir,
                         project=project or os.environ.get("WANDB_PROJECT", "dvpo_lightning"),
                         log_model=log_model, mode=mode, **init, **kwargs)

    def use_save_dir(self, save_dir: str) -> None:
        """Set the run's parent directory if none was given (before the run starts)."""
        if self._save_dir is None and self._experiment is None:
            # absolute: W&B's service process, started by an earlier run of this process
            # (pipeline stages in one process, tests), resolves a relative path against its
            # own working directory and writes the run's log there
            self._save_dir = self._wandb_init["dir"] = os.path.abspath(save_dir)

    @property
    def experiment(self):
        if self._experiment is None and self._save_dir:
            os.makedirs(self._save_dir, exist_ok=True)  # else wandb falls back to a temp dir
        return WandbLogger.experiment.fget(self)

    @property
    def run_dir(self) -> str | None:
        """The W&B run directory (``…/wandb/offline-run-<time>-<id>``), once the run exists."""
        run = self._experiment
        return None if run is None or not getattr(run, "dir", None) else str(Path(run.dir).parent)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self.mode == "offline" and self.run_dir:
            rank_zero_info(f"W&B: offline run ({self.mode_reason}) in {self.run_dir}\n"
                           f"W&B: upload it with `wandb sync {self.run_dir}`")


class LogConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` to ``trainer.log_dir`` (Lightning's behaviour) and puts the full
    resolved config into every W&B run's config, nested as in the YAML
    (``model.init_args.optim.lr``)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the --config file paths, not settings
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


def log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list]) -> None:
    """Log a table to every W&B logger of ``trainer`` (no-op for other loggers)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows)


def has_wandb(trainer: Trainer) -> bool:
    """Whether any of the trainer's loggers is a W&B logger."""
    return any(isinstance(lg, WandbLogger) for lg in trainer.loggers)


def log_files(trainer: Trainer, files: dict[str, str | Path]) -> None:
    """Log pictures to every W&B logger: ``.png`` as images, ``.html`` as HTML panels."""
    import wandb

    payload = {}
    for key, path in files.items():
        path = Path(path)
        if path.suffix == ".png":
            payload[key] = wandb.Image(str(path))
        elif path.suffix == ".html":
            payload[key] = wandb.Html(path.read_text())
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and payload:
            logger.experiment.log(payload)


def quiet_libraries() -> None:
    """Silence what every command would otherwise print: tokenizers' fork warning,
    Lightning's note on frozen modules in eval mode and its advice to all-reduce the held-out
    metrics (already merged over the processes), transformers' progress bars."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Frozen parts (reference, GVM, RM) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Held-out metrics are merged over every process's rows before they are logged (the same
    # value on every rank): Lightning's advice to all-reduce them, printed whenever
    # torch.distributed is up (a vLLM engine starts it even in one process), does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('eval/")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
