"""Diffusion pipelines for DDPO: load by path or hub id, encode prompts, LoRA on the UNet, grids.

Two folder layouts are understood, both one subfolder per component (each `save_pretrained`):

    latent (Stable Diffusion 1.x/2.x, diffusers' own layout):
        model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/  [safety_checker/ ...]
    pixel (no VAE; the image miniature world, `save_pixel_pipeline`):
        model_index.json  unet/  text_encoder/  tokenizer/  scheduler/
        (model_index.json says "_class_name": "AlignPixelPipeline"; it may be left out: a folder
        with those four subfolders and no vae/ is read as pixel-space)

The UNet is a `UNet2DConditionModel` (in pixel space its channels are RGB in [−1, 1]), the text
encoder a transformers `CLIPTextModel` with its `CLIPTokenizer`, and whatever scheduler was saved
is replaced by a `DDIMScheduler` of its config (`ddim_scheduler`: SD's settings where a PNDM/Euler/...
config lacks them, clip_sample off for latents as diffusers' pipeline does): DDPO's policy is the DDIM
step (ddim.py), and SD's scheduler config (set_alpha_to_one=False, steps_offset=1) keeps σ_t > 0 there.
Components are loaded one by one (`from_pretrained(src, subfolder=...)`) so a missing one is
named in the error and a hub id downloads only the weights actually used.
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from align.runner import offline_unless_hub_reachable

log = logging.getLogger(__name__)

PIXEL_CLASS_NAME = "AlignPixelPipeline"
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA scripts
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class PipelineLoadError(ValueError):
    """A pipeline folder or hub id that cannot be loaded; the message names what is missing."""


@dataclass
class DiffusionParts:
    """The pieces DDPO uses; vae=None means pixel-space diffusion (x_0 is the image in [−1, 1])."""
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object           # DDIMScheduler
    source: str

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2^(VAE blocks − 1) (8 for SD), 1 without a VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_shape(self, resolution: int = 0) -> tuple[int, int, int]:
        """(C, H, W) of x_t for images of `resolution` pixels (0 = the UNet's native sample_size)."""
        c = self.unet.config.in_channels
        if resolution <= 0:
            size = self.unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            return c, h, w
        f = self.vae_scale_factor
        if resolution % f:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {f}")
        return c, resolution // f, resolution // f


# ---------------------------------------------------------------------------- loading

def _components(src: str, local: bool) -> tuple[dict, bool]:
    """(model_index.json as a dict or {}, has_vae). Checks a local folder for missing components."""
    from diffusers import DiffusionPipeline
    index: dict = {}
    path = Path(src)
    if local and (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
    elif not local:
        index = dict(DiffusionPipeline.load_config(src))
    listed = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
                    and len(v) == 2 and v[0] is not None)
    if index:
        has_vae = "vae" in listed
        required = [*REQUIRED, "vae"] if has_vae else list(REQUIRED)
        missing_from_index = [c for c in REQUIRED if c not in listed]
        if missing_from_index:
            raise PipelineLoadError(f"{src}: model_index.json does not list {', '.join(missing_from_index)} "
                                    f"(lists {', '.join(listed)}); DDPO needs {', '.join(REQUIRED)} (+ vae)")
        where = f"model_index.json lists {', '.join(listed)}"
    else:
        has_vae = (path / "vae").is_dir()
        required = [*REQUIRED, "vae"] if has_vae else list(REQUIRED)
        where = "a pipeline folder holds unet/, text_encoder/, tokenizer/, scheduler/ and, for latent diffusion, vae/"
    if local:
        for name in required:
            if not (path / name).is_dir():
                raise PipelineLoadError(f"{src}: missing '{name}' ({where})")
    return index, has_vae


def check_pipeline(src: str | Path) -> tuple[str, bool, dict, bool]:
    """(src, is_local, model_index dict, has_vae), or a PipelineLoadError naming what is missing.
    Cheap (reads JSON only): trainers call it before creating their run folder."""
    src = str(src)
    local = Path(src).expanduser().exists()
    if local:
        src = str(Path(src).expanduser())
        if not Path(src).is_dir():
            single = Path(src).suffix in (".safetensors", ".ckpt")  # a civitai-style single-file checkpoint
            raise PipelineLoadError(f"{src}: not a folder (expected a diffusers pipeline folder)" + (
                "; convert a single-file checkpoint first: StableDiffusionPipeline.from_single_file(FILE)"
                ".save_pretrained(DIR)" if single else ""))
    elif not _HUB_ID.match(src):
        raise PipelineLoadError(f"{src}: no such folder (and not a hub id of the form org/name)")
    else:
        offline_unless_hub_reachable()  # a hub id on a machine without the hub: fail in seconds, not a minute
    try:
        index, has_vae = _components(src, local)
    except PipelineLoadError:
        raise
    except (OSError, ValueError) as e:
        raise PipelineLoadError(f"{src}: cannot read the pipeline's model_index.json: {str(e).splitlines()[0]}") from e
    _check_text_to_image(src, local, index)
    return src, local, index, has_vae


def _check_text_to_image(src: str, local: bool, index: dict) -> None:
    """Refuse, naming the file, a pipeline whose UNet needs more than (x_t, t, CLIP text states): SDXL (two text
    encoders, `added_cond_kwargs`), inpainting / instruct-pix2pix / depth / upscaling UNets (in_channels ≠
    out_channels: mask, image or depth channels), class-conditioned UNets; else they load and fail mid-run on
    a tensor shape or a missing argument."""
    what = f"{src} ({index['_class_name']})" if index.get("_class_name") else src
    extra = [c for c in ("text_encoder_2", "tokenizer_2") if (index.get(c) or [None])[0] is not None]
    if extra:
        raise PipelineLoadError(f"{what}: model_index.json lists {', '.join(extra)} (SDXL-style: two text "
                                f"encoders and added size conditioning); DDPO here takes SD 1.x/2.x pipelines")
    for name, ok in (("unet", ("UNet2DConditionModel",)),
                     ("text_encoder", ("CLIPTextModel", "CLIPTextModelWithProjection"))):
        cls = (index.get(name) or [None, None])[1]
        if cls is not None and cls not in ok:
            raise PipelineLoadError(f"{what}: model_index.json says its {name} is a {cls}; DDPO needs a "
                                    f"{' or '.join(ok)}")
    try:
        if local:
            cfg = json.loads((Path(src) / "unet" / "config.json").read_text())
        else:
            from diffusers import UNet2DConditionModel
            cfg = UNet2DConditionModel.load_config(src, subfolder="unet")
    except (OSError, ValueError):
        return  # no readable config: load_pipeline names the component it cannot load
    if cfg.get("in_channels") != cfg.get("out_channels", cfg.get("in_channels")):
        raise PipelineLoadError(f"{what}: unet/config.json has in_channels {cfg['in_channels']} but out_channels "
                                f"{cfg['out_channels']}: a UNet that takes extra input channels (inpainting mask, "
                                f"instruct-pix2pix image, depth, low-res image); DDPO needs a text-to-image UNet")
    conditioning = [f"{k}={cfg[k]!r}" for k in ("addition_embed_type", "class_embed_type", "num_class_embeds")
                    if cfg.get(k)]
    if conditioning:
        raise PipelineLoadError(f"{what}: unet/config.json has {', '.join(conditioning)}: a UNet conditioned on "
                                f"more than the text (SDXL's size/text_time embeddings, class labels, an upscaler's "
                                f"noise level); DDPO needs a text-to-image UNet")


def load_pipeline(src: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                  attention: str = "sdpa") -> DiffusionParts:
    """Load a latent (SD 1.x/2.x) or pixel-space pipeline from a folder or hub id, scheduler -> DDIM.

    dtype: for every component (training code upcasts what it trains). attention: "sdpa" (torch's
    scaled_dot_product_attention, diffusers' default processor) or "xformers", used only when it
    is importable and the device is CUDA (else SDPA, with a log line).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    src, local, index, has_vae = check_pipeline(src)
    kind = "folder" if local else "hub id (no local folder of that name)"
    errors = (OSError, ValueError, SafetensorError)  # SafetensorError: a truncated or damaged weights file

    def only_fp16(name) -> bool:  # a local folder whose weights are all *.fp16.*: load that variant first (trying the
        folder = Path(src) / name  # plain files has diffusers log an ERROR line before the fallback works)
        weights = [f.name for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")] if local else []
        return bool(weights) and all(".fp16." in w or ".fp16-" in w for w in weights)  # -00001-of-00002: shards

    def load(name, fn, **kw):
        try:
            if "torch_dtype" in kw and only_fp16(name):
                out = fn(src, subfolder=name, variant="fp16", **kw)
                log.info("%s: %s loaded from its fp16 variant files (no plain weights)", src, name)
                return out
            return fn(src, subfolder=name, **kw)
        except errors as e:
            if "torch_dtype" in kw:  # weights saved only as a variant (e.g. *.fp16.safetensors), as diffusers allows
                try:
                    out = fn(src, subfolder=name, variant="fp16", **kw)
                    log.info("%s: %s loaded from its fp16 variant files (no plain weights)", src, name)
                    return out
                except errors:
                    pass
            raise PipelineLoadError(f"{src}: cannot load '{name}' of the pipeline {kind}: "
                                    f"{str(e).splitlines()[0]}") from e

    scheduler = ddim_scheduler(load("scheduler", DDIMScheduler.load_config), src, latent=has_vae)
    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers 5 loads an empty folder without a word
        raise PipelineLoadError(f"{src}: cannot load 'tokenizer' of the pipeline {kind}: no vocabulary in it "
                                f"(vocab.json + merges.txt, or tokenizer.json)")
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained, torch_dtype=dtype)
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:  # no model_max_length saved: transformers' 1e30 (SD's is 77)
        log.info("%s: tokenizer model_max_length %d -> %d, the text encoder's max_position_embeddings", src,
                 tokenizer.model_max_length, positions)
        tokenizer.model_max_length = positions
    unet = load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype)
    vae = load("vae", AutoencoderKL.from_pretrained, torch_dtype=dtype) if has_vae else None
    width, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
    if width != cross and not getattr(unet.config, "encoder_hid_dim", None):  # (no projection of its own)
        raise PipelineLoadError(f"{src}: the text encoder's hidden_size is {width} but the UNet's "
                                f"cross_attention_dim is {cross}: text_encoder/ and unet/ are not one model's")
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.to(device).requires_grad_(False).eval()
    _set_attention(unet, attention, device)
    if index.get("_class_name") not in (None, PIXEL_CLASS_NAME, "StableDiffusionPipeline"):
        log.info("%s: a %s; using its unet, text_encoder, tokenizer%s", src, index["_class_name"],
                 ", vae" if has_vae else "")
    return DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, src)


# Stable Diffusion's DDIM settings for what a saved scheduler config of another class (PNDM, Euler, DPM-Solver,
# ...) lacks: DDIMScheduler's own defaults (clip_sample and set_alpha_to_one True, steps_offset 0) would clip SD
# latents to ±1 at every step and leave the last step without noise (σ = 0).
SD_DDIM_DEFAULTS = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def ddim_scheduler(config: dict, src: str = "", latent: bool = True):
    """`DDIMScheduler` from a saved scheduler config of any class, with the settings DDPO's DDIM step needs.

    - A config of another class gets SD's values (SD_DDIM_DEFAULTS) for the keys it lacks.
    - Latent pipelines, as diffusers' `StableDiffusionPipeline.__init__` does: clip_sample -> False (latents
      are not in [−1, 1]), steps_offset -> 1.
    - timestep_spacing "linspace" -> "leading": the DDIM step goes from t to t − T/S (ddim.py, as
      `DDIMScheduler.step`), which only the "leading" grid ("trailing" where S divides T) lands on; on the
      linspace grid each stored x_{t−1} would sit at another noise level than the next step's t says.
    Every change is logged."""
    from diffusers import DDIMScheduler
    cfg, changed = dict(config), {}
    saved = cfg.get("_class_name") or "DDIMScheduler"
    if saved != "DDIMScheduler":
        changed.update({k: v for k, v in SD_DDIM_DEFAULTS.items() if k not in cfg})
    if cfg.get("timestep_spacing", "leading") == "linspace":
        changed["timestep_spacing"] = "leading"
    if latent and {**cfg, **changed}.get("clip_sample", True):
        changed["clip_sample"] = False
    if latent and {**cfg, **changed}.get("steps_offset", 0) != 1:
        changed["steps_offset"] = 1
    if changed:
        log.info("%s: scheduler %s -> DDIMScheduler with %s", src or "pipeline", saved,
                 ", ".join(f"{k}={v}" for k, v in changed.items()))
    return DDIMScheduler.from_config({**cfg, **changed})


def _set_attention(unet, attention: str, device) -> None:
    if attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")
    if attention == "xformers" and torch.device(device).type != "cuda":
        log.info("attention=xformers: xformers has no %s kernels; using SDPA attention", torch.device(device).type)
    if attention == "xformers" and torch.device(device).type == "cuda":
        try:
            import xformers  # noqa: F401
            unet.enable_xformers_memory_efficient_attention()
            return
        except Exception as e:  # not installed, or no kernel for this GPU/dtype
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            load_error = getattr(sys.modules.get("xformers._cpp_lib"), "_cpp_library_load_exception", None)
            if load_error is not None:  # e.g. a CUDA-12 wheel on a CUDA-13 torch: needs libcudart.so.12
                why += f" (its CUDA extension did not load: {str(load_error).splitlines()[0]}; cause: " \
                       f"{load_error.__cause__})"
            log.info("xformers unavailable: %s; using SDPA attention", why)
    unet.set_attn_processor(CpuSdpaProcessor() if torch.device(device).type == "cpu" else AttnProcessor2_0())


FLOAT32_ATTENTION_BELOW = 32  # head dims under this get CpuSdpaProcessor's float32 attention product


class _Float32Sdpa(torch.overrides.TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` with a head dim < FLOAT32_ATTENTION_BELOW in float32 (autocast
    off), its output cast back to q's dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].shape[-1] < FLOAT32_ATTENTION_BELOW:
            q, k, v, *rest = args
            with torch.autocast("cpu", enabled=False):
                return func(q.float(), k.float(), v.float(), *rest, **kwargs).to(q.dtype)
        return func(*args, **kwargs)


class CpuSdpaProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor; when the CPU runs it in bf16/fp16 and the head dim is small, softmax(QKᵀ)V is
    computed in float32.

    torch's CPU flash-attention *backward* in bf16 is slow at small head dims: 1 thread, 4×8 heads × 256
    tokens, a no-grad forward + a forward and backward (DDPO's sampling and training of one latent), bf16
    vs the product in float32 from bf16 q/k/v: head dim 8: 16.7 vs 9.6 ms; 16: 17.9 vs 11.7; 24: 19.7 vs
    17.9; 32: 18.4 vs 18.1; 40: 20.3 vs 23.3; 64+: bf16 faster. DDPO's bf16 training call on the peer's tiny
    SD UNet (head dim 8) spent 55% of its time in that backward. Projections, convolutions and norms stay in
    autocast's dtype, and sampling and training both go through here, so their log-probs are computed alike.
    """

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if hidden_states.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return super().__call__(attn, hidden_states, *args, **kwargs)
        with _Float32Sdpa():
            return super().__call__(attn, hidden_states, *args, **kwargs)


