import math

import pytest
import torch
from torch.testing import assert_close

from dvpo_lightning.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
LOGP_REF = torch.tensor([[-1.5, -1.0, -0.5]])


def test_estimators_known_answers():
    # logp − logp_ref = [0.5, −1, 0]; log r = logp_ref − logp = [−0.5, 1, 0]
    assert_close(kl_estimate(LOGP, LOGP_REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    assert_close(kl_estimate(LOGP, LOGP_REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    k3 = [math.exp(-0.5) + 0.5 - 1, math.e - 1 - 1, 0.0]
    assert_close(kl_estimate(LOGP, LOGP_REF, "k3"), torch.tensor([k3]))


def test_k3_nonnegative_and_mask_guards_overflow():
    logp = torch.tensor([[-1.0, -1e4]])
    logp_ref = torch.tensor([[-2.0, 0.0]])  # exp(1e4) overflows at the padded position
    mask = torch.tensor([[True, False]])
    out = kl_estimate(logp, logp_ref, "k3", mask=mask)
    assert torch.isfinite(out).all() and out[0, 1] == 0 and out[0, 0] >= 0


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(LOGP, LOGP_REF, "k4")


def test_adaptive_controller_by_hand_and_resume():
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(kl=9.0, n_steps=256)  # e = clip(0.5) = 0.2 → 0.2·(1 + 0.2·256/10000)
    assert ctl.coef == pytest.approx(0.2 * 1.00512)
    ctl.update(kl=5.4, n_steps=100)  # e = −0.1
    assert ctl.coef == pytest.approx(0.2 * 1.00512 * (1 - 0.1 * 100 / 10000))
    resumed = AdaptiveKLController()
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.coef == ctl.coef


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(kl=100.0, n_steps=10)
    assert ctl.coef == 0.05
    other = FixedKLController(0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.coef == 0.05
