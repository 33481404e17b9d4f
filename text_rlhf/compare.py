"""`align compare` for causal LMs: a batched generator and the judges (a reward model or a function).

Generation is greedy by default (deterministic: the model's single best answer, so seeds change
nothing and one run serves them all); `text.sample=true` samples at `text.temperature` with a seed
per generate call. Either way the GenerationConfig is explicit and nothing is inherited from the
checkpoint's generation_config (`raw_sampling`): a chat model's top_p or repetition penalty would
otherwise change what "the model's answer" means between checkpoints.

A response is the continuation up to (not including) the first EOS. Few-shot prompts invite the
model to go on after its answer ("\\n\\nQ: next question ..."): `text.stop` cuts every response, of
every arm alike, at the first occurrence of a string (e.g. "\\nQ:"), so a plain and a few-shot
prompt are judged on the answer alone. Nothing is cut by default: the raw continuation is what a
user of the model would get.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from align.compare import CompareConfig, FunctionJudge, is_function_spec, torch_dtype
from text_rlhf.models import (ModelLoadError, _check_path, decode_responses, format_prompts, load_causal_lm,
                              load_reward_scorer, load_tokenizer, max_positions, read_align_meta)
from text_rlhf.policy import raw_sampling, response_mask, stop_token_ids
from text_rlhf.rm import TextScorer

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


def generation_config(tok, params, stop_ids: list[int] | None = None):
    """Greedy or raw sampling, every knob explicit (left None, transformers would fill top_k=50); responses end
    on any of stop_ids (policy.stop_token_ids; default the tokenizer's EOS)."""
    from transformers import GenerationConfig
    stop_ids = [tok.eos_token_id] if stop_ids is None else stop_ids
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=[i for i in stop_ids if i is not None] or None)
    common = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, use_cache=True, **ids)
    if not params.sample:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0, typical_p=1.0,
                            epsilon_cutoff=0.0, eta_cutoff=0.0, **common)


class TextGenerator:
    """gen(prompts, seed) -> responses (str), left-padded batches, cut at EOS (and at `stop`)."""

    def __init__(self, path: str, params, device="cpu", dtype=torch.float32):
        self.tok = load_tokenizer(path, padding_side="left")
        self.lm = load_causal_lm(path, dtype=dtype).to(device).eval()
        self.lm.requires_grad_(False)
        self.params, self.device = params, torch.device(device)
        self.stop_ids = stop_token_ids(self.tok, self.lm)
        self.gen_cfg = generation_config(self.tok, params, self.stop_ids)
        self.deterministic = not params.sample
        self.max_positions = max_positions(self.lm.config)

    def formatted(self, prompts: list[str]) -> list[str]:
        return format_prompts(self.tok, prompts, self.params.chat_template, "text.chat_template")

    def check_prompts(self, items) -> None:
        """Every prompt, plain and engineered, must leave room for max_new_tokens in the model's positions (a
        few-shot prefix easily fills a small context); the error names the prompt's id and variant."""
        if not self.max_positions:
            return
        room = self.max_positions - self.params.max_new_tokens
        for variant in ("plain", "engineered"):
            texts = self.formatted([getattr(it, variant) for it in items])
            lengths = [len(x) for x in self.tok(texts)["input_ids"]]
            too_long = [i for i, n in enumerate(lengths) if n > room]
            if too_long:
                i = too_long[0]
                raise ValueError(f"prompt id {items[i].id!r} ({variant}) is {lengths[i]} tokens: with max_new_tokens "
                                 f"{self.params.max_new_tokens} it exceeds the model's {self.max_positions} positions "
                                 f"({len(too_long)} {variant} prompts do; longest {max(lengths)} tokens): shorten "
                                 f"them (fewer shots: fewshot_k) or lower max_new_tokens")

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        enc = self.tok(self.formatted(list(prompts)), return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)   # (B, P)
        if self.max_positions:
            lengths = mask.sum(1)
            too_long = (lengths + self.params.max_new_tokens > self.max_positions).nonzero().flatten()
            if len(too_long):
                i = int(too_long[0])
                shown = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:60] + "…"
                raise ValueError(f"prompt {shown!r} is {int(lengths[i])} tokens: with max_new_tokens "
                                 f"{self.params.max_new_tokens} it exceeds the model's {self.max_positions} positions")
        rng = contextlib.nullcontext()
        if self.params.sample:  # generate draws from the global RNG: seed it, and restore it after
            devices = [self.device] if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        with rng, raw_sampling(self.lm):
            if self.params.sample:
                torch.manual_seed(seed)
            seq = self.lm.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_cfg)
        responses = seq[:, ids.shape[1]:]                                                   # (B, T)
        keep = response_mask(responses, self.stop_ids)                                      # (B, T) incl. EOS
        texts = decode_responses(self.tok, ids, mask, responses, keep)                     # EOS and pads dropped
        if self.params.stop:
            texts = [t.split(self.params.stop, 1)[0] for t in texts]
        return texts


