"""Supervised fine-tuning on demonstrations: next-token loss on the response only.

Data: JSONL of {"prompt": ..., "response": ...}. The prompt is tokenized alone (with the tokenizer's
special tokens) — exactly the token boundary the model sees at generation time — and the response as
it continues it (`models.encode_responses`), then EOS; the labels of prompt and pad positions are −100.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.data import load_sft
from align.rl.config import LoraParams
from align.runner import WindowMean, progress
from align.session import adamw, load_optimizer_state, rng_state, set_rng_state, start_run
from text_rlhf.models import (apply_lora, enable_checkpointing, format_prompts, encode_responses, load_causal_lm,
                              load_tokenizer, pad_batch, position_ids_from_mask, save_hf)

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    model: str = ""
    """Base causal LM: a local save_pretrained folder or a hub id."""
    data: str = ""
    """Demonstrations JSONL: {"prompt", "response"} per line."""
    out: str = ""
    """Output folder (model, checkpoints, logs, report.md)."""
    epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""
    batch_size: int = 16
    """Sequences per optimiser step and process (micro_batch_size × accumulation)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward; 0 = batch_size."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Linear warm-up share of the steps, then linear decay to 0."""
    max_length: int = 512
    """Prompt + response tokens kept (longer examples are truncated on the right)."""
    eval_fraction: float = 0.1
    """Held-out share of the demonstrations (0 = no evaluation)."""
    seed: int = 0
    mixed_precision: str = "no"
    """no | bf16 | fp16 (accelerate autocast); weights load in float32, and with LoRA the frozen base is
    then kept in that dtype (the adapters train in float32)."""
    gradient_checkpointing: bool = False
    lora: LoraParams = field(default_factory=LoraParams)
    save_every: int = 0
    """Checkpoint every N optimiser steps (0 = each epoch's end only)."""
    chat_template: bool = False
    """Format every prompt as a user turn of the model's chat template (instruct models: Llama 3, Qwen, ...;
    `text_rlhf.models.chat_prompts`); false: the prompt text as it is."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints, newest first (TRL's save_total_limit; 0 = all). The newest is what
    --resume continues from; an older one is its fallback where the newest is damaged."""
    log_every: int = 10


