"""The image world's base models, trained here from scratch and cached (`align.demo.cached`).

    base diffusion  a pixel-space text-to-image model at 16×16: diffusers UNet2DConditionModel
                    (~1M parameters) + a 2-layer CLIPTextModel + a CLIP BPE tokenizer (tiny.py),
                    trained jointly with the ε-prediction loss (Ho et al. 2020, Eq. 14)
                        L = E_{x0, c, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t, c)‖²
                    on `world.make_dataset` images and their noisy web captions, with 10% of the
                    captions dropped to "" so classifier-free guidance has an unconditional model
                    (Ho & Salimans 2022). Saved with `save_pixel_pipeline`, so `load_pipeline`,
                    `run_ddpo` and `align compare` load it by path.
    base CLIP       a small open_clip model (custom config, 16×16 ViT) trained contrastively
                    (CLIP's symmetric InfoNCE, Radford et al. 2021, Fig. 3) on the same kind of
                    (image, caption) pairs; saved with `ClipReward.save`, so `ClipReward.load`,
                    `run_image_rm` and `load_reward` take its folder.

The web is where the base model's habits come from: tagged captions ("masterpiece, best quality")
sit mostly on clean, centred, medium images, so tag-laden prompts get better images (the world's
thesis, measured by `prompt_gap`). Nothing here knows about tags.

Each model is keyed by its config dataclass + CODE_VERSION: change either and the cache misses.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from align.demo import cached
from align.runner import progress
from align.session import warmup_cosine
from image_rlhf.world import COLOURS, SHAPES, WorldConfig, engineered_prompt, make_dataset, plain_prompt

log = logging.getLogger(__name__)

CODE_VERSION = "image-world-train-1"
"""Bump when the training code changes what a cached model would be."""


# ---------------------------------------------------------------------------- configs

@dataclass
class DiffusionTrainConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    steps: int = 700
    """Optimiser steps; each sees a fresh batch of rendered images (the web is endless). Measured
    here at equal compute: 500 × 32 beats 250 × 64 early in training (steps matter more than batch).
    500 → 800 steps (1 thread: 229 → 381 s): final ε-loss 0.059 → 0.048; gold at 6 DDIM steps, held-out
    plain 0.344 → 0.377 and engineered 0.361 → 0.399, RLHF prompts plain 0.305 → 0.360 and engineered
    0.328 → 0.379. A 3-level UNet (32, 64, 64) at 500 steps did not help (held-out plain 0.354 / eng 0.364
    at 10 DDIM steps vs 0.334 / 0.365, 1.2× slower). 700 keeps the cold image demo near 11 minutes."""
    batch_size: int = 32
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, then cosine to lr · min_lr_ratio)."""
    warmup: int = 40
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    """EMA of the weights (UNet and text encoder); the saved model is the EMA. Decay warms up as
    min(ema_decay, (1 + step) / (10 + step)) so a short run is not dominated by the random init."""
    caption_dropout: float = 0.1
    """Share of captions replaced by "" (the unconditional model that CFG needs)."""
    block_out_channels: tuple[int, ...] = (32, 64)
    attention_heads: int = 2
    """Heads of the UNet's attention (diffusers' `attention_head_dim`, which counts heads); 2 heads of
    32 channels run ~2× faster on a CPU than 8 of 8."""
    text_width: int = 32
    text_layers: int = 2
    num_merges: int = 20000
    """CLIP BPE merges kept: 20000 makes every world word ("triangle", "masterpiece") one token."""
    max_length: int = 24
    """Tokenizer model_max_length (the longest web captions are ~24 tokens)."""
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    """The cosine schedule (Nichol & Dhariwal 2021, §3.2), made for small images: the linear one
    (beta_start/beta_end, DDPM) destroys a 16×16 image by mid-schedule. Measured here after 500 steps
    × 32 at guidance 3: mean gold 0.35 (cosine) vs 0.21 (linear)."""
    data_chunk: int = 4096
    """Images rendered per make_dataset call (a new seed each chunk)."""
    seed: int = 0


