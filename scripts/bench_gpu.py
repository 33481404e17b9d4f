#!/usr/bin/env python
"""GPU throughput at real model sizes (random weights: timing needs no trained weights).

ddpo  `image_rlhf.ddpo.run_ddpo` on a Stable-Diffusion-1.5-sized pipeline: the SD 1.5 UNet
      (860M params: channels 320/640/1280/1280, 2 layers per block, cross-attention 768), SD's VAE
      (128/256/512/512) and CLIP ViT-L/14's text tower (12 × 768) with the full CLIP BPE tokenizer,
      built from configs, saved with save_pretrained and loaded by path as a user's would be. Settings
      are `configs/image/sd15-pickscore.yaml`'s (512 px, 50 DDIM steps, η = 1, CFG 5 at sampling and
      training, LoRA r = 4 on to_q/to_k/to_v/to_out.0, bf16 autocast, train batch 4, every timestep
      trained, compile_unet: the preset's (on since run 7; runs 1-4 ran eager); `--ddpo-set` overrides, e.g.
      timesteps_per_forward), with fewer samples per epoch
      (`--ddpo-batches` × the preset's sample_batch_size: 16; runs 1-4 had 8) and the mean-brightness
      reward, once per attention backend (torch SDPA, then xformers) or per `--ddpo-variants`.
ppo   `text_rlhf.ppo.run_ppo` on GPT-2-sized models (124M: 12 layers × 768, vocab 50257; the reward
      model a GPT2ForSequenceClassification of the same size): `configs/text/gpt2-hh.yaml`'s PPO stage
      (batch 64, 128 new tokens, 4 PPO epochs of 16-sample mini-batches, LoRA r = 16 on all linear
      layers, bf16), 64-token prompts, no stop at EOS (every response is 128 tokens); LoRA and full
      fine-tuning.

attn  the attention kernels alone at SD 1.5's shapes (8 heads; 4096/1024/256/64 query tokens of head dim
      40/80/160/160, self- and cross-attention, 16 rows): torch SDPA vs xformers' memory_efficient_attention
      (its own dispatch, and forced to each of its ops: fa3, fa2, cutlass), forward and forward + backward,
      with the op xformers' dispatch picks and its largest |difference| from SDPA.
unet  the DDPO hot path alone in one process (same machine, so ratios are fair): the CFG sampling
      forward of `--sample-batches` images (default 8) and the training forward + backward of 4 / 8 / 16
      samples (timesteps_per_forward 1 / 2 / 4 at train batch 4), per `--unet-variants`: contiguous,
      channels_last, compiled (torch.compile of the contiguous UNet, static shapes: DDPOConfig.compile_unet;
      the first sampling batch only, as each shape is a compile; the first call's seconds, compile included,
      are recorded and its output checked against eager's); median of `--reps` CUDA-event timings.

Each variant runs in its own child process (peak memory = torch.cuda.max_memory_allocated of that run
alone). Epoch/iteration 1 is warm-up (cuDNN autotuning, allocator growth); the numbers are medians over
the rest, from the run's own `time/*` fields in metrics.jsonl.

MFU counts the UNet's FLOPs with torch.utils.flop_counter on the real modules: F_s = one CFG sampling
forward (2 rows) per image and step, F_t = one CFG forward + backward (LoRA: activation gradients
everywhere, weight gradients of the adapters only) per trained (sample, timestep); VAE decode and text
encoding are counted into the sampling phase, which times them too. MFU = those FLOPs / phase time /
peak, against the datasheet's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s) and against a measured
8192³ bf16 matmul.

Without network access on the GPU machine, carry what its image lacks as wheels (diffusers, omegaconf,
antlr4-python3-runtime, importlib_metadata; xformers to try it) and a saved CLIP tokenizer (built here by
`image_rlhf.tiny.build_clip_tokenizer(dir, num_merges=48894)`: real CLIP's 49,408 tokens; without
--tokenizer the script builds it, which needs open_clip). The runs in the README (one H100 each):

    python scripts/bench_gpu.py --out OUT --tokenizer TOK                                   # run 1
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts unet,ddpo,ppo --attention sdpa \
        --flops RUN1/bench_gpu.json --ddpo-epochs 2 --ddpo-set timesteps_per_forward=2 --ppo-iters 3 \
        --ppo-variants lora16:lora.r=16 lora16-unmerged:lora.r=16,merge_lora_generate=false    # run 2
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts attn,ddpo --attention sdpa,xformers \
        --flops RUN1/bench_gpu.json                                                           # run 3
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts ddpo --attention xformers,sdpa \
        --flops RUN1/bench_gpu.json                                                           # run 4
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts unet --unet-variants contiguous,compiled \
        --sample-batches 8,16,32 --unet-batches 8                                             # run 5
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts ddpo --flops RUN1/bench_gpu.json \
        --ddpo-batches 1 --ddpo-set gradient_accumulation_steps=4 --ddpo-variants eager:compile_unet=false \
        compiled:compile_unet=true fp32:mixed_precision=no,num_steps=10,epochs=2                # run 7 (~9.5 min)
        # one optimiser step per epoch: each epoch's clipfrac = how often sampling's and training's numerics of
        # the same weights differ by more than DDPO's clip range 1e-4 (bf16 kernels differ by batch shape)
    python scripts/bench_gpu.py --out OUT --tokenizer TOK --parts ddpo --attention sdpa --flops RUN1/bench_gpu.json \
        --ddpo-epochs 3 --ddpo-batches 1 --ddpo-set gradient_accumulation_steps=4 compile_unet=false \
        --ddpo-variants eager:recompute_log_probs=false recompute:recompute_log_probs=true    # run 9 (~4 min)
    python scripts/bench_gpu.py --out /tmp/bench_gpu_tiny --tiny     # CPU dry run, tiny configs (minutes)

xformers 0.0.35's PyPI wheel is built for CUDA 12.8: on a CUDA-13 torch its extension needs libcudart.so.12
(unzip the `nvidia-cuda-runtime-cu12` wheel and put its `nvidia/cuda_runtime/lib` on LD_LIBRARY_PATH before
Python starts), else every xformers op reports "xFormers wasn't build with CUDA support".

Writes `bench_gpu.json` (every number) and prints a table per part.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
           "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle"]

from bench_gpu_models import (_device_dtype, attention_bench, build_gpt2, build_sd, matmul_tflops,  # noqa: E402
                              median_ms, unet_flops)


# ------------------------------------------------------------------------------------------ children

def unet_child(spec: dict) -> dict:
    """The DDPO hot path alone, same machine, same process: the CFG sampling forward (8 images = 16 UNet
    rows, no grad) and the training step_log_prob forward + backward with LoRA (b samples = 2b rows), in
    both memory formats; median ms of `reps` after 2 warm-ups, timed with CUDA events (CPU: perf_counter)."""
    import torch

    from align.rl.config import LoraParams
    from image_rlhf.pipeline import add_unet_lora, encode_prompts, load_pipeline, negative_embeds
    from image_rlhf.sampling import _guided_noise_pred, step_log_prob

    device, dtype = _device_dtype(spec["tiny"])
    parts = load_pipeline(spec["pipeline"], device)
    for m in (parts.vae, parts.text_encoder, parts.unet):
        m.to(dtype)
    add_unet_lora(parts.unet, LoraParams(r=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet, sched = parts.unet, parts.scheduler
    c, h, w = parts.latent_shape()
    sched.set_timesteps(50, device=device)
    cuda = device.type == "cuda"

    timed = lambda fn, reps: median_ms(fn, reps, warmup=2, cuda=cuda)  # noqa: E731

    auto = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)  # noqa: E731
    with auto():
        neg = negative_embeds(parts)
        emb = encode_prompts(parts, ANIMALS[:8])
    out: dict = {}
    eager_ref: dict = {}

    def put(key, value):  # also to the log, so that a run killed mid-compile keeps what it measured
        out[key] = value
        print(f"unet {key} = {value}", file=sys.stderr, flush=True)

    for fmt in spec["variants"]:
        if fmt == "compiled":  # each shape is a compile (minutes at SD size): the first sampling batch only
            torch._dynamo.reset()
            unet.to(memory_format=torch.contiguous_format)
            unet.compile(dynamic=False)
        else:
            unet.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
        for nb in spec["sample_batches"][:1] if fmt == "compiled" else spec["sample_batches"]:
            x = torch.randn(nb, c, h, w, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(nb))
            e = emb[torch.arange(nb) % len(emb)]
            t = sched.timesteps[10]

            @torch.no_grad()
            def sample():
                with auto():
                    return _guided_noise_pred(unet, x, t, e, neg, 5.0)
            t0 = time.perf_counter()
            eps = sample().float()
            if cuda:
                torch.cuda.synchronize()
            put(f"{fmt}/sample_first_call_s_{nb}img", time.perf_counter() - t0)  # compiled: with the compile
            if fmt == "contiguous":
                eager_ref[nb] = eps
            elif nb in eager_ref:  # how far the variant's output is from eager's (bf16: ~1e-2 relative)
                put(f"{fmt}/sample_max_rel_diff_{nb}img",
                    ((eps - eager_ref[nb]).abs().max() / eager_ref[nb].abs().max()).item())
            put(f"{fmt}/sample_fwd_{nb}img_ms", timed(sample, spec["reps"]))
        for b in spec["train_batches"]:
            xb = torch.randn(b, c, h, w, device=device, dtype=dtype)
            xp = torch.randn_like(xb)
            tb = sched.timesteps[torch.arange(b) % 50]
            eb = emb[torch.arange(b) % 8]

            def train():
                with auto():
                    lp = step_log_prob(unet, sched, xb, tb, xp, eb, neg, 5.0, 1.0)
                lp.float().sum().backward()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train()
            if cuda:
                torch.cuda.synchronize()
            put(f"{fmt}/train_first_call_s_{b}samples", time.perf_counter() - t0)
            put(f"{fmt}/train_fwd_bwd_{b}samples_ms", timed(train, spec["reps"]))
            if cuda:
                put(f"{fmt}/train_fwd_bwd_{b}samples_peak_gib", torch.cuda.max_memory_allocated() / 2 ** 30)
            unet.zero_grad(set_to_none=True)
    return out


def ddpo_child(spec: dict) -> dict:
    import logging

    import torch

    from align.config import load_config
    from image_rlhf.ddpo import DDPOConfig, run_ddpo

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tiny = spec["tiny"]
    overrides = [f"epochs={spec['epochs']}", f"num_batches_per_epoch={spec['batches']}",
                 f"gradient_accumulation_steps={2 * spec['batches']}", "grid_every=0", "save_every=100000",
                 "buffer_size=0"]
    if tiny:  # before the variant's own settings, which may still compile (e.g. compile_backend=aot_eager)
        overrides += ["resolution=0", "num_steps=10", "mixed_precision=no", "compile_unet=false"]
    overrides += spec.get("set", [])
    cfg = load_config(DDPOConfig, REPO / "configs/image/sd15-pickscore.yaml", overrides=overrides, section="ddpo",
                      pipeline=spec["pipeline"], reward="brightness", prompts=spec["prompts"], out=spec["out"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_ddpo(cfg)
    wall = time.perf_counter() - t0
    procs = sorted({type(p).__name__ for p in result.unet.attn_processors.values()})
    rows = [json.loads(l) for l in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    every = [r for r in rows if "time/sample_s" in r]
    rows = every[1:]  # epoch 1 = warm-up
    n = cfg.sample_batch_size * cfg.num_batches_per_epoch
    sample_s = statistics.median(r["time/sample_s"] for r in rows)
    update_s = statistics.median(r["time/update_s"] for r in rows)
    out = dict(name=spec["name"], attention=cfg.attention, compile_unet=cfg.compile_unet, processors=procs,
               images_per_epoch=n, num_steps=cfg.num_steps, trained_steps_per_image=cfg.num_steps,
               measured_epochs=len(rows), sample_s=sample_s, update_s=update_s,
               sampled_img_per_s=n / sample_s, train_ts_per_s=n * cfg.num_steps / update_s,
               e2e_img_per_s=n / (sample_s + update_s), wall_s=wall,
               reward_first=rows[0]["reward/mean"], approx_kl=rows[-1].get("policy/approx_kl"),
               # every epoch's (warm-up included): with one optimiser step per epoch its ratios are sampling's
               # against training's numerics of the same weights (bf16 rounds the two differently)
               per_epoch={k: [r.get(f"policy/{k}") for r in every] for k in ("approx_kl", "clipfrac", "ratio", "logp_recompute_diff")})
    if torch.cuda.is_available():
        out.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
    try:
        import xformers
        out["xformers"] = xformers.__version__
    except Exception as e:  # noqa: BLE001
        out["xformers"] = f"not importable: {type(e).__name__}: {e}"[:200]
    return out


def ppo_child(spec: dict) -> dict:
    import logging

    import torch

    from align.config import load_config
    from text_rlhf.ppo import PPOConfig, run_ppo

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tiny = spec["tiny"]
    overrides = [f"iterations={spec['iters']}", "stop_at_eos=false", "save_every=100000", "log_samples=0",
                 *spec["set"]]
    if tiny:
        overrides += ["mixed_precision=no", "max_new_tokens=16", "batch_size=16", "ppo.mini_batch_size=8",
                      "ppo.micro_batch_size=4", "reward_batch_size=16"]
    cfg = load_config(PPOConfig, REPO / "configs/text/gpt2-hh.yaml", overrides=overrides, section="ppo",
                      policy=spec["policy"], reward=spec["reward"], prompts=spec["prompts"], out=spec["out"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_ppo(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "time/generate_s" in r][1:]  # iteration 1 = warm-up
    med = {k: statistics.median(r[f"time/{k}_s"] for r in rows) for k in ("generate", "score", "update")}
    it_s = sum(med.values())
    b, new = cfg.batch_size, cfg.max_new_tokens
    out = dict(variant=spec["name"], lora_r=cfg.lora.r, merge_lora_generate=cfg.merge_lora_generate, batch=b, new_tokens=new, measured_iters=len(rows),
               **{f"{k}_s": v for k, v in med.items()}, iter_s=it_s, samples_per_s=b / it_s,
               gen_tokens_per_s=b * new / med["generate"], wall_s=wall)
    if torch.cuda.is_available():
        out.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
    return out


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    fn = {"ddpo": ddpo_child, "ppo": ppo_child, "unet": unet_child,
          "attn": lambda s: attention_bench(s["tiny"], s["reps"]), "flops": lambda s: unet_flops(Path(s["pipeline"]), s["tiny"]),
          "setup": _setup_child}[spec["kind"]]
    result = fn(spec)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _setup_child(spec: dict) -> dict:
    work = Path(spec["work"])
    res = {"matmul_bf16_tflops": matmul_tflops() if not spec["tiny"] else None}
    import torch
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name()
        res["torch"] = torch.__version__
    import diffusers
    import transformers
    res.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    t = time.perf_counter()
    if {"ddpo", "unet"} & set(spec["parts"]):
        build_sd(work / "sd", spec.get("tokenizer"), spec["tiny"])
        res["sd_params_m"] = json.loads((work / "sd/bench_params.json").read_text())
    if "ppo" in spec["parts"]:
        build_gpt2(work / "gpt2", spec["tiny"])
        res["gpt2_params_m"] = json.loads((work / "gpt2/bench_params.json").read_text())
    res["build_s"] = time.perf_counter() - t
    return res


def run_child(spec: dict, log_path: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], stdout=subprocess.PIPE,
                           stderr=log, text=True, env=env, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if p.returncode != 0 or not lines:
        tail = log_path.read_text()[-2500:]
        print(f"[{spec['kind']} {spec.get('attention', spec.get('name', ''))}] FAILED rc={p.returncode}\n{tail}",
              flush=True)
        return {"error": f"rc={p.returncode}", "log_tail": tail}
    r = json.loads(lines[-1][len("BENCH_RESULT "):])
    r["child_wall_s"] = time.perf_counter() - t
    print(f"[{spec['kind']}] {json.dumps(r)}", flush=True)
    return r


# ------------------------------------------------------------------------------------------ driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for bench_gpu.json and the child logs")
    ap.add_argument("--work", default="", help="scratch folder for models and runs (default: OUT/work)")
    ap.add_argument("--parts", default="ddpo,ppo")
    ap.add_argument("--attention", default="sdpa,xformers")
    ap.add_argument("--tokenizer", default="", help="a saved CLIPTokenizer folder (else built, needs open_clip)")
    ap.add_argument("--ddpo-epochs", type=int, default=3)
    ap.add_argument("--ddpo-batches", type=int, default=2,
                    help="sampling batches (of the preset's sample_batch_size) per epoch")
    ap.add_argument("--ddpo-set", nargs="*", default=[], help="extra DDPOConfig key=value for every DDPO run")
    ap.add_argument("--ddpo-variants", nargs="*", default=[],
                    help="DDPO runs, each NAME:key=value,... (DDPOConfig overrides; default: one per --attention)")
    ap.add_argument("--flops", default="", help="reuse the FLOP counts of an earlier bench_gpu.json")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per micro-benchmark case (unet part)")
    ap.add_argument("--unet-batches", default="4,8,16", help="samples per training UNet call (unet part)")
    ap.add_argument("--sample-batches", default="8", help="images per CFG sampling UNet call (unet part)")
    ap.add_argument("--unet-variants", default="contiguous,channels_last",
                    help="unet part: contiguous, channels_last, compiled")
    ap.add_argument("--ppo-iters", type=int, default=4)
    ap.add_argument("--ppo-set", nargs="*", default=[], help="extra PPOConfig key=value for every PPO run")
    ap.add_argument("--ppo-variants", nargs="*", default=["lora16:lora.r=16", "full:lora.r=0"],
                    help="PPO runs, each NAME:key=value,key=value (PPOConfig overrides)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with tiny configs")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        return child_main(a._child)
    if not a.out:
        ap.error("--out is required")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    parts = a.parts.split(",")
    res: dict = {"argv": sys.argv[1:]}
    json_path = out / "bench_gpu.json"

    def save():
        json_path.write_text(json.dumps(res, indent=1))

    res["setup"] = run_child(dict(kind="setup", work=str(work), parts=parts, tiny=a.tiny,
                                  tokenizer=a.tokenizer or None), out / "setup.log", 900)
    save()
    if "error" in res["setup"]:
        sys.exit(1)
    gpu = res["setup"].get("gpu", "cpu")
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)
    sd = str(work / "sd")
    if "attn" in parts:
        res["attn"] = run_child(dict(kind="attn", tiny=a.tiny, reps=max(a.reps, 10)), out / "attn.log", 600)
        save()
    if "unet" in parts:
        res["unet"] = run_child(dict(kind="unet", pipeline=sd, tiny=a.tiny, reps=a.reps,
                                     train_batches=[int(b) for b in a.unet_batches.split(",") if b],
                                     sample_batches=[int(b) for b in a.sample_batches.split(",") if b],
                                     variants=a.unet_variants.split(",")), out / "unet.log", 900)
        save()
    if "ddpo" in parts:
        prompts = work / "prompts.txt"
        prompts.write_text("".join(f"a photo of a {x}\n" for x in ANIMALS))
        if a.flops:  # FLOPs depend on the shapes only: reuse an earlier run's count
            res["flops"] = json.loads(Path(a.flops).read_text())["flops"]
        else:
            res["flops"] = run_child(dict(kind="flops", pipeline=sd, tiny=a.tiny), out / "flops.log", 600)
        save()
        res["ddpo"] = []
        for variant in a.ddpo_variants or [f"{x}:attention={x}" for x in a.attention.split(",")]:
            name, _, sets = variant.partition(":")
            sets = [x for x in sets.split(",") if x] + a.ddpo_set
            r = run_child(dict(kind="ddpo", name=name, pipeline=sd, prompts=str(prompts), set=sets,
                               out=str(work / f"ddpo-{name}"), epochs=a.ddpo_epochs, batches=a.ddpo_batches,
                               tiny=a.tiny), out / f"ddpo-{name}.log", 1200)
            r["set"] = sets
            r.setdefault("name", name)
            fl = res["flops"]
            if "error" not in r and "error" not in fl:
                f_s = r["num_steps"] * fl["unet_cfg_fwd_per_image_step"] + fl["vae_decode_per_image"] + \
                    fl["text_encode_per_prompt"]
                r["sample_tflops"] = f_s * r["sampled_img_per_s"] / 1e12
                r["train_tflops"] = fl["unet_cfg_fwd_bwd_per_sample_step"] * r["train_ts_per_s"] / 1e12
                for k in ("sample", "train"):
                    if peak:
                        r[f"{k}_mfu_datasheet"] = r[f"{k}_tflops"] / peak
                    if res["setup"].get("matmul_bf16_tflops"):
                        r[f"{k}_mfu_matmul"] = r[f"{k}_tflops"] / res["setup"]["matmul_bf16_tflops"]
            res["ddpo"].append(r)
            save()
    if "ppo" in parts:
        res["ppo"] = []
        for variant in a.ppo_variants:
            name, _, sets = variant.partition(":")
            r = run_child(dict(kind="ppo", name=name, set=[x for x in sets.split(",") if x] + a.ppo_set,
                               policy=str(work / "gpt2/policy"), reward=str(work / "gpt2/reward"),
                               prompts=str(work / "gpt2/prompts.jsonl"), out=str(work / f"ppo-{name}"),
                               iters=a.ppo_iters, tiny=a.tiny), out / f"ppo-{name}.log", 1200)
            res["ppo"].append(r)
            save()
    report(res)


def _f(v, nd=2) -> str:
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def report(res: dict) -> None:
    s = res["setup"]
    print(f"\n{s.get('gpu', 'cpu')}  torch {s.get('torch', '')}  diffusers {s['diffusers']}  transformers "
          f"{s['transformers']}  matmul bf16 {_f(s.get('matmul_bf16_tflops'), 0)} TFLOP/s")
    at = res.get("attn")
    if at and "error" not in at:
        print(f"Attention alone ({at['rows']} rows × {at['heads']} heads), median ms; xformers {at['xformers']}")
        ops = [o for o in ("xformers", "fa3", "fa2", "cutlass") if any(f"{o}_fwd_ms" in c for c in at["cases"])]
        _table(["q × kv tokens, head dim", "xformers picks (fw / bw)", "SDPA fwd", *(f"{o} fwd" for o in ops),
                "SDPA fwd+bwd", *(f"{o} fwd+bwd" for o in ops)], "ll" + "r" * (2 + 2 * len(ops)),
               [[f"{c['q_tokens']} × {c['kv_tokens']}, {c['head_dim']}",
                 f"{c.get('xformers_fw_op', '—')} / {c.get('xformers_bw_op', '—')}", _f(c["sdpa_fwd_ms"], 3),
                 *(_f(c.get(f"{o}_fwd_ms"), 3) for o in ops), _f(c["sdpa_fwd_bwd_ms"], 3),
                 *(_f(c.get(f"{o}_fwd_bwd_ms"), 3) for o in ops)] for c in at["cases"]])
    u = res.get("unet")
    if u and "error" not in u:
        print("UNet hot path (LoRA r=4, CFG, bf16 autocast), median ms per call; ratio = contiguous / variant")
        variants = list(dict.fromkeys(k.split("/", 1)[0] for k in u if "/" in k))
        others = [v for v in variants if v != "contiguous"]
        _table(["case", *variants, *(f"× {v}" for v in others)], "l" + "r" * (len(variants) + len(others)),
               [[key, *(_f(u.get(f"{v}/{key}"), 1) for v in variants),
                 *(_f(u[f"contiguous/{key}"] / u[f"{v}/{key}"] if u.get(f"contiguous/{key}") and u.get(f"{v}/{key}")
                      else None) for v in others)]
                for key in dict.fromkeys(k.split("/", 1)[1] for k in u if "/" in k and k.endswith("_ms"))])
        for key in (k for k in u if k.endswith(("_gib", "_first_call_s", "_diff")) or "_first_call_s_" in k
                    or "_diff_" in k):
            print(f"{key}: {_f(u[key], 3)}")
    if res.get("ddpo"):
        fl = res.get("flops", {})
        print(f"DDPO, SD-1.5-sized ({s.get('sd_params_m')} M params), UNet TFLOP: sampling fwd (CFG) "
              f"{_f(fl.get('unet_cfg_fwd_per_image_step', 0) / 1e12, 3)} per image-step, train fwd+bwd "
              f"{_f(fl.get('unet_cfg_fwd_bwd_per_sample_step', 0) / 1e12, 3)} per sample-step")
        print("settings: " + "; ".join(f"{r.get('name', '?')}: {' '.join(r.get('set', [])) or 'preset'}"
                                        for r in res["ddpo"]))
        _table(["run", "compiled", "processors", "sampled img/s", "train timesteps/s", "e2e img/s", "peak GiB",
                "MFU sample", "MFU train"], "lllrrrrrr",
               [[r.get("name", r.get("attention", "?")), f"FAILED {r['error']}"] if "error" in r else
                [r.get("name", r["attention"]), str(r.get("compile_unet", False)), ",".join(r["processors"]), _f(r["sampled_img_per_s"]), _f(r["train_ts_per_s"], 1),
                 _f(r["e2e_img_per_s"], 3), _f(r.get("peak_alloc_gib"), 1), _f(r.get("sample_mfu_datasheet"), 3),
                 _f(r.get("train_mfu_datasheet"), 3)] for r in res["ddpo"]])
    if res.get("ppo"):
        print(f"PPO, GPT-2-sized ({s.get('gpt2_params_m')} M params)")
        _table(["variant", "LoRA r", "merged rollout", "samples/s", "gen tok/s", "generate s", "score s", "update s",
                "peak GiB"], "lrlrrrrrr",
               [[r.get("variant", "?"), f"FAILED {r['error']}"] if "error" in r else
                [r["variant"], str(r["lora_r"]), str(r["merge_lora_generate"] and r["lora_r"] > 0),
                 _f(r["samples_per_s"]), _f(r["gen_tokens_per_s"], 0), _f(r["generate_s"]), _f(r["score_s"]),
                 _f(r["update_s"]), _f(r.get("peak_alloc_gib"), 1)] for r in res["ppo"]])


def _table(header: list[str], aligns: str, rows: list[list[str]]) -> None:
    """A Markdown table: aligns has one 'l' or 'r' per column."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
