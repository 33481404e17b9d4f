"""Reward model: a causal-LM trunk + scalar head, trained on ranked responses (Bradley-Terry).

Data: preferences JSONL ({"prompt", "chosen", "rejected"} or {"prompt", "completions", "ranking"}),
or `hf:NAME[:SPLIT]` for an Anthropic-HH-style `datasets` dataset. All pairs of a prompt go in one
batch and each response is scored once (align.reward.PairBatch). The score is read at the last
non-pad token, which is the EOS appended to every response (as PPO's responses end in EOS).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.data import batch_groups, hf_spec, load_hf_preferences, load_preferences
from align.reward import evaluate_pairs, held_out_table, pair_schedule, split_summary
from align.rl.config import LoraParams
from align.session import adamw, load_optimizer_state, rng_state, set_rng_state, start_run, train_reward_model
from text_rlhf.models import (SequenceScorer, apply_lora, enable_checkpointing, encode_pairs, encode_text_pairs,
                              format_prompts, load_seq_scorer, load_tokenizer, pad_batch, save_hf)
from text_rlhf.policy import disable_dropout

log = logging.getLogger(__name__)


@dataclass
class RMConfig:
    model: str = ""
    """Trunk to start from (usually the SFT model): folder or hub id."""
    data: str = ""
    """Preferences JSONL, or hf:NAME[:SPLIT] (Anthropic-HH style chosen/rejected conversations)."""
    eval_data: str = ""
    """Held-out preferences; empty = split eval_fraction of the prompts off `data`."""
    out: str = ""
    epochs: float = 1.0
    """InstructGPT trains its RM for a single epoch: more overfits."""
    max_pairs_per_batch: int = 64
    """Pairs per optimiser step and process; whole prompts are never split across batches."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_length: int = 512
    eval_fraction: float = 0.1
    hf_limit: int = 0
    """Read at most this many rows of an hf: dataset (0 = all)."""
    allow_duplicates: bool = False
    """A record repeated in the data file is an error naming both lines; true: drop the repeats (logged)."""
    seed: int = 0
    mixed_precision: str = "no"
    """no | bf16 | fp16 (accelerate autocast); with LoRA the frozen base is kept in that dtype (the adapters
    and the score head train in float32)."""
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    """Zero the trunk's dropout (TRL's RewardTrainer default): with it the chosen and rejected texts of a pair
    are scored under different masks, which adds noise to the very difference the loss trains. LoRA's own
    dropout (lora.dropout) is kept."""
    lora: LoraParams = field(default_factory=LoraParams)
    save_every: int = 0
    """Checkpoint every N steps (0 = end of each epoch)."""
    chat_template: bool = False
    """Format every prompt as a user turn of the model's chat template (instruct models: Llama 3, Qwen, ...;
    `text_rlhf.models.chat_prompts`); false: the prompt text as it is."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints, newest first (TRL's save_total_limit; 0 = all). The newest is what
    --resume continues from; an older one is its fallback where the newest is damaged."""
    log_every: int = 10


def load_groups(spec: str, limit: int = 0, allow_duplicates: bool = False):
    if hf_spec(spec):
        return load_hf_preferences(*hf_spec(spec), limit=limit or None)
    return load_preferences(spec, allow_duplicates=allow_duplicates)


def with_chat_prompts(tok, groups, chat_template: bool):
    """The groups with their prompts as the model reads them (`format_prompts`: a conversation in the chat template,
    a text prompt in it where chat_template is set), candidates as they are."""
    import dataclasses
    distinct = list(dict.fromkeys(g.prompt for g in groups))
    prompts = dict(zip(distinct, format_prompts(tok, distinct, chat_template)))
    return [g if prompts[g.prompt] is g.prompt else dataclasses.replace(g, prompt=prompts[g.prompt]) for g in groups]


