"""`align demo --world image`: the whole recipe on the image miniature world, measured by its gold judge.

    1. base models       the pixel diffusion model and the contrastive CLIP (world_train.py, cached)
    2. preferences       K samples per RLHF prompt from the base model (DDIM η = 1, CFG: the policy
                         DDPO will train), ranked by a noisy gold labeler whose noise is calibrated on
                         these very samples to ~75% inter-labeler agreement (InstructGPT §3.4)
    3. reward model      the contrastive CLIP fine-tuned PickScore-style on those rankings
                         (`run_image_rm`); held-out accuracy against noisy labels and against gold
    4. RL                DDPO (`run_ddpo`) on the learned reward, the gold judge as a monitor only,
                         KL to the base model logged per epoch (the over-optimisation curve)
    5. evaluation        base and aligned × plain and engineered prompts on HELD-OUT colour×shape
                         pairs (never RLHF prompts), several seeds, judged by the gold judge
                         (align.compare: bootstrap CIs, paired win rates)

The gold judge labels preferences and evaluates; it is never the reward DDPO optimises.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.demo import StageTimer, WorldResult
from image_rlhf.world import (ENGINEERED_TAGS, HELDOUT_PAIRS, calibrate_noise, expected_agreement, gold_details,
                              gold_rank, labeler_agreement, plain_prompt, prompt_pairs)
from image_rlhf.world_train import (ClipTrainConfig, DiffusionTrainConfig, base_clip, base_diffusion, train_stats)

log = logging.getLogger(__name__)

GOLD_JUDGE = "image_rlhf.world:gold_score"
SUCCESS_THRESHOLD = 0.8
"""A gold score ≥ 0.8 needs the right colour and shape (0.4 + 0.4 at most) and a fair drawing."""
TARGET_AGREEMENT = 0.75
EVAL_TEMPLATES = ("a {c} {s}", "{c} {s}", "picture of a {c} {s}", "a {s} in {c}")
"""Plain phrasings of the held-out prompts (web-caption forms); engineered = + the quality tags."""


@dataclass
class ImageDemoPreset:
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    num_steps: int = 6
    """DDIM steps of every sample: preference data, DDPO rollouts, evaluation. Measured on the default
    base model (192 samples of the 12 plain / engineered prompts, guidance 3): mean gold 0.316 / 0.340 at
    4 steps, 0.330 / 0.350 at 6, 0.338 / 0.344 at 10, 0.322 / 0.324 at 20 — 6 steps cost 0.6× of 10 and
    draw as well; the time saved buys DDPO samples and evaluation seeds."""
    guidance_scale: float = 3.0
    k: int = 4
    """Images per ranking (K = 4 → 6 pairs, all in one RM batch, InstructGPT §3.5). Measured: K = 6 ×
    16 groups per prompt (2160 pairs, 2.3× the sampling time) did not beat K = 4 × 10 (540 pairs): held-out
    accuracy 59% vs 61% (noisy labels); either RM tracks the gold score within a prompt (r = 0.74-0.78)
    only through colour — r with shape and quality ≈ 0 — because the labels' noise (75% agreement) buries
    the small gold differences that shape and quality make between these blobs."""
    groups_per_prompt: int = 10
    """Rankings per RLHF prompt for the reward model."""
    eval_groups_per_prompt: int = 4
    """Rankings per HELD-OUT prompt: the RM's held-out accuracy (prompts it never saw)."""
    rm_epochs: float = 1.0
    """Passes over the rankings. Held-out loss (log 2 = 0.693 is chance) after epochs 1 / 2 / 3, measured on
    three RMs: 0.595 / 0.592 / 0.610 (500-step base, K = 4), 0.622 / 0.657 / 0.669 (K = 6 × 16 groups),
    0.658 / 0.735 / 0.779 (700-step base, accuracy 60% / 53% / 50%): past one epoch the RM memorises
    the 9 RLHF prompts' label noise."""
    rm_lr: float = 3e-4
    """What the RM learns (session 6: within-group correlation of its score with the gold parts colour /
    shape / quality on the held-out rankings; `rm_vs_gold`): default 0.80 / 0.21 / −0.07; lr 1e-4 0.71 /
    0.17 / 0.03; lr 1e-3 0.75 / 0.22 / −0.23; 2 epochs 0.72 / 0.06 / −0.15; lr 1e-4 × 3 epochs 0.76 / 0.15 /
    −0.06; the base CLIP before fine-tuning 0.65 / 0.15 / 0.03. On its own training rankings every variant's
    shape correlation is −0.02 to −0.05, though the gold score there carries shape (+0.40; colour +0.88):
    no setting teaches this CLIP (16 px images in 4×4 patches, 2 layers of width 64) shape from 540 noisy
    pairs, so DDPO cannot be rewarded for it."""
    rm_pairs_per_batch: int = 36
    ddpo: dict = field(default_factory=lambda: dict(
        epochs=10, sample_batch_size=64, num_batches_per_epoch=2, train_batch_size=32,
        gradient_accumulation_steps=2, timestep_fraction=0.5, min_std_dev=0.05, lr=1e-2, clip_range=1e-3,
        buffer_size=64, min_count=16, adv_clip=5.0, inner_epochs=1, noise_group_size=8))
    """DDPO settings (image_rlhf.ddpo.DDPOConfig). min_std_dev = 0.05 trains the 4 stochastic steps of 6
    (σ_t 0.77-0.24) and skips the last two (σ_t 0.009, 0.005), whose 1/σ_t-sized log-prob gradients held 97%
    of the policy gradient's squared norm (measured at 10 steps). Two optimiser steps of 64 samples per epoch;
    clip_range 1e-3 because the second step's per-element ratios are off by ~1e-4-1e-3 (at DDPO's 1e-4 it
    would be clipped away). 1280 samples in all — still too few: measured on 252 samples of the 500-step base
    (10 DDIM steps, the 8 stochastic ones), the policy gradient has split-half cosine ≈ 0 with the learned
    reward as advantage (and needs ~1400 samples for signal = noise with the gold score itself), so the
    learned reward barely moves whatever the lr (12 × 64 at 10 steps, with or without min_std_dev, and
    10 × 128 at 6 steps: RLHF-prompt reward within +0.08 of the base on fixed seeds).
    One x_T per group of a prompt's samples (noise_group_size; 55% of the learned reward's variance within a
    prompt comes from x_T, which no step's log-prob is credited with): G = 8 -> held-out aligned-plain gold
    0.401 (base 0.399, win vs base-engineered 28%), no better. With the gold judge itself as the reward
    (an oracle RM, same 1280 samples, lr 1e-3): 0.391 (G = 0), 0.394 (G = 8), 0.397 (timestep_fraction 1.0,
    all 4 stochastic steps) — the RL step, not only the RM,
    is short of samples here. 40 epochs (5120 samples, ~4x the demo's DDPO time): 0.410 with the oracle,
    0.411 with the learned RM (base-engineered 0.417; wins vs it 37% / 34%). Measured 2026-11-26 on the
    cached default base models.
    lr (LoRA r = 8, Adam; the policy gradient here is noise-dominated, so Adam's step size ~ lr sets how far
    the policy moves): held-out aligned-plain gold, pipeline seed 0, learned RM: 0.399 (1e-3), 0.415 (3e-3),
    0.428 (1e-2), 0.401 (2e-2, the proxy climbs where gold does not); oracle RM: 0.391 (1e-3), 0.414 (3e-3),
    0.459 (1e-2). Seed 1 (other labels, RM, DDPO samples): 0.372 (1e-3), 0.380 (1e-2) — below the base's
    0.399 with either, the RM of that seed being climbed; seed 2: 0.403 (1e-3), 0.404 (1e-2). The gold
    monitor on the RLHF prompts' own samples (no held-out prompt) ranks 1e-2 first on seeds 0 and 1, hence
    the default.
    noise_group_size = 8 at lr 1e-2 (session 5; no gain at 1e-3, above): held-out aligned-plain gold over
    pipeline seeds 0 / 1 / 2 is 0.425 / 0.416 / 0.423 (G = 0: 0.428 / 0.380 / 0.404; G = 4 on seed 1: 0.400),
    and the gold monitor on the RLHF prompts' own samples, mean of the last 3 epochs, 0.512 / 0.435 / 0.412
    (G = 0: 0.451 / 0.390 / 0.400) — better on every seed by the signal that involves no held-out prompt,
    hence the default (centring each reward on its x_T group's mean removes the share of the reward that no
    step's log-prob is credited with). Weak evidence, said plainly: with the gold judge as the reward (oracle)
    G = 8 gave 0.384 / 0.411 held-out on seeds 0 / 1 against G = 0's 0.459 on seed 0, at the same
    training-side gold (last 3 epochs 0.457 vs 0.451) — held-out gold moves ±0.04 from run to run at equal
    training reward, as much as any setting here changes it.
    15 epochs instead of 10 (G = 8, seeds 0 / 1): the gold monitor on the RLHF prompts keeps rising (last 3
    epochs 0.500 / 0.455) while held-out aligned-plain falls to 0.396 / 0.407 (KL 30k / 14k nats): the policy
    specialises to the 9 RLHF prompts, so that monitor stops predicting held-out prompts past ~10 epochs.
    DPOK's KL leash (kl_coef, seed 0; without it: held-out aligned-plain 0.425, RLHF pairs 0.504, kl/ref 9.2k
    nats; base 0.399 / 0.374). With the closed-form per-element Gaussian KL (kl_estimator=gaussian, session 8)
    kl_coef 0.01 / 0.1 / 1 / 10 gives kl/ref 6.0k / 1.1k / 165 / 12 nats, held-out aligned-plain 0.423 / 0.411 /
    0.401 / 0.402, RLHF pairs 0.490 / 0.436 / 0.375 / 0.374: a clean trade, gold still rising with KL (this
    recipe stops before the Gao et al. peak: the proxy-vs-gold curve in the report), so the demo runs unleashed.
    With k2 on per-element-mean log-probs (session 7) kl_coef 0.1 / 1 changed nothing and 30 halved kl/ref: its
    gradient is 1/D² of the summed penalty's and one sample's worth of noise. Over 99% of the unleashed kl/ref
    is in the two untrained low-σ steps (σ_t ≤ 0.009, where a small change of the mean costs ‖Δμ‖²/2σ² nats);
    the leash on the trained steps alone holds those too (shared weights)."""
    lora_r: int = 8
    """LoRA rank on the UNet's attention projections (alpha = r); 0 = full fine-tuning. Measured on the
    default preset (same base, RM and samples): full fine-tuning at lr 5e-4 collapsed the model (gold
    0.36 -> 0.03 in 9 epochs), at 1e-4 drifted down (held-out aligned-plain gold 0.29, KL 9e3 nats);
    LoRA r=8 at 1e-3 kept it (0.36, KL 63 nats) — better, though still no gain over the base (those runs:
    10 DDIM steps, 768 samples, before min_std_dev). LoRA r=8 on the ResNet convolutions (conv1, conv2) as
    well as attention, oracle RM (the gold judge as reward), lr 1e-2, G = 8, seed 0, the default base: held-out
    aligned-plain 0.418 against 0.403 with attention only (session 14; an earlier 0.389 vs 0.459 was measured
    while such a LoRA was saved in mixed key formats and evaluated with its convolutions' adapters alone, since
    fixed in save_unet_lora) — within the ±0.04 between runs, no reason to train more. Without LoRA on the
    cross-attention's keys and values (so that the update cannot be prompt-specific; learned RM, G = 8):
    0.403 / 0.417 on seeds 0 / 1 (with them: 0.425 / 0.416) — no better."""
    kl_samples: int = 16
    """Trajectories per epoch that kl/ref averages over (its reference forward costs ~⅓ of sampling)."""
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    """Seeds per held-out prompt phrasing: 12 × 8 = 96 paired samples per arm."""
    eval_templates: tuple[str, ...] = EVAL_TEMPLATES
    rlhf_eval_seeds: tuple[int, ...] = (100, 101, 102, 103)
    """Fresh seeds for the second evaluation, on the 9 RLHF prompts' (colour, shape) pairs that DDPO trained
    on (9 × 4 phrasings × 4 seeds = 144 paired samples per arm): the held-out table asks whether alignment
    carries over to combinations never trained on, this one whether it worked where it was applied."""
    n_boot: int = 2000
    seed: int = 0