def save_pixel_pipeline(out: str | Path, unet, text_encoder, tokenizer, scheduler) -> Path:
    """Write the pixel layout (see the module docstring); `load_pipeline(out)` reads it back."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": PIXEL_CLASS_NAME, "_note": "align pixel-space diffusion: no VAE",
             "unet": ["diffusers", type(unet).__name__], "text_encoder": ["transformers", type(text_encoder).__name__],
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def save_parts(parts: DiffusionParts, out: str | Path) -> Path:
    """A fully fine-tuned pipeline: diffusers' StableDiffusionPipeline layout (with the base's safety checker and
    feature extractor where parts.source lists them), or the pixel layout."""
    out = Path(out)
    if parts.vae is None:
        return save_pixel_pipeline(out, parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler)
    from diffusers import StableDiffusionPipeline
    own = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
               scheduler=parts.scheduler)
    pipe = _with_safety_checker(parts.source, own) if parts.source else None
    if pipe is None:
        pipe = StableDiffusionPipeline(**own, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def _with_safety_checker(src: str, own: dict):
    """The base's StableDiffusionPipeline with our components and its own safety_checker / feature_extractor (SD 1.x
    ships them; a fine-tune saved without them would silently lose the NSFW filter), or None if it lists none."""
    from diffusers import StableDiffusionPipeline
    index = check_pipeline(src)[2]
    extras = [c for c in ("safety_checker", "feature_extractor") if (index.get(c) or [None])[0] is not None]
    if not extras:
        return None
    errors = []
    for variant in (None, "fp16"):  # the base's weights may be only the fp16 variant (see load_pipeline)
        try:
            return StableDiffusionPipeline.from_pretrained(src, **own, variant=variant)
        except Exception as e:  # optional parts: never lose the trained pipeline over them
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    log.warning("%s: %s not carried over to the fine-tuned pipeline (%s; as the fp16 variant: %s); it is saved "
                "without them", src, " and ".join(extras), *errors)
    return None


# ---------------------------------------------------------------------------- prompts

@torch.no_grad()
def encode_prompts(parts: DiffusionParts, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """c = the text encoder's last hidden states (B, L, D), L = the tokenizer's model_max_length
    (77 for SD), padded to max length and truncated as StableDiffusionPipeline does."""
    tok, enc = parts.tokenizer, parts.text_encoder
    device = next(enc.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(list(prompts[i:i + batch_size]), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)                  # (b, L)
        out.append(enc(ids)[0])                                                               # (b, L, D)
    return torch.cat(out)


def negative_embeds(parts: DiffusionParts) -> torch.Tensor:
    """∅ = the embedding of the empty prompt (1, L, D), shared by every sample for CFG."""
    return encode_prompts(parts, [""])


# ---------------------------------------------------------------------------- LoRA and weights

def add_unet_lora(unet, lora) -> None:
    """LoRA adapters on the UNet via peft, as diffusers' training scripts (`unet.add_adapter`).

    lora: align.rl.config.LoraParams; ["all-linear"] means the attention projections here.
    Gaussian init of A (B = 0, so the adapted UNet starts equal to the base, ratio = 1).
    """
    from peft import LoraConfig

    from align.session import float32_trainable
    targets = LORA_TARGETS if list(lora.target_modules) in ([], ["all-linear"]) else list(lora.target_modules)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                init_lora_weights="gaussian", target_modules=targets))
    float32_trainable(unet)  # trained in float32 even when the base is bf16/fp16


def save_unet_lora(unet, out: str | Path) -> Path:
    """out/pytorch_lora_weights.safetensors, loadable by `StableDiffusionPipeline.load_lora_weights(out)`;
    the LoRA config (rank, alpha, targets) travels in the file's metadata. Keys in diffusers' format (`to_q.lora.down`,
    as its training scripts write them) where diffusers maps every key, else all in PEFT's (`lora_A`): its map covers
    the attention projections only, and a file of both kinds loads with the other kind's layers silently dropped
    (LoRA on conv1/conv2 too: diffusers 0.42 loaded the convolutions' adapters alone)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    peft_state = get_peft_model_state_dict(unet)
    state = convert_state_dict_to_diffusers(dict(peft_state))
    if any(".lora_A." in k or ".lora_B." in k for k in state):  # a target diffusers' map does not know
        state = peft_state
    meta = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out), unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=meta)
    return Path(out)


