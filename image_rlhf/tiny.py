"""Tiny random diffusion components built offline, saved with save_pretrained, loaded by path.

For tests, benchmarks and the image miniature world. Sizes follow diffusers' own tests
(`get_dummy_components` of the Stable Diffusion pipeline tests: UNet block_out_channels=(4, 8)-ish,
a 2-block VAE, a tiny CLIP text encoder, `torch.manual_seed` before each component), scaled up a
little so the norm groups and attention heads divide evenly. The tokenizer is a real CLIP BPE
tokenizer made from the merges open_clip ships, so prompt handling is the real one.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

# Stable Diffusion 1.x's DDIM scheduler config (scheduler/scheduler_config.json of SD 1.5):
# set_alpha_to_one=False + steps_offset=1 keep σ_t > 0 at the last step, so every step of an
# η = 1 rollout has a log-density (see ddim.py).
SD_DDIM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")


def build_clip_tokenizer(out_dir: str | Path, num_merges: int = 1000, model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` from open_clip's BPE merges, saved to `out_dir`, returned.

    The vocabulary is built the way CLIP's `SimpleTokenizer` builds it: the 256 byte-to-unicode
    characters, the same with '</w>' (end of word), one token per merge, then <|startoftext|>
    and <|endoftext|>. Truncating to the first `num_merges` merges (1000 -> 1514 tokens) keeps
    the ids of those tokens equal to real CLIP's ('a</w>' = 320) and <|endoftext|> the largest
    id, which CLIP text towers pool at.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + num_merges]]  # line 0 is the version header
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def tiny_clip_text_encoder(tokenizer, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A random 2-layer CLIPTextModel sized to the tokenizer (special-token ids from it)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, projection_dim=hidden_size,
                         max_position_embeddings=tokenizer.model_max_length, layer_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg)


def tiny_sd_pipeline(out_dir: str | Path, sample_size: int = 32, seed: int = 0,
                     block_out_channels: tuple[int, ...] = (8, 16), cross_attention_dim: int = 32) -> Path:
    """Save a random latent-diffusion `StableDiffusionPipeline` to `out_dir` and return the path.

    Latents (4, sample_size, sample_size); the 2-block VAE downsamples once, so images are
    2·sample_size pixels (64×64 by default). Scheduler: DDIM with SD 1.x's config. Loads back with
    `StableDiffusionPipeline.from_pretrained(path)`.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")  # save_pretrained below rewrites it in place
    groups = min(block_out_channels[0], 4)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, norm_num_groups=groups,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * sample_size)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=cross_attention_dim, seed=seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_DDIM_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def tiny_pixel_unet(sample_size: int = 16, cross_attention_dim: int = 32, seed: int = 0,
                    block_out_channels: tuple[int, ...] = (32, 64)):
    """A random pixel-space UNet2DConditionModel: in/out channels 3 (RGB in [−1, 1]), no VAE.

    (32, 64) channels, one cross-attention block: ~1M parameters, the size DESIGN.md measured
    drawing recognisable shapes at 16×16 on a CPU.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=block_out_channels, norm_num_groups=min(block_out_channels[0], 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)