PRESETS = {
    "default": ImageDemoPreset(),
    # the test's end-to-end run (4-6 min cold on 2 cores): the default recipe on a base diffusion model trained
    # 300 steps instead of 700 and a CLIP trained 150 steps instead of 300, 6 DDPO epochs instead of 10, fewer
    # evaluation seeds. Measured over preset seeds 0 / 1 / 2 / 3 (2026-11-26, same cached base models):
    # aligned-plain − base-plain gold on fresh seeds of the RLHF pairs +0.046 / +0.031 / +0.071 / +0.033 (10
    # epochs: +0.058 / +0.045 / +0.036 / +0.021), on the held-out pairs +0.016 / −0.009 / +0.022 / +0.042.
    # The smaller preset this replaced (a 120-step base, 96 DDPO samples) had an RM at chance (44-69% on 36
    # held-out pairs) and full fine-tuning that collapsed the model on 2 of 4 seeds.
    "small": ImageDemoPreset(
        diffusion=DiffusionTrainConfig(steps=300, warmup=20), clip=ClipTrainConfig(steps=150, data_chunk=4096),
        ddpo={**ImageDemoPreset().ddpo, "epochs": 6}, eval_seeds=(0, 1, 2, 3), n_boot=500),
}


# ---------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_images(parts, prompts: list[str], num_steps: int, guidance_scale: float, seed: int,
                  batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]: the DDPO policy's samples (DDIM η = 1, CFG) of `prompts`, seeded per batch."""
    from image_rlhf.pipeline import encode_prompts, negative_embeds
    from image_rlhf.sampling import decode_latents, sample_trajectories
    neg = negative_embeds(parts) if guidance_scale > 1 else None
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        traj = sample_trajectories(parts.unet, parts.scheduler, encode_prompts(parts, chunk), neg, num_steps,
                                   guidance_scale, 1.0, generator=torch.Generator().manual_seed(seed * 1000 + b))
        out.append(decode_latents(parts.vae, traj.final_latents).cpu())
    return torch.cat(out)


