"""Published image rewards on transformers' CLIP: PickScore and the LAION aesthetic predictor.

    pickscore: r(p, x) = s · ⟨E_T(p)/‖E_T(p)‖, E_I(x)/‖E_I(x)‖⟩, s = exp(logit_scale)
               (Kirstain et al. 2023: `yuvalkirstain/PickScore_v1`, a CLIP-H fine-tuned on Pick-a-Pic;
               the same formula scores any transformers `CLIPModel`, e.g. a plain CLIP as CLIPScore·s)
    aesthetic: r(x)    = MLP(E_I(x)/‖E_I(x)‖)
               (LAION aesthetic predictor v1 on OpenAI CLIP ViT-L/14, the reward of DDPO's aesthetic
               experiment, ddpo-pytorch's `aesthetic_score` and TRL's DDPO example; its MLP is linear:
               768 → 1024 → 128 → 64 → 16 → 1 with dropout and no activation)

These are the checkpoints users already have; `ClipReward` (clip_reward.py) is the one align trains.
Spec strings, accepted wherever a reward or judge is named (`load_reward`, `--reward`, `--judge`):

    pickscore                       yuvalkirstain/PickScore_v1 with the laion/CLIP-ViT-H-14 processor
    pickscore:MODEL[,PROCESSOR]     any CLIPModel folder or hub id; PROCESSOR defaults to MODEL
    aesthetic                       openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor's
                                    aesthetic-model.pth (TRL's copy of LAION's sac+logos+ava1-l14-linearMSE)
    aesthetic:CLIP,MLP              a CLIPModel folder or hub id + the MLP's state dict: a .pth/.safetensors
                                    file, or REPO_ID/FILENAME on the hub
    FOLDER                          a folder holding a transformers CLIP config.json = pickscore:FOLDER
    hpsv2, hpsv2.1, hpsv2:CKPT[,CLIP]   HPSv2 on open_clip (image_rlhf/hps_reward.py)

Images come in as DDPO's decoder output, float (B, 3, H, W) in [0, 1]. They are quantised to 8 bits (what
the published models were trained on: ddpo-pytorch and TRL hand them uint8), then resized and cropped as
the checkpoint's `CLIPImageProcessor` would (shortest side to `size`, bicubic; centre crop to
`crop_size`; mean/std), but batched on the tensor, on the model's device. On an image already at the crop
size this is the processor exactly; a resize differs from PIL's bicubic by interpolation detail only
(tests/test_hf_rewards.py bounds both). On CUDA the towers run in bf16 (fp32 elsewhere); scores come
back float32.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_rlhf.clip_reward import resize_center_crop

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's model card loads this processor
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_MLP = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
LAION_MLP_HIDDEN = (1024, 128, 64, 16)
LAION_MLP_DROPOUT = (0.2, 0.2, 0.1)


def _size(d, *keys):
    """A field of a transformers size dict (a dict or a SizeDict), None when absent."""
    for k in keys:
        v = d.get(k) if isinstance(d, dict) else getattr(d, k, None)
        if v is not None:
            return int(v)
    return None


def quantise_8bit(images: torch.Tensor, device, spec: str) -> torch.Tensor:
    """DDPO's float (B, 3, H, W) in [0, 1] on `device`, rounded to 8 bits: what the published rewards were
    trained on (PIL images; ddpo-pytorch and TRL hand them uint8)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {spec!r}: images must be a float tensor (B, 3, H, W) in [0, 1], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    return (images.detach().to(device, torch.float32).clamp(0, 1) * 255).round() / 255


