"""`align compare` for diffusion pipelines: a DDIM generator (CFG, seeds) and the image judges.

A generator is a pipeline folder or hub id (SD 1.x/2.x or the pixel layout), a DDPO run folder
(its `pipeline/`, or its `lora/` on the base pipeline named in its config.yaml), or PIPELINE+LORA
(diffusers LoRA weights as `align image ddpo` saves them). Sampling is the DDPO rollout itself
(`sample_trajectories`: DDIM with η, classifier-free guidance), so an aligned model is evaluated
under the policy it was trained as. Noise comes from a CPU generator seeded per (seed, batch): the
plain and engineered arms start each prompt from the same x_T and draw the same z_t.

Judges: a CLIP reward folder (`align image rm`, or its run folder), a built-in (brightness, jpeg,
...), or module:function scoring (prompts, images (B, 3, H, W) in [0, 1]) -> (B,).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from align.compare import CompareConfig, FunctionJudge, is_function_spec, torch_dtype
from image_rlhf.pipeline import check_pipeline, encode_prompts, image_grid, load_pipeline, negative_embeds, save_png
from image_rlhf.rewards import load_reward
from image_rlhf.sampling import decode_latents, sample_trajectories

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
LORA_FILE = "pytorch_lora_weights.safetensors"


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(pipeline, LoRA folder or None) of a generator spec (see the module docstring)."""
    if "+" in spec and not Path(spec).exists():
        base, _, lora = spec.partition("+")
        return base, lora
    p = Path(spec)
    if (p / LORA_FILE).is_file():
        return _base_of_run(p.parent, spec), str(p)
    if (p / "config.yaml").is_file() and not (p / "model_index.json").is_file():  # a DDPO run folder
        if (p / "pipeline" / "model_index.json").is_file():
            return str(p / "pipeline"), None
        if (p / "lora" / LORA_FILE).is_file():
            return _base_of_run(p, spec), str(p / "lora")
    return spec, None


def _base_of_run(run: Path, spec: str) -> str:
    from omegaconf import OmegaConf
    cfg = run / "config.yaml"
    base = OmegaConf.load(cfg).get("pipeline") if cfg.is_file() else None
    if not base:
        raise ValueError(f"{spec}: LoRA weights without their base pipeline (no 'pipeline:' in {cfg}); "
                         f"pass PIPELINE+{spec}")
    return str(base)


class ImageGenerator:
    """gen(prompts, seed) -> images (B, 3, H, W) in [0, 1] on the pipeline's device."""

    deterministic = False  # x_T is random even at η = 0

    def __init__(self, spec: str, params, device="cpu", dtype=torch.float32):
        pipeline, lora = resolve_model(spec)
        self.parts = load_pipeline(pipeline, device=device, dtype=dtype)
        if lora:
            self.parts.unet.load_lora_adapter(lora, prefix="unet", weight_name=LORA_FILE)
            log.info("%s: LoRA %s on %s", spec, lora, pipeline)
        self.params = params
        self.latent_shape = self.parts.latent_shape(params.resolution)
        self.neg = negative_embeds(self.parts) if params.guidance_scale > 1 else None

    def check_prompts(self, items) -> None:
        """The text encoder reads the first model_max_length tokens (77 for CLIP), as StableDiffusionPipeline does:
        warn of prompts cut there, and above all of engineered variants that the cut makes the plain prompt
        (tags appended to a long prompt are never seen: the pair is a tie by construction, not a finding)."""
        tok = self.parts.tokenizer
        limit = tok.model_max_length

        def ids(texts):
            return tok(texts, truncation=True, max_length=limit)["input_ids"]
        lengths = [len(x) for x in tok([t for it in items for t in (it.plain, it.engineered)])["input_ids"]]
        if max(lengths) <= limit:
            return
        same = [it.id for it, a, b in zip(items, ids([it.plain for it in items]), ids([it.engineered for it in items]))
                if a == b]
        log.warning("%d of %d prompts (plain or engineered) are longer than the text encoder's %d tokens and were "
                    "cut there", sum(n > limit for n in lengths), len(lengths), limit)
        if same:
            log.warning("%d engineered prompts are their plain prompt once cut to %d tokens, so the generator sees no "
                        "difference (ids %s)", len(same), limit, ", ".join(same[:10]) + (" ..." if len(same) > 10 else ""))

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int) -> torch.Tensor:
        p = self.params
        embeds = encode_prompts(self.parts, list(prompts))                               # (B, L, D)
        traj = sample_trajectories(self.parts.unet, self.parts.scheduler, embeds, self.neg, p.num_steps,
                                   p.guidance_scale, p.eta, generator=torch.Generator().manual_seed(seed),
                                   latent_shape=self.latent_shape)
        return decode_latents(self.parts.vae, traj.final_latents)                        # (B, 3, H, W)


