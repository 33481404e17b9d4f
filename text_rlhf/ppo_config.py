"""PPOConfig, the settings of `align text ppo` (run_ppo in ppo.py); `check_config`, every setting that cannot work,
refused before a run folder or a model exists; `critic_folder`, where value_model=separate's trunk loads from."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.rl.config import LoraParams, PPOParams
from text_rlhf.models import _check_path, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    policy: str = ""
    """Policy to optimise (folder or hub id); its initial weights are the reference π_ref unless
    `reference` names another model."""
    reference: str = ""
    """π_ref for the KL penalty when it is not the initial policy: e.g. the SFT model while a later
    round of iterated RLHF starts from the previous round's policy. Same tokenizer; not with LoRA
    (there π_ref is the policy with its adapters off)."""
    reward: str = ""
    """Reward model folder (align text rm), or module:function scoring (prompts, responses) -> floats."""
    prompts: str = ""
    """Prompts: JSONL {"prompt"} per line, or a text file with one prompt per line."""
    out: str = ""
    iterations: int = 100
    """Rollout + update rounds."""
    batch_size: int = 64
    """Prompts per rollout, per process."""
    max_prompt_length: int = 128
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    """0 = off. Anything but raw sampling makes the KL estimate dishonest (a warning says so)."""
    top_p: float = 1.0
    stop_at_eos: bool = True
    lr: float = 1e-5
    value_model: str = "head"
    """head: linear value head on the policy's trunk (one forward for both); separate: its own trunk."""
    value_init: str = ""
    """Trunk for value_model=separate (default: the reward model if it is a folder with the policy's tokenizer, else
    the policy). It reads the policy's token ids, so it must share the policy's tokenizer."""
    normalize_reward: bool = True
    """Shift the RM so the initial policy's mean score is 0 (measured on its first rollout; the reference
    policy unless `reference` is set)."""
    scale_reward: bool = False
    """Also divide by the std of those scores: mean 0 and variance 1 under the initial policy (Ziegler et al. 2019
    §2.2), so that `ppo.kl.kl_coef` weighs the same for an RM on any scale (hub RMs' scores span ±10 or more).
    Off by default, as InstructGPT (a shift only). Needs normalize_reward."""
    reward_clip: float = 0.0
    """Clip the (shifted, scaled) score to ±reward_clip before the KL penalty and missing_eos_penalty apply
    (0 = off; TRL's score_clip, OpenRLHF's reward_clip_range): one outlier score cannot dominate a batch."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response cut off before EOS."""
    ppo: PPOParams = field(default_factory=PPOParams)
    lora: LoraParams = field(default_factory=LoraParams)
    seed: int = 0
    mixed_precision: str = "no"
    """no | fp16 | bf16: autocast; with LoRA the frozen base weights are also kept in that dtype (half the
    memory and bandwidth; the adapters and the value head train in float32)."""
    merge_lora_generate: bool = True
    """With LoRA, roll out with the adapters merged into the base weights (`policy.merged_lora`: restored
    exactly afterwards); false runs generate through the unmerged adapters."""
    gradient_checkpointing: bool = False
    reward_batch_size: int = 64
    save_every: int = 10
    """Checkpoint every N iterations (and at the end; 0 = at the end only)."""
    chat_template: bool = False
    """Format every prompt as a user turn of the model's chat template (instruct models: Llama 3, Qwen, ...;
    `text_rlhf.models.chat_prompts`); the reward scores the formatted prompt + response;
    false: the prompt text as it is."""
    reward_chat_template: bool = False
    """An RM with a tokenizer of its own (re-encoded text: Skywork-Reward, GRM, RM-Gemma) scores the conversation
    [user: the prompt as written, assistant: the response] in its own tokenizer's chat template, as it was trained.
    An RM sharing the policy's tokenizer reads the policy's token ids, formatted by chat_template."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints, newest first (TRL's save_total_limit; 0 = all). The newest is what
    --resume continues from; an older one is its fallback where the newest is damaged."""
    log_samples: int = 4
    """Sample texts kept per logged iteration (samples.jsonl)."""
    monitor: str = ""
    """A second scorer, same syntax as `reward`, logged on every rollout as monitor/mean and never
    optimised: e.g. a gold judge, to watch the proxy reward over-optimise (Gao et al. 2022)."""


# ---------------------------------------------------------------------------- reward


