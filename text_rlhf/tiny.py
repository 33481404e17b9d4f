"""Tiny random causal LMs and tokenizers built offline, saved with save_pretrained.

For tests, benchmarks and the miniature worlds: the same layouts a hub checkpoint has, so every
loading path (`from_pretrained(dir)`) is the real one.
"""
from __future__ import annotations

from pathlib import Path


def build_bpe_tokenizer(corpus: list[str], vocab_size: int = 256, pad: bool = True):
    """A byte-level BPE tokenizer trained in code on `corpus` (any text encodes: byte fallback).
    Specials: <|endoftext|> (EOS/BOS), and <pad> unless pad=False (to exercise the EOS-as-pad path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<pad>"] if pad else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    kw = dict(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
              unk_token="<|endoftext|>")
    if pad:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kw)


def build_sp_tokenizer(corpus: list[str], vocab_size: int = 256):
    """A Llama-2-style SentencePiece BPE (transformers' LlamaTokenizer: "▁" for spaces and prepended to the text,
    byte fallback, <s> added in front, no pad token) trained in code on `corpus`."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    bpe = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return LlamaTokenizer(vocab=bpe["vocab"], merges=merges, add_bos_token=True)


def build_wordpiece_tokenizer(corpus: list[str], vocab_size: int = 200):
    """A BERT/DeBERTa-style WordPiece tokenizer trained in code on `corpus`: lower-cased, `[CLS] a [SEP]` and
    `[CLS] a [SEP] b [SEP]` (token type 1 on b), [PAD]; EOS is [SEP], as DeBERTa-v3's tokenizer has it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                                             special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"]))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]")


def build_wordlevel_tokenizer(vocab_size: int = 512):
    """The peer benchmark's tokenizer: <pad>, <eos>, <unk> then words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<eos>")


def tiny_causal_lm(arch: str, tokenizer, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                   n_positions: int = 128, seed: int = 0, dropout: float | None = None):
    """A random GPT-2, Llama- or OPT-350m-style model sized to the tokenizer; `dropout` (GPT-2: embedding,
    residual and attention; Llama: attention; OPT: both) overrides the architecture's default."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, **ids)
        if dropout is not None:
            cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = dropout
        return GPT2LMHeadModel(cfg)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=2 * n_embd,
                          num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                          max_position_embeddings=n_positions, tie_word_embeddings=False, **ids)
        if dropout is not None:
            cfg.attention_dropout = dropout
        return LlamaForCausalLM(cfg)
    if arch == "opt":  # OPT-350m's layout: post-norm, states projected to a narrower width before the head
        from transformers import OPTConfig, OPTForCausalLM
        cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=n_embd, ffn_dim=2 * n_embd, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, max_position_embeddings=n_positions,
                        word_embed_proj_dim=n_embd // 2, do_layer_norm_before=False, **ids)
        if dropout is not None:
            cfg.dropout = cfg.attention_dropout = dropout
        return OPTForCausalLM(cfg)
    raise ValueError(f"unknown tiny architecture {arch!r} (gpt2, llama or opt)")


def save_tiny(out: str | Path, arch: str, corpus: list[str], vocab_size: int = 256, pad: bool = True, **model_kw) -> Path:
    out = Path(out)
    tok = build_bpe_tokenizer(corpus, vocab_size, pad=pad)
    tiny_causal_lm(arch, tok, **model_kw).save_pretrained(out)
    tok.save_pretrained(out)
    return out