class TextScorer:
    """score(prompts, responses) -> (N,) with a SequenceScorer, batched and right-padded.

    `ids`: a dict in which to keep each distinct (prompt, response)'s token ids (int32), for a caller that scores
    the same pairs again (the RM trainer: every epoch, every held-out evaluation), so each is tokenized once."""

    def __init__(self, scorer: SequenceScorer, tokenizer, max_length: int, device, autocast=None,
                 ids: dict | None = None):
        self.scorer, self.tok, self.max_length, self.device = scorer, tokenizer, max_length, device
        self.autocast, self.ids = autocast, ids

    def token_ids(self, prompts, responses) -> list:
        """encode_pairs' ids of each (prompt, response), from `ids` where kept there."""
        if self.ids is None:
            return encode_pairs(self.tok, prompts, responses, self.max_length)[0]
        keys = list(zip(prompts, responses))
        new = [k for k in dict.fromkeys(keys) if k not in self.ids]
        if new:
            ids, _ = encode_pairs(self.tok, [p for p, _ in new], [r for _, r in new], self.max_length)
            self.ids.update((k, torch.tensor(x, dtype=torch.int32)) for k, x in zip(new, ids))
        return [self.ids[k] for k in keys]

    def __call__(self, prompts, responses) -> torch.Tensor:
        if getattr(self.scorer, "module", self.scorer).last_token:  # DDP wraps it in .module
            ids, mask = pad_batch(self.token_ids(prompts, responses), self.tok.pad_token_id)
            inputs = {"input_ids": ids, "attention_mask": mask}
        else:  # an encoder: its own [CLS] prompt [SEP] response [SEP]
            inputs = encode_text_pairs(self.tok, prompts, responses, self.max_length)
        ctx = self.autocast() if self.autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            return self.scorer(**{k: v.to(self.device) for k, v in inputs.items()})


