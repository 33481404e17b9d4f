"""Image reward model: an open_clip CLIP fine-tuned PickScore-style on ranked images (Bradley-Terry).

Data: preferences JSONL with image paths relative to the file ({"prompt", "chosen", "rejected"}
or {"prompt", "images", "ranking"}; see align.data.jsonl). All pairs of a prompt go in one batch
and each image is scored once (align.reward.PairBatch). PickScore (Kirstain et al. 2023, §4)
takes a two-way softmax over the pair's scores s·cos(text, image); its probability of the winner
is σ(r_w − r_l), so the loss is align.reward.pairwise_loss with ties as 0.5/0.5 soft labels. The
temperature s = exp(logit_scale) is learned (own learning rate) and clamped at 100 as in CLIP.
mode="aesthetic" trains the MLP head on image features the same pairwise way (towers frozen by
default, as LAION's predictor sits on a frozen CLIP; ClipReward.aesthetic_loss is the MSE form).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from align.data import DataError, batch_groups, hf_spec, load_preferences, read_jsonl
from align.data.hf_images import load_hf_image_preferences
from align.reward import evaluate_pairs, held_out_table, pair_schedule, split_summary
from align.session import load_optimizer_state, rng_state, set_rng_state, start_run, train_reward_model
from image_rlhf.clip_reward import ClipReward

log = logging.getLogger(__name__)


@dataclass
class ImageRMConfig:
    clip: str = "tiny-clip"
    """Starting CLIP: open_clip model name, model-config .json, built-in (tiny-clip) or saved folder."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag or weights file for a model name (e.g. laion2b_s32b_b79k; tags need the hub)."""
    mode: str = "pickscore"
    """pickscore: s·⟨text, image⟩; aesthetic: MLP head on the image embedding (prompt ignored)."""
    data: str = ""
    """Preferences JSONL (image paths relative to the file), or hf:NAME[:SPLIT], a `datasets` dataset (hub id or
    local folder) in Pick-a-Pic's layout (caption, jpg_0, jpg_1, label_0, label_1) or prompt/chosen/rejected."""
    eval_data: str = ""
    """Held-out preferences; empty = split eval_fraction of the prompts off `data`."""
    hf_limit: int = 0
    """Read at most this many rows of an hf: dataset (0 = all)."""
    allow_duplicates: bool = False
    """A record repeated in the data file is an error naming both lines; true: drop the repeats (logged)."""
    out: str = ""
    epochs: float = 1.0
    max_pairs_per_batch: int = 64
    """Pairs per optimiser step and process; whole prompts are never split across batches."""
    lr: float = 3e-6
    """PickScore fine-tunes CLIP-H with 3e-6; a tiny CLIP trained from scratch wants ~1e-3."""
    logit_scale_lr: float = 1e-3
    """Learning rate of the temperature logit_scale (pickscore mode)."""
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    image_size: int = 0
    """Override the CLIP input size (0 = the model's; pretrained position embeddings are resized)."""
    freeze_towers: Optional[bool] = None
    """Freeze the CLIP towers (None = frozen for aesthetic, trained for pickscore). A frozen image tower runs in eval
    mode, once per image: its embeddings are kept for every epoch and held-out evaluation."""
    head_hidden: list[int] = field(default_factory=lambda: [1024, 128, 64, 16])
    """Hidden sizes of the aesthetic MLP head (LAION's predictor)."""
    cache_images: bool = True
    """Keep decoded images (uint8, model size) in memory; all are decoded once up front either way."""
    seed: int = 0
    mixed_precision: str = "no"
    save_every: int = 0
    """Checkpoint every N steps (0 = end of each epoch)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints, newest first (TRL's save_total_limit; 0 = all). The newest is what
    --resume continues from; an older one is its fallback where the newest is damaged."""
    log_every: int = 10


# ---------------------------------------------------------------------------- images

