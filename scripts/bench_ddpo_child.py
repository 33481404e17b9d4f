#!/usr/bin/env python
"""The child processes of scripts/bench_ddpo.py: one align DDPO run with wall-clock hooks
(`align_child_main`) and the UNet op profile (`profile_child_main`). bench_ddpo.py starts each as
`python scripts/bench_ddpo.py --_child SPEC` / `--_profile SPEC` in a fresh process (so peak RSS is per
run) and reads the one JSON line it prints; the settings are bench_ddpo.SETTINGS."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402,F401
from bench_ddpo import ANIMALS, REPO, SETTINGS  # noqa: E402,F401

# ------------------------------------------------------------------------------------------ align run (child)

def _torchvision_shim(ddpo_mod) -> bool:
    """image_rlhf.pipeline.image_grid imports torchvision.utils.make_grid; the benchmark venv (the peer's
    torch build) has no torchvision. When it is missing, ddpo's image_grid runs with a minimal stand-in
    make_grid (same layout) put in sys.modules for the duration of that call only (a permanent fake
    module would confuse diffusers'/transformers' torchvision probes)."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is not None or not hasattr(ddpo_mod, "image_grid"):
        return False
    import math
    import types

    def make_grid(tensor, nrow=8, padding=2, pad_value=0.0, **_):
        n, c, h, w = tensor.shape
        xmaps = min(nrow, n)
        ymaps = int(math.ceil(n / xmaps))
        H, W = h + padding, w + padding
        grid = tensor.new_full((c, H * ymaps + padding, W * xmaps + padding), pad_value)
        for k in range(n):
            y, x = divmod(k, xmaps)
            grid[:, y * H + padding:y * H + padding + h, x * W + padding:x * W + padding + w] = tensor[k]
        return grid

    tv = types.ModuleType("torchvision")
    tvu = types.ModuleType("torchvision.utils")
    tvu.make_grid = make_grid
    tv.utils = tvu
    orig = ddpo_mod.image_grid

    def image_grid(*a, **kw):
        sys.modules["torchvision"], sys.modules["torchvision.utils"] = tv, tvu
        try:
            return orig(*a, **kw)
        finally:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.utils", None)
    ddpo_mod.image_grid = image_grid
    return True


