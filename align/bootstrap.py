"""Percentile-bootstrap statistics for comparing arms: means, success rates, paired win rates.

Resampling is over prompts (and over seeds when an arm has several), every resample computed at
once from multiplicity weights — no Python loop over resamples — and seeded, so one table's
statistics share the same resamples.
"""
from __future__ import annotations

import torch


def _as_grid(x) -> torch.Tensor:
    """(P,) or (P, S) numbers -> (P, S) float64; NaN/inf refused (a judge bug must not hide in a mean)."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.numel() == 0:
        raise ValueError(f"scores must be a non-empty (prompts, seeds) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("scores contain NaN or inf")
    return t


def bootstrap_ci(stats, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                 chunk_elems: int = 1 << 22):
    """Percentile-bootstrap CIs of grid means. stats (K, P, S) -> (mean, low, high), each (K,).

    Resample b draws P prompt indices and (S > 1) S seed indices with replacement; as weights
    w_p (n_boot, P), w_s (n_boot, S) that sum to 1, its mean of stats[k] is Σ_ps w_p x_kps w_s.
    Resamples are generated in chunks of ~chunk_elems weights (memory), all from one seeded
    generator; every k shares the same resamples, so CIs in one table are coherent.
    n_boot = 0 gives NaN bounds.
    """
    x = torch.as_tensor(stats, dtype=torch.float64)
    K, P, S = x.shape
    mean = x.mean(dim=(1, 2))
    if n_boot <= 0:
        nan = torch.full_like(mean, float("nan"))
        return mean, nan, nan.clone()
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    g = torch.Generator().manual_seed(int(seed))
    chunk = max(1, chunk_elems // max(P, S))
    boots = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w_p = _multiplicities(P, b, g) / P                                         # (b, P)
        w_s = _multiplicities(S, b, g) / S if S > 1 else torch.ones(b, 1, dtype=torch.float64)  # (b, S)
        boots.append(torch.einsum("bp,kps,bs->kb", w_p, x, w_s))                   # (K, b)
    boots = torch.cat(boots, dim=1)                                                # (K, n_boot)
    alpha = (1 - confidence) / 2
    q = torch.quantile(boots, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=1)  # (2, K)
    return mean, q[0], q[1]


def _multiplicities(n: int, b: int, g: torch.Generator) -> torch.Tensor:
    """(b, n) how many times each of n items is drawn in b resamples of size n with replacement."""
    idx = torch.randint(n, (b, n), generator=g)
    return torch.zeros(b, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(b, n, dtype=torch.float64))


def summarize(scores, success_threshold: float | None = None, n_boot: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> dict:
    """Mean score and success rate (score >= success_threshold) of one arm, with bootstrap CIs.

    scores: (P,) or (P, S). Without a threshold the success fields are None.
    """
    x = _as_grid(scores)
    stats = [x] if success_threshold is None else [x, (x >= success_threshold).double()]
    mean, low, high = bootstrap_ci(torch.stack(stats), n_boot, confidence, seed)
    out = {"n_prompts": x.shape[0], "n_seeds": x.shape[1], "mean": mean[0].item(),
           "ci_low": low[0].item(), "ci_high": high[0].item(),
           "success": None, "success_ci_low": None, "success_ci_high": None}
    if success_threshold is not None:
        out.update(success=mean[1].item(), success_ci_low=low[1].item(), success_ci_high=high[1].item())
    return out


def win_rate(a_scores, b_scores, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
             tie_tol: float = 0.0) -> dict:
    """Win rate of arm a over arm b, paired by (prompt, seed); ties (|a − b| <= tie_tol) count half.

    Also the mean paired difference a − b. Both with bootstrap CIs over the same resamples.
    """
    a, b = _as_grid(a_scores), _as_grid(b_scores)
    if a.shape != b.shape:
        raise ValueError(f"arms are paired by (prompt, seed): shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    diff = a - b
    tie = diff.abs() <= tie_tol
    win = torch.where(tie, 0.5, (diff > 0).double())                                  # (P, S)
    mean, low, high = bootstrap_ci(torch.stack([win, diff]), n_boot, confidence, seed)
    return {"win_rate": mean[0].item(), "ci_low": low[0].item(), "ci_high": high[0].item(),
            "wins": int(((diff > 0) & ~tie).sum()), "ties": int(tie.sum()), "losses": int(((diff < 0) & ~tie).sum()),
            "n": diff.numel(), "mean_diff": mean[1].item(), "diff_ci_low": low[1].item(),
            "diff_ci_high": high[1].item()}
