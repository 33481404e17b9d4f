"""Loading causal LMs, tokenizers and reward models; the forward passes PPO needs.

Padding is always tracked by attention masks, never by token id: a tokenizer without a pad token
gets EOS as pad, and then a pad and a real EOS share an id. Position ids are computed from the mask
so that a left-padded prompt sees the same positions in `generate` and in the training forward.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from align.data import Conversation
from align.runner import offline_unless_hub_reachable

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    pass


def _check_path(path: str, what: str, need_config: bool = True) -> str:
    """A local-looking path that does not exist is a user error, not a hub lookup."""
    p = Path(str(path)).expanduser()
    if p.exists():
        for marker, kind in (("model_index.json", "a diffusers pipeline"), ("align_reward.json", "an image reward model"),
                             ("model/align_reward.json", "an image reward model run")):
            if p.is_dir() and (p / marker).exists():
                raise ModelLoadError(f"{what}: {str(path)!r} is {kind} folder ({marker}), not a transformers "
                                     "language model: the text commands take a causal LM or its run folder")
        if need_config and p.is_dir() and (p / "model" / "config.json").exists():
            p = p / "model"  # an align run folder: its final model
        if need_config and p.is_dir() and not (p / "config.json").exists():
            raise ModelLoadError(f"{what}: {str(path)!r} has no config.json (not a save_pretrained folder)")
        return str(p)
    s = str(path)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith("/") or not s or \
            ("/" in s and Path(s.split("/")[0]).expanduser().is_dir()):  # runs/sftt: a typo, not org/name
        raise ModelLoadError(f"{what}: no such folder {s!r}")
    offline_unless_hub_reachable()  # without the hub: only its local cache, and a miss fails in seconds
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


def _missing_head(info: dict, heads: tuple[str, ...]) -> list[str]:
    """The weights of `heads` (top-level module names) that the checkpoint did not hold."""
    return sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] in heads)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, fused_activations: bool = True):
    """A causal LM whose checkpoint holds its LM head (an `align text rm` folder here is a mistake: its
    head would be random, and the error says so)."""
    from transformers import AutoModelForCausalLM
    path = _check_path(path, "model")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(f"model: cannot load {path!r}: {e}") from e
    missing = _missing_head(info, ("lm_head", "embed_out", "output"))
    kind = read_align_meta(path).get("kind", "")
    if kind == "text_reward_model" or (missing and not getattr(model.config, "tie_word_embeddings", False)):
        why = f"{', '.join(missing)} missing" if missing else "its tied embedding was never trained as an LM head"
        raise ModelLoadError(f"model: {path!r} has no language-model head ({why}"
                             f"{'; it is a ' + kind if kind else ''}): pass a causal-LM folder (an SFT/PPO run's)")
    if fused_activations:
        fuse_activations(model)
    return model


def load_seq_scorer(path: str, dtype: torch.dtype = torch.float32, pad_token_id: int | None = None,
                    new_head: bool = False):
    """A causal-LM trunk with a scalar head (AutoModelForSequenceClassification, num_labels=1). new_head (RM
    training): from a plain causal-LM checkpoint the head starts random, as in InstructGPT's RM initialisation;
    otherwise (a reward, a judge, a critic) a checkpoint without a trained head is an error, not a random score."""
    from transformers import AutoModelForSequenceClassification
    path = _check_path(path, "reward model")
    try:  # mismatched sizes are loaded (and reported below), so a classifier's head is named, not a shape error
        model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                         ignore_mismatched_sizes=True,
                                                                         output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(f"reward model: cannot load {path!r}: {e}") from e
    mismatched = {k: tuple(ckpt) for k, ckpt, _ in info.get("mismatched_keys", ())}
    heads = {k: v for k, v in mismatched.items() if k.split(".")[0] in ("score", "classifier")}
    if heads and not new_head:  # e.g. a 2-label sentiment classifier: its labels are no scalar reward
        n = next(iter(heads.values()))[0]
        raise ModelLoadError(f"reward model: {path!r} is a classifier with {n} labels, not a scalar reward model "
                             f"(num_labels=1): to reward one label's logit or probability, pass a module:function "
                             f"that computes it with transformers")
    if set(mismatched) - set(heads):
        raise ModelLoadError(f"reward model: {path!r}: checkpoint weights do not fit its config: "
                             f"{', '.join(sorted(set(mismatched) - set(heads))[:5])}")
    missing = _missing_head(info, ("score", "classifier"))
    if missing and not new_head:
        raise ModelLoadError(f"reward model: {path!r} holds no trained reward head ({', '.join(missing)} would start "
                             f"random): pass an `align text rm` output (its folder or model/), not a causal LM's")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    fuse_activations(model)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of a transformers model: `activation_checkpointing_enable` where it
    exists (transformers 5; its old name warns), else `gradient_checkpointing_enable`. transformers
    checkpoints a layer only in train mode with grad on, so the trainers put their models in train mode."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


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
    pad == EOS (it would read the token before EOS: plain `AutoModelForSequenceClassification(...)` calls score
    an align RM differently where pad == EOS; score with this class or `align compare --judge`). An optional
    constant shift in `config.reward_shift` (set by hand; PPO normalises with its own) is subtracted.

    skip_id (an RM align did not train, `load_reward_scorer`): read at the last real token that is not this id,
    the config's pad id, which is where transformers' pooling read it in training (TRL with pad == EOS: the token
    before the EOS). An encoder (BERT, DeBERTa, RoBERTa: a `classifier`, not a decoder's `score`) pools at [CLS]
    through its own pooler, so its own forward scores it (`last_token` False; inputs right-padded).
    """

    def __init__(self, model, skip_id: int | None = None):
        super().__init__()
        self.model, self.skip_id = model, skip_id
        hf = unwrap_hf(model)
        self.head = getattr(hf, "score", None) or getattr(hf, "classifier", None)
        if self.head is None:
            raise ModelLoadError(f"{type(hf).__name__} has no `score`/`classifier` head")
        self.last_token = hasattr(hf, "score")  # transformers' decoder classifiers: a `score` Linear at the last token

    @property
    def shift(self) -> float:
        return float(getattr(unwrap_hf(self.model).config, "reward_shift", 0.0) or 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        if not self.last_token:
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits[:, 0].float() - self.shift
        trunk = unwrap_hf(self.model).base_model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).last_hidden_state  # (B, L, H)
        keep = attention_mask if self.skip_id is None else attention_mask * (input_ids != self.skip_id)
        last = last_token_index(torch.where(keep.any(1, keepdim=True), keep, attention_mask))      # (B,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]                    # (B, H)
        return self.head(h).squeeze(-1).float() - self.shift


