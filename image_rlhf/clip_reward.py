"""CLIP-based learned reward on open_clip: PickScore or an aesthetic MLP head.

    pickscore: r(p, x) = s · ⟨E_T(p)/‖E_T(p)‖, E_I(x)/‖E_I(x)‖⟩,   s = exp(logit_scale) ≤ 100
    aesthetic: r(x)    = MLP(E_I(x)/‖E_I(x)‖)

PickScore (Kirstain et al. 2023, §4) fine-tunes CLIP with a two-way softmax over the scores of a
pair's two images: softmax(r_w, r_l)_w = σ(r_w − r_l), the Bradley-Terry probability, so the
trainer (image_rlhf/rm.py) reuses align.reward.pairwise_loss; the learned temperature is CLIP's own
logit_scale, clamped at ln 100 as in CLIP. The aesthetic head follows the LAION aesthetic predictor
(Schuhmann 2022): an MLP on the normalised image embedding, regressed on scalar ratings with MSE.

Images come in as float tensors (B, 3, H, W) in [0, 1], the DDPO decoder's output, and are
resized and normalised on the tensor (F.interpolate, batched, differentiable) as open_clip's
PIL preprocess does: shortest side to the model's size, centre crop, (x − mean) / std.

A saved folder is an open_clip "local-dir" (open_clip_config.json + open_clip_model.safetensors,
so `open_clip.create_model("local-dir:DIR")` loads the towers by itself) plus align_reward.json
(mode, name, logit scale, head sizes) and aesthetic_head.safetensors in aesthetic mode.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP (Radford et al. 2021, §2.5) clips the temperature at 100
META_FILE = "align_reward.json"

# Built-in configs that need no hub. vocab_size stays 49408 so open_clip's shipped BPE tokenizer
# works and <|endoftext|> (49407) stays the largest id, which the text tower pools at; the token
# embedding (49408 × 32) is most of tiny-clip's ~1.7M parameters.
TINY_CONFIGS = {
    "tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0},
    },
}


def _register_config(name: str, cfg: dict) -> None:
    """Write `cfg` as NAME.json to a per-user temp folder and register it with open_clip."""
    import open_clip

    if open_clip.get_model_config(name) == cfg:
        return
    folder = Path(tempfile.gettempdir()) / f"align-open-clip-configs-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, folder / f"{name}.json")  # atomic: a concurrent process reads old or new, never half
    open_clip.add_model_config(folder / f"{name}.json")


def resize_center_crop(x: torch.Tensor, shortest_edge: int | None, crop: tuple[int, int] | None,
                       mode: str = "bicubic") -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, *crop), batched on the tensor as CLIP preprocessors do on PIL images:
    shortest side to `shortest_edge` (the long side scaled and truncated, as torchvision's Resize and
    transformers' `get_resize_output_image_size`), then the centre crop (top = (H' − h) // 2, as transformers').
    None skips that step; a crop larger than the resized image scales it up to fit (PIL pipelines would pad).
    Antialiased; clamped to [0, 1], as PIL's uint8 output is after a bicubic overshoot."""
    h, w = x.shape[-2:]
    nh, nw = h, w
    if shortest_edge is not None:
        nh, nw = (shortest_edge, int(shortest_edge * w / h)) if h <= w else (int(shortest_edge * h / w), shortest_edge)
    th, tw = crop if crop is not None else (nh, nw)
    if nh < th or nw < tw:
        s = max(th / nh, tw / nw)
        nh, nw = max(th, round(nh * s)), max(tw, round(nw * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[..., top:top + th, left:left + tw]


class AestheticHead(nn.Module):
    """LAION aesthetic predictor shape (768 → 1024 → 128 → 64 → 16 → 1 with dropout) on the
    normalised image embedding. LAION's MLP has no nonlinearity (so it is linear); we put a GELU
    between layers so that the hidden sizes mean something."""

    def __init__(self, dim: int, hidden=(1024, 128, 64, 16), dropout: float = 0.1):
        super().__init__()
        layers, d = [], dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        self.mlp = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B,)
        return self.mlp(image_emb).squeeze(-1)


class ClipReward(nn.Module):
    """r = ClipReward(...)(prompts, images) -> (B,): the reward protocol of DDPO and the RM trainer."""

    def __init__(self, model, tokenizer, model_cfg: dict, mode: str = "pickscore", name: str = "",
                 pretrained: str | None = None, head_hidden=(1024, 128, 64, 16)):
        super().__init__()
        import open_clip

        if mode not in ("pickscore", "aesthetic"):
            raise ValueError(f"mode must be 'pickscore' or 'aesthetic', got {mode!r}")
        self.model, self.tokenizer, self.model_cfg = model, tokenizer, copy.deepcopy(model_cfg)
        self.mode, self.name, self.pretrained = mode, name, pretrained
        self.head_hidden = tuple(int(h) for h in head_hidden)
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        size = self.preprocess_cfg.get("size", model_cfg["vision_cfg"]["image_size"])
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        self.register_buffer("image_mean", torch.tensor(self.preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(self.preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.head = AestheticHead(model_cfg["embed_dim"], self.head_hidden) if mode == "aesthetic" else None

    # ------------------------------------------------------------------ build / save / load

    @classmethod
    def create(cls, name_or_config: str = "tiny-clip", pretrained: str | None = None, *, mode: str | None = None,
               image_size: int | None = None, head_hidden=(1024, 128, 64, 16), device="cpu") -> "ClipReward":
        """From an open_clip model name (+ `pretrained` tag or file; tags need the hub), a custom
        model-config JSON file, a built-in name (`TINY_CONFIGS`), an open_clip local-dir folder or a
        saved ClipReward folder. mode=None: the saved folder's mode, else "pickscore"; a different
        mode keeps the towers and starts a fresh head."""
        import open_clip

        spec = str(name_or_config)
        if not (Path(spec) / META_FILE).is_file() and (Path(spec) / "model" / META_FILE).is_file():
            spec = str(Path(spec) / "model")  # an `align image rm` run folder: the model it finished with
        if (Path(spec) / META_FILE).is_file():
            r = cls.load(spec, device=device)
            if image_size and (int(image_size),) * 2 != tuple(r.image_size):
                raise ValueError(f"{spec}: a saved reward keeps its input size {r.image_size[0]}; image_size="
                                 f"{image_size} applies to an open_clip model or config, not to a saved reward")
            if mode is None or mode == r.mode:
                return r
            return cls(r.model, r.tokenizer, r.model_cfg, mode, r.name, r.pretrained, head_hidden).to(device)
        if spec in TINY_CONFIGS:
            _register_config(spec, TINY_CONFIGS[spec])
            name = spec
        elif (Path(spec) / "open_clip_config.json").is_file():
            name = f"local-dir:{spec}"
        elif spec.endswith(".json"):
            _check_model_config(spec)  # open_clip skips a config without these keys, and would build the model of
            open_clip.add_model_config(spec)  # the same name it ships (ViT-B-32.json -> the real ViT-B-32) or none
            name = Path(spec).stem
        else:
            name = spec
        if name.startswith("local-dir:"):
            model_cfg = json.loads((Path(spec) / "open_clip_config.json").read_text())["model_cfg"]
        else:
            model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"unknown CLIP {spec!r}: not a saved ClipReward folder, a model-config .json, "
                             f"a built-in ({', '.join(TINY_CONFIGS)}) or an open_clip model name")
        if image_size:
            model_cfg["vision_cfg"]["image_size"] = int(image_size)
        is_file = bool(pretrained) and Path(pretrained).is_file()
        if pretrained and not is_file and open_clip.get_pretrained_cfg(name, pretrained):
            _download_tag(spec, name, pretrained)  # before the towers are built (ViT-H-14: ~1B parameters)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device,
                                           force_image_size=int(image_size) if image_size else None)
        except Exception as e:  # a file that is no checkpoint of this model; a tag that is none of its tags
            lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
            if is_file:
                raise ValueError(f"CLIP {spec!r} pretrained={pretrained!r}: not a checkpoint of {name} "
                                 f"({type(e).__name__}: {'; '.join(lines[:2])[:300]})") from e
            if not pretrained or not isinstance(e, RuntimeError):
                raise
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"CLIP {spec!r} pretrained={pretrained!r}: {str(e).splitlines()[0]} (tags of {name}: "
                             f"{', '.join(tags) or 'none'}; or a checkpoint file path)") from e
        return cls(model, open_clip.get_tokenizer(name), model_cfg, mode or "pickscore", name, pretrained,
                   head_hidden).to(device)

    def save(self, out_dir, extra: dict | None = None) -> Path:
        """Write a folder that `ClipReward.load(out_dir)` (and open_clip's local-dir:) reload offline."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}, indent=1))
        save_file(_cpu_state(self.model), str(out / "open_clip_model.safetensors"))
        if self.head is not None:
            save_file(_cpu_state(self.head), str(out / "aesthetic_head.safetensors"))
        if hasattr(self.tokenizer, "tokenizer") and hasattr(self.tokenizer.tokenizer, "save_pretrained"):
            self.tokenizer.tokenizer.save_pretrained(out)  # an HF tokenizer: local-dir: reads it from here
        meta = {"kind": "clip_reward", "format": 1, "mode": self.mode, "name": self.name,
                "pretrained": self.pretrained, "logit_scale": self.logit_scale,
                "head_hidden": list(self.head_hidden), **(extra or {})}
        (out / META_FILE).write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, path, device="cpu") -> "ClipReward":
        import open_clip
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a saved ClipReward folder (no {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        model_cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
        model = open_clip.create_model(f"local-dir:{path}", device=device)  # strict weight load
        reward = cls(model, open_clip.get_tokenizer(f"local-dir:{path}"), model_cfg, meta["mode"],
                     meta.get("name", ""), meta.get("pretrained"), meta.get("head_hidden", (1024, 128, 64, 16)))
        if reward.head is not None:
            reward.head.load_state_dict(load_file(str(path / "aesthetic_head.safetensors")))
        return reward.to(device)

    # ------------------------------------------------------------------ scoring

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    @property
    def logit_scale(self) -> float:
        """s = exp(logit_scale), the learned inverse temperature."""
        return float(self.model.logit_scale.detach().exp().item())

    def clamp_logit_scale(self) -> None:
        """In place, after each optimiser step, as open_clip's training loop: 0 ≤ logit_scale ≤ ln 100."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised: shortest side to S, centre crop."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            mode = "bilinear" if self.preprocess_cfg.get("interpolation") == "bilinear" else "bicubic"
            x = resize_center_crop(x, min(self.image_size), self.image_size, mode)
        return (x - self.image_mean) / self.image_std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, D), unit norm
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:  # (B, D), unit norm
        tokens = self.tokenizer(list(prompts)).to(self.device)  # (B, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def similarity(self, prompts, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """(B,) cosines ⟨E_T(p)/‖E_T(p)‖, E_I(x)/‖E_I(x)‖⟩ (HPSv2's score; CLIPScore's before its 2.5·max(·, 0)).
        Each distinct prompt is encoded once (a K-way ranking shares one). `image_features` (B, D): the images'
        `image_features`, given in their place (kept from a frozen image tower)."""
        prompts = self._prompts(prompts, images if image_features is None else image_features)
        img = self.image_features(images) if image_features is None else image_features  # (B, D)
        uniq = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        index = torch.tensor([uniq[p] for p in prompts], device=self.device)
        return (img * self.text_features(list(uniq))[index]).sum(-1)

    def score(self, prompts, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
              ) -> torch.Tensor:
        """(B,) rewards: s · similarity (pickscore), or the head on the image embedding (aesthetic); `image_features`
        as in `similarity`."""
        if self.mode == "aesthetic":
            self._prompts(prompts, images if image_features is None else image_features)
            return self.head(self.image_features(images) if image_features is None else image_features)
        return self.model.logit_scale.exp().float() * self.similarity(prompts, images, image_features)

    @staticmethod
    def _prompts(prompts, images) -> list[str]:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        return prompts

    def forward(self, prompts, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.score(prompts, images, image_features)

    def aesthetic_loss(self, images: torch.Tensor, targets) -> torch.Tensor:
        """LAION-aesthetic regression: MSE between head(image) and scalar ratings (B,)."""
        if self.head is None:
            raise ValueError("aesthetic_loss needs mode='aesthetic'")
        targets = torch.as_tensor(targets, dtype=torch.float32, device=self.device).flatten()
        return F.mse_loss(self.head(self.image_features(images)), targets)


def _check_model_config(path: str) -> None:
    """A model-config .json as open_clip registers it: a JSON object with embed_dim, vision_cfg and text_cfg."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such open_clip model config: {path}")
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))  # open_clip reads it so: no BOM
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"open_clip model config {path}: not JSON ({e})") from None
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        raise ValueError(f"open_clip model config {path}: an open_clip local-dir config ({{\"model_cfg\", ...}}); "
                         f"give its folder ({Path(path).parent}) to load its weights too, or the model_cfg alone")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"open_clip model config {path}: missing {', '.join(missing)} (a model config has embed_dim, "
                         f"vision_cfg and text_cfg, as open_clip's model_configs/*.json)")


def _download_tag(spec: str, name: str, tag: str) -> None:
    """An open_clip pretrained tag's weights into the hub cache (where create_model then finds them), failing in
    seconds when they are neither cached nor reachable: not after building the model and a minute of retries."""
    import open_clip

    from align.runner import offline_unless_hub_reachable
    offline_unless_hub_reachable()
    try:
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"CLIP {spec!r} pretrained={tag!r}: cannot get its weights ({why}) (a tag's weights come from "
                         f"the hub; offline, give pretrained=PATH of a checkpoint file, or a saved reward folder as the "
                         f"CLIP)") from e


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