def _save_pngs(images: torch.Tensor, folder: Path, stem: str) -> list[str]:
    """One PNG per image (uint8, lossless), named stem-i.png; returns the file names."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = []
    for i, a in enumerate(arr):
        names.append(f"{stem}-{i}.png")
        Image.fromarray(a).save(folder / names[-1])
    return names


# ---------------------------------------------------------------------------- preferences

def make_preferences(parts, pairs, groups: int, k: int, p: ImageDemoPreset, folder: Path, name: str,
                     seed: int, noise: float | None = None) -> dict:
    """Sample `groups` × K images per (colour, shape) plain prompt, rank each group with the noisy gold
    labeler and write folder/name.jsonl ({"prompt", "images", "ranking"}, paths relative to it).

    noise=None calibrates the labeler's β on these samples' within-group pairs to TARGET_AGREEMENT
    (world.DEFAULT_NOISE was calibrated on other pairs; agreement depends on how far apart the
    pair's gold scores are). Returns noise, agreement (expected and simulated), gold stats, files."""
    prompts = [plain_prompt(c, s) for c, s in pairs for _ in range(groups)]
    images = sample_images(parts, [q for q in prompts for _ in range(k)], p.num_steps, p.guidance_scale, seed)
    images = images.view(len(prompts), k, *images.shape[1:])                              # (G, K, 3, H, W)
    gold = gold_details([q for q in prompts for _ in range(k)], images.flatten(0, 1))["score"].view(len(prompts), k)
    ia, ib = torch.triu_indices(k, k, 1)
    ga, gb = gold[:, ia].flatten(), gold[:, ib].flatten()                                  # every within-group pair
    if noise is None:
        noise = calibrate_noise(ga, gb, TARGET_AGREEMENT)
    rng = torch.Generator().manual_seed(seed + 17)
    lines = []
    img_dir = folder / f"{name}-images"
    for g, q in enumerate(prompts):
        files = _save_pngs(images[g], img_dir, f"{g:04d}")
        ranking = gold_rank(q, images[g], rng, noise).tolist()
        lines.append(json.dumps({"prompt": q, "images": [f"{img_dir.name}/{f}" for f in files], "ranking": ranking}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {"path": path, "noise": noise, "expected_agreement": expected_agreement(ga, gb, noise),
            "measured_agreement": labeler_agreement(ga, gb, noise, torch.Generator().manual_seed(seed + 23)),
            "n_groups": len(prompts), "n_pairs": len(ga), "gold_mean": gold.mean().item(),
            "images": images, "gold": gold, "prompts": prompts}


@torch.no_grad()
def rm_vs_gold(rm_dir: Path, prefs: dict) -> dict:
    """How the RM relates to the gold judge on ranked groups (`prefs` of make_preferences):
    "accuracy", the share of within-group pairs it orders as the noiseless gold judge does (gold ties
    skipped); "corr", the within-group correlation of its score with the gold score and each of its parts
    (each centred on its group's mean, so prompts' differences do not count): which part it learned;
    "gold_corr", the same for the gold score itself: how much of the labels' signal each part carries."""
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.world import gold_details
    rm = ClipReward.load(rm_dir).eval()
    g, k = prefs["gold"].shape
    prompts, images = [q for q in prefs["prompts"] for _ in range(k)], prefs["images"].flatten(0, 1)
    with torch.no_grad():
        scores = rm.score(prompts, images).float().view(g, k)
    ia, ib = torch.triu_indices(k, k, 1)
    dg, ds = prefs["gold"][:, ia] - prefs["gold"][:, ib], scores[:, ia] - scores[:, ib]
    keep = dg != 0
    parts = gold_details(prompts, images)

    def centred(x):  # (G·K,) -> (G, K), each group minus its mean
        x = x.float().view(g, k)
        return x - x.mean(1, keepdim=True)

    def corr(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))

    names = ("score", "colour", "shape", "quality")
    rm_c, gold_c = centred(scores), centred(parts["score"])
    return {"accuracy": float(((dg > 0) == (ds > 0))[keep].float().mean()),
            "corr": {n: corr(rm_c, centred(parts[n])) for n in names},
            "gold_corr": {n: corr(gold_c, centred(parts[n])) for n in names[1:]}}


# ---------------------------------------------------------------------------- the run

def _ddpo_rows(metrics_path: Path) -> list[dict]:
    """Over-optimisation rows from DDPO's metrics.jsonl: the samples logged at epoch e were drawn by the
    policy after e − 1 updates, so step = e − 1 (step 0 is the base model, KL 0)."""
    rows = []
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if m.get("reward/mean") is None or m.get("monitor/mean") is None:
            continue
        rows.append({"step": int(m["step"]) - 1, "kl": float(m.get("kl/ref") or 0.0),
                     "proxy": float(m["reward/mean"]), "gold": float(m["monitor/mean"])})
    return rows


COMPONENTS = ("colour", "shape", "quality", "clean", "centred", "size")
"""What the gold judge reads (world.gold_details): score = 0.4·colour + 0.4·shape + 0.2·quality, quality =
mean(clean, centred, size)."""


class DetailJudge:
    """The gold judge (the same scores as world.gold_score) that keeps the components of every call, in call
    order, so the report can say which part of the score RL and the prompt tags move."""

    def __init__(self):
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, prompts, images) -> torch.Tensor:
        from image_rlhf.world import gold_details
        d = gold_details(prompts, images)
        self.calls.append({k: d[k] for k in ("score",) + COMPONENTS})
        return d["score"].to(images.device)

    def by_arm(self, arms: dict) -> dict[str, dict[str, float]]:
        """Mean components per arm. `evaluate` calls the judge arm by arm (in the arms' order), seed by seed,
        one batch per seed here; the recorded scores are checked against each arm's, so a different call
        order fails loudly instead of mixing arms up."""
        out, i = {}, 0
        for name, arm in arms.items():
            n_seeds = arm.scores.shape[1]
            calls, i = self.calls[i:i + n_seeds], i + n_seeds
            got = torch.stack([c["score"].double() for c in calls], 1) if len(calls) == n_seeds else None
            if got is None or got.shape != arm.scores.shape or not torch.allclose(got, arm.scores):
                raise RuntimeError(f"DetailJudge: the recorded calls do not line up with arm {name!r}")
            out[name] = {k: torch.cat([c[k].float() for c in calls]).mean().item() for k in COMPONENTS}
        self.calls = self.calls[i:]
        return out


def _eval_items(templates, pairs):
    from align.compare import PromptItem
    items = []
    for c, s in pairs:
        for j, t in enumerate(templates):
            plain = t.format(c=c, s=s)
            items.append(PromptItem(f"{c}-{s}-{j}", plain, f"{plain}, {ENGINEERED_TAGS}"))
    return items


def run(out: Path, *, preset: str = "default", fresh: bool = False, progress: bool = True) -> WorldResult:
    """The image world end to end into `out` (see the module docstring). Base models come from the cache
    (`fresh` retrains them); everything else is recomputed."""
    from align.compare import ImageGenParams, compare_arms, default_pairs, evaluate, splits_table
    from align.report import markdown_table
    from align.rl.config import LoraParams
    from image_rlhf.compare import ImageGenerator, samples_markdown
    from image_rlhf.ddpo import DDPOConfig, run_ddpo
    from image_rlhf.pipeline import load_pipeline
    from image_rlhf.rm import ImageRMConfig, run_image_rm

    if preset not in PRESETS:
        raise ValueError(f"image demo: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("prefs", "rm", "ddpo", "samples"):  # this run's own outputs, redone each time
        shutil.rmtree(out / sub, ignore_errors=True)
    timer = StageTimer("image")
    notes: list[str] = []

    # ---------------------------------------------------------------- 1. base models
    with timer("base diffusion model"):
        base_dir, diff_cached = base_diffusion(p.diffusion, fresh, progress)
    with timer("base CLIP"):
        clip_dir, clip_cached = base_clip(p.clip, fresh, progress)
    diff_stats, clip_stats = train_stats(base_dir), train_stats(clip_dir)

    # ---------------------------------------------------------------- 2. preferences
    with timer("preference data"):
        parts = load_pipeline(base_dir)
        train_pairs = prompt_pairs("train")
        prefs = make_preferences(parts, train_pairs, p.groups_per_prompt, p.k, p, out / "prefs", "train", p.seed)
        held = make_preferences(parts, list(HELDOUT_PAIRS), p.eval_groups_per_prompt, p.k, p, out / "prefs",
                                "heldout", p.seed + 1, noise=prefs["noise"])
        del parts
    # ---------------------------------------------------------------- 3. reward model
    with timer("reward model"):
        rm_dir = run_image_rm(ImageRMConfig(
            clip=str(clip_dir), data=str(prefs["path"]), eval_data=str(held["path"]), out=str(out / "rm"),
            epochs=p.rm_epochs, max_pairs_per_batch=p.rm_pairs_per_batch, lr=p.rm_lr, logit_scale_lr=1e-3,
            weight_decay=0.0, seed=p.seed, log_every=5))
        rm_meta = json.loads((rm_dir / "align_reward.json").read_text()).get("held_out", {})
        rm_gold = rm_vs_gold(rm_dir, held)
        rm_gold_acc = rm_gold["accuracy"]

    # ---------------------------------------------------------------- 4. DDPO
    with timer("DDPO"):
        prompts_file = out / "prefs" / "ddpo_prompts.txt"
        prompts_file.write_text("".join(plain_prompt(c, s) + "\n" for c, s in train_pairs))
        cfg = DDPOConfig(pipeline=str(base_dir), reward=str(rm_dir), prompts=str(prompts_file), out=str(out / "ddpo"),
                         num_steps=p.num_steps, guidance_scale=p.guidance_scale, eta=1.0,
                         lora=LoraParams(r=p.lora_r, alpha=float(p.lora_r)),
                         monitor=GOLD_JUDGE, log_kl=True, kl_samples=p.kl_samples, seed=p.seed, save_every=10_000,
                         grid_prompts=[plain_prompt(c, s) for c, s in HELDOUT_PAIRS], grid_seeds=[0, 1],
                         **p.ddpo)
        result = run_ddpo(cfg)
        aligned_dir = result.model_dir
        del result
    overopt = _ddpo_rows(out / "ddpo" / "metrics.jsonl")

    # ---------------------------------------------------------------- 5. evaluation on held-out prompts
    with timer("evaluation"):
        items = _eval_items(p.eval_templates, HELDOUT_PAIRS)
        gen_params = ImageGenParams(num_steps=p.num_steps, guidance_scale=p.guidance_scale, eta=1.0)
        judge = DetailJudge()
        arms = evaluate({"base": str(base_dir), "aligned": str(aligned_dir)}, items,
                        lambda path: ImageGenerator(path, gen_params), judge, list(p.eval_seeds),
                        batch_size=len(items), judge_spec=GOLD_JUDGE, n_samples=len(items))
        components = {"held-out pairs": judge.by_arm(arms)}
        pairs = default_pairs(["base", "aligned"]) + [("aligned-engineered", "base-engineered"),
                                                      ("aligned-plain", "base-plain")]
        compare = compare_arms(arms, pairs, SUCCESS_THRESHOLD, n_boot=p.n_boot, seed=p.seed)
        samples_md = samples_markdown(arms, items, out, n=len(items))
        rl_items = _eval_items(p.eval_templates, train_pairs)
        rl_arms = evaluate({"base": str(base_dir), "aligned": str(aligned_dir)}, rl_items,
                           lambda path: ImageGenerator(path, gen_params), judge, list(p.rlhf_eval_seeds),
                           batch_size=len(rl_items), judge_spec=GOLD_JUDGE, n_samples=0)
        components["RLHF pairs (trained on)"] = judge.by_arm(rl_arms)
        compare["components"] = components
        compare["rlhf_prompts"] = compare_arms(rl_arms, pairs, SUCCESS_THRESHOLD, n_boot=p.n_boot, seed=p.seed)
        split_md = ("Mean gold score on the held-out (colour, shape) pairs, and on fresh samples (other seeds) of the "
                    f"{len(train_pairs)} pairs whose plain prompts DDPO trained on (n = prompts × seeds; ties count "
                    "half in the win rate).\n\n" + splits_table(
                        {"held-out pairs": compare, "RLHF pairs (trained on)": compare["rlhf_prompts"]},
                        ("base-plain", "base-engineered", "aligned-plain", "aligned-engineered"),
                        ("aligned-plain", "base-engineered")))
        split_md += ("\n\nWhat the gold judge reads, mean per arm (score = 0.4·colour + 0.4·shape + 0.2·quality; "
                     "quality = mean of clean, centred, size): which part the tags move, and which part RL moves.\n\n"
                     + markdown_table([{"prompts": split, "arm": arm, **{k: v[k] for k in COMPONENTS}}
                                       for split, per_arm in components.items() for arm, v in per_arm.items()]))

    # ---------------------------------------------------------------- report pieces
    a = compare["arms"]
    gap_base = a["base-engineered"]["mean"] - a["base-plain"]["mean"]
    if gap_base <= 0:
        notes.append(f"the base model does not show the world's thesis on held-out prompts: engineered "
                     f"{a['base-engineered']['mean']:.3f} vs plain {a['base-plain']['mean']:.3f} (gold).")
    if overopt and len(overopt) > 1 and overopt[-1]["proxy"] <= overopt[0]["proxy"]:
        notes.append("DDPO did not raise the learned reward on its own samples.")

    grids = sorted((out / "ddpo" / "grids").glob("epoch-*.png"))
    grid_md = ""
    if grids:
        first, last = grids[0], grids[-1]
        grid_md = (f"DDPO's fixed grid (held-out plain prompts {', '.join(cfg.grid_prompts)}; rows = seeds 0, 1):\n\n"
                   f"**before** ({first.stem})\n\n![before](ddpo/grids/{first.name})\n\n"
                   f"**after** ({last.stem})\n\n![after](ddpo/grids/{last.name})\n\n")
    cache_line = (f"Base diffusion model: `{base_dir}` ({'cache' if diff_cached else 'trained now'}; "
                  f"{diff_stats.get('unet_params', 0) / 1e6:.2f}M-param UNet + "
                  f"{diff_stats.get('text_encoder_params', 0) / 1e6:.2f}M-param text encoder, "
                  f"{p.diffusion.steps} steps × {p.diffusion.batch_size} images, final ε-loss "
                  f"{diff_stats.get('final_loss', float('nan')):.4f}, {diff_stats.get('seconds', 0):.0f} s to train). "
                  f"Base CLIP: `{clip_dir}` ({'cache' if clip_cached else 'trained now'}; "
                  f"{clip_stats.get('params', 0) / 1e6:.2f}M params, zero-shot colour+shape accuracy "
                  f"{clip_stats.get('zero_shot_accuracy', float('nan')):.1%} on 12 classes).")
    data_md = (f"{prefs['n_groups']} rankings of K = {p.k} base-model samples of {len(train_pairs)} plain RLHF prompts "
               f"({prefs['n_pairs']} pairs), ranked by the noisy gold labeler: Bradley-Terry/Plackett-Luce temperature "
               f"β = {prefs['noise']:.4f}, calibrated on these samples to {TARGET_AGREEMENT:.0%} expected agreement "
               f"between two labelers (measured by simulation: {prefs['measured_agreement']:.1%}; on the held-out "
               f"rankings {held['expected_agreement']:.1%}). Mean gold of the samples: {prefs['gold_mean']:.3f}.")
    rm_md = (f"The contrastive CLIP fine-tuned PickScore-style ({p.rm_epochs:g} epochs, lr {p.rm_lr:g}) on those "
             f"rankings. Held-out rankings of the {len(HELDOUT_PAIRS)} held-out prompts ({held['n_pairs']} pairs): "
             f"accuracy {rm_meta.get('accuracy', float('nan')):.1%} against the noisy labels, "
             f"{rm_gold_acc:.1%} against the noiseless gold order (a perfect RM would reach about "
             f"{TARGET_AGREEMENT:.0%}-ish against noisy labels). What it learned — within-group correlation of its "
             f"score with the gold score and its parts, held-out rankings: "
             + ", ".join(f"{n} {v:+.2f}" for n, v in rm_gold["corr"].items())
             + " (the gold score's own correlation with its parts there: "
             + ", ".join(f"{n} {v:+.2f}" for n, v in rm_gold["gold_corr"].items()) + ").")
    ddpo_md = ""
    if overopt:
        f0, fl = overopt[0], overopt[-1]
        how = f"LoRA r = {p.lora_r}" if p.lora_r > 0 else "full fine-tuning"
        ddpo_md = (f"DDPO, {how}, {cfg.epochs} epochs × {cfg.sample_batch_size * cfg.num_batches_per_epoch} "
                   f"samples of the {len(train_pairs)} RLHF prompts ({cfg.num_steps} DDIM steps, η = 1, guidance "
                   f"{cfg.guidance_scale:g}, lr {cfg.lr:g}, clip range {cfg.clip_range:g}). On its own samples: "
                   f"learned reward {f0['proxy']:.3f} → {fl['proxy']:.3f}, gold (monitor, never trained on) "
                   f"{f0['gold']:.3f} → {fl['gold']:.3f}, KL to the base model {fl['kl']:.2f} nats per trajectory "
                   f"(the last sampled epoch).\n\n")
    sections = [("Image world: base models", cache_line), ("Image world: preference data", data_md),
                ("Image world: reward model", rm_md), ("Image world: DDPO", ddpo_md + grid_md),
                ("Image world: held-out vs trained-on prompts", split_md),
                ("Image world: samples on held-out prompts", samples_md)]
    result = WorldResult(world="image", compare=compare, models=["base", "aligned"], overopt=overopt,
                         sections=sections, timings=dict(timer.seconds), notes=notes, out_dir=str(out))
    summary = {"preset": preset, "timings": timer.seconds, "labeler": {k: prefs[k] for k in (
        "noise", "expected_agreement", "measured_agreement", "n_groups", "n_pairs", "gold_mean")},
        "rm": {"held_out": rm_meta, "gold_accuracy": rm_gold_acc, "vs_gold": rm_gold}, "overopt": overopt,
        "compare": compare, "notes": notes, "cached": {"diffusion": diff_cached, "clip": clip_cached},
        "config": dataclasses.asdict(p)}
    (out / "image_world.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return result
