"""Models for scripts/bench_gpu.py: Stable-Diffusion-1.5- and GPT-2-124M-shaped pipelines with random
weights (or tiny ones for a CPU dry run), saved with save_pretrained; FLOP counts; the matmul ceiling."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768, hidden_act="quick_gelu")
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab=50257)
GPT2_TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab=512)


def _device_dtype(tiny: bool):
    import torch
    if tiny:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (use --tiny for a CPU dry run)")
    return torch.device("cuda"), torch.bfloat16


# ------------------------------------------------------------------------------------------ setup

def build_sd(out: Path, tokenizer_dir: str | None, tiny: bool) -> Path:
    """A random SD-1.5-shaped (or tiny) StableDiffusionPipeline saved to `out`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from image_rlhf.tiny import SD_DDIM_CONFIG, build_clip_tokenizer

    device, dtype = _device_dtype(tiny)
    if tokenizer_dir:
        tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    else:  # real CLIP: 48,894 merges -> 49,408 tokens
        tok = build_clip_tokenizer(out.parent / "clip-tokenizer", num_merges=1000 if tiny else 48894)
    text_cfg = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              **(TINY_TEXT if tiny else SD15_TEXT))
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text = CLIPTextModel(text_cfg)
    for m in (unet, vae, text):
        m.to(dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD_DDIM_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("unet", unet), ("vae", vae), ("text", text))}
    (out / "bench_params.json").write_text(json.dumps(n))
    return out


def build_gpt2(out: Path, tiny: bool, n_prompts: int = 256, prompt_len: int = 64) -> Path:
    import copy

    import numpy as np
    import torch
    from transformers import GPT2ForSequenceClassification

    from text_rlhf.tiny import build_wordlevel_tokenizer, tiny_causal_lm

    s = GPT2_TINY if tiny else GPT2_124M
    device, dtype = _device_dtype(tiny)
    tok = build_wordlevel_tokenizer(s["vocab"])
    with torch.device(device):
        policy = tiny_causal_lm("gpt2", tok, n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                                n_positions=s["n_positions"], seed=0)
        rcfg = copy.deepcopy(policy.config)
        rcfg.num_labels, rcfg.architectures = 1, None
        torch.manual_seed(1)
        rm = GPT2ForSequenceClassification(rcfg)
    for name, m in (("policy", policy), ("reward", rm)):
        m.to(dtype).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, s["vocab"], size=(n_prompts, prompt_len)).tolist()
    inv = {i: t for t, i in tok.get_vocab().items()}
    with open(out / "prompts.jsonl", "w") as f:
        for row in ids:
            f.write(json.dumps({"prompt": " ".join(inv[i] for i in row)}) + "\n")
    (out / "bench_params.json").write_text(json.dumps({"policy": sum(p.numel() for p in policy.parameters()) / 1e6}))
    return out