def load_reward_scorer(path: str, tokenizer, dtype: torch.dtype = torch.float32) -> SequenceScorer:
    """A trained reward model to score with (a reward, a judge): an `align text rm` output (align.json) is read at its
    last real token, the EOS it was trained on; any other (TRL, the hub) where transformers' own pooling reads it."""
    model = load_seq_scorer(path, dtype=dtype)
    ours = read_align_meta(_check_path(path, "reward model")).get("kind") == "text_reward_model"
    skip_id = None if ours else getattr(model.config, "pad_token_id", None)
    model.config.pad_token_id = tokenizer.pad_token_id
    return SequenceScorer(model, skip_id)


def encode_text_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs of an encoder RM (`SequenceScorer.last_token` False): the tokenizer's own pair encoding,
    `[CLS] prompt [SEP] response [SEP]` with its token types, as sentence-pair rewards (OpenAssistant's DeBERTa RMs:
    `tokenizer(question, answer)`) are trained. A pair longer than max_length loses the start of its longer text."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(list(prompts), list(responses), truncation="longest_first", max_length=max_length,
                        padding=True, padding_side="right", return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int, add_eos: bool = True
                 ) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + response (+ EOS): the prompt's tokens exactly as at generation time (the prompt alone),
    then the response's as they continue it (`encode_responses`). Returns the ids and the
    prompt lengths. A sequence longer than max_length loses the *start of its prompt* (its BOS kept), so
    the response and the EOS the score is read at survive (cutting the end would make two candidates of a
    long prompt the same sequence, scored at a prompt token); a response longer than max_length alone
    keeps its first tokens and the EOS. How many were cut is logged."""
    distinct = list(dict.fromkeys(prompts))  # a ranked group's K candidates share one prompt: tokenized once
    by_prompt = dict(zip(distinct, tokenizer(distinct, add_special_tokens=True)["input_ids"]))
    p_ids = [by_prompt[p] for p in prompts]
    r_ids = encode_responses(tokenizer, prompts, responses, p_ids)
    eos = [tokenizer.eos_token_id] if add_eos else []
    bos = tokenizer.bos_token_id
    ids, lengths, cut = [], [], 0
    for p, r in zip(p_ids, r_ids):
        if len(p) + len(r) + len(eos) > max_length:
            cut += 1
            head = 1 if bos is not None and p and p[0] == bos and max_length > len(eos) + 1 else 0
            room = max_length - len(r) - len(eos)  # for the prompt
            if room >= head:
                p = _keep_end(p, room, bos)
            else:
                p, r = p[:head], r[:max_length - head - len(eos)]
        ids.append(p + r + eos)
        lengths.append(len(p))
    if cut:
        log.warning("%d of %d sequences are longer than max_length %d: their prompts were cut from the start",
                    cut, len(ids), max_length)
    return ids, lengths


def encode_responses(tokenizer, prompts: list[str], responses: list[str], p_ids: list[list[int]]) -> list[list[int]]:
    """Token ids of each response as it continues its prompt: those of prompt + response after the prompt's own
    tokens `p_ids`. Tokenized alone, a response would be tokenized as the start of a text, and SentencePiece-style
    tokenizers (Llama 2, Mistral, Phi-3, ...) prepend "▁" there: "\n" + "Hi" would train "\n ▁Hi", a space the
    data does not have. Where the prompt's tokens are not a prefix of the joint ones (a token merges across the
    boundary, e.g. a prompt ending in a space) the response is tokenized alone: generation starts from `p_ids`."""
    joint = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=True)["input_ids"]
    out = [j[len(p):] if len(j) > len(p) and j[:len(p)] == p else None for p, j in zip(p_ids, joint)]
    merged = [i for i, ids in enumerate(out) if ids is None]  # tokenized alone only where needed
    if merged:
        for i, ids in zip(merged, tokenizer([responses[i] for i in merged], add_special_tokens=False)["input_ids"]):
            out[i] = ids
    return out


def decode_responses(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                     resp_mask: torch.Tensor) -> list[str]:
    """Texts of generated responses as they continue their prompts (special tokens dropped): decode(prompt +
    response) minus decode(prompt), the inverse of `encode_responses`. Decoded alone, a SentencePiece response
    loses its leading space (Llama's decoder strips the "▁" it takes for the text's own prefix): " 5" would come
    back as "5", and a reward re-encoding prompt + text would see "3:5"."""
    p = [[t for t, k in zip(row, keep) if k] for row, keep in zip(prompt_ids.tolist(), prompt_mask.tolist())]
    r = [[t for t, k in zip(row, keep) if k] for row, keep in zip(responses.tolist(), resp_mask.tolist())]
    heads = tokenizer.batch_decode(p, skip_special_tokens=True)
    fulls = tokenizer.batch_decode([a + b for a, b in zip(p, r)], skip_special_tokens=True)
    return [f[len(h):] if f.startswith(h) else tokenizer.decode(ids, skip_special_tokens=True)  # alone: rare
            for h, f, ids in zip(heads, fulls, r)]


def _keep_end(ids: list[int], n: int, bos: int | None) -> list[int]:
    """`ids` cut to its last n tokens, keeping a leading BOS (within the n) where it has one and n > 1."""
    if len(ids) <= n:
        return ids
    head = 1 if bos is not None and ids and ids[0] == bos and n > 1 else 0
    return ids[:head] + (ids[len(ids) - n + head:] if n > head else [])


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no fixed limit, e.g. ALiBi)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, Conversation))


def _conversation(prompt) -> list[dict]:
    if isinstance(prompt, Conversation):
        return list(prompt.messages)
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def format_prompts(tokenizer, prompts: list, chat_template: bool, where: str = "chat_template") -> list[str]:
    """Prompts as the model reads them: a conversation (a list of {"role", "content"}, TRL's conversational format)
    always in the tokenizer's chat template, a text in it where chat_template is set, else as it is."""
    out = list(prompts)
    idx = [i for i, p in enumerate(prompts) if chat_template or _is_conversation(p)]
    for i, text in zip(idx, chat_prompts(tokenizer, [prompts[i] for i in idx], where) if idx else []):
        out[i] = text
    return out


def chat_prompts(tokenizer, prompts: list, where: str = "chat_template") -> list[str]:
    """Each prompt as one user turn (a conversation: its turns) of the tokenizer's chat template, ending where the assistant's reply starts
    (`apply_chat_template(..., add_generation_prompt=True)`, as TRL and OpenRLHF's --apply_chat_template format
    an instruct model's prompts). The template's text opens with BOS where the tokenizer adds one itself; that
    copy is dropped, so the prompt is tokenized as any other, with one BOS. The response that follows ends with
    EOS; an instruct tokenizer's EOS is its end-of-turn token (Qwen's <|im_end|>), and `stop_token_ids` adds the
    checkpoint's generation_config ones (Llama 3's <|eot_id|>)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer of {tokenizer.name_or_path!r} has no chat template (a base model's "
                         "usually has none): give text prompts (with the format written in them) and "
                         "chat_template=false, not conversations")
    return _without_template_bos(tokenizer, [_render(tokenizer, _conversation(p), where, add_generation_prompt=True)
                                             for p in prompts])


def _render(tokenizer, messages: list[dict], where: str, **kw) -> str:
    """apply_chat_template as text; a conversation the template refuses (its `raise_exception`: Gemma's and Mistral's
    take no system turn, or need user and assistant turns to alternate) is a one-line error naming it."""
    from jinja2 import TemplateError
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except TemplateError as e:
        first = str(messages[0].get("content", ""))[:40] if messages else ""
        raise ValueError(f"{where}: the chat template of {tokenizer.name_or_path!r} refuses the conversation with roles "
                         f"{[m.get('role') for m in messages]} (starting {first!r}): {e}") from e


def _without_template_bos(tokenizer, texts: list[str]) -> list[str]:
    """Rendered templates less their leading BOS text where the tokenizer adds a BOS itself (one BOS, not two)."""
    bos = tokenizer.bos_token
    if bos and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        return [t[len(bos):] if t.startswith(bos) else t for t in texts]
    return texts


def chat_conversations(tokenizer, prompts: list, responses: list[str]) -> tuple[list[str], list[str]]:
    """(prompt part, response part) of each [user: prompt, assistant: response] conversation in the tokenizer's chat
    template: the prompt part is `chat_prompts`' (up to where the reply starts), the response part the rest of the
    rendered conversation (the reply and the template's end of turn), so `encode_pairs(..., add_eos=False)` tokenizes
    the whole as the RM was trained on it. A template whose conversation does not begin with its generation prompt
    (one that rewrites earlier turns) gives the whole conversation as the response part, after an empty prompt."""
    heads = chat_prompts(tokenizer, prompts, "reward_chat_template")
    fulls = _without_template_bos(tokenizer, [_render(tokenizer, _conversation(p) + [{"role": "assistant", "content": r}],
                                                      "reward_chat_template") for p, r in zip(prompts, responses)])
    out_p, out_r = [], []
    for head, full in zip(heads, fulls):
        cut = len(head) if full.startswith(head) else 0
        out_p.append(full[:cut]), out_r.append(full[cut:])
    return out_p, out_r


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, P) ids and mask of generation prompts. A prompt longer than max_length keeps its *last*
    tokens (an instruction's end, e.g. "Assistant:", is what the response follows) and its BOS where the
    tokenizer adds one; how many were cut is logged."""
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cut = sum(len(x) > max_length for x in ids)
    ids = [_keep_end(x, max_length, tokenizer.bos_token_id) for x in ids]
    if cut:
        log.warning("%d of %d prompts are longer than %d tokens: kept their last tokens", cut, len(ids), max_length)
    return pad_batch(ids, tokenizer.pad_token_id, side="left")


def pad_batch(seqs: list, pad_id: int, side: str = "right", fill=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask from ragged sequences (lists of ids, or 1-D integer tensors), in one scatter: the ids,
    concatenated, fill the mask's ones in row-major order, which is each row's tokens in order on either side."""
    lengths = torch.tensor([len(s) for s in seqs])                                                 # (B,)
    L = int(lengths.max())
    pos = torch.arange(L)
    mask = pos < lengths[:, None] if side == "right" else pos >= L - lengths[:, None]              # (B, L)
    ids = torch.full((len(seqs), L), pad_id if fill is None else fill, dtype=torch.long)
    if all(torch.is_tensor(s) for s in seqs):
        ids[mask] = torch.cat(list(seqs)).long()
    else:
        ids[mask] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, mask.long()


def read_align_meta(path: str | Path) -> dict:
    f = Path(path) / "align.json"
    return json.loads(f.read_text()) if f.exists() else {}
