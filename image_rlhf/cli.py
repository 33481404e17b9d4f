"""Image: DDPO on diffusers pipelines against a CLIP-based learned reward."""
from __future__ import annotations

import argparse

from align.cli import add_run_args, stage_config


def add_parsers(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", required=True)
    r = sub.add_parser("rm", help="CLIP reward model (PickScore-style or aesthetic head) on ranked image pairs")
    r.add_argument("--clip", help="starting CLIP: an open_clip model name (+ pretrained=TAG, e.g. ViT-H-14 "
                                  "pretrained=laion2b_s32b_b79k), a model-config .json, tiny-clip, or a saved "
                                  "reward folder (an `align image rm` run)")
    r.add_argument("--data", help="image preferences JSONL (image paths relative to the file), or hf:NAME[:SPLIT], a "
                                  "datasets dataset in Pick-a-Pic's layout (e.g. hf:yuvalkirstain/pickapic_v2:train; "
                                  "hf_limit=N reads N rows) or with prompt/chosen/rejected image columns")
    r.add_argument("--out", help="output folder")
    add_run_args(r, "configs/image/tiny.yaml", "mode=aesthetic lr=1e-5 epochs=2")
    r.set_defaults(func=_rm)

    d = sub.add_parser("ddpo", help="DDPO: RL fine-tuning of a diffusion pipeline against a reward")
    d.add_argument("--pipeline", help="diffusers pipeline to fine-tune: folder or hub id (SD 1.x/2.x, or pixel layout)")
    d.add_argument("--reward", help="reward: CLIP reward folder (align image rm), pickscore, aesthetic, hpsv2, hpsv2.1 "
                                    "(published checkpoints; pickscore:MODEL, aesthetic:CLIP,MLP, hpsv2:CKPT[,CLIP] or "
                                    "a transformers CLIP folder for local copies), jpeg, incompressibility, brightness, or module:function "
                                    "scoring (prompts, images)")
    d.add_argument("--prompts", help='prompts: a text file, one per line, or JSONL ({"prompt"} per line)')
    d.add_argument("--out", help="output folder")
    add_run_args(d, "configs/image/tiny.yaml", "lora.r=8 num_steps=20 kl_coef=0.1")
    d.set_defaults(func=_ddpo)


def _rm(args):
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    run_image_rm(stage_config(ImageRMConfig, args, clip=args.clip, data=args.data, out=args.out), resume=args.resume)


def _ddpo(args):
    from image_rlhf.ddpo import DDPOConfig, run_ddpo
    run_ddpo(stage_config(DDPOConfig, args, pipeline=args.pipeline, reward=args.reward, prompts=args.prompts, out=args.out),
             resume=args.resume)