@dataclass
class ClipTrainConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 20
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    embed_dim: int = 32
    vision_width: int = 64
    vision_layers: int = 2
    patch_size: int = 4
    text_width: int = 32
    text_layers: int = 2
    context_length: int = 24
    data_chunk: int = 8192
    seed: int = 0


def _key(cfg) -> dict:
    return {"code": CODE_VERSION, **dataclasses.asdict(cfg)}


class _Web:
    """An endless stream of (images (B, 3, H, W) in [0, 1], captions) rendered chunk by chunk."""

    def __init__(self, cfg: WorldConfig, chunk: int, seed: int):
        self.cfg, self.chunk, self.seed, self.k = cfg, chunk, seed, 0
        self.images, self.captions, self.pos = None, [], 0

    def next(self, n: int):
        if self.images is None or self.pos + n > len(self.captions):
            self.images, self.captions, _ = make_dataset(self.chunk, self.seed * 100_003 + self.k, self.cfg)
            self.k, self.pos = self.k + 1, 0
        i = self.pos
        self.pos += n
        return self.images[i:i + n], self.captions[i:i + n]


# ---------------------------------------------------------------------------- base diffusion

def build_diffusion_parts(cfg: DiffusionTrainConfig, tokenizer_dir: Path):
    """(unet, text_encoder, tokenizer, scheduler), random, seeded."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from image_rlhf.tiny import build_clip_tokenizer, tiny_clip_text_encoder
    tokenizer = build_clip_tokenizer(tokenizer_dir, num_merges=cfg.num_merges, model_max_length=cfg.max_length)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=cfg.text_width, num_layers=cfg.text_layers,
                                          seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.world.size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels), norm_num_groups=min(cfg.block_out_channels[0], 8),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(cfg.block_out_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_heads)
    # set_alpha_to_one=False + steps_offset=1 as SD's DDIM config: σ_t > 0 at every step (ddim.py)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    return unet, text_encoder, tokenizer, scheduler


def train_diffusion(cfg: DiffusionTrainConfig, out: Path, show_progress: bool = True) -> dict:
    """Train the base text-to-image model and save its pixel pipeline to `out`. Returns stats."""
    from image_rlhf.pipeline import save_pixel_pipeline

    out = Path(out)
    unet, text_encoder, tokenizer, scheduler = build_diffusion_parts(cfg, out / "tokenizer")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    alphas_cumprod = scheduler.alphas_cumprod.float()                                      # (1000,) ᾱ_t
    web = _Web(cfg.world, cfg.data_chunk, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    unet.train(), text_encoder.train()
    t0, losses = time.perf_counter(), []
    bar = progress(total=cfg.steps, desc="base diffusion", disable=not show_progress)
    for step in range(cfg.steps):
        images, captions = web.next(cfg.batch_size)
        drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=cfg.max_length, truncation=True,
                        return_tensors="pt").input_ids                                    # (B, L)
        x0 = images * 2 - 1                                                                 # (B, 3, H, W) in [−1, 1]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=g)                 # (B,)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        c = text_encoder(ids)[0]                                                            # (B, L, D)
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=c).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval(), text_encoder.eval()
    save_pixel_pipeline(out, unet, text_encoder, tokenizer, scheduler)
    stats = {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
             "unet_params": sum(p.numel() for p in unet.parameters()),
             "text_encoder_params": sum(p.numel() for p in text_encoder.parameters())}
    (out / "train_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def base_diffusion(cfg: DiffusionTrainConfig = DiffusionTrainConfig(), fresh: bool = False,
                   show_progress: bool = True) -> tuple[Path, bool]:
    """(pipeline folder, was_cached): the cached base model, trained on first use (or when fresh)."""
    return cached("image-diffusion", _key(cfg), lambda tmp: train_diffusion(cfg, tmp, show_progress), fresh)


# ---------------------------------------------------------------------------- base CLIP

def clip_model_config(cfg: ClipTrainConfig) -> dict:
    """An open_clip model config (ViT on 16×16 images, patch 4 → 16 tokens). vocab_size stays 49408 so
    open_clip's shipped BPE tokenizer works and <|endoftext|> is the largest id (the pooled token)."""
    return {"embed_dim": cfg.embed_dim,
            "vision_cfg": {"image_size": cfg.world.size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                           "head_width": 16, "patch_size": cfg.patch_size, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                         "heads": 4, "layers": cfg.text_layers, "mlp_ratio": 2.0}}


