#!/usr/bin/env python
"""Writes a small offline example for the text pipeline into DIR (no hub needed):

  DIR/base/          a tiny random GPT-2 + a byte-level BPE tokenizer (save_pretrained layout)
  DIR/demos.jsonl    {"prompt", "response"}: "add 3 and 4:" -> " 7"
  DIR/prefs.jsonl    {"prompt", "completions", "ranking"}: right answer > wrong > rambling > no answer (K=4)
  DIR/prompts.jsonl  {"prompt"}: held-out addition prompts for PPO

Usage: python scripts/make_text_example.py DIR
"""
import argparse
import json
import random
from pathlib import Path

from text_rlhf.tiny import save_tiny


def main(out: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    train, held = pairs[:80], pairs[80:]
    corpus = [f"add {a} and {b}: {a + b}" for a, b in pairs] + ["the quick brown fox jumps over the lazy dog"]
    save_tiny(out / "base", "gpt2", corpus * 3, vocab_size=320, n_layer=2, n_embd=64, n_head=4)
    with open(out / "demos.jsonl", "w") as f:
        for a, b in train:
            f.write(json.dumps({"prompt": f"add {a} and {b}:", "response": f" {a + b}"}) + "\n")
    with open(out / "prefs.jsonl", "w") as f:
        for a, b in train:
            wrong = rng.sample([x for x in range(19) if x != a + b], 2)
            completions = [f" {wrong[0]}", f" {a + b}", f" {wrong[1]} and more", " ?"]
            f.write(json.dumps({"prompt": f"add {a} and {b}:", "completions": completions, "ranking": [1, 0, 2, 3]}) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for a, b in held + train[:20]:
            f.write(json.dumps({"prompt": f"add {a} and {b}:"}) + "\n")
    print(f"example written to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default="runs/text-example", help="output folder (default %(default)s)")
    main(parser.parse_args().dir)