def check_model(spec: str) -> None:
    """Cheap checks of a generator spec (JSON and file names only) before anything runs: its pipeline, its LoRA."""
    pipeline, lora = resolve_model(spec)
    check_pipeline(pipeline)
    folder = Path(lora).expanduser() if lora else None
    if folder is not None and folder.exists() and not (folder / LORA_FILE).is_file():
        raise ValueError(f"{spec}: no {LORA_FILE} in {lora!r}")
    if folder is not None and not folder.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", lora):  # nor a hub id
        raise ValueError(f"{spec}: no such LoRA folder {lora!r}")


def load_generator(path: str, cfg: CompareConfig, device) -> ImageGenerator:
    return ImageGenerator(path, cfg.image, device, torch_dtype(cfg.dtype))


def load_judge(spec: str, cfg: CompareConfig, device):
    """A CLIP reward folder (or an `align image rm` run folder), a built-in, pickscore / aesthetic[:...] (published
    checkpoints, image_rlhf.hf_rewards), or module:function."""
    from image_rlhf.hf_rewards import is_hf_spec
    if is_function_spec(spec) and not is_hf_spec(spec):
        return FunctionJudge(spec)  # outputs are checked (count, finite) by align.compare.evaluate
    return load_reward(spec, device=device)


def describe(cfg: CompareConfig) -> str:
    i = cfg.image
    return f"{i.num_steps} DDIM steps, η = {i.eta:g}, guidance {i.guidance_scale:g}"


def samples_markdown(arms, items, out_dir, n: int = 8) -> str:
    """One PNG grid per arm (first seed, first n prompts) under out_dir/samples/, linked."""
    lines = []
    for name, arm in arms.items():
        imgs = [s for s in arm.samples[:n] if torch.is_tensor(s)]
        if not imgs:
            continue
        fname = re.sub(r"[^\w.-]", "_", name) + ".png"
        path = save_png(image_grid(torch.stack(imgs), nrow=len(imgs)), Path(out_dir) / "samples" / fname)
        lines.append(f"**{name}**\n\n![{name}](samples/{path.name})")
    if lines:
        cols = "; ".join(f"{it.id}. `{it.plain}`" for it in items[:n])
        lines.insert(0, f"First seed; columns, left to right (id and plain prompt): {cols}.")
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------- align sample

def save_candidates(images: torch.Tensor, out: Path, index: int, prompt: str) -> list[str]:
    """`align sample`'s files of one prompt's K images: out/images/INDEX-j.png (lossless uint8) and the sheet
    out/sheets/INDEX.png; returns the images' paths relative to `out`."""
    from PIL import Image
    names = []
    for sub in ("images", "sheets"):
        (out / sub).mkdir(exist_ok=True)
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for j, a in enumerate(arr):
        names.append(f"images/{index:06d}-{j}.png")
        Image.fromarray(a).save(out / names[-1])
    _candidate_sheet(images, prompt).save(out / "sheets" / f"{index:06d}.png")
    return names


def _candidate_sheet(images: torch.Tensor, prompt: str):
    """A prompt's K images in a row (enlarged to >= 96 px), each candidate's index under it and the prompt above: a
    ranker reads "3" off the sheet rather than counting to the ninth image."""
    from PIL import Image, ImageDraw, ImageFont

    grid = image_grid(images, nrow=len(images))                                        # (3, H, W), padding 2
    row = Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    size = max(14, row.height // 24)  # readable beside 512 px images too
    font, strip = ImageFont.load_default(size=size), size + 6
    sheet = Image.new("RGB", (row.width, row.height + 2 * strip), "white")
    sheet.paste(row, (0, strip))
    draw, tile = ImageDraw.Draw(sheet), (row.width - 2) / len(images)
    text = prompt
    while len(text) > 1 and draw.textlength(text, font=font) > row.width - 4:
        text = text[:-2] + "…"
    draw.text((2, 2), text, fill="black", font=font)
    for j in range(len(images)):
        draw.text((2 + tile * (j + 0.5), row.height + strip + 2), str(j), fill="black", font=font, anchor="mt")
    return sheet
