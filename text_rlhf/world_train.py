"""Pretraining the text world's base model: a tiny GPT-2 on the world's "internet" corpus.

The base model only ever sees `world.make_corpus` documents (exam sheets without answers, prose,
~20% Q:/A: pages) joined by EOS — so whether it answers a plain instruction or a few-shot Q:/A:
prompt is whatever that data taught it. Plain next-token cross-entropy on packed blocks
(GPT-2/nanoGPT style), AdamW with warmup and cosine decay; saved with `save_pretrained` (model +
tokenizer) so every later stage loads it by path like any hub checkpoint.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from align.runner import progress, seed_everything
from align.session import adamw, warmup_cosine
from text_rlhf import world

logger = logging.getLogger(__name__)

CODE_VERSION = "text-base-2"
"""Part of the cache key: bump when this file changes what a cached base model is."""


@dataclass
class BaseLMConfig:
    n_docs: int = 30000
    """Corpus documents (~38 tokens each)."""
    qa_fraction: float = 0.5
    """Share of Q:/A: pages in the corpus. Only exam sheets (no answers) ever follow a bare
    instruction line with anything, so plain prompts get parroted whatever this share is; it sets
    how many solved examples the model learns the tasks from."""
    filler_fraction: float = 0.1
    """Share of prose documents; the rest are exam sheets without answers."""
    families: tuple[str, ...] = ()
    """Task families in the corpus (empty = all of world_tasks.FAMILIES)."""
    steps: int = 1000
    batch_size: int = 32
    block_size: int = 128
    """Tokens per training sequence: documents are packed, EOS between them."""
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    n_layer: int = world.TINY_GPT2["n_layer"]
    n_embd: int = world.TINY_GPT2["n_embd"]
    n_head: int = world.TINY_GPT2["n_head"]
    dropout: float = 0.0
    """Off, as in nanoGPT's pretraining: a model this small under-fits its corpus, and dropout's
    masks cost ~35% of a CPU training step. Saved in the config, so SFT, RM and PPO run without it."""
    seed: int = 0

    def cache_key(self) -> dict:
        return {"world": "text", "code": CODE_VERSION, **asdict(self)}


def pack(docs: list[str], tok, block_size: int) -> torch.Tensor:
    """The corpus as one EOS-separated token stream, cut into (N, block_size) rows."""
    eos = tok.eos_token_id
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    stream = [eos]
    for doc in ids:
        stream.extend(doc)
        stream.append(eos)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def pretrain(cfg: BaseLMConfig, out: Path, show_progress: bool = True) -> dict:
    """Train the base LM from scratch into `out` (model + tokenizer); returns {"loss", "seconds", "tokens"}."""
    seed_everything(cfg.seed)
    tok = world.build_world_tokenizer()
    model = world.build_tiny_gpt2(tok, seed=cfg.seed, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                   dropout=cfg.dropout)
    data = pack(world.make_corpus(cfg.n_docs, cfg.seed, qa_fraction=cfg.qa_fraction,
                                     filler_fraction=cfg.filler_fraction,
                                     families=list(cfg.families) or None), tok, cfg.block_size)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    lr_scale = warmup_cosine(cfg.warmup, cfg.steps, 0.1)   # to 10% of cfg.lr, as nanoGPT
    model.train()
    t0, ema = time.perf_counter(), None
    bar = progress(range(cfg.steps), desc="pretrain text base LM", disable=not show_progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_scale(step)
        rows = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]     # (B, T)
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stats = {"loss": ema, "seconds": time.perf_counter() - t0, "tokens": cfg.steps * cfg.batch_size * cfg.block_size,
             "params": sum(p.numel() for p in model.parameters()), "corpus_rows": len(data)}
    logger.info("text base LM: loss %.3f after %d steps (%.0f s)", ema, cfg.steps, stats["seconds"])
    return stats


def base_model(cfg: BaseLMConfig, fresh: bool = False, show_progress: bool = True) -> tuple[Path, bool]:
    """The cached base model folder for `cfg` (trained on first use or when `fresh`), and whether it was cached."""
    from align.demo import cached
    return cached("text-base", cfg.cache_key(), lambda d: pretrain(cfg, d, show_progress), fresh=fresh)
