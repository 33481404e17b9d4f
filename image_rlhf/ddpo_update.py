"""DDPO's update phase and the reference policy: the clipped per-step surrogate over stored trajectories
(`ddpo_update`), log π_ref and the exact per-step KL to the initial UNet. Used by `run_ddpo` (ddpo.py)."""
from __future__ import annotations

import contextlib

import torch

from align.rl import clipped_surrogate, kl_k1, kl_k2
from align.session import stop_if_not_finite
from image_rlhf.ddim import ddim_std_dev, step_kl, step_kl_per_element
from image_rlhf.sampling import step_log_prob


def epoch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, rank, batch): prompts, noise and shuffles of an epoch
    do not depend on what ran before, so a resumed run samples exactly as the original would."""
    return torch.Generator().manual_seed(hash(tuple(keys)) & (2**63 - 1))


def ddpo_update(model, unet, ref_unet, optimizer, acc, scheduler, latents, timesteps, old_log_probs, advantages,
                embeds, neg, guidance, trainable, n_train_steps, cfg, epoch, rank) -> dict:
    """`inner_epochs` passes over this process's N samples (shapes as in run_ddpo). Per train batch and
    trained step: the clipped surrogate; each loss is divided by the n_train_steps × gradient_accumulation_steps
    losses that one optimiser step sums, so it steps on their mean. `timesteps_per_forward` steps share one
    UNet call and one backward (the sum of their losses): the same gradient, fewer, larger calls.
    cfg.recompute_log_probs: log π_old from the update's own UNet calls (the first inner epoch's, and any later one's
    that train other steps), run once (no backward) before any step (`policy/logp_recompute_diff`: their mean
    |difference| from the sampler's record)."""
    N, S = old_log_probs.shape
    neg = neg if guidance > 1 else None
    n_backward = n_train_steps * cfg.gradient_accumulation_steps
    sums: dict[str, float] = {}
    n, extra = 0, {}
    calls_per_inner = [list(_update_calls(N, trainable, n_train_steps, cfg, epoch_generator(cfg.seed, epoch, rank,
                                                                                         10_000 + inner), latents.device))
                       for inner in range(cfg.inner_epochs)]
    if cfg.recompute_log_probs:  # every inner epoch's trained (sample, step)s: with timestep_fraction < 1 they differ
        old_log_probs, extra["policy/logp_recompute_diff"] = _recompute(
            model, acc, scheduler, latents, timesteps, old_log_probs, embeds, neg, guidance, cfg.eta, calls_per_inner)
    for calls in calls_per_inner:
        for k, idx, idx_m, s, m, last in calls:
            b = len(idx)
            step_now = (k + 1) % cfg.gradient_accumulation_steps == 0
            x_t, x_prev = latents[idx_m, s], latents[idx_m, s + 1]                           # (m·b, C, H, W)
            t = timesteps[s]                                                                 # (m·b,)
            sync = step_now and last  # DDP all-reduces on the last backward only
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    log_probs, means = step_log_prob(model, scheduler, x_t, t, x_prev, embeds[idx_m], neg,
                                                     guidance, cfg.eta, return_mean=True)
                log_probs = log_probs.float()                                                # (m·b,) log π_θ
                olds = old_log_probs[idx_m, s]                                               # (m·b,) log π_old
                if cfg.kl_coef > 0:
                    ref_log_probs, ref_means = ref_log_prob(unet, ref_unet, scheduler, x_t, t, x_prev,
                                                            embeds[idx_m], neg, guidance, cfg.eta, acc)
                    if cfg.kl_estimator == "gaussian":                                       # (m·b,) exact, per element
                        penalty = step_kl_per_element(means.float(), ref_means.float(),
                                                      ddim_std_dev(scheduler, t, cfg.eta).to(means.device))
                    else:  # k2 = ½(log π − log π_ref)²: as a loss its gradient is ∇KL[π‖π_ref] on samples
                        penalty = kl_k2(log_probs, ref_log_probs)  # of π (Schulman 2020); k1's is 0 there
                total = 0.0
                for c in range(m):  # one loss per trained step, as if each had its own forward
                    rc = slice(c * b, (c + 1) * b)
                    log_prob = log_probs[rc]                                                 # (b,)
                    loss, st = clipped_surrogate(log_prob, olds[rc], advantages[idx], cfg.clip_range)
                    if cfg.kl_coef > 0:
                        loss = loss + cfg.kl_coef * penalty[rc].mean()
                        st["kl_penalty"] = penalty[rc].mean().detach()
                        st["kl_ref"] = kl_k1(log_prob, ref_log_probs[rc]).mean().detach()
                    total = total + loss
                    for name, v in {"loss": loss, **st}.items():
                        sums[f"policy/{name}"] = sums.get(f"policy/{name}", 0.0) + float(v.detach())
                    n += 1
                acc.backward(total / n_backward)
            if step_now and last:
                stop_if_not_finite(acc, {"loss": sums["policy/loss"]}, f"ddpo, epoch {epoch + 1} (lr {cfg.lr})")
                if cfg.max_grad_norm:
                    norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    sums["policy/grad_norm"] = sums.get("policy/grad_norm", 0.0) + norm * n_backward
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    out = {**{k: v / n for k, v in sums.items()}, **extra}
    means = acc.gather(torch.tensor(list(out.values()), device=acc.device).unsqueeze(0)).mean(0)  # over processes
    return dict(zip(out, means.tolist()))


def _update_calls(N, trainable, n_train_steps, cfg, g, device):
    """One inner epoch's UNet calls, in order: (k, idx (b,), idx_m (m·b,), s (m·b,), m, last). Samples are
    shuffled into train batches k; each sample visits its trainable steps in its own random order (ddpo-pytorch)
    and the first n_train_steps of that order are trained on, `timesteps_per_forward` = m of them per call, rows
    step-major: (step j0, all b samples), (j0 + 1, all b), ...; last: the batch's last call."""
    k_fwd = max(1, cfg.timesteps_per_forward)
    perm = torch.randperm(N, generator=g)                                                    # shuffle samples
    step_order = torch.stack([trainable[torch.randperm(len(trainable), generator=g)] for _ in range(N)])  # (N, S')
    for k, start in enumerate(range(0, N, cfg.train_batch_size)):
        rows = perm[start:start + cfg.train_batch_size]                                      # (b,)
        idx = rows.to(device)
        for j0 in range(0, n_train_steps, k_fwd):
            m = min(k_fwd, n_train_steps - j0)
            s = step_order[rows, j0:j0 + m].T.reshape(-1).to(device)                         # (m·b,) step index
            yield k, idx, idx.repeat(m), s, m, j0 + m == n_train_steps


def _recompute(model, acc, scheduler, latents, timesteps, old_log_probs, embeds, neg, guidance, eta, calls_per_inner):
    """log π_old of the trained (sample, step)s from the training forward itself, call for call as the update will
    run it (same rows, shapes and order): before the first optimiser step its ratios are then exactly 1, whatever
    the sampler's kernels rounded differently. The first inner epoch's calls, then those of later inner epochs that
    train a (sample, step) not yet recomputed (timestep_fraction < 1 draws other steps each inner epoch), all before
    any step. Grad stays on (no backward; DDP not synced), so that a compiled UNet runs its training graph, whose
    fusions may round unlike its inference graph (eager kernels give the same result either way: run 8, README).
    Returns (the (N, S) log-probs, the recomputed entries' mean |difference| from the recorded ones)."""
    olds, diffs = old_log_probs.clone(), []
    done = torch.zeros(old_log_probs.shape, dtype=torch.bool, device=old_log_probs.device)      # (N, S)
    with acc.no_sync(model):
        for calls in calls_per_inner:
            for _, _, idx_m, s, _, _ in calls:
                new = ~done[idx_m, s]                                                        # (m·b,)
                if not new.any():
                    continue
                with acc.autocast():
                    lp = step_log_prob(model, scheduler, latents[idx_m, s], timesteps[s], latents[idx_m, s + 1],
                                       embeds[idx_m], neg, guidance, eta).detach().float()   # (m·b,)
                rows, steps = idx_m[new], s[new]
                diffs.append((lp[new] - old_log_probs[rows, steps].float()).abs())
                olds[rows, steps], done[rows, steps] = lp[new], True
    return olds, torch.cat(diffs).mean().item()


@contextlib.contextmanager
def reference(unet, ref_unet):
    """π_ref, the UNet before training: the frozen copy (full fine-tuning), or the UNet with its LoRA
    adapters off (LoRA B starts at 0, so that is exactly the initial UNet)."""
    if ref_unet is not None:
        yield ref_unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@torch.no_grad()
def ref_log_prob(unet, ref_unet, scheduler, x_t, t, x_prev, embeds, neg, guidance, eta, acc):
    """(log π_ref (B,) float32, μ_ref (B, C, H, W)) of the same transitions."""
    with acc.autocast(), reference(unet, ref_unet) as ref:
        log_prob, mean = step_log_prob(ref, scheduler, x_t, t, x_prev, embeds, neg, guidance, eta, return_mean=True)
    return log_prob.float(), mean


@torch.no_grad()
def kl_to_ref(unet, ref_unet, scheduler, traj, n, neg, guidance, acc) -> torch.Tensor:
    """Σ_s KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) over the S steps of the first n trajectories (n,) float64.

    Both steps are Gaussians with the same σ_t, so each is ‖μ_θ − μ_ref‖²/(2σ_t²) (ddim.step_kl): μ_θ was
    kept while sampling, μ_ref costs one reference forward per step, on the same batch layout as the
    sampling forward (all n rows at one t), so that before any update the two are bit-identical: 0."""
    kl = torch.zeros(n, dtype=torch.float64, device=traj.latents.device)
    with acc.autocast(), reference(unet, ref_unet) as ref:
        for s, t in enumerate(traj.timesteps):
            x_t, x_prev = traj.latents[:n, s], traj.latents[:n, s + 1]                      # (n, C, H, W)
            _, mean_ref = step_log_prob(ref, scheduler, x_t, t, x_prev, traj.prompt_embeds[:n], neg, guidance,
                                        traj.eta, return_mean=True)
            kl += step_kl(traj.means[:n, s], mean_ref, ddim_std_dev(scheduler, t, traj.eta))
    return kl
