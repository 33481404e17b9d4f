"""DDPO: RL fine-tuning of a diffusion model against a reward (Black et al. 2023, DDPO_IS).

One epoch, top to bottom (ddpo-pytorch's `train.py` is the reference implementation):
  1. sample      — `num_batches_per_epoch` batches of prompts per process; DDIM with η = 1 and
                   classifier-free guidance, recording (x_t, t, x_{t−1}, log π_old) of every step
  2. reward      — decode x_0, score (prompt, image) with the reward; gather over processes
  3. advantages  — per-prompt normalisation (align.rl.PerPromptStatTracker: a buffer per prompt,
                   batch statistics until `min_count`), clipped to ±adv_clip; every process
                   computes the same advantages from the gathered rewards and keeps its own rows
  4. update      — `inner_epochs` passes: shuffle the samples, shuffle each sample's step order,
                   train on the first `timestep_fraction` of them; per step the clipped surrogate
                   (align.rl.clipped_surrogate, ε = clip_range) on r = π_θ/π_old of that transition,
                   + kl_coef·KL to the reference (DPOK, Fan et al. 2023); gradients accumulate over
                   a train batch's steps, one optimiser step per train batch
  5. log         — reward, approx-KL, clip fraction; optionally a second "monitor" reward scored on the same
                   images (a gold judge, never trained on) and the exact KL of the sampling policy to the
                   initial UNet (kl/ref); a grid of fixed prompts × seeds every `grid_every` epochs (PNG + TB)
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from align.data import load_prompts
from align.rl import PerPromptStatTracker, check_finite_rewards, group_advantages
from align.runner import progress
from align.session import adamw, gather_strings, load_optimizer_state, rng_state, set_rng_state, start_run
from image_rlhf.pipeline import (add_unet_lora, check_compile, check_pipeline, encode_prompts, image_grid,
                                 load_pipeline, load_trainable_state, negative_embeds, save_parts, save_png,
                                 save_unet_lora, trainable_state)
from image_rlhf.ddim import ddim_std_dev
from image_rlhf.ddpo_config import _DTYPES, DDPOConfig, check_config
from image_rlhf.ddpo_update import ddpo_update, epoch_generator, kl_to_ref
from image_rlhf.rewards import load_reward, score_batch
from image_rlhf.sampling import decode_latents, memory_format, sample_trajectories

log = logging.getLogger(__name__)


@dataclass
class DDPOResult:
    model_dir: Path
    """out/lora (LoRA: `StableDiffusionPipeline.load_lora_weights(model_dir)`) or out/pipeline (full
    fine-tuning: the whole pipeline folder, loadable by `load_pipeline` / diffusers)."""
    unet: torch.nn.Module
    """The trained UNet in memory (LoRA layers injected; every process has its own copy)."""


def run_ddpo(cfg: DDPOConfig, resume: bool = False) -> DDPOResult:
    check_config(cfg)
    n_local = cfg.sample_batch_size * cfg.num_batches_per_epoch                    # images per process and epoch
    step_samples = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if cfg.compile_unet:
        check_compile(cfg.compile_backend)
        if cfg.mixed_precision != "no" and not cfg.recompute_log_probs and not torch.cuda.is_available():
            log.warning("compile_unet with %s on the CPU: the compiled sampling and training graphs round "
                        "differently (measured: 75%% of the first step's ratios outside the clip range); set "
                        "recompute_log_probs=true, or compile_unet=false (CPU gains are small)", cfg.mixed_precision)
    src, local = check_pipeline(cfg.pipeline)[:2]  # before the run folder exists: a typo leaves no half-made run
    if local:  # config.yaml names the base of out/lora for `align compare --model RUN`, run from any folder
        cfg = replace(cfg, pipeline=str(Path(src).resolve()))
    prompts_all = load_prompts(cfg.prompts)
    if any(isinstance(p, list) for p in prompts_all):
        raise ValueError(f"{cfg.prompts}: a conversation (a list of messages) where an image prompt is a text")
    run = start_run(cfg, cfg.out, resume, cfg.mixed_precision, cfg.seed)
    acc = run.accelerator
    world, rank = acc.num_processes, acc.process_index
    grid_prompts = list(cfg.grid_prompts) or list(dict.fromkeys(prompts_all))[:4]

    # models: the pipeline (frozen, in the inference dtype), the UNet's trained part in float32
    weight_dtype = _DTYPES[cfg.mixed_precision]
    parts = load_pipeline(cfg.pipeline, acc.device, attention=cfg.attention)
    for m in (parts.vae, parts.text_encoder, parts.unet if cfg.lora.r > 0 else None):
        if m is not None and weight_dtype != torch.float32:
            m.to(weight_dtype)
    unet = parts.unet
    ref_unet = None
    if cfg.lora.r > 0:
        add_unet_lora(unet, cfg.lora)
    else:
        unet.requires_grad_(True)
        if cfg.kl_coef > 0 or cfg.log_kl:  # full fine-tuning: the reference is a frozen copy (LoRA: adapters off)
            ref_unet = copy.deepcopy(unet).requires_grad_(False)
            if weight_dtype != torch.float32:
                ref_unet.to(weight_dtype)
    if cfg.compile_unet:  # in place: state_dict, peft and accelerate see the same module
        for m in (unet, ref_unet):
            if m is not None:
                m.compile(backend=cfg.compile_backend, dynamic=False)
    reward_fn = load_reward(cfg.reward, acc.device)
    monitor_fn = load_reward(cfg.monitor, acc.device) if cfg.monitor else None
    kl_rows = (n_local if cfg.kl_samples <= 0 else min(cfg.kl_samples, n_local)) if cfg.log_kl else 0
    latent_shape = parts.latent_shape(cfg.resolution)
    neg = negative_embeds(parts)                                                             # (1, L, D) ∅
    trainable = trainable_steps(parts.scheduler, cfg.num_steps, cfg.eta, cfg.min_std_dev)    # (S',) step indices
    n_train_steps = int(len(trainable) * cfg.timestep_fraction)
    if n_train_steps < 1:
        raise ValueError(f"timestep_fraction {cfg.timestep_fraction} of the {len(trainable)} of {cfg.num_steps} "
                         f"steps with σ_t ≥ min_std_dev {cfg.min_std_dev} leaves no step to train")
    guidance = cfg.guidance_scale if cfg.train_cfg else 1.0
    params = [p for p in unet.parameters() if p.requires_grad]
    # AdamW as ddpo-pytorch (β = 0.9/0.999, weight decay 1e-4, eps 1e-8)
    optimizer = adamw(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    tracker = (PerPromptStatTracker(cfg.buffer_size, cfg.min_count) if cfg.buffer_size > 0
               else PerPromptStatTracker(buffer_size=0, min_count=1))  # empty buffers: always the batch statistics
    if run.resume_dir:
        from safetensors.torch import load_file
        load_trainable_state(unet, load_file(str(run.resume_dir / "trainable.safetensors")), str(run.resume_dir))
        load_optimizer_state(optimizer, run.resume_dir / "optimizer.pt")  # this config's lr, the checkpoint's moments
        tracker.load_state_dict(run.state["tracker"])
        set_rng_state(torch.load(run.resume_dir / "rng.pt", weights_only=False))
    model, optimizer = acc.prepare(unet, optimizer)
    n_params = sum(p.numel() for p in params)
    log.info("ddpo: %d prompts; %d epochs × %d samples (%d per process × %d = %d batches of %d); %d inner epoch(s) "
             "× %d optimiser steps of %d samples (%d per process = %d accumulated batches of %d) × %d of %d steps; "
             "%s, %.2fM trained params; guidance %.1f (train_cfg=%s), η=%.2f, latents %s, reward=%s",
             len(prompts_all), cfg.epochs, n_local * world, n_local, world, cfg.num_batches_per_epoch,
             cfg.sample_batch_size, cfg.inner_epochs, n_local // step_samples, step_samples * world, step_samples,
             cfg.gradient_accumulation_steps, cfg.train_batch_size, n_train_steps, cfg.num_steps,
             f"LoRA r={cfg.lora.r}" if cfg.lora.r > 0 else "full fine-tuning", n_params / 1e6, cfg.guidance_scale,
             cfg.train_cfg, cfg.eta, latent_shape, cfg.reward)

    def write(ckpt_dir: Path):
        from safetensors.torch import save_file
        save_file(trainable_state(unet), str(ckpt_dir / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
        torch.save(rng_state(), ckpt_dir / "rng.pt")

    # the memory format of every sampling forward (the policy and, for kl/ref, the frozen reference)
    sampling_format = (torch.channels_last if cfg.channels_last and acc.device.type == "cpu"
                       and weight_dtype == torch.float32 else None)
    sampling = lambda: memory_format([unet, ref_unet], sampling_format)  # noqa: E731
    run.check_end(cfg.epochs, "epochs", "epoch")
    epoch = run.start_step
    if run.is_main:  # grids of epochs after the checkpoint belong to the lost part of a crashed run
        for png in (run.out / "grids").glob("epoch-*.png"):
            if png.stem[6:].isdigit() and int(png.stem[6:]) > epoch:
                png.unlink()
    if not cfg.grid_seeds or cfg.grid_every <= 0:
        grid_prompts = []                                                                     # no grid
    if run.is_main and grid_prompts and epoch == 0:  # the base model, before any update (again if no checkpoint)
        with sampling():
            run.log(0, {"grid/reward": _grid(parts, unet, grid_prompts, cfg, latent_shape, neg, reward_fn, acc, run,
                                             0)})
    bar = progress(total=cfg.epochs, desc="ddpo", is_main=run.is_main)
    bar.update(epoch)
    while epoch < cfg.epochs:
        t0 = time.perf_counter()
        # ------------------------------------------------------------ 1. sample, 2. reward
        unet.eval()
        batches, reward_error, monitor_error, kls, t_kl = [], None, None, [], 0.0
        with sampling():  # channels_last on the CPU, contiguous again for the update
            for i in range(cfg.num_batches_per_epoch):
                g = epoch_generator(cfg.seed, epoch, rank, i)
                prompts, x_T = draw_batch(prompts_all, cfg.sample_batch_size, cfg.noise_group_size, latent_shape, g)
                embeds = encode_prompts(parts, prompts)                                      # (B, L, D) c
                n_kl = min(kl_rows - i * cfg.sample_batch_size, cfg.sample_batch_size)      # KL rows of this batch
                with torch.no_grad(), acc.autocast():
                    traj = sample_trajectories(unet, parts.scheduler, embeds, neg if guidance > 1 else None,
                                               cfg.num_steps, guidance, cfg.eta, generator=g,
                                               latent_shape=latent_shape, return_means=n_kl > 0, init_latents=x_T)
                    images = decode_latents(parts.vae, traj.final_latents)                  # (B, 3, H, W) in [0, 1]
                    # 2. reward, per batch (images are not kept)
                    rewards, err = score_batch(reward_fn, prompts, images, cfg.reward)           # (B,)
                    monitor = score_batch(monitor_fn, prompts, images, cfg.monitor) if monitor_fn else (None, None)
                reward_error, monitor_error = reward_error or err, monitor_error or monitor[1]
                if n_kl > 0:
                    t_kl -= time.perf_counter()
                    kls.append(kl_to_ref(unet, ref_unet, parts.scheduler, traj, n_kl,
                                          neg if guidance > 1 else None, guidance, acc))    # (n_kl,)
                    t_kl += time.perf_counter()
                batches.append(dict(prompts=prompts, embeds=embeds, latents=traj.latents, log_probs=traj.log_probs,
                                    rewards=rewards, monitor=monitor[0]))
        # ------------------------------------------------------------ 2b. gather rewards over processes
        timesteps = traj.timesteps                                                            # (S,)
        prompts = [p for b in batches for p in b["prompts"]]
        latents = torch.cat([b["latents"] for b in batches])                                 # (N, S+1, C, H, W)
        old_log_probs = torch.cat([b["log_probs"] for b in batches]).float()                 # (N, S)
        embeds = torch.cat([b["embeds"] for b in batches])                                   # (N, L, D)
        rewards = torch.cat([b["rewards"] for b in batches]).to(acc.device)                  # (N,)
        all_rewards = acc.gather(rewards).cpu()                                              # (world·N,), rank order
        all_prompts = gather_strings(prompts, acc)
        where = f"epoch {epoch + 1}: nothing was updated, the last checkpoint is intact"
        check_finite_rewards(all_rewards, all_prompts, cfg.reward, where, reward_error)
        extra = {}
        if monitor_fn is not None:  # the gold judge: logged, never trained on
            all_monitor = acc.gather(torch.cat([b["monitor"] for b in batches]).to(acc.device)).cpu()  # (world·N,)
            check_finite_rewards(all_monitor, all_prompts, cfg.monitor, where, monitor_error)
            extra.update({"monitor/mean": all_monitor.mean().item(),
                          "monitor/std": all_monitor.std(unbiased=False).item()})
        if kl_rows:
            all_kl = acc.gather(torch.cat(kls).to(acc.device)).cpu()                       # (world·kl_rows,) float64
            extra.update({"kl/ref": all_kl.mean().item(), "time/kl_s": t_kl})
        t_sample = time.perf_counter()
        # ------------------------------------------------------------ 3. advantages
        if cfg.noise_group_size:  # groups are consecutive within every process's rows, so in the gathered order too
            advantages = group_advantages(all_rewards, cfg.noise_group_size).clamp(-cfg.adv_clip, cfg.adv_clip)
        else:
            advantages = compute_advantages(tracker, all_prompts, all_rewards, cfg.adv_clip)
        advantages = advantages.reshape(world, n_local)[rank].to(acc.device)                # (N,) this process's rows
        # ------------------------------------------------------------ 4. update
        unet.train()
        stats = ddpo_update(model, unet, ref_unet, optimizer, acc, parts.scheduler, latents, timesteps, old_log_probs,
                        advantages, embeds, neg, guidance, trainable, n_train_steps, cfg, epoch, rank)
        t_update = time.perf_counter()
        epoch += 1
        bar.update(1)
        # ------------------------------------------------------------ 5. log
        metrics = {"reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std(unbiased=False).item(),
                   "reward/min": all_rewards.min().item(), "reward/max": all_rewards.max().item(),
                   **({"reward/prompts_tracked": float(len(tracker.stats))}  # only where the tracker is used
                      if cfg.buffer_size > 0 and not cfg.noise_group_size else {}),
                   **extra, **stats, "time/sample_s": t_sample - t0, "time/update_s": t_update - t_sample,
                   "time/images_per_s": n_local * world / (t_update - t0)}
        if run.is_main and grid_prompts and (epoch % cfg.grid_every == 0 or epoch == cfg.epochs):
            with sampling():
                metrics["grid/reward"] = _grid(parts, unet, grid_prompts, cfg, latent_shape, neg, reward_fn, acc, run,
                                               epoch)
        run.log(epoch, metrics)
        shown = {"reward": f"{metrics['reward/mean']:.4f}"}  # of the samples drawn before this epoch's update
        if metrics.get("monitor/mean") is not None:
            shown["monitor"] = f"{metrics['monitor/mean']:.4f}"
        if metrics.get("kl/ref") is not None:  # KL to the initial UNet along those samples, nats per trajectory
            shown["kl_ref"] = f"{metrics['kl/ref']:.3g}"
        shown["approx_kl"] = f"{stats['policy/approx_kl']:.1e}"  # of this update's ratios (PPO's, ~0)
        bar.set_postfix(shown)
        if (cfg.save_every and epoch % cfg.save_every == 0) or epoch == cfg.epochs:
            run.checkpoint(epoch, write, {"tracker": tracker.state_dict()})
    bar.close()
    return DDPOResult(_finish(run, cfg, parts, unet, grid_prompts), unet)


def trainable_steps(scheduler, num_steps: int, eta: float, min_std_dev: float) -> torch.Tensor:
    """(S',) indices s of the DDIM steps whose σ_t(η) ≥ min_std_dev (all S when min_std_dev ≤ 0)."""
    if min_std_dev <= 0:
        return torch.arange(num_steps)
    scheduler.set_timesteps(num_steps)
    std = ddim_std_dev(scheduler, scheduler.timesteps, eta)                                  # (S,) σ_t
    keep = (std >= min_std_dev).nonzero().flatten()
    if len(keep) == 0:
        raise ValueError(f"min_std_dev {min_std_dev}: no step of {num_steps} has σ_t that large "
                         f"(max {std.max().item():.4g})")
    return keep


def draw_batch(prompts_all: list[str], batch_size: int, group_size: int, latent_shape, g: torch.Generator):
    """(prompts (B,), x_T (B, C, H, W) or None): B prompts drawn uniformly; with group_size G ≥ 2, B/G draws
    each repeated G times and one x_T per group (None: sample_trajectories draws every x_T itself)."""
    if not group_size:
        return [prompts_all[j] for j in torch.randint(len(prompts_all), (batch_size,), generator=g).tolist()], None
    n = batch_size // group_size
    idx = torch.randint(len(prompts_all), (n,), generator=g).repeat_interleave(group_size).tolist()
    x_T = torch.randn((n, *latent_shape), generator=g, device=g.device).repeat_interleave(group_size, 0)
    return [prompts_all[j] for j in idx], x_T


def compute_advantages(tracker: PerPromptStatTracker, prompts: list[str], rewards: torch.Tensor,
                       adv_clip: float) -> torch.Tensor:
    """Â = clip((r − mean_prompt) / (std_prompt + 1e-6), −adv_clip, adv_clip)  (B,), DDPO §5.

    The clip bounds what one outlier image (a reward-model glitch) can do to an update; ddpo-pytorch
    applies it in the loss (adv_clip_max = 5), here it is applied once, to the advantages."""
    return tracker.update(prompts, rewards).clamp(-adv_clip, adv_clip)


@torch.no_grad()
def _grid(parts, unet, grid_prompts, cfg, latent_shape, neg, reward_fn, acc, run, epoch) -> float:
    """grids/epoch-XXX.png (+ TensorBoard): rows = grid_seeds, columns = grid_prompts, same noise every epoch.
    Returns the grid's mean reward (the same images each epoch: a low-noise progress signal)."""
    was_training = unet.training
    unet.eval()
    embeds = encode_prompts(parts, grid_prompts)
    rows, scores = [], []
    for seed in cfg.grid_seeds:  # eager under compile_unet: its batch shape would be one more multi-minute compile
        with acc.autocast(), torch.compiler.set_stance("force_eager"):
            traj = sample_trajectories(unet, parts.scheduler, embeds, neg if cfg.guidance_scale > 1 else None,
                                       cfg.num_steps, cfg.guidance_scale, cfg.eta,
                                       generator=torch.Generator().manual_seed(int(seed)), latent_shape=latent_shape)
            images = decode_latents(parts.vae, traj.final_latents).cpu()
            scores.append(score_batch(reward_fn, grid_prompts, images, cfg.reward)[0])
        rows.append(images)
    unet.train(was_training)
    grid = image_grid(torch.cat(rows), nrow=len(grid_prompts))
    save_png(grid, run.out / "grids" / f"epoch-{epoch:03d}.png")
    if run.logger.tb is not None:
        run.logger.tb.add_image("samples/grid", grid, epoch)
    return torch.cat(scores).nanmean().item()


def _finish(run, cfg, parts, unet, grid_prompts=()) -> Path:
    out = Path(run.out)
    if cfg.lora.r > 0:
        result = out / "lora"
        if run.is_main:
            save_unet_lora(unet, result)
    else:
        result = out / "pipeline"
        if run.is_main:
            if cfg.mixed_precision != "no":  # the frozen VAE / text encoder ran cast to bf16/fp16: save the
                parts = replace(load_pipeline(cfg.pipeline), unet=unet)  # pipeline's own float32 ones
            save_parts(parts, result)
    h = run.logger.history

    def first_last(key):
        vals = [v for _, v in h[key]]
        return f"{vals[0]:.4g}", f"{vals[-1]:.4g}"

    metrics = [
        ("reward (mean over the epoch's samples)", "reward/mean"), ("reward std", "reward/std"),
        ("grid reward (fixed prompts and seeds; first = before training)", "grid/reward"),
        ("approx KL[π_old‖π] per step", "policy/approx_kl"),
        ("clip fraction", "policy/clipfrac"), ("mean |log π_old recomputed − sampled|", "policy/logp_recompute_diff"),
        ("KL to reference (k1)", "policy/kl_ref"),
        ("KL penalty per step (" + ("closed form, nats per element" if cfg.kl_estimator == "gaussian" else
                                    cfg.kl_estimator) + ")", "policy/kl_penalty"),
        (f"monitor: {cfg.monitor}", "monitor/mean"), ("KL to reference per trajectory (exact, nats)", "kl/ref"),
        ("images/s", "time/images_per_s")]
    rows = "\n".join(f"| {name} | {first_last(key)[0]} | {first_last(key)[1]} |"
                     for name, key in metrics if h.get(key))  # what this run logged (no monitor, no KL: not shown)
    grids = sorted((out / "grids").glob("epoch-*.png"))
    shown = [grids[0], grids[-1]] if len(grids) > 1 else grids
    grid_md = "\n\n".join(f"**{g.stem}**\n\n![{g.stem}](grids/{g.name})" for g in shown)
    if grid_md and grid_prompts:  # the PNG carries no text: say which prompt each column is
        grid_md = (f"Rows: seeds {list(cfg.grid_seeds)}; columns, left to right: "
                   + "; ".join(f"{i + 1}. `{p}`" for i, p in enumerate(grid_prompts)) + ".\n\n" + grid_md)
    world = run.accelerator.num_processes
    body = (f"DDPO on `{cfg.pipeline}` against `{cfg.reward}`: {cfg.epochs} epochs of "
            f"{cfg.sample_batch_size * cfg.num_batches_per_epoch * world} images, {cfg.num_steps} DDIM steps "
            f"(η = {cfg.eta}, guidance {cfg.guidance_scale}), clip range {cfg.clip_range}, "
            f"{f'LoRA r={cfg.lora.r}' if cfg.lora.r > 0 else 'full fine-tuning'}, KL coef {cfg.kl_coef}"
            f"{f' ({cfg.kl_estimator})' if cfg.kl_coef > 0 else ''}"
            + (f"; UNet compiled ({cfg.compile_backend}: the first epoch includes the compile)"
               if cfg.compile_unet else "") +
            ".\n\n"
            f"| metric | first epoch | last epoch |\n|---|---|---|\n{rows}\n\n"
            f"Result: `{result}`" + (" (`StableDiffusionPipeline.load_lora_weights`)" if cfg.lora.r > 0 and parts.vae
                                     is not None else "") + f"; `align compare --model aligned={out}` samples it.")
    run.finish("DDPO report", [("Summary", body), ("Samples (rows: seeds, columns: prompts)", grid_md or "none")],
               ["reward/mean", "grid/reward", "monitor/mean", "kl/ref", "policy/approx_kl", "policy/clipfrac",
                "policy/kl_ref"], xlabel="epoch")
    return result