def decode_image(path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8: PIL -> RGB -> shortest side to size (bicubic) -> centre crop, as open_clip.
    16-bit greyscale (PIL modes I;16*, I) is scaled to 8 bits first: PIL's convert clips it to white.
    Transparency (RGBA, LA, PA, a palette or RGB with a transparent colour) is composited onto white, as
    transformers' CLIPImageProcessor (PickScore's) does and as a viewer shows it: PIL's convert("RGB") would drop
    alpha and keep whatever colour the transparent pixels store (often black). An EXIF orientation (a phone's JPEG) is
    applied, as a viewer, transformers' load_image and `datasets.Image` do: without it the image is read on its side."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.getexif().get(0x0112, 1) != 1:  # Orientation
            im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        elif im.mode == "F":  # 32-bit float: [0, 1] (as most tools write it) or [0, 255]; PIL's convert clips to black
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((a * (255 if np.nanmax(a) <= 1 else 1)).round().clip(0, 255).astype(np.uint8))
        if "A" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
    (th, tw), (w, h) = size, im.size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - th) // 2, (nw - tw) // 2
    im = im.crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _candidate_fields(jsonl_path) -> dict[int, list[str]]:
    """line -> the field name of each candidate ("chosen", "images[2]", ...), for error messages."""
    fields = {}
    for line, obj in read_jsonl(jsonl_path):
        if "chosen" in obj:
            fields[line] = ["chosen", "rejected"]
        else:
            key = "images" if "images" in obj else "completions"
            fields[line] = [f"{key}[{i}]" for i in range(len(obj.get(key) or []))]
    return fields


class ImageStore:
    """Candidate image paths -> a float batch (N, 3, H, W) in [0, 1] at the model's size.

    `add` decodes every image once, up front, so a missing, corrupt or unconvertible file fails
    before training with DataError "prefs.jsonl:LINE: field 'images[1]': ..." rather than mid-run."""

    def __init__(self, size: tuple[int, int], cache: bool = True):
        self.size, self.cache = tuple(size), cache
        self.images: dict[str, torch.Tensor] = {}
        self.where: dict[str, tuple[str, int, str]] = {}  # path -> (jsonl, line, field)
        self.hf: list = []  # align.data.hf_images.HFImages of `hf:` data: key -> its dataset cell

    def add(self, groups, hf=None) -> "ImageStore":
        """`hf`: the HFImages of groups read by load_hf_image_preferences (candidates are its keys, not paths)."""
        if hf is not None:
            self.hf.append(hf)
        fields: dict[str, dict[int, list[str]]] = {}
        for g in groups:
            jsonl, _, line = (g.source or ":0").rpartition(":")
            if hf is None and jsonl not in fields:
                fields[jsonl] = _candidate_fields(jsonl) if jsonl else {}
            names = fields.get(jsonl, {}).get(int(line), [])
            for i, path in enumerate(g.candidates):
                if path not in self.where:
                    self.where[path] = hf.where(path) if hf is not None else \
                        (jsonl or None, int(line) or None, names[i] if i < len(names) else None)
                    image = self._decode(path)
                    if self.cache:
                        self.images[path] = image
        return self

    def _decode(self, path) -> torch.Tensor:
        try:
            source = next((h for h in self.hf if path in h), None)
            return decode_image(source.open(path) if source is not None else path, self.size)
        except Exception as e:  # missing, truncated, not an image, a mode PIL cannot make RGB
            jsonl, line, fld = self.where.get(path, (None, None, None))
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", path=jsonl, line=line,
                            field=fld) from None

    def load(self, paths) -> torch.Tensor:  # (N, 3, H, W) float32 in [0, 1]
        return torch.stack([self.images[p] if p in self.images else self._decode(p) for p in paths]).float() / 255


def load_image_groups(spec: str, limit: int = 0, allow_duplicates: bool = False):
    """(groups, None) from a preferences JSONL; (groups, HFImages) from `hf:NAME[:SPLIT]` (Pick-a-Pic layout)."""
    if hf_spec(spec):
        return load_hf_image_preferences(*hf_spec(spec), limit=limit or None)
    return load_preferences(spec, candidates="path", allow_duplicates=allow_duplicates), None