def encode_sft(tokenizer, records: list[dict], max_length: int, where: list[str] | None = None,
               chunk: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per record, int32 tensors; labels −100 on the prompt. Records whose response is cut
    away entirely by max_length are an error (naming the record: where[i], e.g. "demos.jsonl:7"), not
    silently dropped. Tokenized `chunk` records at a time and kept as tensors: Python lists of ints cost ~36 bytes
    a token (measured: 0.73 GB for 20k HH demonstrations of ~260 tokens, ids and labels), int32 tensors 8."""
    out = []
    for start in range(0, len(records), chunk):  # (none for eval_fraction=0: fast tokenizers fail on an empty batch)
        part = records[start:start + chunk]
        prompts = [r["prompt"] for r in part]
        p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        r_ids = encode_responses(tokenizer, prompts, [r["response"] for r in part], p_ids)
        for i, (p, r) in enumerate(zip(p_ids, r_ids), start=start):
            if len(p) >= max_length:
                raise ValueError(f"{where[i] if where else f'record {i + 1}'}: field 'prompt': the prompt alone has "
                                 f"{len(p)} tokens >= max_length={max_length}; raise max_length or shorten the prompt")
            ids = torch.tensor((p + r + [tokenizer.eos_token_id])[:max_length], dtype=torch.int32)
            labels = ids.clone()
            labels[:len(p)] = -100
            out.append((ids, labels))
    return out


def collate(examples, pad_id: int):
    ids, mask = pad_batch([e[0] for e in examples], pad_id)
    labels, _ = pad_batch([e[1] for e in examples], pad_id, fill=-100)
    return ids, mask, labels


def run_sft(cfg: SFTConfig, resume: bool = False) -> Path:
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"sft: --{name} is required")
    for name in ("batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"sft: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.micro_batch_size < 0 or cfg.save_every < 0 or not cfg.epochs > 0 or not 0 <= cfg.eval_fraction < 1:
        raise ValueError("sft: needs micro_batch_size >= 0, save_every >= 0, epochs > 0 and 0 <= eval_fraction < 1 "
                         f"(got {cfg.micro_batch_size}, {cfg.save_every}, {cfg.epochs}, {cfg.eval_fraction})")
    records, lines = load_sft(cfg.data, with_lines=True)  # bad input fails before the run folder exists
    tok = load_tokenizer(cfg.model, padding_side="right")
    prompts = format_prompts(tok, [r["prompt"] for r in records], cfg.chat_template)  # conversations: always
    records = [{**r, "prompt": p} for r, p in zip(records, prompts)]
    encoded = encode_sft(tok, records, cfg.max_length, where=lines)  # so does a prompt longer than max_length
    run = start_run(cfg, cfg.out, resume, cfg.mixed_precision, cfg.seed, step_batch=("batch_size", cfg.batch_size))
    acc = run.accelerator
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_eval = int(len(records) * cfg.eval_fraction) if len(records) > 1 else 0
    eval_set = [encoded[i] for i in order[:n_eval]]
    train_set = [encoded[i] for i in order[n_eval:]]
    n_predicted = [int((labels[1:] != -100).sum()) for _, labels in train_set]  # tokens in the loss

    model = load_causal_lm(cfg.model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model = apply_lora(model, cfg.lora, "CAUSAL_LM", cfg.mixed_precision)
    if run.resume_dir:
        _load_weights(model, run.resume_dir / "model")
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro}")
    accum = cfg.batch_size // micro
    steps_per_epoch = math.ceil(len(train_set) / (micro * acc.num_processes)) // accum or 1
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(1, warmup), max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    model, optimizer = acc.prepare(model, optimizer)
    if run.resume_dir:
        load_optimizer_state(optimizer, run.resume_dir / "optimizer.pt")  # this config's lr, the checkpoint's moments
        scheduler.load_state_dict(torch.load(run.resume_dir / "scheduler.pt", weights_only=False))
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]  # cfg.lr, not the checkpoint's
        for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            g["lr"] = base * fn(scheduler.last_epoch)  # the schedule at the resumed step
        set_rng_state(torch.load(run.resume_dir / "rng.pt", weights_only=False))
    log.info("sft: %d train / %d eval demonstrations; %d steps of %d sequences (%d × %d accumulation × %d processes)",
             len(train_set), len(eval_set), total_steps, cfg.batch_size * acc.num_processes, micro, accum,
             acc.num_processes)

    def write(ckpt_dir: Path):
        save_hf(acc.unwrap_model(model), tok, ckpt_dir / "model", merge_lora=False)
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
        torch.save(rng_state(), ckpt_dir / "rng.pt")

    run.check_end(total_steps, "epochs")
    step = run.start_step
    if step == 0 and eval_set:  # the starting point, so the report shows what SFT changed
        run.log(0, {"sft/eval_loss": evaluate(model, eval_set, tok, micro, acc)})
    model.train()
    window = WindowMean()
    bar = progress(total=total_steps, desc="sft", is_main=run.is_main)
    bar.update(step)
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        world = acc.num_processes
        shards = [perm[r::world] for r in range(world)]
        for s in range(skip, steps_per_epoch):
            # token-weighted: each micro-batch's mean NLL weighted by its share of the response tokens of the step's
            # whole global batch (every process's micro-batches), × world for DDP's average over processes: the
            # gradient of one batch, as one process would take it (equal weights per micro-batch or per process
            # would not be). A process whose shard has run out runs a stand-in example at weight 0 (DDP needs
            # every process's backward, or the others wait for it forever).
            step_micros = [[sh[(s * accum + a) * micro:(s * accum + a + 1) * micro] for a in range(accum)]
                           for sh in shards]
            total_tok = max(1, sum(n_predicted[i] for ms in step_micros for idx in ms for i in idx))
            micros = [idx for idx in step_micros[acc.process_index] if idx]
            weights = [sum(n_predicted[i] for i in idx) / total_tok * world for idx in micros]
            if not micros:
                micros, weights = [perm[:1]], [0.0]
            loss_sum = 0.0
            for idx, w in zip(micros, weights):
                ids, mask, labels = collate([train_set[i] for i in idx], tok.pad_token_id)
                with acc.autocast():
                    out = model(input_ids=ids.to(acc.device), attention_mask=mask.to(acc.device),
                                position_ids=position_ids_from_mask(mask).to(acc.device), labels=labels.to(acc.device))
                acc.backward(out.loss * w)
                loss_sum += out.loss.item() * w / world
            if world > 1:  # the step's loss over every process's tokens, for the log
                loss_sum = float(acc.reduce(torch.tensor(loss_sum, dtype=torch.float64, device=acc.device), "sum"))
            grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"sft: loss is not finite at step {step}; lower lr (now {cfg.lr})")
            window.add({"sft/loss": loss_sum, "sft/grad_norm": float(grad_norm)})
            if step % cfg.log_every == 0 or step == total_steps:
                run.log(step, {**window.pop(), "sft/lr": scheduler.get_last_lr()[0]})
            if (cfg.save_every and step % cfg.save_every == 0) or step % steps_per_epoch == 0 or step == total_steps:
                if eval_set:
                    run.log(step, {"sft/eval_loss": evaluate(model, eval_set, tok, micro, acc)})
                run.checkpoint(step, write, {"epoch": epoch})
            if step >= total_steps:
                break
    bar.close()
    final = _finish(run, cfg, acc.unwrap_model(model), tok, eval_set, len(train_set), total_steps)
    return final


def _load_weights(model, folder: Path) -> None:
    """Load checkpointed weights into a freshly built (possibly peft-wrapped) model."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        set_peft_model_state_dict(model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())


@torch.no_grad()
def evaluate(model, eval_set, tok, micro: int, acc) -> float:
    """Token-weighted mean NLL of the held-out responses."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_set), micro):
        ids, mask, labels = collate(eval_set[i:i + micro], tok.pad_token_id)
        with acc.autocast():
            out = model(input_ids=ids.to(acc.device), attention_mask=mask.to(acc.device),
                        position_ids=position_ids_from_mask(mask).to(acc.device), labels=labels.to(acc.device))
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    model.train()
    return total / max(1, count)


def _finish(run, cfg, model, tok, eval_set, n_train, total_steps) -> Path:
    out = Path(cfg.out)
    if run.is_main:
        save_hf(model, tok, out / "model")
    hist = run.logger.history
    rows = []
    if "sft/eval_loss" in hist:
        first, last = hist["sft/eval_loss"][0][1], hist["sft/eval_loss"][-1][1]
        rows.append(f"| held-out loss, nats per response token (before → after) | {first:.4f} → {last:.4f} |")
        rows.append(f"| held-out perplexity (last) | {math.exp(min(last, 50)):.2f} |")
    else:
        rows.append(f"| held-out loss | none: no held-out demonstrations (eval_fraction={cfg.eval_fraction:g}) |")
    if "sft/loss" in hist:
        rows.append(f"| train loss (mean over the last log_every steps, nats per response token) | {hist['sft/loss'][-1][1]:.4f} |")
    body = (f"Fine-tuned `{cfg.model}` on `{cfg.data}`: {n_train} train / {len(eval_set)} held-out demonstrations, "
            f"{total_steps} optimiser steps, LoRA r={cfg.lora.r}.\n\n| metric | value |\n|---|---|\n" + "\n".join(rows) +
            f"\n\nThe model is in `{out / 'model'}` (save_pretrained layout; `align text ppo --policy {out / 'model'}`).")
    run.finish("SFT report", [("Summary", body)], ["sft/loss", "sft/eval_loss", "sft/lr"], xlabel="optimiser step")
    return out / "model"
