#!/usr/bin/env python
"""Why do DDPO's first-step PPO ratios leave 1 ± 1e-4 in bf16 on a GPU? Sampling's UNet call vs training's.

DDPO records log π(x_{t−1} | x_t) while sampling (no grad, `--images` images per UNet call: 2× the rows with
CFG) and recomputes it in the update (grad on, train batch × timesteps_per_forward samples per call, two
timesteps mixed); before any update the two must agree (ratio 1). Run 7 of scripts/bench_gpu.py measured 3%
of the ratios outside DDPO's clip range 1e-4 in bf16 on an H100 (0 in float32). This script separates the
causes on the SD-1.5 UNet (random weights, LoRA r=4 with random B so the adapters take part, bf16 weights
under bf16 autocast, as DDPO's frozen base): it samples one DDIM step for `--images` images at each of two
timesteps, then recomputes their log-probs
  repeat    the sampling calls again, same rows in the same order (is the UNet run to run deterministic?)
  rows      in the sampling call's shape (2 × --images UNet rows), no grad
  chunks    in training-sized calls (`--train-images` per call, half from each timestep), no grad
  train     the same calls with grad on and the UNet in train mode (DDPO's update)
  train_big grad on, in the sampling call's shape
and prints, per variant, the largest |Δ log p| and the fraction of ratios outside 1 ± 1e-4.

    python scripts/check_batch_numerics.py --device cuda                  # an H100: ~1 min
    python scripts/check_batch_numerics.py --device cpu --tiny            # a dry run on the CPU
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (CPU dry run)")
    ap.add_argument("--images", type=int, default=16, help="images per sampling call (the SD presets: 16)")
    ap.add_argument("--train-images", type=int, default=8,
                    help="samples per training call: train_batch_size × timesteps_per_forward (presets: 4 × 2)")
    ap.add_argument("--steps", default="10,11", help="the two DDIM step indices (of 50) the samples are at")
    ap.add_argument("--clip", type=float, default=1e-4)
    a = ap.parse_args()
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from align.rl.config import LoraParams
    from bench_gpu_models import SD15_UNET, TINY_UNET
    from image_rlhf.ddim import ddim_step_with_logprob
    from image_rlhf.pipeline import add_unet_lora
    from image_rlhf.sampling import _guided_noise_pred, step_log_prob

    dev, cfg = torch.device(a.device), (TINY_UNET if a.tiny else SD15_UNET)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dev)
    add_unet_lora(unet, LoraParams(r=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
            elif not p.requires_grad and dev.type == "cuda":
                p.data = p.data.to(torch.bfloat16)  # DDPO's frozen base in the mixed-precision dtype
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator(dev).manual_seed(0)
    n, size, dim = a.images, cfg["sample_size"], cfg["cross_attention_dim"]
    emb = torch.randn(n, 77, dim, device=dev, generator=g)
    neg = torch.randn(1, 77, dim, device=dev, generator=g)
    ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
    xs, ts, prevs, logps = [], [], [], []
    unet.eval()
    for k in (int(s) for s in a.steps.split(",")):  # sampling: one call of n images (2n rows) per timestep
        t = sched.timesteps[k].to(dev)
        x = torch.randn(n, 4, size, size, device=dev, generator=g)
        with torch.no_grad(), ac():
            eps = _guided_noise_pred(unet, sched.scale_model_input(x, t), t, emb, neg, 5.0)
            prev, lp = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=g)[:2]
        xs.append(x), ts.append(t.expand(n)), prevs.append(prev), logps.append(lp)
    # training order: chunks of train_images samples, half from each timestep (timesteps_per_forward = 2)
    h = a.train_images // 2
    order = torch.cat([torch.stack([torch.arange(i, i + h), torch.arange(n + i, n + i + h)]).reshape(-1)
                       for i in range(0, n, h)]).to(dev)
    X_, T_, P_, L = (torch.cat(v)[order] for v in (xs, ts, prevs, logps))
    E_ = torch.cat([emb, emb])[order]

    def recompute(rows: int, grad: bool, same_order: bool = False) -> torch.Tensor:
        unet.train(grad)
        X, T, P, E = (torch.cat(v) for v in (xs, ts, prevs, [emb, emb])) if same_order else (X_, T_, P_, E_)
        out = []
        for i in range(0, len(X), rows):
            s = slice(i, i + rows)
            with torch.set_grad_enabled(grad), ac():
                out.append(step_log_prob(unet, sched, X[s], T[s], P[s], E[s], neg, 5.0, 1.0).detach())
        return torch.cat(out)[order] if same_order else torch.cat(out)

    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                 "images": n, "train_images": a.train_images, "steps": a.steps, "clip": a.clip}
    t0 = time.perf_counter()
    variants = (("repeat", n, False, True), ("rows", n, False, False), ("chunks", a.train_images, False, False),
                ("train", a.train_images, True, False), ("train_big", n, True, False))
    for name, rows, grad, same in variants:
        d = recompute(rows, grad, same) - L
        res[name] = {"max_abs_dlogp": d.abs().max().item(), "mean_abs_dlogp": d.abs().mean().item(),
                     "clipfrac": ((d.exp() - 1).abs() > a.clip).float().mean().item()}
        print(name, json.dumps(res[name]), flush=True)
    res["recompute_s"] = time.perf_counter() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