class ImageScorer:
    """score(prompts, image paths) -> (N,) with a ClipReward (or its DDP wrapper).

    `features`, where the image tower is frozen (and so in eval mode, `_train_mode`): a dict, shared by the training
    and the held-out scorer, that keeps each image's embedding by path, so the tower runs once per image rather than
    once per epoch and evaluation (LAION's aesthetic predictor is likewise trained on precomputed embeddings)."""

    def __init__(self, reward, store: ImageStore, device, autocast=None, features: dict | None = None):
        self.reward, self.store, self.device, self.autocast = reward, store, device, autocast
        self.features = features

    def __call__(self, prompts, paths) -> torch.Tensor:
        with self.autocast() if self.autocast else torch.autocast("cpu", enabled=False):
            if self.features is None:
                return self.reward(list(prompts), self.store.load(paths).to(self.device)).float()
            new = [p for p in dict.fromkeys(paths) if p not in self.features]
            if new:  # the frozen tower, outside the DDP wrapper (it has nothing to synchronise)
                with torch.no_grad():
                    emb = getattr(self.reward, "module", self.reward).image_features(
                        self.store.load(new).to(self.device))                              # (n_new, D)
                self.features.update(zip(new, emb))
            emb = torch.stack([self.features[p] for p in paths])                             # (N, D)
            return self.reward(list(prompts), image_features=emb).float()


def split_by_prompt(groups, fraction: float, seed: int):
    """(train, held): a seeded `fraction` of the distinct prompts is held out, with all their groups."""
    prompts = sorted({g.prompt for g in groups})
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held_prompts = {prompts[i] for i in perm[:int(len(prompts) * fraction)]}
    return [g for g in groups if g.prompt not in held_prompts], [g for g in groups if g.prompt in held_prompts]


# ---------------------------------------------------------------------------- run

def _set_trainable(reward: ClipReward, cfg: ImageRMConfig) -> list[dict]:
    """requires_grad per mode and the optimiser's parameter groups (logit_scale on its own lr)."""
    freeze = cfg.mode == "aesthetic" if cfg.freeze_towers is None else cfg.freeze_towers
    reward.model.requires_grad_(False)
    if cfg.mode == "pickscore":
        reward.model.requires_grad_(not freeze)
        reward.model.logit_scale.requires_grad_(True)
    elif not freeze:  # aesthetic: the text tower and logit_scale are unused, never trained
        reward.model.visual.requires_grad_(True)
    scale = reward.model.logit_scale
    rest = [p for p in reward.parameters() if p.requires_grad and p is not scale]
    groups = [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay}] if rest else []
    if scale.requires_grad:
        groups.append({"params": [scale], "lr": cfg.logit_scale_lr, "weight_decay": 0.0})
    return groups


def _frozen_tower(reward: ClipReward) -> bool:
    return not any(p.requires_grad for p in reward.model.visual.parameters())


def _train_mode(model, reward: ClipReward) -> None:
    """Train mode, except a frozen image tower, which is a feature extractor: in eval mode a BatchNorm tower (RN50)
    keeps its running statistics and a dropout tower gives the same embedding each time (ImageScorer keeps them)."""
    model.train()
    if _frozen_tower(reward):
        reward.model.visual.eval()