class LaionAestheticMLP(nn.Module):
    """LAION's aesthetic MLP in its own layout (`layers.{0,2,4,6,7}`), so its state dict loads as is."""

    def __init__(self, dim: int = 768):
        super().__init__()
        h, p = LAION_MLP_HIDDEN, LAION_MLP_DROPOUT
        self.layers = nn.Sequential(nn.Linear(dim, h[0]), nn.Dropout(p[0]), nn.Linear(h[0], h[1]), nn.Dropout(p[1]),
                                    nn.Linear(h[1], h[2]), nn.Dropout(p[2]), nn.Linear(h[2], h[3]), nn.Linear(h[3], 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B,)
        return self.layers(emb).squeeze(-1)


class HFClipReward(nn.Module):
    """`score(prompts, images) -> (B,)` from a transformers `CLIPModel`: PickScore, or an aesthetic MLP."""

    def __init__(self, model, image_processor, tokenizer=None, mlp: LaionAestheticMLP | None = None, spec: str = ""):
        super().__init__()
        self.model, self.tokenizer, self.mlp, self.spec = model, tokenizer, mlp, spec
        ip = image_processor
        self.shortest_edge = _size(ip.size, "shortest_edge") if getattr(ip, "do_resize", True) else None
        if self.shortest_edge is None and getattr(ip, "do_resize", True):  # {"height", "width"}: resize to exactly that
            self.crop = (_size(ip.size, "height"), _size(ip.size, "width"))
            self.exact = True
        else:
            crop = ip.crop_size if getattr(ip, "do_center_crop", True) else None
            self.crop = (_size(crop, "height"), _size(crop, "width")) if crop is not None else None
            self.exact = False
        resample = int(getattr(ip, "resample", 3))
        self.mode = {2: "bilinear", 3: "bicubic"}.get(resample, "bicubic")
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = quantise_8bit(images, self.device, self.spec)
        if self.exact:
            x = F.interpolate(x, size=self.crop, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        elif self.shortest_edge is not None or self.crop is not None:
            x = resize_center_crop(x, self.shortest_edge, self.crop, self.mode)
        return (x - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, D), unit norm
        dtype = self.model.visual_projection.weight.dtype
        pooled = self.model.vision_model(pixel_values=self.preprocess(images).to(dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:  # (B, D), unit norm
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def score(self, prompts, images: torch.Tensor) -> torch.Tensor:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"reward {self.spec!r}: got {len(prompts)} prompts for {len(images)} images")
        img = self.image_features(images)
        if self.mlp is not None:
            return self.mlp(img.to(self.mlp.layers[0].weight.dtype)).float()
        uniq = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # each distinct prompt encoded once
        txt = self.text_features(list(uniq))[torch.tensor([uniq[p] for p in prompts], device=self.device)]
        return self.model.logit_scale.detach().float().exp() * (img * txt).sum(-1)

    def forward(self, prompts, images: torch.Tensor) -> torch.Tensor:
        return self.score(prompts, images)

    def __repr__(self):
        return f"HFClipReward({self.spec!r})"


def is_hf_clip_folder(path) -> bool:
    """A folder whose config.json is a transformers CLIP model (model_type "clip")."""
    import json
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def is_hf_spec(spec: str) -> bool:
    """`pickscore` / `aesthetic` / `hpsv2` / `hpsv2.1`, with or without ':args' (not a module:function spec)."""
    from image_rlhf.hps_reward import is_hps_spec
    return str(spec).partition(":")[0] in ("pickscore", "aesthetic") or is_hps_spec(spec)


def _hub_error(spec: str, what: str, e: Exception) -> ValueError:
    return ValueError(f"reward {spec!r}: cannot load {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                      f" (a local copy, or a hub id with the hub reachable)")


def fetch_file(spec: str, source: str, what: str) -> Path:
    """`source` if it is a file, else REPO_ID/FILENAME downloaded from the hub; errors name `what`."""
    path = Path(source)
    if path.is_file():
        return path
    repo, sep, filename = source.rpartition("/")
    if not sep or "/" not in repo:
        raise ValueError(f"reward {spec!r}: {what} {source!r} is neither a file nor REPO_ID/FILENAME")
    try:
        from huggingface_hub import hf_hub_download

        from align.runner import offline_unless_hub_reachable
        offline_unless_hub_reachable()  # unreachable: the local cache only, at once, not after a minute of retries
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # offline, missing repo or file: one message that names them
        raise _hub_error(spec, f"{what} {filename!r} from {repo!r}", e) from e


def read_state_dict(spec: str, path: Path):
    """A .safetensors file or a torch pickle (weights only); the dict under "state_dict" when there is one."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"reward {spec!r}: {path}: not a readable state dict ({type(e).__name__}: {e})") from e
    return state["state_dict"] if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) else state


def _load_mlp(spec: str, source: str, dim: int) -> LaionAestheticMLP:
    path = fetch_file(spec, source, "aesthetic MLP")
    state = read_state_dict(spec, path)
    mlp = LaionAestheticMLP(dim)
    try:
        mlp.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"reward {spec!r}: {path}: not a LAION aesthetic MLP on {dim}-d CLIP image embeddings "
                         f"(layers.0 .. layers.7; {first[0] if first else e})") from e
    return mlp


def load_hf_reward(spec: str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module | None:
    """The reward named by `spec` (module docstring; `hpsv2...`: image_rlhf.hps_reward), or None when `spec`
    names none of these."""
    from image_rlhf.hps_reward import load_hps_reward
    spec = str(spec)
    hps = load_hps_reward(spec, device)
    if hps is not None:
        return hps
    kind, sep, args = spec.partition(":")
    if kind == "pickscore" and not sep:
        model_src, proc_src, mlp_src = PICKSCORE_MODEL, PICKSCORE_PROCESSOR, None
    elif kind == "aesthetic" and not sep:
        model_src, proc_src, mlp_src = AESTHETIC_CLIP, AESTHETIC_CLIP, AESTHETIC_MLP
    elif kind in ("pickscore", "aesthetic") and sep:
        parts = [a.strip() for a in args.split(",")]
        if not parts[0] or len(parts) > 2 or (kind == "aesthetic" and len(parts) != 2):
            form = "pickscore:MODEL[,PROCESSOR]" if kind == "pickscore" else "aesthetic:CLIP,MLP"
            raise ValueError(f"reward {spec!r}: expected {form}")
        model_src = parts[0]
        proc_src, mlp_src = (parts[-1] if kind == "pickscore" else parts[0]), (parts[1] if kind == "aesthetic" else None)
    elif Path(spec).is_dir() and is_hf_clip_folder(spec):
        model_src = proc_src = spec
        mlp_src = None
    else:
        return None
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if Path(model_src).is_dir() and not is_hf_clip_folder(model_src):
        raise ValueError(f"reward {spec!r}: {model_src}: no transformers CLIP config.json (model_type 'clip') there")
    if not (Path(model_src).is_dir() and Path(proc_src).is_dir()):
        from align.runner import offline_unless_hub_reachable
        offline_unless_hub_reachable()  # hub ids: unreachable, the local cache only, at once
    try:
        model = CLIPModel.from_pretrained(model_src, dtype=dtype)
    except Exception as e:
        raise _hub_error(spec, f"CLIPModel {model_src!r}", e) from e
    try:
        processor = CLIPImageProcessor.from_pretrained(proc_src)
        tokenizer = None if mlp_src else AutoTokenizer.from_pretrained(proc_src)
    except Exception as e:
        raise _hub_error(spec, f"the image processor / tokenizer of {proc_src!r}", e) from e
    mlp = _load_mlp(spec, mlp_src, model.config.projection_dim).to(dtype) if mlp_src else None
    reward = HFClipReward(model, processor, tokenizer, mlp, spec)
    return reward.to(device).eval().requires_grad_(False)


__all__ = ["HFClipReward", "LaionAestheticMLP", "load_hf_reward", "is_hf_clip_folder", "is_hf_spec",
           "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "AESTHETIC_CLIP", "AESTHETIC_MLP"]