def trainable_state(module) -> dict[str, torch.Tensor]:
    """The parameters being trained (LoRA A/B, or all), by name: what a checkpoint must hold."""
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module, state: dict[str, torch.Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    unknown = [k for k in state if k not in params]
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items()
              if k in params and v.shape != params[k].shape]  # e.g. another lora.r
    if unknown or missing or shapes:
        raise ValueError(f"{where}: checkpoint does not match the model (unknown {unknown[:3]}, missing "
                         f"{missing[:3]}" + (f", checkpoint vs model shape {shapes[:2]}" if shapes else "")
                         + "); was it written with another pipeline or LoRA setting?")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# ---------------------------------------------------------------------------- grids

def image_grid(images: torch.Tensor, nrow: int, min_size: int = 96) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> one (3, H', W') grid, nrow images per row; tiny images are
    enlarged ×k (nearest) so that each is at least `min_size` pixels."""
    from torchvision.utils import make_grid
    images = images.float().clamp(0, 1).cpu()
    k = max(1, math.ceil(min_size / images.shape[-1]))
    if k > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=k, mode="nearest")
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """(3, H, W) in [0, 1] -> PNG, written atomically."""
    from PIL import Image

    from align.runner import atomic_write_bytes
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def check_compile(backend: str) -> None:
    """compile_unet's backend exists, and inductor has its C++ compiler (CPU) or triton (GPU): else torch fails at
    the first UNet call, after the run folder is written."""
    import shutil

    import torch._dynamo
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile_backend {backend!r} is not a torch.compile backend; "
                         f"one of {torch._dynamo.list_backends()} (or aot_eager, eager)")
    if backend == "inductor" and not torch.cuda.is_available() and not any(
            shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("compile_unet with the inductor backend on the CPU needs a C++ compiler (g++/clang++) "
                         "on PATH; install one (Debian: apt install g++) or set compile_unet=false")
    if backend == "inductor" and torch.cuda.is_available():
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ValueError("compile_unet with the inductor backend on a GPU needs a working triton (Linux torch "
                             "wheels ship it: pip install triton matching your torch), or set compile_unet=false")
