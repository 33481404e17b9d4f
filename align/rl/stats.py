"""Running statistics: global running moments, DDPO's per-prompt stat tracker, the non-finite reward check."""
from __future__ import annotations

from collections import deque

import torch


class RunningMoments:
    """Running mean and (population) std over every value seen, merged batch by batch with
    Chan et al.'s parallel update, so the result equals the statistics of the concatenation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 0.0, 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total
        return b_mean, b_var ** 0.5

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


class PerPromptStatTracker:
    """Per-prompt reward normalisation of DDPO (Black et al. 2023, §5; ddpo-pytorch's stat_tracking).

    Each prompt keeps a buffer of its last `buffer_size` rewards; a reward's advantage is
    (r − mean_prompt) / (std_prompt + eps). While a prompt has fewer than `min_count` rewards
    buffered, the whole batch's mean and std stand in (the batch fallback). std is the
    population std (numpy's default, as ddpo-pytorch); eps = 1e-6.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = torch.as_tensor(rewards, dtype=torch.float64)
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts but {rewards.numel()} rewards")
        if not torch.isfinite(rewards).all():
            bad = [i for i, ok in enumerate(torch.isfinite(rewards).tolist()) if not ok]
            raise ValueError(f"non-finite rewards at batch positions {bad[:10]} (prompt {prompts[bad[0]]!r})")
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        advantages = torch.empty_like(rewards)
        index: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            index.setdefault(p, []).append(i)
        for prompt, idx in index.items():
            idx_t = torch.tensor(idx)
            prompt_rewards = rewards[idx_t]
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(prompt_rewards.tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            advantages[idx_t] = (prompt_rewards - mean) / (std + self.eps)
        return advantages.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(N,) advantages of rewards that come in consecutive groups of `group_size` sharing everything the
    policy does not choose (DDPO: the prompt and the initial noise x_T): Â = (r − mean of its group) /
    (std of all group-centred rewards + eps). The group mean is a baseline that conditions on x_T, so the
    reward variance x_T causes (which no step's log-prob is credited with) leaves the advantages; one
    batch-wide scale rather than each group's own std, which is itself noisy with groups of 4-8 and blows
    up near-ties (Liu et al. 2025, "Dr. GRPO", drop the per-group std too). Population std; float64 inside."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of 1 has no baseline), got {group_size}")
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(r).all():
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        raise ValueError(f"non-finite rewards at batch positions {bad[:10]}")
    centred = r.reshape(-1, group_size)
    centred = centred - centred.mean(1, keepdim=True)
    return (centred / (centred.std(unbiased=False) + eps)).flatten().float()


def check_finite_rewards(rewards: torch.Tensor, prompts: list[str], spec: str, where: str,
                         error: Exception | None = None) -> None:
    """Stop a run on NaN/inf rewards (B,), all processes' (so every rank raises, none hangs at a collective):
    FloatingPointError naming the reward spec, the first bad value and its prompt (prompts: the same rows), how
    many, and `where` (e.g. "iteration 3: nothing was updated, the last checkpoint is intact"). error: the
    reward's own ValueError (a checked reward refusing NaN), re-raised with `where`."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if not bad:
        return
    if error is not None:
        raise FloatingPointError(f"{error} ({where})") from error
    raise FloatingPointError(f"reward {spec!r} returned {rewards[bad[0]].item()} for prompt {prompts[bad[0]]!r} "
                             f"({len(bad)} non-finite of {len(prompts)}); {where}")
