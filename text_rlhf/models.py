"""Loading causal LMs, tokenizers and reward models; the forward passes PPO needs.

Padding is always tracked by attention masks, never by token id: a tokenizer without a pad token
gets EOS as pad, and then a pad and a real EOS share an id. Position ids are computed from the mask
so that a left-padded prompt sees the same positions in `generate` and in the training forward.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    pass


def _check_path(path: str, what: str, need_config: bool = True) -> str:
    """A local-looking path that does not exist is a user error, not a hub lookup."""
    p = Path(str(path)).expanduser()
    if p.exists():
        if need_config and p.is_dir() and (p / "model" / "config.json").exists():
            p = p / "model"  # an align run folder: its final model
        if need_config and p.is_dir() and not (p / "config.json").exists():
            raise ModelLoadError(f"{what}: {str(path)!r} has no config.json (not a save_pretrained folder)")
        return str(p)
    s = str(path)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith("/") or not s:
        raise ModelLoadError(f"{what}: no such folder {s!r}")
    return s  # a hub id such as "gpt2" or "EleutherAI/pythia-160m"


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer
    path = _check_path(path, "tokenizer", need_config=False)
    if (Path(path) / "model" / "tokenizer_config.json").exists():
        path = str(Path(path) / "model")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"tokenizer: cannot load {path!r}: {e}") from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer at {path!r} has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.warning("tokenizer at %s has no pad token: using EOS (%r, id %d) as pad; padding is tracked by "
                    "attention masks, so a real EOS is never mistaken for a pad", path, tok.eos_token, tok.eos_token_id)
    tok.padding_side = padding_side
    return tok


def dtype_of(name: str) -> torch.dtype:
    return {"no": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[name]


def fuse_activations(model: nn.Module) -> int:
    """Swap transformers' `NewGELUActivation` (GPT-2's tanh-GELU as five Python-level ops) for
    torch's fused `gelu(approximate="tanh")`: the same function (|Δ| ~1e-7 in fp32), one kernel
    forward and backward — 25-30% of a small GPT-2's training step on a CPU. Returns the count."""
    from transformers.activations import NewGELUActivation
    n = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
                n += 1
    return n


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, fused_activations: bool = True):
    from transformers import AutoModelForCausalLM
    path = _check_path(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ModelLoadError(f"model: cannot load {path!r}: {e}") from e
    if fused_activations:
        fuse_activations(model)
    return model


def load_seq_scorer(path: str, dtype: torch.dtype = torch.float32, pad_token_id: int | None = None):
    """A causal-LM trunk with a scalar head (AutoModelForSequenceClassification, num_labels=1); from a
    plain causal-LM checkpoint the head starts random, as in InstructGPT's RM initialisation."""
    from transformers import AutoModelForSequenceClassification
    path = _check_path(path, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except OSError as e:
        raise ModelLoadError(f"reward model: cannot load {path!r}: {e}") from e
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    fuse_activations(model)
    return model


def apply_lora(model, lora, task_type: str, mixed_precision: str = "no"):
    """Wrap `model` with peft LoRA adapters when lora.r > 0 (else return it unchanged).

    mixed_precision fp16/bf16: the frozen base weights are cast to that dtype first (half the memory and
    bandwidth of float32; autocast computes in it anyway), while everything trained — the adapters (peft
    keeps them float32) and a sequence classifier's `score` head — stays float32 for the optimiser."""
    if lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    if mixed_precision != "no":
        model.to(dtype_of(mixed_precision))
    targets = lora.target_modules
    targets = targets[0] if len(targets) == 1 and targets[0] == "all-linear" else list(targets)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     task_type=task_type, modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    from align.session import float32_trainable
    model = get_peft_model(model, cfg)
    float32_trainable(model)
    return model


def unwrap_hf(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected, adapters active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_hf(model, tokenizer, out: str | Path, merge_lora: bool = True) -> None:
    """save_pretrained layout loadable by transformers directly; a LoRA model is saved merged (and its
    adapter beside it, in out/adapter) so the next stage can load it by path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter")
        if merge_lora:
            import copy
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; pads get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token (mask 1) of each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def trunk_and_head(model):
    """(trunk, lm_head) of a causal LM, so the vocabulary projection can run on response positions only."""
    hf = unwrap_hf(model)
    return hf.base_model, hf.get_output_embeddings()


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, T, V), (B, T) -> (B, T), in float32."""
    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class SequenceScorer(nn.Module):
    """Reward model: a causal-LM trunk + scalar head read at the last non-pad token (by mask).

    Wraps an AutoModelForSequenceClassification (saved/loaded with save_pretrained) but does not use
    its pooling, which finds the last token by comparing ids with pad_token_id and so breaks when
    pad == EOS. The InstructGPT shift lives in `config.reward_shift`: score = head(h_last) − shift.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        hf = unwrap_hf(model)
        self.head = getattr(hf, "score", None) or getattr(hf, "classifier", None)
        if self.head is None:
            raise ModelLoadError(f"{type(hf).__name__} has no `score`/`classifier` head")

    @property
    def shift(self) -> float:
        return float(getattr(unwrap_hf(self.model).config, "reward_shift", 0.0) or 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        trunk = unwrap_hf(self.model).base_model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).last_hidden_state  # (B, L, H)
        last = last_token_index(attention_mask)                                                  # (B,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]                    # (B, H)
        return self.head(h).squeeze(-1).float() - self.shift


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int, add_eos: bool = True
                 ) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + response (+ EOS), prompt and response tokenized apart exactly as at
    generation time (the prompt alone, then the tokens the model produced). Returns the ids and the
    prompt lengths; sequences longer than max_length keep their first max_length tokens."""
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    ids = [(p + r + eos)[:max_length] for p, r in zip(p_ids, r_ids)]
    return ids, [min(len(p), max_length) for p in p_ids]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right", fill=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask from ragged lists."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
        else:
            ids[i, L - len(s):], mask[i, L - len(s):] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def read_align_meta(path: str | Path) -> dict:
    f = Path(path) / "align.json"
    return json.loads(f.read_text()) if f.exists() else {}
