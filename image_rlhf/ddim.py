"""One DDIM denoising step that also returns log p(x_{t−1} | x_t): the policy of DDPO.

DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", §4.2) treats
each denoising step as an action: with η > 0 the DDIM update (Song et al. 2021, eq. 12) is a
Gaussian policy  π(x_{t−1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), whose log-density is what the
clipped surrogate needs. `ddim_step_with_logprob` reproduces `DDIMScheduler.step` exactly (same
arithmetic, same config switches) and adds that log-density. Only public scheduler state is
read (`alphas_cumprod`, `final_alpha_cumprod`, `config`, `num_inference_steps`); ddpo-pytorch
imported private diffusers helpers, which broke with a diffusers release.

Notation (variable name -> paper, DDIM eq. 12 and 16):

    alpha_prod_t          ᾱ_t  (α_t in the DDIM paper)    alphas_cumprod[t]
    alpha_prod_t_prev     ᾱ_{t−1}: alphas_cumprod[t − T/S], or final_alpha_cumprod when t − T/S < 0
    beta_prod_t           1 − ᾱ_t
    pred_original_sample  f_θ(x_t, t), "predicted x_0"
    pred_epsilon          ε_θ(x_t, t)
    std_dev_t             σ_t(η) = η · sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_{t−1})   (eq. 16)
    prev_sample_mean      μ_θ = sqrt(ᾱ_{t−1})·x̂_0 + sqrt(1 − ᾱ_{t−1} − σ_t²)·ε_θ               (eq. 12)
    prev_sample           x_{t−1} = μ_θ + σ_t·z,  z ~ N(0, I)
    log_prob              log N(x_{t−1}; μ_θ, σ_t² I), reduced over the non-batch dims
"""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like` (B, C, H, W)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022 §2.3), written out as DDIMScheduler does:
    s = clamp(quantile_ratio(|x̂_0|), 1, max_value) per sample; x̂_0 = clamp(x̂_0, −s, s) / s."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile/clamp need float32 on CPU
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def ddim_step_with_logprob(scheduler: DDIMScheduler, model_output: torch.Tensor,
                           timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 1.0,
                           prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, reduce: str = "mean",
                           return_mean: bool = False) -> tuple[torch.Tensor, ...]:
    """x_{t−1} and log p(x_{t−1} | x_t) for one DDIM step (Song et al. 2021 eq. 12; DDPO §4.2).

    model_output, sample: (B, C, H, W). timestep: an int, a 0-d tensor, or a (B,) tensor of
    per-sample timesteps (the PPO update shuffles steps within a trajectory); all arithmetic is
    per-sample broadcast, no loop over the batch. `scheduler.set_timesteps(S)` must have been
    called: t_prev = t − num_train_timesteps // S, as in `DDIMScheduler.step`.

    prev_sample None: sample x_{t−1} = μ_θ + σ_t·z with `generator`. Given (a stored transition):
    use it and only score it; it is detached, so gradients reach θ through μ_θ alone.

    reduce: how the per-element log-density is pooled over the D = C·H·W non-batch elements.
      "mean" (default, ddpo-pytorch's choice): log p / D. The ratio exp(log p − log p_old) then
        has a scale independent of the resolution, so one clip_range (1e-4 in DDPO) transfers
        from 32² latents to 64² latents; with the sum the log-ratio grows ∝ D and the same
        clip_range clips almost everything at a larger size.
      "sum": the true log-density of the D-dimensional Gaussian (= "mean" × D).

    Returns (prev_sample (B, C, H, W), log_prob (B,)) with log_prob in at least float32;
    return_mean=True appends μ_θ (B, C, H, W), the policy mean (for `step_kl`; no extra cost).
    η = 0 is deterministic DDIM: σ_t = 0 and the density is a Dirac, so log_prob is None and
    prev_sample equals `DDIMScheduler.step(...).prev_sample` bit for bit; scoring a given
    prev_sample at η = 0 raises. η > 0 with σ_t = 0 (the last step when ᾱ_{t−1} = ᾱ_t, e.g.
    `set_alpha_to_one=True`) raises too, instead of returning ±inf.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"expected a DDIMScheduler, got {type(scheduler).__name__}; "
                        "use DDIMScheduler.from_config(pipe.scheduler.config)")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(S) first")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if not 0 <= eta <= 1:  # η > 1: σ_t² > 1 − ᾱ_{t−1} (NaN in DDIMScheduler.step), which the clamp below would hide
        raise ValueError(f"eta must be in [0, 1] (η > 1 makes σ_t² exceed 1 − ᾱ_(t−1): no DDIM step), got {eta}")
    if eta == 0 and prev_sample is not None:
        raise ValueError("eta = 0 makes the DDIM step deterministic (σ_t = 0): a given prev_sample "
                         "has no log-density; use eta > 0 (DDPO samples with eta = 1)")
    cfg = scheduler.config
    B = sample.shape[0]

    # 1.-2. t_prev = t − T/S and the alphas, per sample; 5. (early, on (B,) scalars) σ_t(η) of eq. 16
    t, alpha_prod_t, alpha_prod_t_prev = _alphas(scheduler, timestep, B)
    beta_prod_t = 1 - alpha_prod_t
    std_dev_t = eta * _variance(alpha_prod_t, alpha_prod_t_prev) ** (0.5)
    # 1 − ᾱ_{t−1} − σ_t² ≥ 0 for η ≤ 1, and exactly 0 at η = 1 on a zero-terminal-SNR step (ᾱ_t = 0), where float32
    # rounds it to ~−1e-8 for some step counts (10, 20, 25 of 1000, trailing): NaN, as in DDIMScheduler.step
    dir_coef = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0) ** (0.5)
    if eta > 0 and bool((std_dev_t == 0).any()):
        raise ValueError(f"σ_t = 0 at timesteps {t[std_dev_t == 0].unique().tolist()} (ᾱ_t−1 = ᾱ_t): the "
                         "step is deterministic and has no log-density; use set_alpha_to_one=False "
                         "and steps_offset=1 as Stable Diffusion's scheduler does (the pipeline's "
                         "scheduler/scheduler_config.json)")
    if cfg.prediction_type == "epsilon" and bool((alpha_prod_t == 0).any()):
        # a zero-terminal-SNR schedule (Lin et al. 2024) visits ᾱ_T = 0, where x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t divides by
        # 0: NaN latents, which DDPO would only meet as a NaN loss
        raise ValueError(f"ᾱ_t = 0 at timesteps {t[alpha_prod_t == 0].unique().tolist()} (rescale_betas_zero_snr: "
                         "zero terminal SNR) with prediction_type 'epsilon': x̂_0 = (x_t − ε)/√ᾱ_t divides by 0. "
                         "Zero-SNR schedules are for v_prediction models; for an ε model set rescale_betas_zero_snr "
                         "false or timestep_spacing 'leading' in the pipeline's scheduler/scheduler_config.json")

    # (B, 1, 1, 1) coefficients on the sample's device, in the model's dtype
    def b(v):
        return _per_sample(v, sample).to(device=sample.device, dtype=model_output.dtype)

    # 3. predicted x_0 ("predicted x_0" of eq. 12) and ε, by prediction type
    if cfg.prediction_type == "epsilon":
        pred_original_sample = (sample - b(beta_prod_t ** (0.5)) * model_output) / b(alpha_prod_t ** (0.5))
        pred_epsilon = model_output
    elif cfg.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - b(alpha_prod_t ** (0.5)) * pred_original_sample) / b(beta_prod_t ** (0.5))
    elif cfg.prediction_type == "v_prediction":
        pred_original_sample = b(alpha_prod_t**0.5) * sample - b(beta_prod_t**0.5) * model_output
        pred_epsilon = b(alpha_prod_t**0.5) * model_output + b(beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type {cfg.prediction_type!r} must be epsilon, sample or v_prediction")

    # 4. clip or threshold predicted x_0, as the scheduler config says
    if cfg.thresholding:
        pred_original_sample = _threshold(pred_original_sample, cfg.dynamic_thresholding_ratio,
                                          cfg.sample_max_value)
    elif cfg.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    # 6. "direction pointing to x_t" of eq. 12
    pred_sample_direction = b(dir_coef) * pred_epsilon

    # 7. x_{t−1} without noise: the mean μ_θ of the policy
    prev_sample_mean = b(alpha_prod_t_prev ** (0.5)) * pred_original_sample + pred_sample_direction
    if eta == 0:
        return (prev_sample_mean, None, prev_sample_mean) if return_mean else (prev_sample_mean, None)

    # 8. sample x_{t−1} = μ_θ + σ_t·z, or score the given one
    std = b(std_dev_t)
    if prev_sample is None:
        gen_device = generator.device if generator is not None else sample.device
        noise = torch.randn(model_output.shape, generator=generator, device=gen_device,
                            dtype=model_output.dtype).to(sample.device)
        prev_sample = prev_sample_mean + std * noise
    prev_sample = prev_sample.detach()

    # 9. log N(x_{t−1}; μ_θ, σ_t²) = −(x − μ)²/(2σ²) − log σ − ½ log 2π, per element, then reduced
    lp_dtype = torch.promote_types(prev_sample_mean.dtype, torch.float32)
    x, mu, sd = prev_sample.to(lp_dtype), prev_sample_mean.to(lp_dtype), std.to(lp_dtype)
    log_prob = -((x - mu) ** 2) / (2 * sd**2) - torch.log(sd) - _HALF_LOG_2PI               # (B, C, H, W)
    dims = tuple(range(1, log_prob.ndim))
    log_prob = log_prob.mean(dim=dims) if reduce == "mean" else log_prob.sum(dim=dims)       # (B,)
    return (prev_sample, log_prob, prev_sample_mean) if return_mean else (prev_sample, log_prob)


def _alphas(scheduler: DDIMScheduler, timestep, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (B,), ᾱ_t (B,), ᾱ_{t−1} (B,): alphas_cumprod[t − T/S], or final_alpha_cumprod when t − T/S < 0
    (float32, as the scheduler)."""
    alphas_cumprod = scheduler.alphas_cumprod
    t = torch.as_tensor(timestep, device=alphas_cumprod.device).long().reshape(-1).expand(B)  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps      # (B,)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas_cumprod.dtype)
    alpha_prod_t_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return t, alphas_cumprod[t], alpha_prod_t_prev


def _variance(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """σ_t(1)² = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1})  (DDIM eq. 16 at η = 1)."""
    return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_std_dev(scheduler: DDIMScheduler, timestep, eta: float = 1.0) -> torch.Tensor:
    """σ_t(η) of the step from t (int or (B,)) as `ddim_step_with_logprob` uses it: (B,) float32."""
    n = torch.as_tensor(timestep).numel()
    _, alpha_prod_t, alpha_prod_t_prev = _alphas(scheduler, timestep, n)
    return eta * _variance(alpha_prod_t, alpha_prod_t_prev) ** 0.5


def step_kl_per_element(mean_p: torch.Tensor, mean_q: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """`step_kl` / D: the exact Gaussian KL of the step per latent element (B,), in the dtype of the means and
    differentiable, for a loss (DPOK's KL regulariser, Fan et al. 2023, in closed form).

    Per element, because the clipped surrogate works on per-element-mean log-probs: both then carry the
    same 1/(σ_t²·D) factor in their gradient through μ_θ (the surrogate's is A·(x_{t−1} − μ_θ)/(σ_t²D),
    this one's (μ_θ − μ_q)/(σ_t²D)), so a KL weight is a trade between nats per element and unit-scale
    advantages, whatever the resolution."""
    diff = (mean_p - mean_q).flatten(1)                                                      # (B, D)
    var = torch.as_tensor(std_dev_t, dtype=diff.dtype, device=diff.device).reshape(-1) ** 2
    return diff.pow(2).mean(dim=1) / (2 * var)                                              # (B,)


def step_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_p, σ_t² I) ‖ N(μ_q, σ_t² I)) = ‖μ_p − μ_q‖² / (2σ_t²), summed over all D = C·H·W elements (B,).

    mean_p, mean_q: (B, C, H, W) μ of two policies at the same x_t (e.g. `return_mean=True`);
    std_dev_t: (B,) or scalar, the σ_t both share (same scheduler, same η). Computed in float64.

    The sum, not the per-element mean that the log-probs use for the ratio: the mean there only
    rescales the log-ratio so that one clip_range fits every resolution; a KL is a divergence
    between distributions, and the divergence of the D-dimensional step is the sum. Summed over the
    S steps of a trajectory sampled from p, its expectation is the KL between the two models'
    distributions over whole trajectories (chain rule; x_T ~ N(0, I) under both), in nats —
    comparable across resolutions and step counts as a KL budget (Gao et al. 2022 plot gold
    reward against √KL).
    """
    D = mean_p[0].numel()
    return step_kl_per_element(mean_p.double(), mean_q.double(), std_dev_t) * D             # (B,)
