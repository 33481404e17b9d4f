#!/usr/bin/env python
"""Writes a small offline example for the image pipeline into DIR (no hub needed):

  DIR/base/           a small text-to-image diffusion model trained here for a minute or two on the
                      image miniature world's captioned shapes (diffusers UNet2DConditionModel in pixel
                      space + CLIP text encoder + tokenizer + DDIM scheduler, 16×16 RGB): a pipeline
                      folder, the way `--pipeline` takes a Stable Diffusion one
  DIR/prefs.jsonl     {"prompt", "images", "ranking"}: K = 4 samples of that model per prompt, ranked
                      best first (image paths are relative to the JSONL file: prefs-images/)
  DIR/prompts.txt     the plain prompts ("a red circle", ...) for DDPO, one per line
  DIR/compare.jsonl   {"prompt", "engineered"}: the same prompts, plain and with the quality tags that
                      the model's training captions put on clean, centred pictures

The rankings stand in for people's: the image world's gold judge ranks each group with labeler noise
calibrated so that two labelers agree 75% of the time (InstructGPT §3.4). It can be named as DDPO's
`monitor=image_rlhf.world:gold_score` or as the judge of `align compare` to watch what the labels meant;
the reward model and DDPO never see it.

Usage: python scripts/make_image_example.py DIR [BASE_STEPS]
"""
import argparse
import json
from pathlib import Path

from image_rlhf.demo import ImageDemoPreset, make_preferences
from image_rlhf.pipeline import load_pipeline
from image_rlhf.world import engineered_prompt, plain_prompt, prompt_pairs
from image_rlhf.world_train import DiffusionTrainConfig, train_diffusion

GROUPS, K = 8, 4


def main(out: str, steps: int = 400, batch_size: int = 32) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DiffusionTrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, warmup=20, block_out_channels=(16, 32),
                               num_merges=2000, max_length=20)
    stats = train_diffusion(cfg, out / "base")
    pairs = prompt_pairs("all")
    sampling = ImageDemoPreset()  # the demo's sampler: 6 DDIM steps, η = 1, guidance 3
    prefs = make_preferences(load_pipeline(out / "base"), pairs, GROUPS, K, sampling, out, "prefs", seed=0)
    (out / "prompts.txt").write_text("".join(plain_prompt(c, s) + "\n" for c, s in pairs))
    (out / "compare.jsonl").write_text("".join(
        json.dumps({"prompt": plain_prompt(c, s), "engineered": engineered_prompt(c, s)}) + "\n" for c, s in pairs))
    print(f"example written to {out}: base model ({stats['unet_params'] / 1e6:.2f}M-param UNet, {steps} steps, "
          f"{stats['seconds']:.0f} s), {prefs['n_groups']} rankings of {K} of its samples "
          f"(labeler agreement {prefs['expected_agreement']:.0%}), {len(pairs)} prompts")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default="runs/image-example", help="output folder (default %(default)s)")
    parser.add_argument("base_steps", nargs="?", type=int, default=400, help="training steps of the base model")
    args = parser.parse_args()
    main(args.dir, args.base_steps)
