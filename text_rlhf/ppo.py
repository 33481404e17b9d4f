"""PPO for causal LMs against a learned reward, KL-regularised to the reference policy.

One iteration, top to bottom (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT §3.5):
  1. rollout  — sample responses with `generate` (left padding, KV cache, temperature 1, no
                top-k/top-p: the KL estimate is only honest on samples of the raw policy)
  2. score    — old log π and V(s_t) in one forward, log π_ref, the RM score at the last
                response token (EOS, or the last token when truncated; never a pad)
  3. rewards  — r_t = −β·(log π − log π_ref)_t, plus the score on the last token
  4. GAE      — γ = 1, λ = 0.95; advantages whitened over the batch
  5. update   — `ppo_epochs` passes of clipped surrogate + clipped value loss (align.rl)
  6. KL control — β adapts towards the target KL (Ziegler et al. eq. 2)
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config import import_function
from align.data import load_prompts
from align.reward import as_scores, normalizer_from_scores
from align.rl import (check_finite_rewards, clipped_surrogate, clipped_value_loss, gae, kl_estimate,
                      make_kl_controller, masked_whiten)
from align.runner import progress, truncate_jsonl
from align.session import (adamw, gather_strings, load_optimizer_state, load_resumed_weights, rng_state, set_rng_state,
                           start_run, stop_if_not_finite)
from text_rlhf.models import (apply_lora, chat_conversations, chat_prompts, decode_responses, enable_checkpointing,
                              encode_pairs, encode_prompts, encode_text_pairs, format_prompts, fuse_activations,
                              last_token_index, load_causal_lm, load_reward_scorer, load_tokenizer, max_positions,
                              pad_batch, save_hf)
from text_rlhf.ppo_config import PPOConfig, check_config, critic_folder
from text_rlhf.policy import (PolicyWithValue, disable_dropout, merged_lora, raw_sampling, reference_log_probs,
                              response_mask, stop_token_ids)

log = logging.getLogger(__name__)


class RewardFn:
    """The reward: an RM folder (token ids reused when it shares the policy's tokenizer) or any
    importable `module:function(prompts, responses) -> list[float]`."""

    def __init__(self, spec: str, policy_tok, device, batch_size: int, chat_template: bool = False,
                 raw_prompts: dict | None = None):
        """chat_template: re-encoded text is the conversation in this RM's chat template (`chat_conversations`);
        raw_prompts: formatted prompt -> the prompt as written, where the policy's prompts were formatted."""
        self.spec, self.device, self.batch_size, self.policy_tok = spec, device, batch_size, policy_tok
        self.chat_template, self.raw_prompts = chat_template, raw_prompts or {}
        self.fn = self.scorer = None
        if ":" in spec and not Path(spec).exists():
            self.fn = import_function(spec, "--reward")
            return
        self.tok = load_tokenizer(spec, padding_side="right")
        self.scorer = load_reward_scorer(spec, self.tok).to(device).eval()
        self.scorer.requires_grad_(False)
        self.limit = min(max_positions(self.scorer.model.config) or 10 ** 6, self.tok.model_max_length)
        self.same_tok = self.scorer.last_token and self.tok.get_vocab() == policy_tok.get_vocab()
        if chat_template and not self.same_tok and not self.scorer.last_token:
            raise ValueError(f"ppo: reward_chat_template: {spec!r} is an encoder RM, scored on its own pair encoding "
                             "[CLS] prompt [SEP] response [SEP], not on a chat conversation")
        if chat_template and not self.same_tok:
            chat_prompts(self.tok, ["x"], "ppo: reward_chat_template")  # its tokenizer has a template, or a clear error

    @torch.no_grad()
    def __call__(self, prompts, responses_text, seq, mask, ended=None) -> torch.Tensor:
        """ended (B,) bool: the responses that stopped at EOS. The same-tokenizer path reads their EOS from
        `seq`; re-encoded for an RM with another tokenizer they get that tokenizer's EOS, as the RM was trained
        (an encoder's pair encoding always ends in its [SEP]). Re-encoded texts longer than the RM's positions
        lose the start of their prompt (`encode_pairs`)."""
        if self.fn is not None:
            out = as_scores(self.fn(list(prompts), list(responses_text)), len(prompts), self.spec, "responses")
            return out.to(self.device)
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            p, r = prompts[i:i + self.batch_size], responses_text[i:i + self.batch_size]
            if self.same_tok and seq.shape[1] <= self.limit:  # the policy's own token ids: no decode/re-encode
                inputs = {"input_ids": seq[i:i + self.batch_size], "attention_mask": mask[i:i + self.batch_size]}
                if ended is not None and self.tok.eos_token_id is not None:
                    inputs["input_ids"] = self._eos_at_end(inputs["input_ids"], inputs["attention_mask"],
                                                           ended[i:i + self.batch_size])
            elif not self.scorer.last_token:  # an encoder: its own [CLS] prompt [SEP] response [SEP]
                inputs = encode_text_pairs(self.tok, p, r, self.limit)
            elif self.chat_template:  # [user, assistant] in the RM's template, which closes the turn itself
                p, r = chat_conversations(self.tok, [self.raw_prompts.get(x, x) for x in p], r)
                ids, _ = encode_pairs(self.tok, p, r, self.limit, add_eos=False)
                inputs = dict(zip(("input_ids", "attention_mask"), pad_batch(ids, self.tok.pad_token_id)))
            else:
                ids, _ = encode_pairs(self.tok, p, r, self.limit - 1, add_eos=False)  # room for the EOS
                if ended is not None:
                    ids = [x + [self.tok.eos_token_id] if e else x for x, e in zip(ids, ended[i:i + self.batch_size].tolist())]
                inputs = dict(zip(("input_ids", "attention_mask"), pad_batch(ids, self.tok.pad_token_id)))
            scores.append(self.scorer(**{k: v.to(self.device) for k, v in inputs.items()}))
        return torch.cat(scores)

    def _eos_at_end(self, ids: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """(B, L) ids whose ended rows close on this tokenizer's EOS. A response may stop on another id (the
        checkpoint's end of turn, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), but the RM was trained on, and the
        re-encoded path and `align compare --judge` score, prompt + response + EOS: read at <|eot_id|>, the same
        response would get another score here than there."""
        rows = ended.nonzero().flatten().to(ids.device)
        if not len(rows):
            return ids
        ids = ids.clone()
        ids[rows, last_token_index(mask[rows])] = self.tok.eos_token_id
        return ids


# ---------------------------------------------------------------------------- run

@dataclass
class PPOResult:
    model_dir: Path
    """Where the final policy was saved (save_pretrained layout)."""
    policy: PolicyWithValue
    """The trained policy + value head, in memory (every process has its own copy)."""


def run_ppo(cfg: PPOConfig, resume: bool = False) -> PPOResult:
    check_config(cfg)
    p = cfg.ppo
    micro = p.micro_batch_size or p.mini_batch_size
    if cfg.temperature != 1.0 or cfg.top_k or cfg.top_p < 1.0:
        log.warning("sampling with temperature=%s top_k=%s top_p=%s: samples no longer come from π, so the KL "
                    "penalty and the PPO ratio refer to a different distribution", cfg.temperature, cfg.top_k, cfg.top_p)
    make_kl_controller(p.kl.kl_coef, p.kl.adaptive, p.kl.target, p.kl.horizon)  # checks β before any folder is made
    if cfg.missing_eos_penalty and not cfg.stop_at_eos:
        raise ValueError("ppo: missing_eos_penalty needs stop_at_eos=true (without it no response ends with EOS, "
                         "so every one would be penalised)")
    prompts_all = load_prompts(cfg.prompts)  # bad input fails before the run folder exists
    tok = load_tokenizer(cfg.policy, padding_side="left")
    formatted = format_prompts(tok, prompts_all, cfg.chat_template)  # conversations always in the chat template
    # formatted -> as written, for an RM that formats the conversation its own way (reward_chat_template)
    raw_prompts = {f: p for f, p in zip(formatted, prompts_all) if f is not p}
    prompts_all = formatted
    critic_init = critic_folder(cfg, tok) if cfg.value_model == "separate" else None
    run = start_run(cfg, cfg.out, resume, cfg.mixed_precision, cfg.seed)
    acc = run.accelerator

    # models: policy (+ value head or critic), reference, reward
    lm = load_causal_lm(cfg.policy)
    limit = max_positions(lm.config)  # prompts are cut (from the left) to fit the responses in the positions
    max_prompt = min(cfg.max_prompt_length, limit - cfg.max_new_tokens) if limit else cfg.max_prompt_length
    if max_prompt < 1:
        raise ValueError(f"ppo: max_new_tokens = {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{limit} positions")
    disable_dropout(lm)
    if cfg.gradient_checkpointing:
        enable_checkpointing(lm)
    ref_lm = None
    if cfg.reference:
        ref_lm = load_causal_lm(cfg.reference).eval().requires_grad_(False).to(acc.device)
        if ref_lm.config.vocab_size != lm.config.vocab_size:
            raise ValueError(f"ppo: reference {cfg.reference!r} has vocabulary size {ref_lm.config.vocab_size}, "
                             f"the policy {lm.config.vocab_size}: they must share the tokenizer")
    elif cfg.lora.r <= 0:
        ref_lm = copy.deepcopy(lm).eval().requires_grad_(False).to(acc.device)
    lm = apply_lora(lm, cfg.lora, "CAUSAL_LM", cfg.mixed_precision)  # frozen base in the autocast dtype
    disable_dropout(lm)  # again: lora.dropout > 0 would make log π of the same tokens random (ratio ≠ 1)
    critic = None
    if cfg.value_model == "separate":
        from transformers import AutoModel
        critic = AutoModel.from_pretrained(critic_init)
        fuse_activations(critic)
        disable_dropout(critic)
        if cfg.gradient_checkpointing:
            enable_checkpointing(critic)
    model = PolicyWithValue(lm, critic)
    model.train()  # from_pretrained leaves eval mode; transformers checkpoints layers only in train mode
    reward_fn = RewardFn(cfg.reward, tok, acc.device, cfg.reward_batch_size, cfg.reward_chat_template, raw_prompts)
    monitor_fn = RewardFn(cfg.monitor, tok, acc.device, cfg.reward_batch_size) if cfg.monitor else None
    optimizer = adamw(model.parameters(), lr=cfg.lr, eps=1e-5)
    kl_ctl = make_kl_controller(p.kl.kl_coef, p.kl.adaptive, p.kl.target, p.kl.horizon)
    shift, scale = None, 1.0
    if run.resume_dir:
        state = run.state
        load_resumed_weights(model, run.resume_dir / "policy.pt")
        load_optimizer_state(optimizer, run.resume_dir / "optimizer.pt")  # this config's lr, the checkpoint's moments
        set_rng_state(torch.load(run.resume_dir / "rng.pt", weights_only=False))
        kl_ctl.load_state_dict(state["kl_ctl"])
        shift, scale = state["reward_shift"], state.get("reward_scale", 1.0)
    model, optimizer = acc.prepare(model, optimizer)
    policy = acc.unwrap_model(model)
    world = acc.num_processes
    global_batch = cfg.batch_size * world
    log.info("ppo: %d prompts; %d iterations × %d samples (%d per process × %d); %d epochs × %d mini-batches of %d "
             "(micro %d); value=%s, LoRA r=%d, reward=%s", len(prompts_all), cfg.iterations, global_batch,
             cfg.batch_size, world, p.ppo_epochs, cfg.batch_size // p.mini_batch_size, p.mini_batch_size, micro,
             cfg.value_model, cfg.lora.r, cfg.reward)
    stop_ids = stop_token_ids(tok, policy.lm) if cfg.stop_at_eos else []
    gen_cfg = sampling_config(cfg, tok, stop_ids)

    def write(ckpt_dir: Path):
        torch.save({k: v for k, v in policy.state_dict().items()}, ckpt_dir / "policy.pt")
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(rng_state(), ckpt_dir / "rng.pt")

    samples_path = run.out / "samples.jsonl"
    run.check_end(cfg.iterations, "iterations", "iteration")
    it = run.start_step
    if run.is_main:  # as metrics.jsonl: keep what the checkpoint covers (a resumed run redoes the rest), else start afresh
        truncate_jsonl(samples_path, "iteration", it)
    bar = progress(total=cfg.iterations, desc="ppo", is_main=run.is_main)
    bar.update(it)
    while it < cfg.iterations:
        t0 = time.perf_counter()
        # ------------------------------------------------------------ 1. rollout
        prompts = _prompts_for(prompts_all, it, cfg.batch_size, world, acc.process_index, cfg.seed)
        prompt_ids, prompt_mask = (t.to(acc.device) for t in encode_prompts(tok, prompts, max_prompt))
        P = prompt_ids.shape[1]
        with torch.no_grad(), acc.autocast(), raw_sampling(policy.lm), merged_lora(policy.lm, cfg.merge_lora_generate):
            seq = policy.lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
        responses = seq[:, P:]                                                   # (B, T)
        T = responses.shape[1]
        resp_mask = response_mask(responses, stop_ids)                          # (B, T)
        mask = torch.cat([prompt_mask, resp_mask], dim=1)                       # (B, P+T)
        t_gen = time.perf_counter()
        # ------------------------------------------------------------ 2. score
        first = None
        if cfg.batch_size == p.mini_batch_size == micro:
            # the whole rollout is one mini-batch: the first update's forward (with grad) sees θ_old,
            # so its detached outputs are the old log-probs and values — no separate no-grad pass
            with acc.autocast():
                first = model(seq, mask, T, cfg.temperature)
            old_log_prob, old_values = first[0].detach(), first[1].detach()
        with torch.no_grad(), acc.autocast():
            if first is None:
                old_log_prob, old_values = policy(seq, mask, T, cfg.temperature)   # (B, T), (B, T)
            ref_log_prob = reference_log_probs(policy, ref_lm, seq, mask, T, cfg.temperature)
            texts = decode_responses(tok, prompt_ids, prompt_mask, responses, resp_mask)
            ended = torch.isin(responses, torch.as_tensor(stop_ids, dtype=responses.dtype, device=responses.device)).logical_and(
                resp_mask.bool()).any(1)                                             # (B,) all False without stops
            scores = reward_fn(prompts, texts, seq, mask, ended).float()       # (B,)
        all_prompts = gather_strings(prompts, acc)  # every rank checks every rank's scores: all raise, none hangs
        check_finite_rewards(acc.gather(scores), all_prompts, cfg.reward,
                             f"iteration {it + 1}: nothing was updated, the last checkpoint is intact")
        raw_scores = scores.clone()
        if cfg.normalize_reward:
            if shift is None:  # the first rollout: a sample of the initial policy (π_ref unless `reference`)
                shift, spread = normalizer_from_scores(acc.gather(scores).cpu())
                scale = spread if cfg.scale_reward else 1.0
                if acc.is_main_process:
                    log.info("reward normalisation: shift %.4f (mean score of the initial policy); their std %.4f %s",
                             shift, spread, "divides the score (scale_reward)" if cfg.scale_reward else
                             "is left as it is, so it sets how much the KL penalty weighs")
            scores = (scores - shift) / scale
        if cfg.reward_clip:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.missing_eos_penalty:
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
        # ------------------------------------------------------------ 3. rewards
        m = resp_mask.float()
        kl = kl_estimate(old_log_prob, ref_log_prob, p.kl.estimator)                     # (B, T)
        rewards = token_rewards(kl, kl_ctl.value, scores, resp_mask)
        kl = kl * m
        # ------------------------------------------------------------ 4. advantages
        advantages, returns = gae(rewards, old_values * m, m, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, m)
        t_score = time.perf_counter()
        # ------------------------------------------------------------ 5. update
        stats = _update(model, optimizer, acc, seq, mask, m, T, old_log_prob, old_values, advantages, returns, cfg, micro,
                        first)
        t_upd = time.perf_counter()
        # ------------------------------------------------------------ 6. KL control
        seq_kl = acc.gather(kl.sum(1)).mean().item()
        kl_coef = kl_ctl.value
        kl_ctl.update(seq_kl, global_batch)
        it += 1
        bar.update(1)
        metrics = {
            "env/score": acc.gather(scores).mean().item(), "env/raw_score": acc.gather(raw_scores).mean().item(),
            "objective/kl": seq_kl, "objective/kl_coef": kl_coef,
            "objective/entropy": acc.gather((-old_log_prob * m).sum(1)).mean().item(),
            "objective/reward": acc.gather(rewards.sum(1)).mean().item(),
            "env/response_length": acc.gather(resp_mask.sum(1).float()).mean().item(),
            "env/ended_with_eos": acc.gather(ended.float()).mean().item(),
            **stats,
            "time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen, "time/update_s": t_upd - t_score,
            "time/samples_per_s": global_batch / (t_upd - t0),
        }
        if monitor_fn is not None:
            with torch.no_grad():
                monitored = acc.gather(monitor_fn(prompts, texts, seq, mask, ended).float())
            check_finite_rewards(monitored, all_prompts, cfg.monitor,
                                 f"iteration {it}, after its update: the last checkpoint is intact")
            metrics["monitor/mean"] = monitored.mean().item()
        run.log(it, metrics)
        bar.set_postfix(score=f"{metrics['env/raw_score']:.3f}", kl=f"{seq_kl:.2f}")
        if run.is_main and cfg.log_samples:
            _append_samples(samples_path, it, prompts, texts, raw_scores, cfg.log_samples)
        if (cfg.save_every and it % cfg.save_every == 0) or it == cfg.iterations:
            run.checkpoint(it, write, {"kl_ctl": kl_ctl.state_dict(), "reward_shift": shift, "reward_scale": scale})
    bar.close()
    return PPOResult(_finish(run, cfg, policy, tok, shift, scale), policy)


def sampling_config(cfg: PPOConfig, tok, stop_ids: list[int] | None = None):
    """Raw sampling from π: every knob explicit (top_k=0 is "off"; left None, transformers would
    fill it with 50). Use with policy.raw_sampling so nothing comes from the checkpoint either.
    stop_ids: what ends a response (policy.stop_token_ids; default the tokenizer's EOS) if cfg.stop_at_eos."""
    stop_ids = [tok.eos_token_id] if stop_ids is None else stop_ids
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, epsilon_cutoff=0.0,
                            eta_cutoff=0.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, use_cache=True,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=[i for i in stop_ids if i is not None] or None
                            if cfg.stop_at_eos else None)


def token_rewards(kl: torch.Tensor, kl_coef: float, scores: torch.Tensor, resp_mask: torch.Tensor) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, + the score on the last real one (EOS, or the last
    generated token when truncated); 0 on pads. Shapes (B, T), (B,), (B, T) -> (B, T).
    The last real token is found from the mask, never by comparing ids with pad (pad may be EOS)."""
    m = resp_mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (resp_mask.sum(1) - 1).clamp_min(0)                                           # (B,)
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    return rewards


def _prompts_for(prompts_all, it, batch, world, rank, seed) -> list[str]:
    """This process's prompts for iteration `it`: epochs of seeded permutations, sharded by rank."""
    g_batch = batch * world
    start = it * g_batch
    out = []
    while len(out) < g_batch:
        epoch, offset = divmod(start + len(out), len(prompts_all))
        perm = torch.randperm(len(prompts_all), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out += [prompts_all[i] for i in perm[offset:offset + g_batch - len(out)]]
    return out[rank * batch:(rank + 1) * batch]


def _update(model, optimizer, acc, seq, mask, m, T, old_log_prob, old_values, advantages, returns, cfg, micro,
            first=None) -> dict:
    """`ppo_epochs` passes over the rollout in shuffled mini-batches; losses are token-weighted so that
    micro-batch accumulation (and DDP's average over processes) gives the same gradient as one big batch. `first`: the (log_prob, values)
    of a forward with grad over the whole rollout at θ_old, used as the first mini-batch's forward."""
    p = cfg.ppo
    B = seq.shape[0]
    sums: dict[str, float] = {}
    n_mb = 0
    stop = False
    for epoch in range(p.ppo_epochs):
        perm = torch.randperm(B, device=seq.device)
        if first is not None and epoch == 0:
            perm = torch.arange(B, device=seq.device)  # one mini-batch: its order does not change the mean
        for start in range(0, B, p.mini_batch_size):
            mb = perm[start:start + p.mini_batch_size]
            mb_tokens = m[mb].sum().clamp_min(1.0)
            # the loss's weights: this process's tokens over all processes' (× world: DDP averages the processes'
            # gradients), so the step follows the token mean of the global mini-batch; the stats stay this process's
            scale = (acc.num_processes / acc.reduce(m[mb].sum(), "sum").clamp_min(1.0) * mb_tokens
                     if acc.num_processes > 1 else 1.0)
            mb_stats: dict[str, float] = {}
            for k, ms in enumerate(range(0, len(mb), micro)):
                idx = mb[ms:ms + micro]
                last_micro = ms + micro >= len(mb)
                sync = nullcontext() if last_micro else acc.no_sync(model)
                with sync:
                    if first is not None and epoch == 0:
                        log_prob, values = first
                    else:
                        with acc.autocast():
                            log_prob, values = model(seq[idx], mask[idx], T, cfg.temperature)
                    w = m[idx].sum() / mb_tokens
                    pg_loss, pg_stats = clipped_surrogate(log_prob, old_log_prob[idx], advantages[idx], p.clip_range, m[idx])
                    vf_loss, vf_stats = clipped_value_loss(values, old_values[idx], returns[idx], p.clip_range_value, m[idx])
                    loss = (pg_loss + p.vf_coef * vf_loss) * w * scale
                    acc.backward(loss)
                for name, v in (("policy/pg_loss", pg_loss), ("policy/vf_loss", vf_loss), *(
                        (f"policy/{n}", s) for n, s in {**pg_stats, **vf_stats}.items())):
                    mb_stats[name] = mb_stats.get(name, 0.0) + float(v.detach()) * float(w)
            stop_if_not_finite(acc, {"pg_loss": mb_stats["policy/pg_loss"], "vf_loss": mb_stats["policy/vf_loss"]},
                               f"ppo (lr {cfg.lr})")
            if p.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k2, v in mb_stats.items():
                sums[k2] = sums.get(k2, 0.0) + v
            n_mb += 1
            if p.early_stop_kl:
                approx_kl = acc.gather(torch.tensor([mb_stats["policy/approx_kl"]], device=seq.device)).mean().item()
                if approx_kl > p.early_stop_kl:
                    stop = True
                    break
        if stop:
            break
    out = {k: v / max(1, n_mb) for k, v in sums.items()}
    out["policy/epochs_done"] = epoch + 1
    out["policy/early_stopped"] = float(stop)
    return out


def _code(text: str) -> str:
    """Markdown inline code of any text: control characters escaped (a newline or tab would break the list item), and a
    code span of two backticks when the text holds one (a single one would end the span there)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _append_samples(path: Path, it: int, prompts, texts, scores, n: int) -> None:
    import json
    with open(path, "a") as f:
        for pr, tx, sc in list(zip(prompts, texts, scores.tolist()))[:n]:
            f.write(json.dumps({"iteration": it, "prompt": pr, "response": tx, "score": sc}) + "\n")


def _finish(run, cfg, policy, tok, shift, scale=1.0) -> Path:
    out = Path(cfg.out)
    if run.is_main:
        save_hf(policy.lm, tok, out / "model")
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in policy.value_head.state_dict().items()}, str(out / "value_head.safetensors"))
        if policy.critic is not None:  # value_model=separate: the head reads this trunk's states
            policy.critic.save_pretrained(out / "critic")
    h = run.logger.history

    def first_last(key):
        if key not in h or not h[key]:
            return "n/a", "n/a"
        k = max(1, len(h[key]) // 10)  # mean of the first and last tenth of the run
        a, b = [v for _, v in h[key][:k]], [v for _, v in h[key][-k:]]
        return f"{sum(a) / len(a):.4g}", f"{sum(b) / len(b):.4g}"

    n_logged = len(h.get("env/raw_score", []))
    k = max(1, n_logged // 10)
    span = "iteration" if k == 1 else f"{k} iterations"
    rows = "\n".join(f"| {name} | {first_last(key)[0]} | {first_last(key)[1]} |" for name, key in [
        ("RM score (raw)", "env/raw_score"), ("KL[π‖π_ref] per response (nats)", "objective/kl"), ("β", "objective/kl_coef"),
        ("response length (tokens)", "env/response_length"), ("share ended with EOS", "env/ended_with_eos"),
        ("clip fraction", "policy/clipfrac"), ("approx KL[π_old‖π] per token, per update (nats)", "policy/approx_kl"),
        ("samples/s", "time/samples_per_s")] + ([(f"monitor: {cfg.monitor}", "monitor/mean")] if cfg.monitor else []))
    samples = ""
    sp = run.out / "samples.jsonl"
    if sp.exists():
        import json
        lines = [json.loads(l) for l in sp.read_text().splitlines() if l.strip()]
        first_it, last_it = lines[0]["iteration"], lines[-1]["iteration"]
        pick = [l for l in lines if l["iteration"] in (first_it, last_it)]
        samples = "\n".join(f"- it {l['iteration']}, score {l['score']:.3f}: {_code(l['prompt'][:60])} → "
                            f"{_code(l['response'][:80])}" for l in pick)
    body = (f"PPO on `{cfg.policy}` against `{cfg.reward}` for {cfg.iterations} iterations of "
            f"{cfg.batch_size * run.accelerator.num_processes} samples. Reward shift (reference mean): "
            f"{f'{shift:.4f}' if shift is not None else 'none'}"
            f"{f', scale (reference std, divided by): {scale:.4f}' if cfg.scale_reward else ''}"
            f"{f', clipped at ±{cfg.reward_clip:g}' if cfg.reward_clip else ''}. Means over the first and the last {span} of {n_logged} "
            f"(a tenth of the run, at least one).\n\n| metric | first {span} | last {span} |\n|---|---:|---:|\n{rows}\n\n"
            f"Policy: `{out / 'model'}` (save_pretrained; LoRA adapter in `model/adapter` when used).")
    run.finish("PPO report", [("Summary", body), ("Samples (first and last iteration)", samples or "none logged")],
               ["env/raw_score", *(["monitor/mean"] if cfg.monitor else []), "objective/kl", "objective/kl_coef",
                "policy/clipfrac", "policy/approx_kl", "env/response_length"], xlabel="iteration")
    return out / "model"