def align_child_main(spec: dict) -> None:
    t_script0 = time.perf_counter()
    import dataclasses
    import logging

    import torch

    threads = spec["threads"]
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    import diffusers
    import transformers

    import image_rlhf.ddpo as ddpo_mod
    from align.rl.config import LoraParams
    from image_rlhf.ddpo import DDPOConfig, run_ddpo
    shim = _torchvision_shim(ddpo_mod)

    s = SETTINGS
    T = {k: 0.0 for k in ("grid_s", "encode_s", "rollout_s", "decode_s", "fwd_sample_s", "fwd_train_s",
                          "bwd_s", "opt_s", "clip_s")}
    N = {k: 0 for k in ("grid", "fwd_sample", "fwd_train", "bwd", "opt")}
    marks: dict = {"in_grid": False}
    hooks = []

    def timed(name, fn, count=None):
        def w(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if not marks["in_grid"] or name == "grid_s":
                    T[name] += time.perf_counter() - t
                    if count:
                        N[count] += 1
        return w

    def patch(name, wrapper_factory):
        orig = getattr(ddpo_mod, name, None)
        if orig is None:
            return
        setattr(ddpo_mod, name, wrapper_factory(orig))
        hooks.append(name)

    def start_run_f(orig):
        def start_run(*a, **kw):
            run = bc.time_run(orig(*a, **kw), marks)
            acc = run.accelerator
            acc.backward = timed("bwd_s", acc.backward, "bwd")
            acc.clip_grad_norm_ = timed("clip_s", acc.clip_grad_norm_)
            return run
        return start_run

    def grid_f(orig):
        def grid(*a, **kw):
            t = time.perf_counter()
            marks["in_grid"] = True
            try:
                return orig(*a, **kw)
            finally:
                marks["in_grid"] = False
                if "loop0" in marks:  # the epoch-0 grid runs before the loop: not part of the timed part
                    T["grid_s"] += time.perf_counter() - t
                    N["grid"] += 1
        return grid

    def lora_f(orig):
        def add_unet_lora(unet, lora):
            out = orig(unet, lora)
            st = {}

            def pre(mod, args):
                st["t"] = time.perf_counter()

            def post(mod, args, output):
                if marks["in_grid"] or "t" not in st:
                    return
                k = "fwd_train" if torch.is_grad_enabled() else "fwd_sample"
                T[k + "_s"] += time.perf_counter() - st.pop("t")
                N[k] += 1
            unet.register_forward_pre_hook(pre)
            unet.register_forward_hook(post)
            marks["trainable"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
            return out
        return add_unet_lora

    if bc.hook_loop(ddpo_mod, marks):
        hooks.append("progress")
    patch("start_run", start_run_f)
    patch("_grid", grid_f)
    patch("add_unet_lora", lora_f)
    patch("encode_prompts", lambda f: timed("encode_s", f))
    patch("sample_trajectories", lambda f: timed("rollout_s", f))
    patch("decode_latents", lambda f: timed("decode_s", f))

    def opt_pre(opt, args, kwargs):
        marks["opt_t"] = time.perf_counter()

    def opt_post(opt, args, kwargs):
        if "opt_t" in marks:
            T["opt_s"] += time.perf_counter() - marks.pop("opt_t")
            N["opt"] += 1
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(opt_pre)
    register_optimizer_step_post_hook(opt_post)

    want = dict(pipeline=spec["pipeline"], reward="brightness", prompts=spec["prompts"], out=spec["out"],
                epochs=spec["epochs"], sample_batch_size=spec["sample_batch"], num_batches_per_epoch=s["sample_batches"],
                train_batch_size=spec["train_batch"], gradient_accumulation_steps=1, num_steps=spec["steps"],
                guidance_scale=s["guidance"], eta=s["eta"], timestep_fraction=s["timestep_fraction"],
                inner_epochs=s["inner_epochs"], lr=s["lr"], max_grad_norm=s["max_grad_norm"], adv_clip=s["adv_clip"],
                buffer_size=0, clip_range=s["clip_range"], train_cfg=True, kl_coef=0.0,
                lora=LoraParams(r=s["lora_r"], alpha=s["lora_alpha"]), mixed_precision="no", attention="sdpa",
                resolution=0, seed=s["seed"], save_every=10 ** 9)
    names = {f.name for f in dataclasses.fields(DDPOConfig)}
    for kv in spec.get("set", []):  # --also-set KEY=VALUE: JSON values (true, 1, 0.5), else strings
        k, _, v = kv.partition("=")
        try:
            want[k] = json.loads(v)
        except json.JSONDecodeError:
            want[k] = v
    dropped = sorted(k for k in want if k not in names)
    cfg = DDPOConfig(**{k: v for k, v in want.items() if k in names})

    t_call0 = time.perf_counter()
    result = run_ddpo(cfg)
    t_call1 = time.perf_counter()

    rows = []
    mpath = Path(spec["out"]) / "metrics.jsonl"
    if mpath.exists():
        rows = [json.loads(l) for l in mpath.read_text().splitlines() if l.strip()]

    def tsum(key):
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        return sum(vals) if vals else None

    sample_s, update_s = tsum("time/sample_s"), tsum("time/update_s")
    if "loop0" in marks and "loop1" in marks:
        loop_s = marks["loop1"] - marks["loop0"] - marks.get("ckpt_s", 0.0)
        timing = "loop"
    else:
        loop_s = (sample_s or 0) + (update_s or 0) + T["grid_s"]
        timing = "time/* sum"
    imgs = spec["epochs"] * spec["sample_batch"] * s["sample_batches"]
    n_train = int(spec["steps"] * s["timestep_fraction"])
    train_ts = imgs * n_train * s["inner_epochs"]
    last = rows[-1] if rows else {}
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    res = {
        "bench": "align_ddpo",
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torchvision_shim": shim,
        "epochs": spec["epochs"], "epochs_logged": len(rows), "timing": timing, "hooks": hooks,
        "config_fields_dropped": dropped, "trainable_params": marks.get("trainable"),
        "load_s": r3(marks.get("loop0", t_call0) - t_call0),
        "loop_s": r3(loop_s), "sample_s": r3(sample_s), "update_s": r3(update_s),
        "grid_s": r3(T["grid_s"]), "grids": N["grid"],
        "other_s": r3(loop_s - (sample_s or 0) - (update_s or 0) - T["grid_s"]),
        "checkpoint_s": r3(marks.get("ckpt_s", 0.0)), "checkpoints": marks.get("ckpt_n", 0),
        "finish_s": r3(t_call1 - marks.get("loop1", t_call1)),
        "images_sampled": imgs, "train_timesteps": train_ts,
        "images_per_s": r3(imgs / sample_s) if sample_s else None,
        "train_timesteps_per_s": r3(train_ts / update_s) if update_s else None,
        "e2e_images_per_s": r3(imgs / loop_s) if loop_s else None,
        "e2e_nogrid_images_per_s": r3(imgs / (loop_s - T["grid_s"])) if loop_s else None,
        # breakdown (grid excluded)
        "encode_s": r3(T["encode_s"]), "rollout_s": r3(T["rollout_s"]), "decode_s": r3(T["decode_s"]),
        "fwd_sample_s": r3(T["fwd_sample_s"]), "fwd_sample_n": N["fwd_sample"],
        "fwd_train_s": r3(T["fwd_train_s"]), "fwd_train_n": N["fwd_train"],
        "bwd_s": r3(T["bwd_s"]), "bwd_n": N["bwd"], "opt_s": r3(T["opt_s"]), "opt_n": N["opt"],
        "clip_s": r3(T["clip_s"]),
        "sample_py_s": r3(sample_s - T["fwd_sample_s"] - T["decode_s"] - T["encode_s"]) if sample_s else None,
        "update_py_s": r3(update_s - T["fwd_train_s"] - T["bwd_s"] - T["opt_s"] - T["clip_s"]) if update_s else None,
        "first_epoch_s": r3(marks["log_t"][0] - marks["loop0"]) if marks.get("log_t") and "loop0" in marks else None,
        "rss_loop0_mb": round(marks["rss_loop0_mb"], 1) if "rss_loop0_mb" in marks else None,
        "rss_loop_mb": round(marks["rss_loop_mb"], 1) if "rss_loop_mb" in marks else None,
        "peak_rss_self_mb": round(bc.self_rss_mb(), 1),
        "final_reward_mean": last.get("reward/mean"),
        "final_approx_kl": last.get("policy/approx_kl"),
        "result": str(result.model_dir),
        "script_wall_s": round(time.perf_counter() - t_script0, 3),
    }
    print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------ profile (child)

def profile_child_main(spec: dict) -> None:
    """UNet cost at the benchmark's shapes, diffusers + peft only (so it runs in the peer venv too).

    sample_*: a sampling call (no grad, UNet batch 2×sample_batch: CFG); train_*: a training call,
    forward + backward (UNet batch 2×train_batch, one timestep per sample, as both trainers do).
    Per case: wall per call, the summed self-CPU time of aten ops (torch.profiler) and the rest
    (Python/dispatch share), the top ops. Variants (what-ifs for align): LoRA off, diffusers' classic
    AttnProcessor (baddbmm + softmax) instead of SDPA, SDPA forced to its math backend, channels_last,
    and a training call on k timesteps per sample at once (batch 2×train_batch×k; the gradient of one
    optimiser step is the same sum, in k× fewer calls)."""
    import contextlib
    import statistics

    import torch
    threads = spec["threads"]
    if threads:
        torch.set_num_threads(threads)
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile

    s = SETTINGS
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(spec["pipeline"], subfolder="unet")
    unet.set_attn_processor(AttnProcessor2_0())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    C, H = unet.config.in_channels, unet.config.sample_size
    L, D = 77, unet.config.cross_attention_dim
    k_steps = spec.get("k_steps", 4)
    Bs, Bt = 2 * spec["sample_batch"], 2 * spec["train_batch"]

    def inputs(b):
        return torch.randn(b, C, H, H), torch.full((b,), 500), torch.randn(b, L, D)

    def math_sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)

    def case(train, b, lora=True, proc=None, ctx=None, cl=False):
        x, t, e = inputs(b)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)

        def setup():
            unet.set_attn_processor(proc() if proc else AttnProcessor2_0())
            (unet.enable_adapters if lora else unet.disable_adapters)()
            unet.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            unet.train(train)

        def fn():
            with (ctx() if ctx else contextlib.nullcontext()):
                if train:
                    unet(x, t, encoder_hidden_states=e).sample.pow(2).mean().backward()
                else:
                    with torch.no_grad():
                        unet(x, t, encoder_hidden_states=e).sample
        return setup, fn, b

    cases = {
        "sample_fwd": case(False, Bs),
        "sample_fwd_nolora": case(False, Bs, lora=False),
        "sample_fwd_classic_attn": case(False, Bs, proc=AttnProcessor),
        "sample_fwd_sdpa_math": case(False, Bs, ctx=math_sdpa),
        "sample_fwd_channels_last": case(False, Bs, cl=True),
        "sample_fwd_nolora_channels_last": case(False, Bs, lora=False, cl=True),
        "train_fwd_bwd": case(True, Bt),
        "train_fwd_bwd_classic_attn": case(True, Bt, proc=AttnProcessor),
        "train_fwd_bwd_sdpa_math": case(True, Bt, ctx=math_sdpa),
        "train_fwd_bwd_channels_last": case(True, Bt, cl=True),
        f"train_fwd_bwd_x{k_steps}_steps": case(True, Bt * k_steps),
        f"train_fwd_bwd_x{k_steps}_steps_classic_attn": case(True, Bt * k_steps, proc=AttnProcessor),
    }
    only = spec.get("only")
    n = spec.get("n", 5)
    res = {"bench": "profile", "python": sys.executable, "torch_version": torch.__version__,
           "diffusers_version": diffusers.__version__, "threads": torch.get_num_threads(),
           "sample_batch_unet": Bs, "train_batch_unet": Bt, "cases": {}}
    for name, (setup, fn, b) in cases.items():
        if only and not any(o in name for o in only):
            continue
        setup()
        fn()  # warm-up
        walls = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            prof_wall = time.perf_counter() - t0
        ka = prof.key_averages()
        aten = sum(e.self_cpu_time_total for e in ka if e.key.startswith("aten::")) / 1e6
        top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:6]
        res["cases"][name] = {
            "unet_batch": b, "wall_s": round(statistics.median(walls), 4),
            "per_image_step_ms": round(1e3 * statistics.median(walls) / (b // 2), 2),  # CFG: 2 rows per image-step
            "prof_wall_s": round(prof_wall, 4), "aten_self_s": round(aten, 4),
            "overhead_share": round(1 - aten / prof_wall, 3) if prof_wall else None,
            "aten_calls": int(sum(e.count for e in ka if e.key.startswith("aten::"))),
            "top": [(e.key, round(e.self_cpu_time_total / 1e6, 4)) for e in top]}
        for p in unet.parameters():
            p.grad = None
    print(json.dumps(res), flush=True)
