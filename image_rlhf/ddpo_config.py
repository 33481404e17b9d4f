"""DDPOConfig, the settings of `align image ddpo` (run_ddpo in ddpo.py), and `check_config`: every setting that
cannot work, refused before a run folder or a model exists."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.rl.config import LoraParams

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class DDPOConfig:
    pipeline: str = ""
    """Diffusers pipeline to fine-tune: folder or hub id (SD 1.x/2.x, or align's pixel layout)."""
    reward: str = ""
    """jpeg|compressibility, incompressibility, brightness, an `align image rm` / ClipReward folder, pickscore,
    aesthetic, hpsv2, hpsv2.1 (the published checkpoints; `pickscore:MODEL`, `aesthetic:CLIP,MLP`,
    `hpsv2:CKPT[,CLIP]` or a transformers CLIP folder for local copies), or module:function."""
    prompts: str = ""
    """Prompts: a text file, one per line, or JSONL {"prompt"}; each batch draws uniformly from them."""
    out: str = ""
    epochs: int = 100
    sample_batch_size: int = 8
    """Images per sampling batch, per process. SD-1.5 UNet, bf16, CFG, H100: 10.6 / 8.9 / 8.4 ms per image and
    step at 8 / 16 / 32 (the SD presets: 16)."""
    num_batches_per_epoch: int = 4
    """Sampling batches per epoch, per process: N = sample_batch_size × this samples per process."""
    train_batch_size: int = 4
    """Samples per forward/backward (must divide N); gradients accumulate over their timesteps."""
    gradient_accumulation_steps: int = 1
    """Train batches per optimiser step: train_batch_size × this × processes samples per step. The
    policy gradient of a few samples is mostly noise; ddpo-pytorch steps on 64-128 samples."""
    num_steps: int = 50
    """DDIM steps S per image."""
    guidance_scale: float = 5.0
    eta: float = 1.0
    """DDIM η: σ_t = η·σ_t(1); η = 1 (DDPM-like) makes every step a Gaussian policy."""
    timestep_fraction: float = 1.0
    """Share of each trajectory's trainable steps (see min_std_dev), shuffled per sample, trained on."""
    min_std_dev: float = 0.0
    """Train only the steps whose σ_t(η) ≥ this (0 = every step). A step whose σ_t is tiny is almost
    deterministic, yet its log-prob gradient scales as 1/σ_t: on the image world's 10-step cosine schedule
    the step from t = 101 (σ_t = 0.009, the others 0.15-0.83) held 97% of the policy gradient's squared
    norm, so Adam's update was that one detail step's and the composition steps were never trained."""
    inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timesteps_per_forward: int = 2
    """Trained steps of a train batch that share one UNet forward/backward (UNet batch ×k, activation
    memory ×k): the gradient is the same sum as one call per step, in k× fewer, larger calls. Measured
    at the benchmark's settings (CPU, 1 thread, UNet fwd+bwd alone): time ×0.94 (k = 2), ×0.93 (k = 4);
    peak RSS of the backward +90 MB (k = 1), +250 MB (k = 2), +530 MB (k = 4). SD-1.5 UNet, LoRA, bf16, CFG,
    train batch 4, H100 (scripts/bench_gpu.py): 41.7 / 26.7 / 21.5 ms per (sample, step) and 10.8 / 19.4 /
    36.7 GiB peak for k = 1 / 2 / 4 — bigger UNet batches fill the GPU; 1 fits the smallest cards."""
    recompute_log_probs: bool = False
    """log π_old from the update's own UNet calls (forward only, once, before the first step) instead of the
    sampler's record, as verl recomputes its rollouts' log-probs: one more UNet forward per trained step (CPU
    benchmark: update time ×1.46, images/s ×0.76; H100, SD-1.5-sized, eager bf16: ×1.56 and ×0.71). In bf16 on
    a GPU the two round differently (other batch shapes and row layouts): on an H100 the first step's clip
    fraction was 3%, and 31% of the ratios left 1 ± clip_range with trained adapters (README, GPU).
    Recomputed, they are exactly 1 before any step (H100 run 9: clip fraction 3% -> 0)."""
    lr: float = 3e-4
    max_grad_norm: float = 1.0
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip."""
    buffer_size: int = 16
    """Per-prompt reward buffer; 0 = no per-prompt statistics (normalise by the whole batch)."""
    min_count: int = 16
    """Rewards a prompt needs buffered before its own mean/std are used (else the batch's)."""
    noise_group_size: int = 0
    """0 = off: every sample has its own prompt draw and x_T; advantages from the per-prompt tracker
    (buffer_size, min_count). G ≥ 2: a sampling batch is sample_batch_size / G groups of G samples of one
    prompt from one x_T (each with its own per-step noise); advantage = reward − its group's mean, over the
    batch std of those differences (align.rl.group_advantages; the tracker is not used). x_T is no step's
    action, yet it moves the reward: the image world's learned reward within a prompt is 55% x_T."""
    clip_range: float = 1e-4
    """ε of the clipped surrogate on per-step ratios (DDPO's 1e-4: log-probs are per-element means)."""
    train_cfg: bool = True
    """Policy = the CFG-guided step (as sampled). False: sample and train the conditional ε_θ(x_t, c)
    alone (half the UNet batch); guidance_scale then applies only to the grid images."""
    kl_coef: float = 0.0
    """DPOK's KL-to-reference weight (0 = off); reference = the initial UNet; see kl_estimator."""
    kl_estimator: str = "gaussian"
    """The per-step KL penalty on trained steps. gaussian: DPOK's closed form, KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) =
    ‖μ_θ − μ_ref‖²/(2σ_t²), exact (no sampling noise), per latent element (ddim.step_kl_per_element: the scale
    of the per-element-mean log-probs the surrogate uses, so kl_coef weighs nats per element against advantages
    of unit scale). k2: ½(log π − log π_ref)² of the sampled transition on the per-element-mean log-probs
    (Schulman's k2; its gradient carries 1/D² where the surrogate's carries 1/D: D = latent elements, and it
    is a one-sample estimate: on the tiny test pipeline k2 at kl_coef 10 or 1000 did not hold the policy at all,
    7.0k nats of kl/ref after 4 epochs against 3.2k with no leash, where gaussian at 10 gave 0.6k).
    Measured in the image world (D = 768, image_rlhf.demo.ImageDemoPreset.ddpo): gaussian kl_coef 0.01 / 0.1 /
    1 / 10 give kl/ref 6.0k / 1.1k / 165 / 12 nats against 9.2k unleashed."""
    monitor: str = ""
    """A second reward (same forms as `reward`) scored on every epoch's samples and logged as
    monitor/mean and monitor/std, never used for advantages: a gold judge (Gao et al. 2022)."""
    log_kl: bool = False
    """Log kl/ref: mean over sampled trajectories of Σ_t KL(π_θ(·|x_t) ‖ π_ref(·|x_t)), the exact
    Gaussian KL of each step summed over all elements (ddim.step_kl), π_ref = the initial UNet.
    Costs one no-grad reference forward per logged step (the policy means come from sampling)."""
    kl_samples: int = 0
    """Trajectories per process that kl/ref averages over: 0 = all sampled, else the first N. With N
    smaller than a sampling batch the reference forward runs on fewer rows than sampling did, so float32
    rounding differs a little: before any update kl/ref is ~1e-8 instead of exactly 0."""
    lora: LoraParams = field(default_factory=lambda: LoraParams(r=4, alpha=4.0))
    """LoRA on the UNet's attention projections (to_q/to_k/to_v/to_out.0); r = 0 trains every weight."""
    mixed_precision: str = "no"
    """no | fp16 | bf16: frozen weights in that dtype, autocast; trained weights stay float32."""
    channels_last: bool = True
    """On the CPU, sample (rollouts, grids, the kl/ref forward) with the UNet in channels_last memory format:
    measured ×0.95 per sampling forward at the benchmark's settings; training stays contiguous (×1.01 there).
    float32 only: in bf16 the NHWC and NCHW kernels round differently, so the recorded log-probs would miss the
    training forward's by ~1e-4 per element (tiny pipeline: a sixth of the first step's ratios clipped at 1e-4).
    On CUDA the UNet stays contiguous: an SD-1.5 UNet in bf16 on an H100 measured ×1.17 per sampling forward
    and ×0.92-1.07 per training call in channels_last (scripts/bench_gpu.py, README)."""
    attention: str = "sdpa"
    """sdpa (torch's scaled_dot_product_attention) | xformers (used only when importable, on CUDA; xformers
    0.0.35's PyPI wheel ran DDPO 0.85x as fast as SDPA on an H100: README, GPU)."""
    compile_unet: bool = False
    """torch.compile the UNet (inductor, static shapes: a graph per UNet batch shape and grad mode, so sampling and
    training each compile once; the grid runs eager; minutes on an SD-1.5 UNet, cached by inductor for later
    runs). SD-1.5 UNet, LoRA, bf16, H100: DDPO ×1.70 end to end (0.84 vs 0.50 images/s), peak 16.2 vs 19.6 GiB,
    after ~3.6 min of compiling (paid back after ~260 images); the CPU benchmark's tiny UNet: ×1.26 per sampling
    call and ×1.0 per training call (README)."""
    compile_backend: str = "inductor"
    """torch.compile's backend when compile_unet: inductor (generated kernels), or e.g. aot_eager (the same graph
    capture and autograd, eager kernels: seconds to compile; to debug, and what the test suite runs)."""
    resolution: int = 0
    """Image size in pixels (0 = the UNet's native sample_size × the VAE factor)."""
    seed: int = 0
    save_every: int = 10
    """Checkpoint every N epochs (and at the end; 0 = at the end only)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints, newest first (TRL's save_total_limit; 0 = all). The newest is what
    --resume continues from; an older one is its fallback where the newest is damaged."""
    grid_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grid (default: the first 4 distinct prompts)."""
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Noise seeds of the grid: one row per seed, the same every time, so progress is visible; [] = no grid."""
    grid_every: int = 10
    """Grid (grids/epoch-XXX.png, grid/reward) before training, every N epochs and after the last; 0 = none.
    A grid is a len(grid_seeds) × len(grid_prompts) rollout: at the benchmark's settings one per epoch
    costs half an epoch's sampling."""


def check_config(cfg: DDPOConfig) -> None:
    """Raise ValueError (one line, naming the setting) for a DDPOConfig that cannot work or would silently do
    something else than it says."""
    for name in ("pipeline", "reward", "prompts", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"ddpo: --{name} is required")
    if cfg.mixed_precision not in _DTYPES:
        raise ValueError(f"mixed_precision must be one of {sorted(_DTYPES)}, got {cfg.mixed_precision!r}")
    if cfg.attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {cfg.attention!r}")
    if cfg.eta <= 0:
        raise ValueError(f"eta must be > 0 (η = 0 is deterministic DDIM: no log-prob to train), got {cfg.eta}")
    for name in ("sample_batch_size", "num_batches_per_epoch", "train_batch_size", "gradient_accumulation_steps",
                 "num_steps", "inner_epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"ddpo: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.save_every < 0:
        raise ValueError(f"ddpo: save_every must be >= 0 (0 = at the end only), got {cfg.save_every}")
    if cfg.eta > 1:  # σ_t(η)² > 1 − ᾱ_{t−1}: the DDIM direction term sqrt(1 − ᾱ_{t−1} − σ_t²) is NaN
        raise ValueError(f"eta must be <= 1 (η > 1 makes σ_t² exceed 1 − ᾱ_(t−1): the DDIM step is NaN), "
                         f"got {cfg.eta}")
    if cfg.guidance_scale < 1:  # the sampler runs CFG only above 1, as diffusers: below it would silently be 1
        raise ValueError(f"guidance_scale must be >= 1 (1 = no classifier-free guidance), got {cfg.guidance_scale}")
    if cfg.adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0 (advantages are clipped to ±adv_clip; 0 zeroes them all), "
                         f"got {cfg.adv_clip}")
    if cfg.buffer_size > 0 and cfg.min_count > cfg.buffer_size:
        raise ValueError(f"min_count {cfg.min_count} > buffer_size {cfg.buffer_size}: a prompt's buffer never holds "
                         f"min_count rewards, so per-prompt statistics would never be used (buffer_size=0 for "
                         f"batch statistics)")
    if cfg.lora.r < 0:
        raise ValueError(f"lora.r must be > 0 (LoRA) or 0 (full fine-tuning), got {cfg.lora.r}")
    if cfg.lora.r > 0 and cfg.lora.dropout > 0:
        raise ValueError(f"lora.dropout must be 0 for DDPO, got {cfg.lora.dropout}: dropout makes the training "
                         f"forward a different, random policy from the sampler's, so the ratios π_θ/π_old are not 1 "
                         f"even before any step and the clipped surrogate (clip_range {cfg.clip_range}) clips them")
    n_local = cfg.sample_batch_size * cfg.num_batches_per_epoch
    step_samples = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if n_local % step_samples:
        raise ValueError(f"train_batch_size × gradient_accumulation_steps = {step_samples} must divide "
                         f"sample_batch_size × num_batches_per_epoch = {n_local}")
    if cfg.noise_group_size < 0 or cfg.noise_group_size == 1 or (
            cfg.noise_group_size and cfg.sample_batch_size % cfg.noise_group_size):
        raise ValueError(f"noise_group_size must be 0 (off) or >= 2 dividing sample_batch_size "
                         f"{cfg.sample_batch_size}, got {cfg.noise_group_size}")
    if cfg.max_grad_norm < 0:  # torch's clip_grad_norm_ scales by max_norm / norm: a negative one flips the gradient
        raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping; a negative one flips every gradient in "
                         f"torch's clip_grad_norm_: the run would descend the reward), got {cfg.max_grad_norm}")
    if cfg.clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (the ratios are clipped to 1 ± clip_range; a negative one inverts "
                         f"the clip), got {cfg.clip_range}")
    if cfg.kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0 (a negative weight rewards leaving the reference), got {cfg.kl_coef}")
    if cfg.kl_estimator not in ("gaussian", "k2"):
        raise ValueError(f"kl_estimator must be 'gaussian' or 'k2', got {cfg.kl_estimator!r}")
    if cfg.timestep_fraction <= 0 or cfg.timestep_fraction > 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
