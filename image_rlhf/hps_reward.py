"""HPSv2 (Wu et al. 2023, Human Preference Score v2) as a reward: an open_clip ViT-H-14 fine-tuned on HPD v2.

    r(p, x) = ⟨E_T(p)/‖E_T(p)‖, E_I(x)/‖E_I(x)‖⟩          (no logit scale: HPSv2's own `score`)

The checkpoint is the whole open_clip model's state dict under "state_dict" (`xswu/HPSv2` on the hub:
HPS_v2_compressed.pt for v2.0, HPS_v2.1_compressed.pt for v2.1), loaded into the open_clip architecture
it was trained from (ViT-H-14), as the `hpsv2` package does; open_clip's OpenAI mean/std and 224 px input.
Spec strings, accepted wherever a reward or judge is named (`load_reward`, `--reward`, `--judge`):

    hpsv2                   xswu/HPSv2 HPS_v2_compressed.pt on ViT-H-14
    hpsv2.1                 xswu/HPSv2 HPS_v2.1_compressed.pt on ViT-H-14
    hpsv2:CKPT[,CLIP]       a checkpoint file (.pt/.pth/.bin/.safetensors; {"state_dict": ...} or the state
                            dict itself, DDP's "module." prefixes dropped) or REPO_ID/FILENAME on the hub, on
                            CLIP = an open_clip model name, model-config .json or built-in (default ViT-H-14)

Images are DDPO's decoder output, float (B, 3, H, W) in [0, 1], quantised to 8 bits (HPSv2 saw PIL images),
then resized on the tensor, batched (`ClipReward.preprocess`: shortest side to 224, bicubic, centre crop). On
square images — every Stable Diffusion sample at its default size — that is a plain resize to 224 × 224, the
same as `hpsv2`'s PIL transform; on other aspect ratios align centre-crops as open_clip's default transform
does. On CUDA the towers run under bf16 autocast (`hpsv2` uses fp16 autocast); scores come back float32.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from image_rlhf.hf_rewards import fetch_file, quantise_8bit, read_state_dict

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
HPS_CLIP = "ViT-H-14"


def is_hps_spec(spec: str) -> bool:
    return str(spec).partition(":")[0] in HPS_FILES


class HPSv2Reward(nn.Module):
    """`score(prompts, images) -> (B,)`: the cosine of a ClipReward's towers (ClipReward.similarity)."""

    def __init__(self, clip, spec: str = ""):
        super().__init__()
        self.clip, self.spec = clip, spec

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @torch.no_grad()
    def score(self, prompts, images: torch.Tensor) -> torch.Tensor:
        x = quantise_8bit(images, self.device, self.spec)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.clip.similarity(prompts, x).float()

    def forward(self, prompts, images: torch.Tensor) -> torch.Tensor:
        return self.score(prompts, images)

    def __repr__(self):
        return f"HPSv2Reward({self.spec!r})"


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _read_state(spec: str, path: Path) -> dict:
    state = read_state_dict(spec, path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"reward {spec!r}: {path}: expected a state dict of tensors (or one under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_hps_reward(spec: str, device="cpu") -> HPSv2Reward | None:
    """The HPSv2 reward named by `spec` (module docstring), or None when `spec` names none."""
    from image_rlhf.clip_reward import ClipReward

    spec = str(spec)
    kind, sep, args = spec.partition(":")
    if kind not in HPS_FILES:
        return None
    if not sep:
        ckpt, clip_name = f"{HPS_REPO}/{HPS_FILES[kind]}", HPS_CLIP
    else:
        parts = [a.strip() for a in args.split(",")]
        if kind != "hpsv2" or not parts[0] or len(parts) > 2:
            raise ValueError(f"reward {spec!r}: expected hpsv2, hpsv2.1 or hpsv2:CHECKPOINT[,OPEN_CLIP_MODEL]")
        ckpt, clip_name = parts[0], parts[1] if len(parts) == 2 else HPS_CLIP
    path = fetch_file(spec, ckpt, "HPSv2 checkpoint")
    state = _read_state(spec, path)
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)  # open_clip warns "initialized randomly": true, until the checkpoint loads below
    try:
        clip = ClipReward.create(clip_name, pretrained=None)  # the architecture; every weight comes from the checkpoint
    finally:
        root.removeFilter(quiet)
    try:
        clip.model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"reward {spec!r}: {path}: not an open_clip {clip_name} state dict "
                         f"({first[0] if first else e}; {' '.join(first[1:2])[:300]})") from e
    return HPSv2Reward(clip.to(device).eval().requires_grad_(False), spec)


__all__ = ["HPSv2Reward", "load_hps_reward", "is_hps_spec", "HPS_REPO", "HPS_FILES", "HPS_CLIP"]
