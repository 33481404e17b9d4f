"""KL estimators and KL coefficient controllers.

Estimators follow Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html).
For a token sampled from the policy q = π and the reference p = π_ref, with
log r = log p(x) − log q(x):
    k1 = −log r              unbiased, high variance, can be negative per sample
    k2 = ½ (log r)²          biased, low variance, ≥ 0
    k3 = (r − 1) − log r     unbiased, low variance, ≥ 0
All three estimate KL[π ‖ π_ref] only when x ~ π; that is why rollouts must sample from the raw
distribution (temperature 1, no top-k/top-p) for the KL penalty to be honest.
"""
from __future__ import annotations

import math

import torch


def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return log_prob - ref_log_prob


def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_log_prob - log_prob) ** 2


def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    log_r = ref_log_prob - log_prob
    return torch.expm1(log_r) - log_r


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-sample KL estimate by name ('k1', 'k2' or 'k3')."""
    if kind not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[kind](log_prob, ref_log_prob)


class FixedKLController:
    """β stays as given."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β of Ziegler et al. 2019 (§2.2, eq. 2):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    n_steps is the number of samples (episodes) in the batch that measured KL_t, as in
    lm-human-preferences and TRL. The ±0.2 clip bounds one update to a 20%·K_β change.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            raise ValueError(f"KL is {current_kl}: the policy diverged or a log-prob is not finite")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


def make_kl_controller(kl_coef: float, adaptive: bool, target: float = 6.0, horizon: float = 10000.0):
    if kl_coef < 0 or (adaptive and (target <= 0 or horizon <= 0)):
        raise ValueError(f"ppo.kl: kl_coef must be >= 0 (a negative β rewards leaving the reference), and an "
                         f"adaptive β needs target > 0 and horizon > 0 (got kl_coef={kl_coef}, target={target}, "
                         f"horizon={horizon})")
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
