"""Text: SFT, reward model and PPO on any Hugging Face causal LM."""
from __future__ import annotations

import argparse

from align.cli import add_run_args, stage_config


def add_parsers(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("sft", help="supervised fine-tuning on {prompt, response} demonstrations")
    s.add_argument("--model", help="base causal LM: folder or hub id")
    s.add_argument("--data", help="demonstrations JSONL")
    s.add_argument("--out", help="output folder")
    add_run_args(s)
    s.set_defaults(func=_sft)

    r = sub.add_parser("rm", help="pairwise (Bradley-Terry) reward model on ranked responses")
    r.add_argument("--model", help="trunk: folder (e.g. the SFT model) or hub id")
    r.add_argument("--data", help="preferences JSONL, or hf:NAME[:SPLIT] (Anthropic-HH style)")
    r.add_argument("--out", help="output folder")
    add_run_args(r)
    r.set_defaults(func=_rm)

    q = sub.add_parser("ppo", help="PPO against a reward model, KL-regularised to the reference policy")
    q.add_argument("--policy", help="policy to optimise (e.g. the SFT model folder); also the reference")
    q.add_argument("--reward", help="reward model folder, or module:function scoring (prompts, responses)")
    q.add_argument("--prompts", help='prompts JSONL ({"prompt"} per line) or a text file, one per line')
    q.add_argument("--out", help="output folder")
    add_run_args(q, example="ppo.clip_range=0.1 lora.r=16 mixed_precision=bf16")
    q.set_defaults(func=_ppo)


def _sft(args):
    from text_rlhf.sft import SFTConfig, run_sft
    run_sft(stage_config(SFTConfig, args, model=args.model, data=args.data, out=args.out), resume=args.resume)


def _rm(args):
    from text_rlhf.rm import RMConfig, run_rm
    run_rm(stage_config(RMConfig, args, model=args.model, data=args.data, out=args.out), resume=args.resume)


def _ppo(args):
    from text_rlhf.ppo import PPOConfig, run_ppo
    run_ppo(stage_config(PPOConfig, args, policy=args.policy, reward=args.reward, prompts=args.prompts, out=args.out),
            resume=args.resume)
