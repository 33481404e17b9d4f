"""Image rewards: anything callable as `score(prompts: list[str], images) -> Tensor[B]`.

images: float tensor (B, 3, H, W) in [0, 1] (what `sampling.decode_latents` returns). Built-ins
follow DDPO (Black et al. 2023, §6.1): JPEG (in)compressibility, the file size in kB of the image
saved as JPEG at quality 95 (ddpo-pytorch `rewards.py`: kB = bytes / 1000), negated for
compressibility; plus mean brightness, a batched sanity reward. `load_reward(spec)` turns a
config string into a reward; a user function's output is checked, so a NaN reward stops the run
with the spec and the index instead of turning the policy's gradients into NaN.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import torch

from align.reward import as_scores

JPEG_QUALITY = 95  # DDPO paper / ddpo-pytorch


def _check_images(images) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {shape}")
    return images


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """(B,) size in kB (1000 bytes) of each image encoded as JPEG. PIL has no batched encoder, so
    this is a per-image loop (DDPO does the same); the tensor -> uint8 conversion is batched."""
    from PIL import Image

    pixels = (_check_images(images).detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    sizes = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(prompts, images: torch.Tensor) -> torch.Tensor:
    """−(JPEG kB): higher for images that compress well (flat, smooth)."""
    return -jpeg_size_kb(images).to(images.device)


def jpeg_incompressibility(prompts, images: torch.Tensor) -> torch.Tensor:
    """+(JPEG kB): higher for images that compress badly (detailed, noisy)."""
    return jpeg_size_kb(images).to(images.device)


def brightness(prompts, images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value in [0, 1] per image (batched)."""
    return _check_images(images).float().mean(dim=(1, 2, 3))


BUILTINS: dict[str, Callable] = {
    "jpeg": jpeg_compressibility,
    "compressibility": jpeg_compressibility,
    "jpeg_compressibility": jpeg_compressibility,
    "incompressibility": jpeg_incompressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "brightness": brightness,
}


class CheckedReward:
    """Wraps a user reward: the output must be a tensor or a list of B finite numbers; it comes
    back as a float32 tensor (B,) on `device`. Anything else is a ValueError naming the spec."""

    def __init__(self, fn: Callable, spec: str, device="cpu"):
        self.fn, self.spec, self.device = fn, spec, torch.device(device)
        _check_signature(fn, spec)

    def __call__(self, prompts, images) -> torch.Tensor:
        n = len(prompts)
        scores = as_scores(self.fn(list(prompts), images), n, self.spec, "images")
        bad = (~torch.isfinite(scores)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"reward {self.spec!r}: non-finite score {scores[i].item()} at index {i} "
                             f"(prompt {prompts[i]!r}); {len(bad)} of {n} scores are NaN/inf")
        return scores.to(self.device)

    def __repr__(self):
        return f"CheckedReward({self.spec!r})"


def _check_signature(fn: Callable, spec: str) -> None:
    """A user reward is called as fn(prompts, images): refuse one that cannot be, or that names its first parameter
    as images (ddpo-pytorch's reward_fn(images, prompts, metadata) -> (rewards, info)), before the first epoch
    fails with a TypeError from inside it, or with a list of prompts where it expected images."""
    import inspect
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: called as is
        return
    try:
        sig.bind(None, None)
    except TypeError as e:
        raise ValueError(f"reward {spec!r}: is called as fn(prompts, images) but has the signature {sig} ({e}); "
                         "a ddpo-pytorch reward_fn(images, prompts, metadata) needs a wrapper: "
                         "lambda prompts, images: reward_fn(images, prompts, {})[0]") from None
    first = next(iter(sig.parameters), "")
    if first.lower() in ("images", "image", "imgs", "img", "pixels"):
        raise ValueError(f"reward {spec!r}: is called as fn(prompts, images), but its first parameter is {first!r} "
                         f"(signature {sig}); swap them (ddpo-pytorch passes images first, align prompts first)")


def load_reward(spec: str, device="cpu") -> Callable:
    """A reward from a string:

    - "jpeg" / "compressibility", "incompressibility", "brightness": the built-ins above;
    - a folder written by `ClipReward.save`, or an `align image rm` run folder (its final `model/`):
      that model, in eval mode with gradients off, on `device`;
    - "pickscore", "aesthetic", "pickscore:MODEL[,PROCESSOR]", "aesthetic:CLIP,MLP" or a transformers CLIP
      folder: the published PickScore / LAION aesthetic predictor (`image_rlhf.hf_rewards`); "hpsv2",
      "hpsv2.1", "hpsv2:CKPT[,CLIP]": HPSv2 (`image_rlhf.hps_reward`);
    - "module:function": an importable `function(prompts, images)`, wrapped in `CheckedReward`.
    """
    spec = str(spec)
    if spec in BUILTINS:
        return BUILTINS[spec]
    from image_rlhf.hf_rewards import load_hf_reward
    hf = load_hf_reward(spec, device)
    if hf is not None:
        return hf
    if Path(spec).is_dir():
        from image_rlhf.clip_reward import META_FILE, ClipReward

        folder = Path(spec)
        if not (folder / META_FILE).is_file() and (folder / "model" / META_FILE).is_file():
            folder = folder / "model"  # an `align image rm` run folder: the model it finished with
        if not (folder / META_FILE).is_file():
            raise ValueError(f"reward {spec!r}: folder has no {META_FILE} nor a CLIP config.json (neither a ClipReward.save "
                             f"folder, a transformers CLIPModel folder, "
                             f"nor an `align image rm` run folder with model/{META_FILE})")
        reward = ClipReward.load(folder, device=device).eval()
        return reward.requires_grad_(False)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward {spec!r}: expected one of {sorted(BUILTINS)}, pickscore, aesthetic, hpsv2, a ClipReward "
                         f"or transformers CLIP folder, or module:function")
    from align.config import import_function
    return CheckedReward(import_function(spec, "reward"), spec, device)


__all__ = ["jpeg_size_kb", "jpeg_compressibility", "jpeg_incompressibility", "brightness", "BUILTINS",
           "CheckedReward", "load_reward"]


def score_batch(reward_fn, prompts, images, spec) -> tuple[torch.Tensor, ValueError | None]:
    """One batch's (B,) float32 scores on the CPU, for a training loop. A ValueError of the reward (a checked
    reward refusing NaN) becomes NaN scores plus the error, so that every process learns of it at the gather
    instead of hanging there."""
    try:
        out = torch.as_tensor(reward_fn(list(prompts), images.float())).detach().float().flatten().cpu()
    except ValueError as e:
        return torch.full((len(prompts),), float("nan")), e
    if out.numel() != len(prompts):
        return torch.full((len(prompts),), float("nan")), ValueError(
            f"reward {spec!r} returned {out.numel()} scores for {len(prompts)} images")
    return out, None
