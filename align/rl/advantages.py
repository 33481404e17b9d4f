"""Generalised advantage estimation and masked statistics.

Shapes: (B, T) per-token tensors; `mask` is 1 on response tokens the policy generated and 0 on
padding after EOS. Every function takes the mask explicitly so padding never leaks into a mean.
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (all entries when mask is None)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries; unbiased (Bessel, n/(n-1)) by default, as TRL and OpenRLHF."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = x.numel() if mask is None else mask.sum()
        n = torch.as_tensor(n, dtype=x.dtype, device=x.device)
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; padding stays 0 after whitening.

    eps = 1e-8 inside the square root (TRL's choice). With `shift_mean=False` the mean is added back:
    the scale is normalised but the sign of every advantage is kept (used for returns).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white if mask is None else white * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), per token.

        δ_t = r_t + γ·V(s_{t+1})·m_{t+1} − V(s_t)
        Â_t = δ_t + γλ·m_{t+1}·Â_{t+1}          (Â_T = 0, V(s_T) = 0: the episode ends)
        R_t = Â_t + V(s_t)                       (the value target)

    rewards, values, mask: (B, T). m_{t+1} = 0 after the last real token, so an episode's
    bootstrap stops at its EOS even when the row is padded further. Returns (advantages, returns),
    both zero on padding. Ties to cleanrl's `lastgaelam` loop; O(T) Python steps over a batched row.
    """
    B, T = rewards.shape
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)         # (B, T)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
    deltas = rewards + gamma * next_values * next_mask - values                      # (B, T)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        lastgaelam = deltas[:, t] + gamma * lam * next_mask[:, t] * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns
