"""The DPO / IPO losses (``ops/dpo.py``): hand-computed cases, and TRL's own loss code on the
same random log-probs.

TRL 1.16's loss lives inside ``DPOTrainer._compute_loss`` (no standalone ``dpo_loss`` since
TRL 1.0); it runs here as an unbound method on a stub trainer whose stub model returns the
per-token log-probs we choose, with ``precompute_ref_logps`` so the reference's come from the
inputs. TRL 1.16's ``sigmoid`` has no label smoothing (TRL < 1.0's ``DPOTrainer.dpo_loss`` had
``−(1 − ε)·log σ(βh) − ε·log σ(−βh)``); conservative DPO is checked as ``(1 − ε)·`` TRL's loss
on the pairs ``+ ε·`` TRL's loss on the swapped pairs, which is that formula averaged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.ops.dpo import DPO_LOSSES, dpo_loss

# Two pairs, β = 0.5: log-ratios chosen [1, 0], rejected [−1, 1], so h = [2, −1], βh = [1, −0.5].
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
BETA = 0.5


def test_sigmoid_by_hand():
    loss, m = dpo_loss(PC, PR, RC, RR, BETA)
    # −log σ(1) = log(1 + e⁻¹) = 0.3132617; −log σ(−0.5) = log(1 + e^0.5) = 0.9740770
    assert float(loss) == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewards/chosen": 0.25,  # β·[1, 0]
        "rewards/rejected": 0.0,  # β·[−1, 1]
        "rewards/margins": 0.25,  # [1, −0.5]
        "rewards/accuracies": 0.5,
        "logps/chosen": -1.5,
        "logps/rejected": -2.0}


def test_label_smoothed_sigmoid_by_hand():
    loss, _ = dpo_loss(PC, PR, RC, RR, BETA, label_smoothing=0.25)
    # 0.75·0.3132617 + 0.25·(−log σ(−1) = 1.3132617) = 0.5632617
    # 0.75·0.9740770 + 0.25·(−log σ(0.5) = 0.4740770) = 0.8490770
    assert float(loss) == pytest.approx((0.5632617 + 0.8490770) / 2, abs=1e-6)


def test_ipo_by_hand():
    # 1 / (2β) = 1. The paper's form: (2 − 1)², (−1 − 1)²
    loss, _ = dpo_loss(PC, PR, RC, RR, BETA, "ipo")
    assert float(loss) == pytest.approx((1.0 + 4.0) / 2)
    # per-token log-ratios (TRL): chosen lengths [2, 1], rejected [1, 4]
    # h̄ = [1/2 + 1/1, 0/1 − 1/4] = [1.5, −0.25] → (0.5)², (−1.25)²
    loss, _ = dpo_loss(PC, PR, RC, RR, BETA, "ipo", chosen_lengths=torch.tensor([2, 1]),
                       rejected_lengths=torch.tensor([1, 4]))
    assert float(loss) == pytest.approx((0.25 + 1.5625) / 2)


def test_equal_policy_and_reference_give_log_2_and_zero_rewards():
    x = torch.randn(5)
    loss, m = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    assert float(m["rewards/margins"]) == 0 and float(m["rewards/accuracies"]) == 0


def test_gradient_reaches_the_policy_only():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(4, generator=g).requires_grad_() for _ in range(4))
    for loss_type in DPO_LOSSES:
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, rc, rr, 0.1, loss_type)[0].backward()
        assert rc.grad is None and rr.grad is None  # the reference is detached
        # the chosen log-prob goes up, the rejected one down (IPO: while h̄ < 1/(2β) = 5)
        assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "hinge"}, r"unknown loss_type 'hinge'; valid: \('sigmoid', 'ipo'\)"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid loss only"),
    ({"chosen_lengths": torch.ones(2)}, "both chosen_lengths and rejected_lengths"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(PC, PR, RC, RR, **{"beta": 0.1, **kwargs})


# --- TRL ------------------------------------------------------------------------------------


def trl_loss(loss_type: str, beta: float, pc, pr, rc, rr, len_c, len_r):
    """TRL's ``DPOTrainer._compute_loss`` on summed log-probs ``(N,)`` and response lengths
    ``(N,)``: returns its loss and the metrics it logged."""
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer  # noqa: N806
    n, width = pc.shape[0], int(torch.cat([len_c, len_r]).max()) + 2
    lengths = torch.cat([len_c, len_r])  # (2N,): the batch is [chosen, rejected]
    completion = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()  # (2N, L)
    # each response's summed log-prob spread evenly over its tokens (TRL sums them back)
    per_token = completion[:, 1:] * (torch.cat([pc, pr]) / lengths)[:, None]  # (2N, L − 1)

    class StubModel:
        training = False  # TRL's "eval" metrics

        def __call__(self, **kwargs):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())

    def same(x):
        return x

    trainer = SimpleNamespace(
        model=StubModel(), accelerator=SimpleNamespace(device="cpu", gather=same,
                                                       gather_for_metrics=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["eval"].items()}


def random_pairs(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    len_c, len_r = (torch.randint(1, 12, (n,), generator=g) for _ in range(2))
    pc, pr, rc, rr = (-torch.rand(n, generator=g, dtype=torch.float64) * 3 * length
                      for length in (len_c, len_r, len_c, len_r))
    return pc, pr, rc, rr, len_c, len_r


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl(loss_type, seed):
    pc, pr, rc, rr, len_c, len_r = random_pairs(seed)
    beta = [0.1, 0.5, 0.03][seed]
    want, trl_metrics = trl_loss(loss_type, beta, pc, pr, rc, rr, len_c, len_r)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, loss_type, chosen_lengths=len_c,
                             rejected_lengths=len_r)
    assert_close(loss, want)
    for k, v in metrics.items():
        assert float(v) == pytest.approx(trl_metrics[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_sigmoid_matches_trl(eps):
    pc, pr, rc, rr, len_c, len_r = random_pairs(7)
    kept, _ = trl_loss("sigmoid", 0.1, pc, pr, rc, rr, len_c, len_r)
    flipped, _ = trl_loss("sigmoid", 0.1, pr, pc, rr, rc, len_r, len_c)
    loss, _ = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", eps)
    assert_close(loss, (1 - eps) * kept + eps * flipped)