class RMJudge:
    """A reward model folder (`align text rm`, or a hub/TRL one): the score of prompt + response + EOS, as it was
    trained (`load_reward_scorer`: where that model reads it; an encoder's `[CLS] prompt [SEP] response [SEP]`)."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32, chat_template: bool = False):
        self.tok, self.path = load_tokenizer(path, padding_side="right"), path
        self.chat_template = chat_template  # prompts as a user turn of the RM's own template, as it was trained
        if chat_template:  # a judge without one fails now, not after the first model's generations
            format_prompts(self.tok, ["x"], True, f"compare: text.chat_template (the judge {path!r})")
        scorer = load_reward_scorer(path, self.tok, dtype).to(device).eval()
        scorer.requires_grad_(False)
        limit = max_positions(scorer.model.config) or 10 ** 6
        self.score = TextScorer(scorer, self.tok, min(limit, self.tok.model_max_length), device)

    def check_prompts(self, prompts) -> None:
        """Conversations need the judge's chat template too: fail before generating, not at the first score."""
        format_prompts(self.tok, list(prompts), self.chat_template, f"--judge {self.path}")

    @torch.no_grad()
    def __call__(self, prompts, responses) -> torch.Tensor:
        return self.score(format_prompts(self.tok, list(prompts), self.chat_template, "text.chat_template"),
                          list(responses))


def check_model(path: str) -> None:
    """Cheap checks of a generator spec (files only) before anything runs: the folder exists, holds a transformers
    model (not a pipeline or an image reward model) and is not an `align text rm` output."""
    p = _check_path(path, "model")
    kind = read_align_meta(p).get("kind", "") if Path(p).is_dir() else ""
    if kind == "text_reward_model":
        raise ModelLoadError(f"model: {path!r} is a reward model (align.json kind {kind!r}), not a policy: pass a "
                             "causal-LM folder (an SFT/PPO run's) as --model, and the reward model as --judge")


def load_generator(path: str, cfg: CompareConfig, device) -> TextGenerator:
    return TextGenerator(path, cfg.text, device, torch_dtype(cfg.dtype))


def load_judge(spec: str, cfg: CompareConfig, device):
    """module:function (gold judge) or a reward-model folder / hub id."""
    if is_function_spec(spec):
        return FunctionJudge(spec)
    return RMJudge(spec, device, torch_dtype(cfg.dtype), cfg.text.chat_template)


def describe(cfg: CompareConfig) -> str:
    t = cfg.text
    how = f"sampling at temperature {t.temperature:g}" if t.sample else "greedy decoding"
    return f"{how}, ≤ {t.max_new_tokens} new tokens" + (f", responses cut at {t.stop!r}" if t.stop else "") + \
        (", prompts as chat-template user turns" if t.chat_template else "")


def samples_markdown(arms, items, out_dir, n: int = 3, width: int = 160) -> str:
    """A few responses of every arm (first seed) for the first n prompts."""
    from align.report import markdown_table
    rows = []
    for i, item in enumerate(items[:n]):
        for name, arm in arms.items():
            text = arm.samples[i] if i < len(arm.samples) else ""
            text = text if len(text) <= width else text[:width] + "…"
            rows.append({"prompt": item.id, "arm": name, "score": arm.scores[i, 0].item(), "response": repr(text)})
    return markdown_table(rows)
