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
CACHE_MARKER = "align-cache.json"   # not config.json: HF folders have their own
WORLD_MARKER = "align-demo-world.json"   # in out/<world>: a later run replaces only folders that hold it
_LEGACY_OUTPUTS = ("data/demos.jsonl", "eval_responses.jsonl", "prefs", "image_world.json")
"""What the worlds write first, for world folders from before WORLD_MARKER."""
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

    def __init__(self, world: str = ""):
        self.seconds: dict[str, float] = {}
        self.prefix = f"demo/{world}" if world else "demo"

    @contextmanager
    def __call__(self, name: str):
        logger.info("%s: %s ...", self.prefix, name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            logger.info("%s: %s done in %.1f s", self.prefix, name, self.seconds[name])


# ---------------------------------------------------------------------------- the base-model cache

def cache_root() -> Path:
    """`$ALIGN_CACHE`, else ~/.cache/align/worlds."""
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align" / "worlds")


def config_key(config: dict) -> str:
    """A short hash of a JSON-able config: the cache folder changes whenever anything that shapes the
    cached model does (world, sizes, steps, seeds, code version tag)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _file_id(path: Path) -> list:
    return [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]


def _manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file of a cache entry but its marker."""
    return {f.relative_to(folder).as_posix(): _file_id(f)
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != CACHE_MARKER}


def _damage(folder: Path) -> str | None:
    """Why the cache entry `folder` cannot be used (None: complete, and its files are as they were built).
    Entries written before the marker listed their files are trusted as they were."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text())
    except FileNotFoundError:
        return "it is incomplete"
    except (OSError, ValueError) as e:
        return f"its {CACHE_MARKER} is unreadable ({e})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return None
    bad = [rel for rel, want in files.items() if not (folder / rel).is_file() or _file_id(folder / rel) != want]
    return f"{', '.join(bad)} changed since it was built" if bad else None


@contextmanager
def _build_lock(path: Path):
    """An exclusive lock on `path` while a cache entry is built, so that two demos sharing a cache build it
    once (the second waits, then uses it) instead of the second replacing it under the first. Released by the
    OS if the holder dies. Where there is no fcntl (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("cache: another process is building %s; waiting for it", path.name[1:-len(".lock")])
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached(name: str, config: dict, build: Callable[[Path], None], fresh: bool = False) -> tuple[Path, bool]:
    """The folder of a cached artefact, built by `build(tmp_dir)` on first use (or when `fresh`).

    Built into a temporary sibling and renamed into place, so a crash mid-build never leaves a
    half-written cache entry that a later run would trust; the marker lists the files' sizes and hashes, so
    an entry damaged later (a truncated safetensors) is rebuilt rather than loaded. Returns (folder, was_cached)."""
    root = cache_root()
    final = root / f"{name}-{config_key(config)}"
    if not fresh and final.is_dir():
        damage = _damage(final)
        if damage is None:
            return final, True
        logger.warning("cache: %s cannot be used: %s; rebuilding it", final, damage)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{final.name}.lock"):
        if not fresh and final.is_dir() and _damage(final) is None:   # built by another process while we waited
            return final, True
        for stale in root.glob(f".{final.name}.tmp-*"):   # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        old = root / f".{final.name}.old-{os.getpid()}"
        try:
            build(tmp)
            # written last: its presence marks the entry complete
            atomic_write_json(tmp / CACHE_MARKER, {"config": config, "files": _manifest(tmp)})
            if final.exists():   # moved aside, not deleted in place: a reader never sees a half-removed entry
                os.replace(final, old)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return final, False


# ---------------------------------------------------------------------------- over-optimisation (Gao et al.)

def fit_gao(kl: Sequence[float], gold: Sequence[float]) -> dict:
    """Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization"), RL form:

        R(d) = d (α − β log d),  d = √KL(π ‖ π_ref),  R = gold(π) − gold(π_init)

    Linear least squares of gold = r0 + d(α − β log d) over every point: r0, the initial policy's gold, is
    fitted with α and β rather than read off the first point, which is one batch of the policy before RL and
    as noisy as any other (in the text demo its standard error is about the size of the whole gain). Points
    whose batch KL estimate is ≤ 0 count at d = 0, where the policy is still the reference. Returns α, β, r0,
    R² of the fit, n points, n_at_zero (points at d = 0) and the d at which the fitted R peaks (exp(α/β − 1)
    for β > 0, else None)."""
    import numpy as np
    kl = np.asarray(kl, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if kl.shape != gold.shape or kl.size < 3:
        raise ValueError(f"fit_gao: need ≥ 3 paired (kl, gold) points, got {kl.size} and {gold.size}")
    d = np.sqrt(np.clip(kl, 0.0, None))
    pos = d > 1e-8
    out = {"n": int(kl.size), "n_at_zero": int((~pos).sum())}
    if np.unique(d[pos]).size < 2:  # α and β need two distinct d > 0
        return {**out, "alpha": float("nan"), "beta": float("nan"), "r0": float("nan"), "r2": float("nan"),
                "d_peak": None}
    d_log_d = np.where(pos, d * np.log(np.where(pos, d, 1.0)), 0.0)
    A = np.stack([np.ones_like(d), d, -d_log_d], axis=1)
    (r0, alpha, beta), *_ = np.linalg.lstsq(A, gold, rcond=None)
    resid = gold - A @ np.array([r0, alpha, beta])
    ss_tot = float(((gold - gold.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    d_peak = float(math.exp(alpha / beta - 1.0)) if beta > 0 else None
    return {**out, "alpha": float(alpha), "beta": float(beta), "r0": float(r0), "r2": r2, "d_peak": d_peak}


def gao_curve(alpha: float, beta: float, d):
    import numpy as np
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def plot_overopt(rows: list[dict], fit: dict, path: Path, title: str) -> Path:
    """Proxy (the RM that RL optimises) and gold reward gains against d = √KL, with the fitted Gao curve.

    The legend sits under the axes: inside, loc="best" looks only at the gold axis's artists, so it covered the
    proxy points (on the twin axis) wherever they were. Figure + Agg canvas, not pyplot: a caller's backend (a
    notebook's) is left alone."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    d = np.sqrt(np.clip([r["kl"] for r in rows], 0, None))
    gold = np.array([r["gold"] for r in rows], dtype=np.float64)
    proxy = np.array([r["proxy"] for r in rows], dtype=np.float64)
    fig = Figure(figsize=(6, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    gold0 = fit["r0"] if math.isfinite(fit.get("r0", float("nan"))) else gold[0]
    proxy0 = fit_gao([r["kl"] for r in rows], proxy)["r0"] if len(rows) >= 3 else float("nan")
    proxy0 = proxy0 if math.isfinite(proxy0) else proxy[0]  # the same form's intercept: not one noisy batch
    ax.plot(d, gold - gold0, "o", ms=3, color="tab:orange", label="gold (judge) − fitted initial")
    ax2 = ax.twinx()
    ax2.plot(d, proxy - proxy0, "s", ms=3, color="tab:blue", alpha=0.6, label="proxy RM − fitted initial")
    ax2.set_ylabel("proxy RM gain", color="tab:blue")
    if math.isfinite(fit.get("alpha", float("nan"))):
        grid = np.linspace(0, max(d.max(), 1e-3) * 1.05, 200)
        ax.plot(grid, gao_curve(fit["alpha"], fit["beta"], grid), "-", color="tab:red",
                label=f"gold fit d(α − β log d): α={fit['alpha']:.3g}, β={fit['beta']:.3g}, R²={fit['r2']:.2f}")
    ax.set_xlabel("d = √KL(π ‖ π_ref)  (nats½)")
    ax.set_ylabel("gold gain", color="tab:orange")
    ax.set_title(title, fontsize=10)
    handles, labels = [], []
    for a in (ax, ax2):
        h, lab = a.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=2, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------- the verdict and the report

def headline(result: WorldResult) -> dict:
    """The issue's three questions for one world, from its compare results (first model = base,
    last = aligned): does aligned-plain beat base-engineered on mean gold score and in ≥ 71% of
    paired comparisons, and does the engineered − plain gap shrink from base to aligned?"""
    arms, base, aligned = result.compare["arms"], result.models[0], result.models[-1]
    mean = {name: s["mean"] for name, s in arms.items()}
    pair = next((p for p in result.compare["pairs"]
                 if p["a"] == f"{aligned}-plain" and p["b"] == f"{base}-engineered"), None)
    gap_base = mean[f"{base}-engineered"] - mean[f"{base}-plain"]
    gap_aligned = mean[f"{aligned}-engineered"] - mean[f"{aligned}-plain"]
    h = {"base_plain": mean[f"{base}-plain"], "base_engineered": mean[f"{base}-engineered"],
         "aligned_plain": mean[f"{aligned}-plain"], "aligned_engineered": mean[f"{aligned}-engineered"],
         "gap_base": gap_base, "gap_aligned": gap_aligned,
         "win_rate": pair["win_rate"] if pair else float("nan"),
         "win_ci": (pair["ci_low"], pair["ci_high"]) if pair else (float("nan"), float("nan"))}
    h["checks"] = {
        "aligned-plain ≥ base-engineered (mean gold)": h["aligned_plain"] >= h["base_engineered"],
        f"aligned-plain wins ≥ {INSTRUCTGPT_WIN_RATE:.0%} vs base-engineered": h["win_rate"] >= INSTRUCTGPT_WIN_RATE,
        "engineered − plain gap shrinks (base → aligned)": gap_aligned < gap_base,
    }
    return h


def _fmt_ci(ci) -> str:
    lo, hi = ci
    return "" if lo is None or lo != lo else f" [{lo:.0%}, {hi:.0%}]"


def summary(results: list[WorldResult], total_s: float) -> str:
    """The one-screen summary printed at the end of `align demo`."""
    lines = ["", "align demo — plain vs prompt-engineered prompts, judged by each world's gold judge (held-out prompts)", ""]
    head = f"{'world':<6} {'base plain':>10} {'base eng.':>10} {'aligned plain':>13} {'aligned eng.':>12} " \
           f"{'gap base→aligned':>17}  aligned-plain vs base-eng. (95% CI)"
    lines.append(head)
    for r in results:
        h = headline(r)
        lines.append(f"{r.world:<6} {h['base_plain']:>10.3f} {h['base_engineered']:>10.3f} {h['aligned_plain']:>13.3f} "
                     f"{h['aligned_engineered']:>12.3f} {h['gap_base']:>+8.3f}→{h['gap_aligned']:<+8.3f}  "
                     f"{h['win_rate']:.1%}{_fmt_ci(h['win_ci'])}  (InstructGPT: 71 ± 4%)")
    lines.append("")
    for r in results:
        for check, ok in headline(r)["checks"].items():
            lines.append(f"  [{'pass' if ok else 'FAIL'}] {r.world}: {check}")
        for note in r.notes:
            lines.append(f"  note ({r.world}): {note}")
    stages = ", ".join(f"{r.world} {sum(r.timings.values()) / 60:.1f} min" for r in results)
    lines += ["", f"total {total_s / 60:.1f} min wall clock (per world: {stages}; worlds run side by side when "
                  "there are cores for it)"]
    return "\n".join(lines)


def world_markdown(r: WorldResult, out: Path) -> str:
    from align.compare import to_markdown
    from align.report import markdown_table
    h = headline(r)
    parts = [f"## {r.world.capitalize()} world", ""]
    parts.append(markdown_table([{"check": c, "result": "pass" if ok else "**FAIL**"} for c, ok in h["checks"].items()]))
    parts += ["", f"Aligned-plain vs base-engineered: mean gold {h['aligned_plain']:.3f} vs {h['base_engineered']:.3f}; "
              f"aligned-plain wins {h['win_rate']:.1%}{_fmt_ci(h['win_ci'])} of paired held-out comparisons "
              f"(ties half; InstructGPT 175B vs few-shot GPT-3: 71 ± 4%). Engineered − plain gap: "
              f"{h['gap_base']:+.3f} (base) → {h['gap_aligned']:+.3f} (aligned).", ""]
    if r.notes:
        parts += ["**Shortfalls and caveats**", ""] + [f"- {n}" for n in r.notes] + [""]
    parts += ["### Plain vs engineered, by model (gold judge)", "", to_markdown(r.compare), ""]
    if len(r.overopt) >= 3:
        fit = fit_gao([x["kl"] for x in r.overopt], [x["gold"] for x in r.overopt])
        png = plot_overopt(r.overopt, fit, out / f"overopt_{r.world}.png",
                           f"{r.world}: proxy RM vs gold during RL (Gao et al. 2022 fit)")
        if not math.isfinite(fit["r2"]) or fit["r2"] < 0.5:  # a peak read off a fit that explains little is noise
            peak = ("; the fit explains little of the gold's variation, so no peak is read from it"
                    if math.isfinite(fit["alpha"]) else "")
        else:
            peak = (f"; fitted gold peaks at d = {fit['d_peak']:.3g} (KL {fit['d_peak'] ** 2:.3g} nats)"
                    if fit["d_peak"] else "")
        if fit["n_at_zero"] > 1:  # the first point is the policy before RL; later ones at KL ≤ 0 are batch noise of k1
            peak += (f". {fit['n_at_zero'] - 1} later step(s) had a batch KL estimate ≤ 0 (the k1 estimate of a "
                     "policy still at the reference) and count at d = 0")
        last = r.overopt[-1]
        initial = (f"the initial policy's gold, fitted: {fit['r0']:.3f}; its first batch: {r.overopt[0]['gold']:.3f}"
                   if math.isfinite(fit["r0"]) else "too few distinct KL values to fit")
        parts += ["### Over-optimisation: proxy RM vs gold as KL grows", "",
                  f"![over-optimisation]({png.name})", "",
                  f"gold = r0 + R(d), R(d) = d(α − β log d), d = √KL, fitted on {fit['n']} RL steps ({initial}): "
                  f"α = {fit['alpha']:.4f}, β = {fit['beta']:.4f}, R² = {fit['r2']:.3f}{peak}. "
                  f"Over the run: KL {r.overopt[0]['kl']:.2f} → {last['kl']:.2f} nats, proxy "
                  f"{r.overopt[0]['proxy']:.3f} → {last['proxy']:.3f}, gold {r.overopt[0]['gold']:.3f} → {last['gold']:.3f} "
                  "(per-batch means of the samples RL trained on).", ""]
    for title, body in r.sections:
        parts += [f"### {title}", "", _relink(body, r.out_dir, out), ""]
    parts += ["### Time per stage", "",
              markdown_table([{"stage": k, "seconds": round(v, 1)} for k, v in r.timings.items()]
                             + [{"stage": "total", "seconds": round(sum(r.timings.values()), 1)}], floatfmt=".1f"), ""]
    return "\n".join(parts)


def _relink(markdown: str, world_dir: str, out: Path) -> str:
    """A world writes links relative to its own folder; the report sits in `out`: prefix them."""
    import re
    if not world_dir:
        return markdown
    try:
        prefix = Path(os.path.relpath(Path(world_dir).resolve(), out.resolve())).as_posix()
    except ValueError:
        return markdown
    if prefix in ("", "."):
        return markdown
    return re.sub(r"\]\((?![a-z]+://|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)


def write_demo_report(results: list[WorldResult], out: Path, total_s: float) -> Path:
    text = ["# align demo", "",
            "The InstructGPT recipe on the miniature worlds (README.md, section 'The miniature worlds: `align demo`'): "
            "base models trained here from scratch, "
            "then SFT (text), preferences ranked by a noisy gold labeler, a learned reward model, and RL against "
            "that reward model with a KL leash. The gold judge plays the human; RL never sees it.", "",
            "```", summary(results, total_s).strip("\n"), "```", ""]
    text += [world_markdown(r, out) for r in results]
    atomic_write_json(out / "demo.json", [{"world": r.world, "headline": {k: v for k, v in headline(r).items()},
                                           "compare": r.compare, "overopt": r.overopt, "timings": r.timings,
                                           "notes": r.notes} for r in results])
    return atomic_write_text(out / "report.md", "\n".join(text))


def _run_world(name: str, folder: Path, preset: str, fresh: bool, progress: bool, threads: int,
               position: int) -> WorldResult:
    """One world in a worker process: its own logging setup, `threads` torch threads, its bars on
    screen line `position`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["ALIGN_PROGRESS_POSITION"] = str(position)
    from align.cli import setup_logging
    setup_logging(verbose=False)
    import torch
    torch.set_num_threads(threads)
    return importlib.import_module(WORLDS[name]).run(folder, preset=preset, fresh=fresh, progress=progress)


def _run_concurrently(worlds, out: Path, preset: str, fresh: bool, progress: bool, threads: int) -> list[WorldResult]:
    """Every world in its own process, the cores split between them. The worlds' models are tiny and use
    two threads poorly (measured: a sequential cold demo kept 1.22 of 2 cores busy), so worlds side by
    side finish well before the same worlds one after the other. A world that fails does not lose the
    others' results: they are reported, then the first error is raised."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    results, errors, t0 = [], [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(worlds), mp_context=mp.get_context("spawn")) as pool:
        futures = [(w, pool.submit(_run_world, w, out / w, preset, fresh, progress, threads, i))
                   for i, w in enumerate(worlds)]
        for w, f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 — re-raised below, after the others are reported
                logger.error("demo: the %s world failed: %s", w, e)
                errors.append(e)
    if errors and results:
        write_demo_report(results, out, time.perf_counter() - t0)
    if errors:
        raise errors[0]
    return results


def _is_world_run(folder: Path) -> bool:
    return folder.is_dir() and (not any(folder.iterdir())
                                or any((folder / f).exists() for f in (WORLD_MARKER, *_LEGACY_OUTPUTS)))


def _prepare_world_folders(worlds: Sequence[str], out: Path, preset: str) -> None:
    """Check every world and its preset, then replace out/<world>: nothing is deleted before a typo is caught,
    and never a folder that no demo wrote (`--out ~` must not remove ~/image)."""
    for name in worlds:
        if name not in WORLDS:
            raise ValueError(f"unknown world {name!r} (choose from {', '.join(WORLDS)})")
        presets = importlib.import_module(WORLDS[name]).PRESETS
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for the {name} world (choose from {', '.join(presets)})")
    for name in worlds:
        if (out / name).exists() and not _is_world_run(out / name):
            raise ValueError(f"{out / name} exists and is not an `align demo` world run (no {WORLD_MARKER}): "
                             "remove it or choose another --out")
    if (out / "demo.json").is_file():  # a previous run's report, which would outlive its deleted folders if this
        for stale in ("report.md", "demo.json", *(f"overopt_{w}.png" for w in worlds)):  # run stopped early
            (out / stale).unlink(missing_ok=True)
    for name in worlds:
        folder = out / name
        if folder.exists():
            logger.info("demo: replacing the previous %s world run in %s", name, folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        atomic_write_json(folder / WORLD_MARKER, {"world": name, "preset": preset})


def run_demo(worlds: Sequence[str], out: str | Path = "runs/demo", preset: str = "default", fresh: bool = False,
             progress: bool = True, concurrent: bool | None = None) -> list[WorldResult]:
    """Run each world's demo into out/<world>, then write out/report.md and print the summary.

    concurrent: one process per world (default when there are several worlds and ≥ 2 torch threads)."""
    import torch
    out = Path(out)
    _prepare_world_folders(worlds, out, preset)
    cores = torch.get_num_threads()
    if concurrent is None:
        concurrent = len(worlds) > 1 and cores >= len(worlds)
    t0 = time.perf_counter()
    if concurrent:
        threads = max(1, cores // len(worlds))
        logger.info("demo: running the %s worlds side by side, %d torch thread(s) each", " and ".join(worlds), threads)
        results = _run_concurrently(list(worlds), out, preset, fresh, progress, threads)
    else:
        results = []
        for name in worlds:
            results.append(importlib.import_module(WORLDS[name]).run(out / name, preset=preset, fresh=fresh,
                                                                      progress=progress))
            write_demo_report(results, out, time.perf_counter() - t0)   # a partial report survives a later crash
    total = time.perf_counter() - t0
    report = write_demo_report(results, out, total)
    print(summary(results, total))
    print(f"\nreport: {report}")
    return results
