"""The `align` command. Modality commands live beside their code and are imported by name, so
`align` itself never imports transformers or diffusers (`align --help` stays fast).

    align text sft|rm|ppo ...      text_rlhf.cli
    align image rm|ddpo ...        image_rlhf.cli
    align compare ...              align.compare (+ text_rlhf.compare / image_rlhf.compare)
    align sample ...               align.sample (the same generators and judges)
    align demo ...                 align.demo (+ text_rlhf.demo / image_rlhf.demo)
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


def add_run_args(p: argparse.ArgumentParser, preset: str = "configs/text/tiny.yaml",
                 example: str = "lr=1e-5 seed=1") -> None:
    """Flags every training command shares; `preset` and `example` are the command's own, for its help."""
    p.add_argument("--config", help=f"YAML preset (e.g. {preset}); flags and key=value override it")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(overrides=[])
    p.epilog = f"Any number of key=value config overrides may follow, anywhere (e.g. {example})."


def stage_config(cls, args, **fields):
    """The config of a training command: dataclass defaults < --config (its `stages.<command>` block)
    < flags (None = not given) < key=value overrides."""
    from align.config import load_config
    return load_config(cls, args.config, args.overrides, section=args.stage, **fields)


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
    add_compare_parser(sub)
    add_sample_parser(sub)
    add_demo_parser(sub)
    return parser


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the whole recipe on the miniature worlds (base -> SFT -> RM -> RL), with a "
                                    "report of plain vs engineered prompts before and after alignment")
    d.add_argument("--world", choices=["text", "image", "both"], default="both",
                   help="which miniature world(s) to run (default both, side by side)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); its world folders are replaced")
    d.add_argument("--fresh", action="store_true", help="retrain the cached base models (cache: $ALIGN_CACHE, "
                   "default ~/.cache/align/worlds)")
    d.add_argument("--preset", default="default", help="default (the demo) or small (the test suite's end-to-end preset, ~5 min cold)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    d.set_defaults(func=_demo, overrides=[])


def _demo(args) -> None:
    if args.overrides:
        raise ValueError(f"align demo takes no key=value overrides (got {' '.join(args.overrides)})")
    demo = importlib.import_module("align.demo")
    worlds = ["text", "image"] if args.world == "both" else [args.world]
    demo.run_demo(worlds, args.out, preset=args.preset, fresh=args.fresh)


def add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="plain vs engineered prompts: generators × a judge -> score, success "
                                       "and win-rate tables with bootstrap CIs")
    c.add_argument("--model", action="append", help="generator(s): PATH or NAME=PATH, comma-separated or "
                   "repeated; the first is the baseline (e.g. base), the others are compared with it")
    c.add_argument("--kind", choices=["text", "image"], help="default: inferred from the first model folder")
    c.add_argument("--prompts", help='JSONL {"prompt", "engineered"?, "id"?} per line, or plain prompts one per line')
    c.add_argument("--judge", help="reward model / CLIP reward folder, image built-in (jpeg, pickscore, aesthetic, hpsv2, ...), or "
                                        "module:function (gold judge)")
    c.add_argument("--template", help="engineered variant: fewshot-qa, sd-tags, or a text with {prompt}")
    c.add_argument("--fewshot", help='{"prompt", "response"} JSONL of examples for --template fewshot-qa')
    c.add_argument("--seeds", help="comma-separated seeds (default 0)")
    c.add_argument("--success-threshold", type=float, help="success = score >= this (default 1.0 for "
                   "module:function judges, none otherwise)")
    c.add_argument("--max-new-tokens", type=int, help="text: response length limit (default 64)")
    c.add_argument("--sample", action="store_true", default=None, help="text: sample (temperature 1) instead of greedy")
    c.add_argument("--stop", help="text: cut responses at the first occurrence of this string (e.g. '\\nQ:')")
    c.add_argument("--num-steps", type=int, help="image: DDIM steps (default 50)")
    c.add_argument("--batch-size", type=int, help="prompts per generate call")
    c.add_argument("--limit", type=int, help="first N prompts only")
    c.add_argument("--out", help="write OUT/compare.md and OUT/compare.json")
    c.add_argument("--config", help="YAML of CompareConfig fields; flags and key=value override it")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    c.set_defaults(func=_compare, overrides=[])
    c.epilog = "Any CompareConfig field as key=value (e.g. image.guidance_scale=7.5 n_boot=5000)."


