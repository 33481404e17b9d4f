"""DDPO rollouts: DDIM sampling with classifier-free guidance, recording every transition.

Black et al. 2023 (DDPO) §4.2 / Algorithm 1: sample S denoising steps with η = 1 and keep
(x_t, t, x_{t−1}, log π_old(x_{t−1} | x_t, c)) for each, so the PPO update can recompute the
log-prob of the same transition under the current UNet (`step_log_prob`) and form the ratio.

Notation:

    latents        (B, S+1, C, H, W)  x_T, x_{T−1}, ..., x_0 (latent space for SD, pixels without a VAE)
    timesteps      (S,)               t of step s (scheduler.timesteps after set_timesteps(S))
    log_probs      (B, S)             log π_θ(x_{t−1} | x_t, c), mean over C·H·W (see ddim.py)
    means          (B, S, C, H, W)    μ_θ(x_t, t, c), the policy mean of each step (only when asked)
    prompt_embeds  (B, L, D)          c, the text encoder's hidden states
    guidance_scale w                  ε̂ = ε_θ(x_t, ∅) + w·(ε_θ(x_t, c) − ε_θ(x_t, ∅))  (Ho & Salimans 2022)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from image_rlhf.ddim import ddim_step_with_logprob


@dataclass
class Trajectory:
    """One batch of DDIM rollouts (DDPO's per-step transitions). x_t = latents[:, s], x_{t−1} = latents[:, s+1]."""
    latents: torch.Tensor                  # (B, S+1, C, H, W) x_T .. x_0
    timesteps: torch.Tensor                # (S,) t per step
    log_probs: torch.Tensor                # (B, S) log π_old(x_{t−1} | x_t, c)
    prompt_embeds: torch.Tensor            # (B, L, D) c
    negative_embeds: torch.Tensor | None   # (B, L, D) ∅ (None when guidance_scale <= 1)
    guidance_scale: float = 5.0
    eta: float = 1.0
    means: torch.Tensor | None = None      # (B, S, C, H, W) μ_θ per step (sample_trajectories(return_means=True))

    @property
    def latents_t(self) -> torch.Tensor:       # (B, S, C, H, W) x_t
        return self.latents[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:    # (B, S, C, H, W) x_{t−1}
        return self.latents[:, 1:]

    @property
    def final_latents(self) -> torch.Tensor:   # (B, C, H, W) x_0, to decode and score
        return self.latents[:, -1]


def _guided_noise_pred(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale):
    """ε̂ with classifier-free guidance: one UNet call on [x_t; x_t] with [∅; c] (w > 1), else on c only.

    timesteps: scalar or (B,). x_t goes in as the dtype of the UNet's weights; ε comes out, and CFG combines it,
    in float32 (or wider): so a bf16 UNet gives sampling and training (accelerate's prepared model, DDP or not)
    the same ε, and the recorded log-probs are the ones step_log_prob recomputes. Returns (B, C, H, W).
    """
    latents = latents.to(_input_dtype(unet))
    up = lambda eps: eps.to(torch.promote_types(eps.dtype, torch.float32))  # noqa: E731
    B = latents.shape[0]
    t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(B)           # (B,)
    if guidance_scale <= 1.0:
        return up(unet(latents, t, encoder_hidden_states=prompt_embeds).sample)
    if negative_embeds is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_embeds (the ∅ prompt)")
    negative_embeds = negative_embeds.expand(B, *negative_embeds.shape[1:])  # a single ∅ row is shared
    model_in = torch.cat([latents, latents])                                                 # (2B, C, H, W)
    embeds = torch.cat([negative_embeds, prompt_embeds])                                     # (2B, L, D)
    noise_uncond, noise_cond = up(unet(model_in, torch.cat([t, t]), encoder_hidden_states=embeds).sample).chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


@torch.no_grad()
def sample_trajectories(unet, scheduler, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                        num_steps: int, guidance_scale: float = 5.0, eta: float = 1.0,
                        generator: torch.Generator | None = None,
                        latent_shape: tuple[int, int, int] | None = None,
                        return_means: bool = False, init_latents: torch.Tensor | None = None) -> Trajectory:
    """Run S = num_steps DDIM steps from x_T ~ N(0, I) and record every transition (DDPO Alg. 1).

    unet: a diffusers UNet2DConditionModel (latent SD UNet or a pixel UNet); scheduler: a
    DDIMScheduler (its timesteps are set here). latent_shape (C, H, W) defaults to the UNet's
    (in_channels, sample_size, sample_size). The noise x_T and every z_t come from `generator`.
    Decoding x_0 is the caller's job (`decode_latents`). return_means: also keep μ_θ of every step
    (`Trajectory.means`, what the KL to a reference needs; taken from the same forward, no extra cost).
    init_latents: (B, C, H, W) noise to start from instead of drawing x_T (DDPO's shared-noise groups);
    the per-step noise still comes from `generator`.
    """
    B = prompt_embeds.shape[0]
    # the scheduler's arithmetic and the stored x_t in float32 (or wider) whatever the UNet's dtype, on the
    # float32 ε of _guided_noise_pred, as step_log_prob does at training time; x_{t−1} is not rounded to bf16
    device, dtype = prompt_embeds.device, torch.promote_types(unet.dtype, torch.float32)
    if latent_shape is None:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        latent_shape = (unet.config.in_channels, *size)
    scheduler.set_timesteps(num_steps, device=device)
    gen_device = generator.device if generator is not None else device
    if init_latents is not None:
        if tuple(init_latents.shape) != (B, *latent_shape):
            raise ValueError(f"init_latents has shape {tuple(init_latents.shape)}, expected {(B, *latent_shape)}")
        latents = init_latents.to(device=device, dtype=dtype)
    else:
        latents = torch.randn((B, *latent_shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    latents = latents * scheduler.init_noise_sigma                                            # x_T
    all_latents, all_log_probs, all_means = [latents], [], []
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        noise_pred = _guided_noise_pred(unet, model_in, t, prompt_embeds, negative_embeds, guidance_scale)
        noise_pred = noise_pred.contiguous()  # a channels_last UNet (`memory_format`) returns NHWC strides
        latents, log_prob, mean = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta=eta,
                                                         generator=generator, return_mean=True)
        latents = latents.to(dtype)
        all_latents.append(latents)
        all_log_probs.append(log_prob if log_prob is not None else torch.full((B,), float("nan"), device=device))
        if return_means:
            all_means.append(mean)
    return Trajectory(latents=torch.stack(all_latents, dim=1),                               # (B, S+1, C, H, W)
                      timesteps=scheduler.timesteps.clone(),                                 # (S,)
                      log_probs=torch.stack(all_log_probs, dim=1),                           # (B, S)
                      prompt_embeds=prompt_embeds, negative_embeds=negative_embeds,
                      guidance_scale=guidance_scale, eta=eta,
                      means=torch.stack(all_means, dim=1) if return_means else None)      # (B, S, C, H, W)


@contextlib.contextmanager
def memory_format(modules, fmt: torch.memory_format | None):
    """Within the block the modules' 4-D weights are in `fmt` (torch.channels_last: oneDNN then runs every
    convolution NHWC), after it contiguous again; fmt None: nothing. The same Parameter objects throughout,
    so optimisers keep their state. Outputs equal the contiguous ones up to float rounding (tested)."""
    modules = [m for m in modules if m is not None]
    if fmt is None or not modules:
        yield
        return
    for m in modules:
        m.to(memory_format=fmt)
    try:
        yield
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)


def _input_dtype(unet) -> torch.dtype:
    """The dtype of the UNet's first weight (conv_in), which x_t is cast to: a bf16 pipeline run without autocast
    (`align compare --dtype bf16`) needs it. Also for an accelerate/DDP-wrapped or peft UNet."""
    return next(unet.parameters()).dtype


def step_log_prob(unet, scheduler, latents_t: torch.Tensor, timesteps: torch.Tensor | int,
                  next_latents: torch.Tensor, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor | None, guidance_scale: float = 5.0,
                  eta: float = 1.0, reduce: str = "mean", return_mean: bool = False):
    """log π_θ(x_{t−1} | x_t, c) of stored transitions under the current UNet, with gradients (B,).

    latents_t, next_latents: (B, C, H, W); timesteps: scalar or (B,). The scheduler must be set to
    the same S as at sampling (`scheduler.set_timesteps(S)`). With the sampling UNet unchanged this
    equals the recorded `Trajectory.log_probs` (same CFG, same η). return_mean: (log_prob, μ_θ (B, C, H, W)).
    """
    model_in = scheduler.scale_model_input(latents_t, timesteps)
    noise_pred = _guided_noise_pred(unet, model_in, timesteps, prompt_embeds, negative_embeds, guidance_scale)
    _, log_prob, mean = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents_t, eta=eta,
                                               prev_sample=next_latents, reduce=reduce, return_mean=True)
    return (log_prob, mean) if return_mean else log_prob


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """x_0 -> images (B, 3, H, W) in [0, 1], float32.

    With a VAE: undo the latent normalisation z·scaling_factor (+ shift_factor where the VAE has
    one; SD 1.x: 0.18215, no shift), decode, then map [−1, 1] -> [0, 1]. vae=None: pixel-space
    diffusion, x_0 is already the image in [−1, 1].
    """
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        latents = vae.decode(z).sample
    return (latents.float() / 2 + 0.5).clamp(0, 1)