def check_config(cfg: PPOConfig) -> None:
    """Refuse, before any folder is made or model loaded, settings that cannot work (missing paths, sizes that
    are not ≥ 1 or do not divide) or would silently do something else (a negative max_grad_norm flips every
    gradient in torch's clip_grad_norm_, a negative early_stop_kl stops after the first mini-batch, a negative
    clip range inverts the clip)."""
    for name in ("policy", "reward", "prompts", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"ppo: --{name} is required")
    p = cfg.ppo
    for name, value in (("batch_size", cfg.batch_size), ("ppo.mini_batch_size", p.mini_batch_size),
                        ("ppo.ppo_epochs", p.ppo_epochs)):
        if value < 1:
            raise ValueError(f"ppo: {name} must be >= 1, got {value}")
    if min(cfg.iterations, p.micro_batch_size, cfg.save_every) < 0:
        raise ValueError("ppo: iterations, ppo.micro_batch_size and save_every must be >= 0")
    if cfg.batch_size % p.mini_batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of ppo.mini_batch_size {p.mini_batch_size}")
    micro = p.micro_batch_size or p.mini_batch_size
    if p.mini_batch_size % micro:
        raise ValueError(f"ppo.mini_batch_size {p.mini_batch_size} is not a multiple of ppo.micro_batch_size {micro}")
    bad = []
    if cfg.value_model not in ("head", "separate"):
        bad.append(f"value_model must be 'head' or 'separate', not {cfg.value_model!r}")
    if p.kl.estimator not in ("k1", "k2", "k3"):
        bad.append(f"ppo.kl.estimator must be k1, k2 or k3, not {p.kl.estimator!r}")
    for name, ok, value in (
            ("temperature", cfg.temperature > 0, cfg.temperature), ("top_k", cfg.top_k >= 0, cfg.top_k),
            ("top_p", 0 < cfg.top_p <= 1, cfg.top_p), ("max_new_tokens", cfg.max_new_tokens >= 1, cfg.max_new_tokens),
            ("max_prompt_length", cfg.max_prompt_length >= 1, cfg.max_prompt_length),
            ("reward_batch_size", cfg.reward_batch_size >= 1, cfg.reward_batch_size),
            ("log_samples", cfg.log_samples >= 0, cfg.log_samples), ("lora.r", cfg.lora.r >= 0, cfg.lora.r),
            ("ppo.clip_range", p.clip_range > 0, p.clip_range), ("ppo.clip_range_value", p.clip_range_value > 0,
                                                                  p.clip_range_value),
            ("ppo.vf_coef", p.vf_coef >= 0, p.vf_coef), ("ppo.max_grad_norm (0 = off)", p.max_grad_norm >= 0,
                                                         p.max_grad_norm),
            ("ppo.early_stop_kl (0 = off)", p.early_stop_kl >= 0, p.early_stop_kl),
            ("ppo.gamma", 0 <= p.gamma <= 1, p.gamma), ("ppo.lam", 0 <= p.lam <= 1, p.lam),
            ("reward_clip (0 = off)", 0 <= cfg.reward_clip < float("inf"), cfg.reward_clip)):
        if not ok:
            bad.append(f"{name} = {value} is out of range")
    if cfg.scale_reward and not cfg.normalize_reward:
        bad.append("scale_reward needs normalize_reward=true (the scale is measured with the shift, on the initial "
                   "policy's first rollout)")
    if cfg.reference and cfg.lora.r > 0:
        bad.append("--reference cannot be combined with LoRA (π_ref is the policy with adapters off)")
    if bad:
        raise ValueError("ppo: " + "; ".join(bad))
    if cfg.lora.r > 0 and cfg.lora.dropout:
        log.warning("ppo: lora.dropout = %s is not used: PPO zeroes every dropout so that log π of the same tokens "
                    "is deterministic (the first ratios exactly 1)", cfg.lora.dropout)


def critic_folder(cfg: PPOConfig, policy_tok) -> str:
    """The folder (or hub id) the separate critic's trunk loads from. It reads the policy's token ids, so it must
    share the policy's tokenizer: the default (the RM folder) falls back to the policy when the RM has a tokenizer
    of its own, and an explicit value_init with another vocabulary is an error (an index error mid-run, or, with
    a larger vocabulary, a critic silently reading other tokens)."""
    explicit = bool(cfg.value_init)
    init = cfg.value_init or (cfg.reward if Path(cfg.reward).exists() else cfg.policy)
    path = _check_path(init, "value_init")
    try:
        vocab = load_tokenizer(init).get_vocab()
    except (OSError, ValueError):  # a trunk saved without a tokenizer: its embedding size is all there is to check
        from transformers import AutoConfig
        vocab = None
        size = getattr(AutoConfig.from_pretrained(path), "vocab_size", None)
        if size is not None and size < len(policy_tok):
            raise ValueError(f"ppo: value_init {init!r} has {size} token embeddings, the policy's tokenizer "
                             f"{len(policy_tok)}: the critic reads the policy's token ids")
    if vocab is not None and vocab != policy_tok.get_vocab():
        if explicit:
            raise ValueError(f"ppo: value_init {init!r} has another tokenizer than the policy; the critic reads the "
                             "policy's token ids, so its trunk must share the policy's tokenizer")
        log.warning("ppo: the reward model %s has its own tokenizer, so the critic starts from the policy instead "
                    "(it reads the policy's token ids); set value_init to choose", init)
        path = _check_path(cfg.policy, "policy")
    return path
