"""The RL math, once: plain torch functions shared by text PPO and image DDPO."""
from align.rl.advantages import gae, masked_mean, masked_var, masked_whiten
from align.rl.kl import (AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3,
                         make_kl_controller)
from align.rl.losses import clipped_surrogate, clipped_value_loss
from align.rl.stats import PerPromptStatTracker, RunningMoments, check_finite_rewards, group_advantages

__all__ = [
    "gae", "masked_mean", "masked_var", "masked_whiten",
    "AdaptiveKLController", "FixedKLController", "make_kl_controller", "kl_estimate", "kl_k1", "kl_k2", "kl_k3",
    "clipped_surrogate", "clipped_value_loss", "PerPromptStatTracker", "RunningMoments", "group_advantages",
    "check_finite_rewards",
]