def zero_shot_accuracy(reward, n: int = 512, seed: int = 12345, world: WorldConfig = WorldConfig()) -> float:
    """Share of fresh rendered images whose best-scoring prompt among the 12 "a {colour} {shape}" is right."""
    images, _, attrs = make_dataset(n, seed, world)
    names = [plain_prompt(c, s) for c in COLOURS for s in SHAPES]
    with torch.no_grad():
        img = reward.image_features(images)                                                # (n, D)
        txt = reward.text_features(names)                                                  # (12, D)
    pred = (img @ txt.T).argmax(1)
    truth = attrs["colour"] * len(SHAPES) + attrs["shape"]
    return float((pred == truth).float().mean())


def train_clip(cfg: ClipTrainConfig, out: Path, show_progress: bool = True) -> dict:
    """Train the world's CLIP contrastively and save it as a ClipReward folder in `out`. Returns stats."""
    from image_rlhf.clip_reward import ClipReward

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "world-clip.json"
    spec.write_text(json.dumps(clip_model_config(cfg)))
    torch.manual_seed(cfg.seed)
    reward = ClipReward.create(str(spec), mode="pickscore")
    spec.unlink()  # the saved folder carries its own config
    model = reward.model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    web = _Web(cfg.world, cfg.data_chunk, cfg.seed + 7)
    t0, losses = time.perf_counter(), []
    model.train()
    bar = progress(total=cfg.steps, desc="base CLIP", disable=not show_progress)
    for step in range(cfg.steps):
        images, captions = web.next(cfg.batch_size)
        img = reward.image_features(images)                                                # (B, D)
        txt = reward.text_features(captions)                                               # (B, D)
        logits = model.logit_scale.exp() * img @ txt.T                                     # (B, B)
        labels = torch.arange(len(img))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        reward.clamp_logit_scale()
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    stats = {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
             "params": sum(p.numel() for p in model.parameters()),
             "zero_shot_accuracy": zero_shot_accuracy(reward, world=cfg.world), "logit_scale": reward.logit_scale}
    reward.save(out, extra={"train_stats": stats})
    (out / "train_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def base_clip(cfg: ClipTrainConfig = ClipTrainConfig(), fresh: bool = False,
              show_progress: bool = True) -> tuple[Path, bool]:
    """(ClipReward folder, was_cached): the cached contrastive CLIP, trained on first use."""
    return cached("image-clip", _key(cfg), lambda tmp: train_clip(cfg, tmp, show_progress), fresh)


def train_stats(folder: Path) -> dict:
    p = Path(folder) / "train_stats.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# ---------------------------------------------------------------------------- the thesis, measured

@torch.no_grad()
def prompt_gap(pipeline: str | Path, pairs, n_per_prompt: int = 16, num_steps: int = 10,
               guidance_scale: float = 3.0, seed: int = 0) -> dict:
    """Gold score of the base model's images for plain vs engineered prompts (same noise for both):
    {"plain", "engineered", "plain_success", "engineered_success"} means over pairs × n_per_prompt."""
    from image_rlhf.pipeline import encode_prompts, load_pipeline, negative_embeds
    from image_rlhf.sampling import decode_latents, sample_trajectories
    from image_rlhf.world import gold_details

    parts = load_pipeline(pipeline)
    neg = negative_embeds(parts)
    res = {}
    for name, fn in (("plain", plain_prompt), ("engineered", engineered_prompt)):
        prompts = [fn(c, s) for c, s in pairs for _ in range(n_per_prompt)]
        traj = sample_trajectories(parts.unet, parts.scheduler, encode_prompts(parts, prompts), neg, num_steps,
                                   guidance_scale, 1.0, generator=torch.Generator().manual_seed(seed))
        d = gold_details([plain_prompt(c, s) for c, s in pairs for _ in range(n_per_prompt)],
                         decode_latents(None, traj.final_latents))
        res[name], res[f"{name}_success"] = d["score"].mean().item(), d["success"].float().mean().item()
        res[f"{name}_quality"] = d["quality"].mean().item()
    return res
