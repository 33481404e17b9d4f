"""The PPO and KL settings shared by text PPO and image DDPO (one config, two modalities)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KLParams:
    """The KL leash to the reference policy (Ziegler et al. 2019 §2.2)."""
    kl_coef: float = 0.2
    """β at the start: per-token reward −β·(log π − log π_ref)."""
    adaptive: bool = True
    """Adapt β towards `target` (Ziegler et al. eq. 2); else β stays fixed."""
    target: float = 6.0
    """Target KL per episode (nats, summed over the response), as Ziegler et al."""
    horizon: float = 10000.0
    """Episodes over which β adapts (K_β = n / horizon)."""
    estimator: str = "k1"
    """Per-token estimator used in the reward: k1 (unbiased, the usual choice), k2 or k3."""


@dataclass
class PPOParams:
    """PPO-clip hyper-parameters (Schulman et al. 2017; defaults as InstructGPT/TRL for text)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    mini_batch_size: int = 64
    """Samples per optimiser step (must divide the rollout batch)."""
    micro_batch_size: int = 0
    """Samples per forward/backward; 0 = the mini-batch (no gradient accumulation)."""
    clip_range: float = 0.2
    """ε of the clipped surrogate."""
    clip_range_value: float = 0.2
    """ε_v of the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    early_stop_kl: float = 0.0
    """Stop this rollout's PPO epochs once approx-KL[π_old, π] of a mini-batch exceeds this (0 = never)."""
    kl: KLParams = field(default_factory=KLParams)


@dataclass
class LoraParams:
    """LoRA through peft (Hu et al. 2021); r = 0 trains every weight."""
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or peft's 'all-linear'); the image side targets the UNet's attention projections."""