def _compare(args) -> None:
    compare = importlib.import_module("align.compare")  # imports torch: not at `align --help` time
    from align.config import load_config
    # --stop '\nQ:' arrives as backslash + n: read the escapes \n and \t as newline and tab
    unescape = lambda s: s.replace("\\n", "\n").replace("\\t", "\t") if s else s  # noqa: E731
    stop, template = unescape(args.stop), unescape(args.template)
    fields = {"models": args.model, "kind": args.kind, "prompts": args.prompts, "judge": args.judge,
              "template": template, "fewshot": args.fewshot, "success_threshold": args.success_threshold,
              "text.max_new_tokens": args.max_new_tokens, "text.sample": args.sample, "text.stop": stop,
              "image.num_steps": args.num_steps, "batch_size": args.batch_size, "limit": args.limit,
              "out": args.out,
              "seeds": _seeds(args.seeds)}
    compare.run_compare(load_config(compare.CompareConfig, args.config, args.overrides, **fields))


def add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="K candidates per prompt from a text model or image pipeline, written for "
                                      "people (or a judge) to rank: the reward model's data")
    s.add_argument("--model", help="generator: causal-LM folder or hub id, or image pipeline / DDPO run folder")
    s.add_argument("--kind", choices=["text", "image"], help="default: inferred from the model folder")
    s.add_argument("--prompts", help='prompts: a text file, one per line, or JSONL ({"prompt"} per line)')
    s.add_argument("--k", type=int, help="candidates per prompt (default 4)")
    s.add_argument("--judge", help="optional: rank by this judge's scores (reward model folder, image built-in, or "
                                   "module:function)")
    s.add_argument("--out", help="output folder: candidates.jsonl (+ images/ and sheets/), report.md")
    s.add_argument("--config", help="YAML of SampleConfig fields; flags and key=value override it")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.set_defaults(func=_sample, overrides=[])
    s.epilog = "Any SampleConfig field as key=value (e.g. text.temperature=0.8 image.num_steps=20 seed=1)."


def _sample(args) -> None:
    sample = importlib.import_module("align.sample")
    from align.config import load_config
    fields = {"model": args.model, "kind": args.kind, "prompts": args.prompts, "k": args.k, "judge": args.judge,
              "out": args.out}
    sample.run_sample(load_config(sample.SampleConfig, args.config, args.overrides, **fields), resume=args.resume)


def _seeds(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: expected integers separated by commas, e.g. 0,1,2") from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under accelerate launch, INFO once (rank 0's), not once per process
        logging.getLogger().setLevel(logging.WARNING)
    if not verbose:
        # open_clip logs its loading steps through the root logger at INFO: keep those to warnings
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
        for noisy in ("transformers", "diffusers", "accelerate", "torch", "peft", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings  # the libraries' UserWarnings/FutureWarnings about their own APIs: -v shows them
        for module in ("peft", "transformers", "diffusers", "accelerate", "huggingface_hub"):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        # read by transformers/huggingface_hub when they are first imported (after this point: the
        # commands import them lazily), so align itself never imports transformers
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _library_io_errors() -> tuple:
    """I/O errors that libraries raise as something other than OSError, once a command has imported them:
    safetensors' SafetensorError ("No space left on device" while saving weights, a truncated file)."""
    st = sys.modules.get("safetensors")
    return (st.SafetensorError,) if hasattr(st, "SafetensorError") else ()


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
    if getattr(args, "threads", None) is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError, *_library_io_errors()) as e:  # user errors (a folder given
        # as a file, a full disk, ...): one clear line, no traceback
        if args.verbose:
            raise
        logging.getLogger("align").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
