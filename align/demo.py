"""`align demo`: the whole recipe on the miniature worlds, and the report that says whether it worked.

Each world lives beside its modality (`text_rlhf.demo`, `image_rlhf.demo`) and exposes
`run(out: Path, *, preset: str, fresh: bool, progress: bool) -> WorldResult`; this module knows
them only by name (as `align compare` knows its adapters), so `align` never imports transformers
or diffusers. What is shared lives here: the cache of base models, stage timing, the Gao et al.
over-optimisation fit, and the report.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from align.runner import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

WORLDS = {"text": "text_rlhf.demo", "image": "image_rlhf.demo"}
INSTRUCTGPT_WIN_RATE = 0.71   # 175B InstructGPT preferred to few-shot 175B GPT-3 (Ouyang et al. 2022, Fig. 1/3)


# ---------------------------------------------------------------------------- results of one world

@dataclass
class WorldResult:
    """What one world's demo measured. `compare` is `align.compare.compare_arms` output over arms named
    "{model}-{variant}" (model in base/sft/aligned, variant plain/engineered), judged by the gold judge
    on held-out prompts."""
    world: str
    compare: dict
    models: list[str]                                   # e.g. ["base", "sft", "aligned"] in stage order
    overopt: list[dict] = field(default_factory=list)   # per RL step: {"step", "kl", "proxy", "gold"}
    sections: list[tuple[str, str]] = field(default_factory=list)  # extra report sections (samples, grids, RM)
    timings: dict[str, float] = field(default_factory=dict)         # stage -> seconds
    notes: list[str] = field(default_factory=list)                  # shortfalls, said plainly
    out_dir: str = ""


class StageTimer:
    """Wall-clock seconds per named stage, in order: `with timer("sft"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        logger.info("demo: %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            logger.info("demo: %s done in %.1f s", name, self.seconds[name])


# ---------------------------------------------------------------------------- the base-model cache

def cache_root() -> Path:
    """`$ALIGN_CACHE`, else ~/.cache/align/worlds."""
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align" / "worlds")


def config_key(config: dict) -> str:
    """A short hash of a JSON-able config: the cache folder changes whenever anything that shapes the
    cached model does (world, sizes, steps, seeds, code version tag)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached(name: str, config: dict, build: Callable[[Path], None], fresh: bool = False) -> tuple[Path, bool]:
    """The folder of a cached artefact, built by `build(tmp_dir)` on first use (or when `fresh`).

    Built into a temporary sibling and renamed into place, so a crash mid-build never leaves a
    half-written cache entry that a later run would trust. Returns (folder, was_cached)."""
    root = cache_root()
    final = root / f"{name}-{config_key(config)}"
    if final.is_dir() and (final / "config.json").is_file() and not fresh:
        return final, True
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        atomic_write_json(tmp / "config.json", config)   # written last: its presence marks the entry complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


# ---------------------------------------------------------------------------- over-optimisation (Gao et al.)

def fit_gao(kl: Sequence[float], gold: Sequence[float]) -> dict:
    """Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization"), RL form:

        R(d) = d (α − β log d),  d = √KL(π ‖ π_ref),  R = gold(π) − gold(π_init)

    Linear least squares in (α, β) over points with d > 0 (the form has R(0) = 0, so the gold gain is
    measured from the first point, which must be the policy before RL). Returns α, β, R² of the fit,
    n points, and the d at which the fitted R peaks (exp(α/β − 1) for β > 0, else None)."""
    import numpy as np
    kl = np.asarray(kl, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if kl.shape != gold.shape or kl.size < 3:
        raise ValueError(f"fit_gao: need ≥ 3 paired (kl, gold) points, got {kl.size} and {gold.size}")
    d = np.sqrt(np.clip(kl, 0.0, None))
    r = gold - gold[0]
    keep = d > 1e-8
    if keep.sum() < 2:
        return {"alpha": float("nan"), "beta": float("nan"), "r2": float("nan"), "n": int(keep.sum()), "d_peak": None}
    dk, rk = d[keep], r[keep]
    A = np.stack([dk, -dk * np.log(dk)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, rk, rcond=None)
    resid = rk - A @ np.array([alpha, beta])
    ss_tot = float(((rk - rk.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    d_peak = float(math.exp(alpha / beta - 1.0)) if beta > 0 else None
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "n": int(keep.sum()), "d_peak": d_peak}


def gao_curve(alpha: float, beta: float, d):
    import numpy as np
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def plot_overopt(rows: list[dict], fit: dict, path: Path, title: str) -> Path:
    """Proxy (the RM that RL optimises) and gold reward gains against d = √KL, with the fitted Gao curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    d = np.sqrt(np.clip([r["kl"] for r in rows], 0, None))
    gold = np.array([r["gold"] for r in rows], dtype=np.float64)
    proxy = np.array([r["proxy"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(d, gold - gold[0], "o", ms=3, color="tab:orange", label="gold (judge) − initial")
    ax2 = ax.twinx()
    ax2.plot(d, proxy - proxy[0], "s", ms=3, color="tab:blue", alpha=0.6, label="proxy RM − initial")
    ax2.set_ylabel("proxy RM gain", color="tab:blue")
    if math.isfinite(fit.get("alpha", float("nan"))):
        grid = np.linspace(0, max(d.max(), 1e-3) * 1.05, 200)
        ax.plot(grid, gao_curve(fit["alpha"], fit["beta"], grid), "-", color="tab:red",
                label=f"fit d(α − β log d): α={fit['alpha']:.3f}, β={fit['beta']:.3f}, R²={fit['r2']:.2f}")
    ax.set_xlabel("d = √KL(π ‖ π_ref)  (nats½)")
    ax.set_ylabel("gold gain", color="tab:orange")
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
