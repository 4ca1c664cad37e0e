"""KL to the reference policy: per-token estimators and the coefficient controllers.

Estimators of ``KL(π‖π_ref)`` from tokens sampled from ``π`` (Schulman, "Approximating KL
divergence", 2020), with ``log r = logp_ref − logp``:

- ``k1 = −log r = logp − logp_ref`` (unbiased, can be negative; the authors' code uses it);
- ``k2 = ½·(log r)²`` (biased, low variance, ≥ 0);
- ``k3 = (r − 1) − log r`` (unbiased, ≥ 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """Per-token KL estimate ``k(logp, logp_ref)``; see the module docstring for the formulas.

    Args:
        logp: ``(B, T)`` float, ``log π(y_t | s_t)`` of the sampling policy.
        logp_ref: ``(B, T)`` float, ``log π_ref(y_t | s_t)``.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.
        mask: ``(B, T)`` bool or None; when given, the output is 0 at masked positions and the
            inputs there are never read (a padded ``logp`` cannot overflow ``exp`` into NaN).

    Returns:
        ``(B, T)`` float.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: unknown kind {kind!r}; valid: {KL_ESTIMATORS}")
    log_r = logp_ref - logp
    if mask is not None:
        log_r = torch.where(mask, log_r, torch.zeros((), dtype=log_r.dtype, device=log_r.device))
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    return torch.expm1(log_r) - log_r  # (r − 1) − log r, expm1 for accuracy near r = 1


class FixedKLController:
    """A constant KL coefficient β.

    Args:
        coef: β (paper: 0.05, ablated over {0.01, 0.05, 0.1}, App. H).
    """

    def __init__(self, coef: float = 0.05) -> None:
        if coef < 0:
            raise ValueError(f"FixedKLController: coef must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL to a target (Ziegler et al. 2019, §2.2).

    ``e = clip(kl / target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps / horizon)``.
    Defaults are the authors' code (TRL's ``AdaptiveKLController``).

    Args:
        init_coef: initial β.
        target: target KL (in the units of the ``kl`` passed to :meth:`update`).
        horizon: number of samples over which the error is corrected.
    """

    def __init__(self, init_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController: need init_coef >= 0, target > 0 and horizon > 0, got "
                f"init_coef={init_coef}, target={target}, horizon={horizon}"
            )
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move β after observing mean KL ``kl`` over ``n_steps`` samples."""
        error = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