def matmul_tflops(n: int = 8192, reps: int = 20) -> float | None:
    import torch
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def unet_flops(pipe_dir: Path, tiny: bool) -> dict:
    """FLOPs of one CFG sampling forward per image, one CFG fwd+bwd per trained (sample, step) with LoRA
    as the preset, one VAE decode and one prompt encoding per image (torch.utils.flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from align.rl.config import LoraParams
    from image_rlhf.pipeline import add_unet_lora, encode_prompts, load_pipeline, negative_embeds
    from image_rlhf.sampling import _guided_noise_pred, decode_latents, step_log_prob

    device, dtype = _device_dtype(tiny)
    parts = load_pipeline(pipe_dir, device)
    for m in (parts.vae, parts.text_encoder, parts.unet):
        m.to(dtype)
    add_unet_lora(parts.unet, LoraParams(r=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    c, h, w = parts.latent_shape()
    parts.scheduler.set_timesteps(50, device=device)
    t = parts.scheduler.timesteps[10]

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not tiny):
        emb = encode_prompts(parts, ["a photo of a cat"])
        neg = negative_embeds(parts)
        x = torch.randn(1, c, h, w, device=device, dtype=dtype)
        f_text = count(lambda: encode_prompts(parts, ["a photo of a cat"]))
        with torch.no_grad():
            f_sample = count(lambda: _guided_noise_pred(parts.unet, x, t, emb, neg, 5.0))
            f_vae = count(lambda: decode_latents(parts.vae, x))

        def train():
            lp = step_log_prob(parts.unet, parts.scheduler, x, t.reshape(1), torch.randn_like(x), emb, neg, 5.0, 1.0)
            lp.float().sum().backward()
        f_train = count(train)
    return {"unet_cfg_fwd_per_image_step": f_sample, "unet_cfg_fwd_bwd_per_sample_step": f_train,
            "vae_decode_per_image": f_vae, "text_encode_per_prompt": f_text}


# ------------------------------------------------------------------------------------------ attention

def median_ms(fn, reps: int, warmup: int, cuda: bool) -> float:
    """Median time of fn() in ms over `reps` calls after `warmup`: CUDA events (synchronised after each
    call) where fn runs on the GPU, perf_counter where it runs on the CPU."""
    import torch
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


# SD 1.5's attention at 512 px (8 heads; 64×64 latents): (query tokens, head dim) per UNet level, each as
# self-attention and as cross-attention over CLIP's 77 text tokens. 16 rows = 8 CFG images.
SD15_ATTN = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
TINY_ATTN = [(64, 8), (16, 16)]


def attention_bench(tiny: bool, reps: int, rows: int = 16, heads: int = 8) -> dict:
    """The attention kernels alone at SD-1.5 shapes (bf16 on CUDA): torch SDPA against xformers'
    memory_efficient_attention with its own dispatch (and forced to each op it has), forward and
    forward + backward, median ms over `reps` after 3 warm-ups. Records which xformers op the dispatch picks
    and the largest |difference| from SDPA's output, so a run shows what "xformers" actually ran."""
    import torch
    import torch.nn.functional as F
    device, dtype = _device_dtype(tiny)
    cuda = device.type == "cuda"
    out: dict = {"rows": rows, "heads": heads}
    try:
        import xformers
        import xformers.ops as xops
        from xformers.ops import fmha
        out["xformers"] = xformers.__version__
        ops = {"fa3": (fmha.flash3.FwOp, fmha.flash3.BwOp), "fa2": (fmha.flash.FwOp, fmha.flash.BwOp),
               "cutlass": (fmha.cutlass.FwOp, fmha.cutlass.BwOp)}
    except Exception as e:  # noqa: BLE001  (no wheel for this torch, no CUDA extension, ...)
        out["xformers"] = f"not importable: {type(e).__name__}: {e}"[:300]
        xops = None

    timed = lambda fn: median_ms(fn, reps, warmup=3, cuda=cuda)  # noqa: E731

    cases = []
    for m, k in (TINY_ATTN if tiny else SD15_ATTN):
        for kv in (m, 77):
            # BMHK, as xformers takes it; SDPA gets the (B, H, M, K) transposed view, as diffusers passes it.
            q, key, v = (torch.randn(rows, n, heads, k, device=device, dtype=dtype, requires_grad=True)
                         for n in (m, kv, kv))
            g = torch.randn(rows, m, heads, k, device=device, dtype=dtype)
            sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), key.transpose(1, 2),  # noqa: E731
                                                          v.transpose(1, 2)).transpose(1, 2)
            case = {"q_tokens": m, "kv_tokens": kv, "head_dim": k}
            ref = sdpa()
            with torch.no_grad():
                case["sdpa_fwd_ms"] = timed(sdpa)
            case["sdpa_fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(sdpa(), (q, key, v), g))
            if xops is not None:
                inp = fmha.Inputs(query=q, key=key, value=v)
                try:
                    case["xformers_fw_op"] = fmha._dispatch_fw(inp, True).NAME
                    case["xformers_bw_op"] = fmha._dispatch_bw(inp, False).NAME
                except Exception as e:  # noqa: BLE001
                    case["xformers_dispatch_error"] = f"{type(e).__name__}: {e}"[:300]
                for name, op in [("xformers", None), *ops.items()]:
                    xf = lambda op=op: xops.memory_efficient_attention(q, key, v, op=op)  # noqa: E731
                    try:
                        with torch.no_grad():
                            case[f"{name}_max_abs_diff"] = (xf() - ref).abs().max().item()
                            case[f"{name}_fwd_ms"] = timed(xf)
                    except Exception as e:  # noqa: BLE001  (op does not support this shape / build)
                        case[f"{name}_fwd_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                        continue
                    try:
                        case[f"{name}_fwd_bwd_ms"] = timed(lambda xf=xf: torch.autograd.grad(xf(), (q, key, v), g))
                    except Exception as e:  # noqa: BLE001
                        case[f"{name}_fwd_bwd_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            cases.append(case)
    out["cases"] = cases
    return out