def run_rm(cfg: RMConfig, resume: bool = False) -> Path:
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"rm: --{name} is required")
    if cfg.log_every < 1 or cfg.save_every < 0:
        raise ValueError(f"rm: log_every must be >= 1 and save_every >= 0, got {cfg.log_every} and {cfg.save_every}")
    if not cfg.eval_data and not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"rm: eval_fraction must be in [0, 1) (the share of prompts held out), got {cfg.eval_fraction}")
    if not cfg.epochs > 0:
        raise ValueError(f"rm: epochs must be > 0 (a fraction trains part of an epoch), got {cfg.epochs}")
    if cfg.max_pairs_per_batch < 1:
        raise ValueError(f"rm: max_pairs_per_batch must be >= 1, got {cfg.max_pairs_per_batch}")
    groups = load_groups(cfg.data, cfg.hf_limit, cfg.allow_duplicates)  # bad input fails before the run folder exists
    eval_groups = load_groups(cfg.eval_data, cfg.hf_limit, cfg.allow_duplicates) if cfg.eval_data else None
    tok = load_tokenizer(cfg.model, padding_side="right")  # so does a wrong --model
    # conversations (TRL's conversational records) always in the chat template, text prompts with chat_template
    groups, eval_groups = (None if gs is None else with_chat_prompts(tok, gs, cfg.chat_template)
                           for gs in (groups, eval_groups))
    run = start_run(cfg, cfg.out, resume, cfg.mixed_precision, cfg.seed,
                    step_batch=("max_pairs_per_batch", cfg.max_pairs_per_batch))
    acc = run.accelerator
    if eval_groups is not None:
        train, held = groups, eval_groups
    else:  # split by prompt, so no held-out prompt was seen in training
        prompts = sorted({g.prompt for g in groups})
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held_prompts = {prompts[i] for i in perm[:int(len(prompts) * cfg.eval_fraction)]}
        train = [g for g in groups if g.prompt not in held_prompts]
        held = [g for g in groups if g.prompt in held_prompts]
    model = load_seq_scorer(str(run.resume_dir / "model") if run.resume_dir and cfg.lora.r <= 0 else cfg.model,
                            pad_token_id=tok.pad_token_id, new_head=True)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.disable_dropout:
        disable_dropout(model)  # before LoRA: its adapters keep lora.dropout
    model = apply_lora(model, cfg.lora, "SEQ_CLS", cfg.mixed_precision)
    scorer = SequenceScorer(model)
    optimizer = adamw(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scorer, optimizer = acc.prepare(scorer, optimizer)
    schedule = pair_schedule(train, cfg.max_pairs_per_batch * acc.num_processes, cfg.epochs, cfg.seed)
    total_steps = len(schedule)
    if run.resume_dir:
        load_optimizer_state(optimizer, run.resume_dir / "optimizer.pt")  # this config's lr, the checkpoint's moments
        set_rng_state(torch.load(run.resume_dir / "rng.pt", weights_only=False))
        if cfg.lora.r > 0:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(acc.unwrap_model(scorer).model,
                                      load_file(str(run.resume_dir / "model" / "adapter" / "adapter_model.safetensors")))
    log.info("rm: %s; %d steps", split_summary(train, held), total_steps)
    # (prompt, response) -> ids, tokenized once for every epoch and evaluation. One epoch scores each training pair
    # once: kept, HH's 160k pairs would hold ~0.5 GB of ids that are never read again
    train_ids = {} if cfg.epochs > 1 else None
    score_fn = TextScorer(scorer, tok, cfg.max_length, acc.device, acc.autocast, train_ids)
    eval_score_fn = TextScorer(acc.unwrap_model(scorer), tok, cfg.max_length, acc.device, acc.autocast, {})

    def write(ckpt_dir: Path):
        save_hf(acc.unwrap_model(scorer).model, tok, ckpt_dir / "model", merge_lora=False)
        # the marker `load_reward_scorer` reads: a checkpoint used as a reward is read at the EOS it trained on
        (ckpt_dir / "model" / "align.json").write_text(json.dumps({"kind": "text_reward_model"}))
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(rng_state(), ckpt_dir / "rng.pt")

    evals = {}  # step -> held-out metrics: those of the last step are the final model's, which _finish reports

    def held_out(done: int) -> dict:
        scorer.eval()
        evals[done] = evaluate_pairs(eval_score_fn, batch_groups(held, cfg.max_pairs_per_batch))
        scorer.train()
        return {f"rm/eval_{k}": v for k, v in evals[done].items() if k != "n_pairs"}

    scorer.train()
    train_reward_model(run, schedule, score_fn, scorer, optimizer, cfg, write, held_out if held else None)
    return _finish(run, cfg, acc.unwrap_model(scorer), tok, train, held, eval_score_fn, evals.get(total_steps))


def _finish(run, cfg, scorer, tok, train, held, score_fn, final: dict | None = None) -> Path:
    """`final`: the held-out metrics of the last step, where the loop took them (a resumed finished run has none)."""
    out = Path(cfg.out)
    if held and final is None:
        scorer.eval()
        final = evaluate_pairs(score_fn, batch_groups(held, cfg.max_pairs_per_batch))
    final = final or {}
    if run.is_main:
        save_hf(scorer.model, tok, out / "model")
        (out / "model" / "align.json").write_text(json.dumps({"kind": "text_reward_model", "held_out": final}, indent=1))
    table = held_out_table(final, run.logger.history, None if cfg.eval_data else cfg.eval_fraction)
    body = (f"Trained a pairwise reward model from `{cfg.model}` on `{cfg.data}`: {split_summary(train, held)} "
            f"(ties get half credit in accuracy).\n\n{table}\n\n"
            f"The model is in `{out / 'model'}` (AutoModelForSequenceClassification layout; align reads the score at the "
            f"last real token, the EOS, by the attention mask: score it with `text_rlhf.models.SequenceScorer` or "
            f"`align compare --judge`, since transformers' own forward pools at the last non-pad id, the token "
            f"before EOS where pad == EOS). PPO shifts it so the reference policy's mean score is 0.")
    run.finish("Reward model report", [("Summary", body)], ["rm/loss", "rm/accuracy", "rm/eval_accuracy", "rm/eval_loss"],
               xlabel="optimiser step")
    return out / "model"
