"""The `align` command. Modality commands live beside their code and are imported by name, so
`align` itself never imports transformers or diffusers (`align --help` stays fast).

    align text sft|rm|ppo ...      text_rlhf.cli
    align image rm|ddpo ...        image_rlhf.cli
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODALITIES = {"text": "text_rlhf.cli", "image": "image_rlhf.cli"}


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags every training command shares."""
    p.add_argument("--config", help="YAML preset (e.g. configs/text/tiny.yaml); flags and key=value override it")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(overrides=[])
    p.epilog = "Any number of key=value config overrides may follow, anywhere (e.g. ppo.clip_range=0.1 lr=1e-5)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Align generative models with what people ask for.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and load reports")
    sub = parser.add_subparsers(dest="modality", required=True)
    for name, module in MODALITIES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a modality whose package is absent should not break the others
            sub.add_parser(name, help=f"(unavailable: {e})")
            continue
        mod.add_parsers(sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0]))
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    if not verbose:
        for noisy in ("transformers", "diffusers", "accelerate", "torch", "peft"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from huggingface_hub.utils import disable_progress_bars
            disable_progress_bars()
        except ImportError:
            pass
        try:
            import transformers
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere among the flags (argparse cannot interleave positionals)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra and not hasattr(args, "func"):
        parser.error(f"unexpected overrides: {' '.join(extra)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    setup_logging(args.verbose)
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        logging.getLogger("align").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
