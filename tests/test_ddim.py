"""DDIM-with-log-prob (DDPO's policy) against DDIMScheduler.step and a float64 hand computation."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

from image_rlhf.ddim import ddim_std_dev, ddim_step_with_logprob, step_kl, step_kl_per_element  # noqa: E402
from image_rlhf.sampling import decode_latents, memory_format, sample_trajectories, step_log_prob  # noqa: E402
from image_rlhf.tiny import SD_DDIM_CONFIG, tiny_sd_pipeline  # noqa: E402

S = 10                       # inference steps for the scheduler-only tests
SHAPE = (3, 4, 8, 8)         # (B, C, H, W)


def make_scheduler(**overrides):
    sched = DDIMScheduler(**{**SD_DDIM_CONFIG, **overrides})
    sched.set_timesteps(S)
    return sched


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    path = tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), sample_size=16)
    return StableDiffusionPipeline.from_pretrained(path)


@pytest.mark.parametrize("overrides", [dict(), dict(prediction_type="v_prediction"),
                                       dict(prediction_type="sample", clip_sample=True),
                                       dict(thresholding=True, set_alpha_to_one=True, steps_offset=0)])
def test_eta0_equals_scheduler_step_exactly(overrides):
    sched = make_scheduler(**overrides)
    for i, t in enumerate(sched.timesteps):      # includes the last step (t_prev < 0 -> final_alpha_cumprod)
        x_t, out = rand(*SHAPE, seed=i), rand(*SHAPE, seed=100 + i)
        ref = sched.step(out, t, x_t, eta=0.0).prev_sample
        mine, log_prob = ddim_step_with_logprob(sched, out, t, x_t, eta=0.0)
        assert log_prob is None
        assert torch.equal(mine, ref)
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step_with_logprob(sched, out, t, x_t, eta=0.0, prev_sample=ref)


def _hand_log_prob(sched, model_output, t, x_t, x_prev, eta, prediction_type):
    """μ from alphas_cumprod (DDIM eq. 12, 16) and the Gaussian log-density, all in float64."""
    ac = sched.alphas_cumprod.double()
    t_prev = int(t) - 1000 // S
    a_t = ac[int(t)].item()
    a_prev = ac[t_prev].item() if t_prev >= 0 else ac[0].item()    # set_alpha_to_one=False
    x_t, eps = x_t.double(), model_output.double()
    if prediction_type == "v_prediction":
        x0 = math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * eps
        eps = math.sqrt(a_t) * eps + math.sqrt(1 - a_t) * x_t
    else:
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    dens = -(x_prev.double() - mu) ** 2 / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return dens.mean(dim=(1, 2, 3)), mu, sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta1_log_prob_matches_hand_computation(prediction_type):
    sched = make_scheduler(prediction_type=prediction_type)
    for i, t in enumerate(sched.timesteps):
        x_t, out, noise = rand(*SHAPE, seed=i), rand(*SHAPE, seed=100 + i), rand(*SHAPE, seed=200 + i)
        x_prev = sched.step(out, t, x_t, eta=1.0, variance_noise=noise).prev_sample
        got_prev, log_prob = ddim_step_with_logprob(sched, out, t, x_t, eta=1.0, prev_sample=x_prev)
        want, mu, sigma = _hand_log_prob(sched, out, t, x_t, x_prev, 1.0, prediction_type)
        assert torch.equal(got_prev, x_prev) and log_prob.shape == (SHAPE[0],)
        torch.testing.assert_close(log_prob.double(), want, rtol=0, atol=1e-5)
        # sampling with a generator draws the same z as the scheduler: x_{t−1} = μ + σ·z exactly
        ours, _ = ddim_step_with_logprob(sched, out, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(i))
        theirs = sched.step(out, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.equal(ours, theirs)
        # and μ (computed here from alphas_cumprod) is the mean the scheduler used: x_{t−1} − μ = σ·z
        torch.testing.assert_close(x_prev.double() - mu, sigma * noise.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_kl_matches_float64_gaussian_kl(prediction_type):
    """KL(N(μ_p, σ²I) ‖ N(μ_q, σ²I)) of one step: μ_p, μ_q and σ_t by hand in float64, the KL as the sum
    over all D elements; and against torch.distributions (per-element Normal KL, summed)."""
    sched = make_scheduler(prediction_type=prediction_type)
    x_t, x_prev = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    out_p, out_q = rand(*SHAPE, seed=3), rand(*SHAPE, seed=3) + 0.1 * rand(*SHAPE, seed=4)
    for t in (sched.timesteps[0], sched.timesteps[S // 2], sched.timesteps[-1]):
        _, _, mean_p = ddim_step_with_logprob(sched, out_p, t, x_t, prev_sample=x_prev, return_mean=True)
        _, _, mean_q = ddim_step_with_logprob(sched, out_q, t, x_t, prev_sample=x_prev, return_mean=True)
        _, mu_p, sigma = _hand_log_prob(sched, out_p, t, x_t, x_prev, 1.0, prediction_type)
        _, mu_q, _ = _hand_log_prob(sched, out_q, t, x_t, x_prev, 1.0, prediction_type)
        std = ddim_std_dev(sched, t, eta=1.0)
        assert std.shape == (1,) and abs(std.item() - sigma) < 1e-4 * sigma   # float32 σ (1 − ᾱ_t/ᾱ_{t−1} cancels)
        want = ((mu_p - mu_q) ** 2).sum(dim=(1, 2, 3)) / (2 * sigma**2)                   # (B,) float64
        got = step_kl(mean_p, mean_q, std)
        assert got.dtype == torch.float64 and got.shape == (SHAPE[0],)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
        normal = torch.distributions.Normal
        per_elem = torch.distributions.kl_divergence(normal(mu_p, sigma), normal(mu_q, sigma))
        torch.testing.assert_close(got, per_elem.sum(dim=(1, 2, 3)), rtol=1e-4, atol=0)
        assert torch.equal(step_kl(mean_p, mean_p, std), torch.zeros(SHAPE[0], dtype=torch.float64))
    # per-sample σ_t: a (B,) timesteps tensor gives each row its own σ
    ts = sched.timesteps[torch.tensor([0, 4, S - 1])]
    stds = ddim_std_dev(sched, ts)
    for i in range(3):
        assert stds[i] == ddim_std_dev(sched, int(ts[i]))[0]


def test_sampling_uses_generator_and_sum_is_mean_times_d():
    sched = make_scheduler()
    t = sched.timesteps[3]
    x_t, out = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    a, lp_a = ddim_step_with_logprob(sched, out, t, x_t, generator=torch.Generator().manual_seed(7))
    b, lp_b = ddim_step_with_logprob(sched, out, t, x_t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    _, lp_sum = ddim_step_with_logprob(sched, out, t, x_t, prev_sample=a, reduce="sum")
    D = math.prod(SHAPE[1:])
    torch.testing.assert_close(lp_sum, lp_a * D, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="reduce"):
        ddim_step_with_logprob(sched, out, t, x_t, reduce="max")


def test_per_sample_timesteps_equal_scalar_calls():
    sched = make_scheduler(prediction_type="v_prediction")
    ts = sched.timesteps[torch.tensor([0, 4, S - 1])]                      # (B,) incl. the last step
    x_t, out, x_prev = rand(*SHAPE, seed=3), rand(*SHAPE, seed=4), rand(*SHAPE, seed=5)
    prev_vec, lp_vec = ddim_step_with_logprob(sched, out, ts, x_t, prev_sample=x_prev)
    mean_vec, _ = ddim_step_with_logprob(sched, out, ts, x_t, eta=0.0)
    for i in range(SHAPE[0]):
        _, lp_i = ddim_step_with_logprob(sched, out[i:i + 1], int(ts[i]), x_t[i:i + 1], prev_sample=x_prev[i:i + 1])
        mean_i, _ = ddim_step_with_logprob(sched, out[i:i + 1], int(ts[i]), x_t[i:i + 1], eta=0.0)
        torch.testing.assert_close(lp_vec[i:i + 1], lp_i, rtol=0, atol=1e-6)
        assert torch.equal(mean_vec[i:i + 1], mean_i)


def test_zero_sigma_raises_with_eta():
    sched = make_scheduler(set_alpha_to_one=True, steps_offset=0)          # last step: ᾱ_{t−1} = 1 -> σ = 0
    x = rand(*SHAPE, seed=0)
    with pytest.raises(ValueError, match="σ_t = 0"):
        ddim_step_with_logprob(sched, x, sched.timesteps[-1], x, eta=1.0)


def test_zero_snr_schedules_v_prediction_steps_and_epsilon_is_refused():
    """rescale_betas_zero_snr makes ᾱ_999 = 0, which "trailing" spacing (SD 2.x zero-SNR fine-tunes) visits first.
    v-prediction: at η = 1, 1 − ᾱ_(t−1) − σ_t² is exactly 0 there and float32 rounded it below 0 at 10, 20, 25 steps:
    NaN latents (DDIMScheduler.step too), and DDPO stopped with "the loss is not finite; lower lr". An ε model's
    x̂_0 divides by √ᾱ_t = 0: refused, naming the setting."""
    x = rand(*SHAPE, seed=0)
    for steps in (10, 20, 25):
        v = DDIMScheduler(**{**SD_DDIM_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                             "prediction_type": "v_prediction"})
        v.set_timesteps(steps)
        assert v.timesteps[0] == 999 and v.alphas_cumprod[999] == 0
        prev, log_prob = ddim_step_with_logprob(v, x, v.timesteps[0], x, eta=1.0, generator=torch.Generator())
        assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all(), steps
        out, _ = ddim_step_with_logprob(v, x, v.timesteps[0], x, eta=0.0)
        assert torch.equal(out, v.step(x, v.timesteps[0], x, eta=0.0).prev_sample)
    sched = make_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="ᾱ_t = 0 at timesteps \\[999\\].*prediction_type 'epsilon'"):
        ddim_step_with_logprob(sched, x, sched.timesteps[0], x, eta=1.0)


def test_eta_above_one_is_refused_not_clamped():
    """The clamp of 1 − ᾱ_(t−1) − σ_t² at 0 (zero-SNR rounding, above) turned η > 1, where it is negative at every
    step and DDIMScheduler.step gives NaN, into silently finite samples of another process (`align compare` and
    `align sample` pass image.eta through unchecked; DDPO refuses it in its config)."""
    sched = make_scheduler()
    x = rand(*SHAPE, seed=0)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        ddim_step_with_logprob(sched, x, sched.timesteps[0], x, eta=1.5)


def _embeds(pipe, prompts):
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return cond, uncond


def test_tiny_pipeline_loads_and_decodes(sd_pipe):
    assert isinstance(sd_pipe.scheduler, DDIMScheduler)
    latents = torch.randn(2, 4, 16, 16)
    images = decode_latents(sd_pipe.vae, latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    pixels = decode_latents(None, torch.tensor([[-1.0, 0.0, 1.0, 3.0]]))
    assert torch.equal(pixels, torch.tensor([[0.0, 0.5, 1.0, 1.0]]))


def test_trajectory_log_probs_are_reproduced_by_step_log_prob(sd_pipe):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    cond, uncond = _embeds(sd_pipe, prompts)
    steps = 4
    traj = sample_trajectories(sd_pipe.unet, sd_pipe.scheduler, cond, uncond, num_steps=steps,
                               guidance_scale=5.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    B = len(prompts)
    assert traj.latents.shape == (B, steps + 1, 4, 16, 16)
    assert traj.timesteps.shape == (steps,) and traj.log_probs.shape == (B, steps)
    assert torch.isfinite(traj.log_probs).all()
    with torch.no_grad():
        for s in range(steps):            # per step, as stored
            lp = step_log_prob(sd_pipe.unet, sd_pipe.scheduler, traj.latents_t[:, s], traj.timesteps[s],
                               traj.next_latents[:, s], cond, uncond, guidance_scale=5.0, eta=1.0)
            torch.testing.assert_close(lp, traj.log_probs[:, s], rtol=0, atol=1e-5)
        # DDPO's update shuffles steps per sample: a (B,) timesteps tensor, one different step each
        perm = torch.tensor([2, 0, 3])
        rows = torch.arange(B)
        lp = step_log_prob(sd_pipe.unet, sd_pipe.scheduler, traj.latents_t[rows, perm], traj.timesteps[perm],
                           traj.next_latents[rows, perm], cond, uncond, guidance_scale=5.0, eta=1.0)
        torch.testing.assert_close(lp, traj.log_probs[rows, perm], rtol=0, atol=1e-5)
    # gradients reach the UNet through μ_θ
    lp = step_log_prob(sd_pipe.unet, sd_pipe.scheduler, traj.latents_t[:, 1], traj.timesteps[1],
                       traj.next_latents[:, 1], cond, uncond, guidance_scale=5.0)
    lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sd_pipe.unet.parameters())
    sd_pipe.unet.zero_grad(set_to_none=True)


def test_trajectory_means_are_the_step_means(sd_pipe):
    """return_means keeps μ_θ of every step: x_{t−1} − μ_θ is σ_t·z, and recomputing μ from the stored
    x_t gives the same tensor."""
    cond, uncond = _embeds(sd_pipe, ["a red circle", "a blue square"])
    traj = sample_trajectories(sd_pipe.unet, sd_pipe.scheduler, cond, uncond, num_steps=3, guidance_scale=5.0,
                               generator=torch.Generator().manual_seed(0), return_means=True)
    assert traj.means.shape == traj.latents_t.shape
    with torch.no_grad():
        for s in range(3):
            _, mean = step_log_prob(sd_pipe.unet, sd_pipe.scheduler, traj.latents_t[:, s], traj.timesteps[s],
                                    traj.next_latents[:, s], cond, uncond, guidance_scale=5.0, return_mean=True)
            torch.testing.assert_close(mean, traj.means[:, s], rtol=0, atol=1e-6)
    plain = sample_trajectories(sd_pipe.unet, sd_pipe.scheduler, cond, uncond, num_steps=3, guidance_scale=5.0,
                                generator=torch.Generator().manual_seed(0))
    assert plain.means is None and torch.equal(plain.latents, traj.latents)


def test_no_cfg_skips_uncond_half(sd_pipe):
    cond, _ = _embeds(sd_pipe, ["a red circle"])
    traj = sample_trajectories(sd_pipe.unet, sd_pipe.scheduler, cond, None, num_steps=2, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(0))
    lp = step_log_prob(sd_pipe.unet, sd_pipe.scheduler, traj.latents_t[:, 0], traj.timesteps[0],
                       traj.next_latents[:, 0], cond, None, guidance_scale=1.0)
    torch.testing.assert_close(lp.detach(), traj.log_probs[:, 0], rtol=0, atol=1e-5)


def test_channels_last_sampling_matches_contiguous(sd_pipe):
    """DDPO samples with the UNet in channels_last (CPU) and trains it contiguous: the rollout equals the
    contiguous one up to float rounding, and the contiguous UNet reproduces the recorded log-probs (ratio 1)."""
    cond, uncond = _embeds(sd_pipe, ["a red circle", "a blue square"])
    unet = sd_pipe.unet

    def rollout():
        return sample_trajectories(unet, sd_pipe.scheduler, cond, uncond, num_steps=4, guidance_scale=5.0,
                                   generator=torch.Generator().manual_seed(0))
    plain = rollout()
    with memory_format([unet], torch.channels_last):
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        fast = rollout()
    assert unet.conv_in.weight.is_contiguous() and fast.latents.is_contiguous()
    # CFG (×5) and the 1/sqrt(ᾱ_t) of x̂_0 amplify float32 rounding along the 4 steps: measured 1.6e-5
    torch.testing.assert_close(fast.latents, plain.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast.log_probs, plain.log_probs, rtol=0, atol=1e-5)
    with torch.no_grad():
        for s in range(4):
            lp = step_log_prob(unet, sd_pipe.scheduler, fast.latents_t[:, s], fast.timesteps[s], fast.next_latents[:, s],
                               cond, uncond, guidance_scale=5.0)
            torch.testing.assert_close(lp, fast.log_probs[:, s], rtol=0, atol=1e-5)


def test_per_element_step_kl_is_the_expected_log_ratio_and_its_gradient():
    """DPOK's closed-form penalty (kl_estimator=gaussian): step_kl / D, and the Monte-Carlo mean over
    x_{t−1} ~ N(μ_p, σ²I) of the per-element-mean log-ratio log p − log q (k1, as ddim_step_with_logprob
    reduces it) converges to it; its gradient in μ_p is (μ_p − μ_q)/(σ²D), by hand in float64."""
    torch.manual_seed(0)
    B, D = 3, 48
    mu_p = torch.randn(B, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mu_q = mu_p.detach() + 0.3 * torch.randn(B, 3, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64)
    kl = step_kl_per_element(mu_p, mu_q, sigma)
    torch.testing.assert_close(kl, step_kl(mu_p, mu_q, sigma) / D, rtol=1e-12, atol=0)
    want = torch.stack([((mu_p[i] - mu_q[i]) ** 2).sum() / (2 * sigma[i] ** 2) / D for i in range(B)])
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(kl.sum(), mu_p)
    torch.testing.assert_close(grad, (mu_p - mu_q).detach() / (sigma.reshape(B, 1, 1, 1) ** 2 * D))
    s = sigma.reshape(B, 1, 1, 1)
    x = mu_p.detach() + s * torch.randn(20000, B, 3, 4, 4, dtype=torch.float64)         # samples of p
    normal = torch.distributions.Normal
    k1 = (normal(mu_p.detach(), s).log_prob(x) - normal(mu_q, s).log_prob(x)).mean(dim=(2, 3, 4))  # (N, B)
    se = k1.std(0) / 20000 ** 0.5
    assert ((k1.mean(0) - kl.detach()).abs() < 4 * se).all(), (k1.mean(0), kl)
