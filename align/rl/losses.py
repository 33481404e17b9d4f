"""PPO's two clipped losses (Schulman et al. 2017), used by text PPO and image DDPO alike."""
from __future__ import annotations

import torch

from align.rl.advantages import masked_mean


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float = 0.2, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss, eq. 7 of Schulman et al. 2017, as a loss to minimise:

        ratio = exp(log π(a|s) − log π_old(a|s))
        L = mean( max(−Â·ratio, −Â·clip(ratio, 1−ε, 1+ε)) )

    ratio = 1 gives L = −mean(Â). Any shape; `mask` selects the entries in the mean.
    Stats: `clipfrac` (share of entries where the clipped branch is the max), `approx_kl`
    (k3 estimate of KL[π_old, π] on the sampled actions, Schulman's 2020 note), `ratio` (mean).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": masked_mean(_k3(log_ratio), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """(r − 1) − log r, r = exp(log_ratio), ≥ 0, without cancellation: computed as written, in float32 it is
    rounding noise (±1e-8, negative "KL"s) at DDPO's clip ranges, where |log r| ~ 1e-4 and the value ~5e-9.
    Small |x| take the series x²/2 + x³/6 + x⁴/24 (truncation x³/60 relative: < 2e-8 below |x| = 1e-2)."""
    x = log_ratio
    return torch.where(x.abs() < 1e-2, x * x * (0.5 + x / 6 + x * x / 24), torch.expm1(x) - x)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float = 0.2, mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 baselines; Andrychowicz et al. 2021 §3.6 note it rarely helps, but
    it is the InstructGPT/TRL default):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_V = ½ · mean( max((V − R)², (V_clip − R)²) )
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats
