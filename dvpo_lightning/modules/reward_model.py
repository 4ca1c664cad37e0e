"""The scalar reward model (the paper's ScalarRM): Bradley–Terry loss on the last token's score
for preference pairs, or a regression on annotated scores (the information 2 × 2)."""

from __future__ import annotations

from torch import Tensor

from dvpo_lightning.modules.value_base import ValueHeadModule
from dvpo_lightning.ops.losses import bradley_terry_loss, score_regression_loss
from dvpo_lightning.rollout.scoring import final_scores
from dvpo_lightning.runtime.log_steps import logs_this_step


class RewardModelModule(ValueHeadModule):
    """Scalar reward model trained on preference pairs.

    Loss: ``−log σ(r(x, y_c) − r(x, y_r))`` with ``r`` the head output at the last response
    token. Validation: held-out pair accuracy with every aggregation (``final`` is the RM's own).

    Args:
        margin: optional margin in the Bradley–Terry loss.
        **kwargs: the backbone, tokenizer, optimizer, model options, head initialisation and
            export directory of :class:`~dvpo_lightning.modules.value_base.ValueHeadModule`.
    """

    kind = "reward"
    table_title = "ScalarRM"

    def __init__(self, margin: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = margin

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        n = int(batch["n_pairs"])
        scores = final_scores(self.response_values(batch), batch["response_mask"])
        loss = bradley_terry_loss(scores[:n], scores[n:], self.margin)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if logs_this_step(self.trainer):
            self.log("train/reward_acc", (scores[:n] > scores[n:]).float().mean(), batch_size=n)
            self.log("train/reward_margin", (scores[:n] - scores[n:]).mean(), batch_size=n)
        return loss


class ScoreRewardModelModule(ValueHeadModule):
    """Scalar reward model regressed on annotated scores: the reward-model side of the study's
    information 2 × 2 ({value model, reward model} × {scores, pairs}; docs/study.md).

    Loss: ``mean ½·(r(x, y) − s)²`` with ``r`` the head output at the last response token and
    ``s`` the row's score — the GVM's data (``ValueDataModule``, ``train_kind: scored``) with
    the reward model's shape: one number per finished response, no per-token values. It
    exports a reward model like :class:`RewardModelModule` (``kind: reward``), so every RL
    method that reads ``model.init_args.reward_model`` can use it unchanged. Its arguments are
    :class:`~dvpo_lightning.modules.value_base.ValueHeadModule`'s.
    """

    kind = "reward"
    table_title = "ScalarRM"

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "returns" not in batch:
            raise ValueError(
                "ScoreRewardModelModule trains on scored rows (a batch with 'returns'), got a "
                "batch without them. Fix: use data.class_path "
                "dvpo_lightning.data.value.ValueDataModule with data.init_args.train_kind: "
                "scored, or RewardModelModule for preference pairs")
        scores = final_scores(self.response_values(batch), batch["response_mask"])
        loss = score_regression_loss(scores, batch["returns"])
        b = scores.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if logs_this_step(self.trainer):
            self.log("train/score_mean", scores.detach().mean(), batch_size=b)
        return loss