def run_image_rm(cfg: ImageRMConfig, resume: bool = False) -> Path:
    for name in ("clip", "data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"image rm: --{name} is required")
    if cfg.log_every < 1 or cfg.save_every < 0:
        raise ValueError(f"image rm: log_every must be >= 1 and save_every >= 0, got {cfg.log_every} and "
                         f"{cfg.save_every}")
    if cfg.mode not in ("pickscore", "aesthetic"):
        raise ValueError(f"image rm: mode must be 'pickscore' or 'aesthetic', got {cfg.mode!r}")
    if not cfg.eval_data and not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"image rm: eval_fraction must be in [0, 1) (the share of prompts held out), "
                         f"got {cfg.eval_fraction}")
    if not cfg.epochs > 0:
        raise ValueError(f"image rm: epochs must be > 0 (a fraction trains part of an epoch), got {cfg.epochs}")
    if cfg.max_pairs_per_batch < 1:
        raise ValueError(f"image rm: max_pairs_per_batch must be >= 1, got {cfg.max_pairs_per_batch}")
    groups, hf = load_image_groups(cfg.data, cfg.hf_limit, cfg.allow_duplicates)  # bad data fails before the run folder
    if cfg.eval_data:
        train, (held, hf_held) = groups, load_image_groups(cfg.eval_data, cfg.hf_limit, cfg.allow_duplicates)
    else:  # split by prompt, so no held-out prompt was seen in training
        (train, held), hf_held = split_by_prompt(groups, cfg.eval_fraction, cfg.seed), hf
    if not train:
        raise ValueError(f"image rm: no training pairs left in {cfg.data} after holding out "
                         f"{len({g.prompt for g in held})} prompts (eval_fraction={cfg.eval_fraction})")
    run = start_run(cfg, cfg.out, resume, cfg.mixed_precision, cfg.seed,
                    step_batch=("max_pairs_per_batch", cfg.max_pairs_per_batch))
    acc = run.accelerator
    if run.resume_dir:
        reward = ClipReward.load(run.resume_dir / "model", device=acc.device)
    else:
        reward = ClipReward.create(cfg.clip, cfg.pretrained, mode=cfg.mode, image_size=cfg.image_size or None,
                                   head_hidden=tuple(cfg.head_hidden), device=acc.device)
    store = ImageStore(reward.image_size, cache=cfg.cache_images).add(train, hf).add(held, hf_held)
    optimizer = torch.optim.AdamW(_set_trainable(reward, cfg))
    model, optimizer = acc.prepare(reward, optimizer)
    schedule = pair_schedule(train, cfg.max_pairs_per_batch * acc.num_processes, cfg.epochs, cfg.seed)
    total_steps = len(schedule)
    if run.resume_dir:
        load_optimizer_state(optimizer, run.resume_dir / "optimizer.pt")  # this config's lr, the checkpoint's moments
        set_rng_state(torch.load(run.resume_dir / "rng.pt", weights_only=False))
    log.info("image rm (%s, %s): %s, %d images; %d steps", cfg.mode, cfg.clip, split_summary(train, held),
             len(store.where), total_steps)
    features = {} if _frozen_tower(reward) else None  # image path -> embedding, shared by both scorers
    score_fn = ImageScorer(model, store, acc.device, acc.autocast, features)
    eval_score_fn = ImageScorer(reward, store, acc.device, acc.autocast, features)

    def write(ckpt_dir: Path):
        reward.save(ckpt_dir / "model")
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(rng_state(), ckpt_dir / "rng.pt")

    evals = {}  # step -> held-out metrics: those of the last step are the final model's, which _finish reports

    def held_out(step: int) -> dict:
        model.eval()
        evals[step] = evaluate_pairs(eval_score_fn, batch_groups(held, cfg.max_pairs_per_batch))
        _train_mode(model, reward)
        return {f"rm/eval_{k}": v for k, v in evals[step].items() if k != "n_pairs"}

    _train_mode(model, reward)
    train_reward_model(run, schedule, score_fn, model, optimizer, cfg, write, held_out if held else None, "image rm",
                       after_step=reward.clamp_logit_scale,  # 0 ≤ logit_scale ≤ ln 100, as open_clip's training loop
                       extra_log=lambda: {"rm/logit_scale": reward.logit_scale} if cfg.mode == "pickscore" else {})
    return _finish(run, cfg, reward, train, held, eval_score_fn, evals.get(total_steps))


def _finish(run, cfg, reward: ClipReward, train, held, score_fn, final: dict | None = None) -> Path:
    """`final`: the held-out metrics of the last step, where the loop took them (a resumed finished run has none)."""
    out = Path(cfg.out)
    if held and final is None:
        reward.eval()
        final = evaluate_pairs(score_fn, batch_groups(held, cfg.max_pairs_per_batch))
    final = final or {}
    if not held:
        log.warning("image rm: no held-out pairs (eval_fraction=%s); nothing to report", cfg.eval_fraction)
    if run.is_main:
        reward.save(out / "model", extra={"held_out": final})
    table = held_out_table(final, run.logger.history, None if cfg.eval_data else cfg.eval_fraction)
    scale = f" Learned logit scale s = {reward.logit_scale:.2f}." if cfg.mode == "pickscore" else ""
    body = (f"Trained a CLIP reward ({cfg.mode}) from `{cfg.clip}` on `{cfg.data}`: {split_summary(train, held)} "
            f"(ties get half credit in accuracy).{scale}\n\n{table}\n\n"
            f"The model is in `{out / 'model'}` (open_clip local-dir layout + align_reward.json); load it with "
            f"`ClipReward.load(path)` or as a DDPO reward with `load_reward(path)`.")
    run.finish("Image reward model report", [("Summary", body)],
               ["rm/loss", "rm/accuracy", "rm/eval_accuracy", "rm/eval_loss", "rm/logit_scale"], xlabel="optimiser step")
    return out / "model"
