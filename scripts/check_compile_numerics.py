#!/usr/bin/env python
"""Is torch.compile's bf16 UNet output as close to float32 as eager bf16's? (DDPOConfig.compile_unet)

Builds the SD-1.5 UNet (random weights, scripts/bench_gpu_models.SD15_UNET), runs one forward in float32
(TF32 off: the reference), one in bf16 eager and one in bf16 compiled (inductor, static shapes), and prints
each one's largest |difference| over the reference's largest magnitude. On CUDA the weights are cast to bf16
(as DDPO's frozen UNet is); on the CPU they stay float32 under bf16 autocast.

    python scripts/check_compile_numerics.py --device cuda --rows 16 --size 64   # an H100: ~2 min
    python scripts/check_compile_numerics.py --device cpu --rows 2 --size 8      # 2 CPU cores: ~6 min
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=16, help="UNet batch")
    ap.add_argument("--size", type=int, default=64, help="latent height = width")
    ap.add_argument("--timestep", type=int, default=741)
    a = ap.parse_args()
    import torch
    from diffusers import UNet2DConditionModel

    from bench_gpu_models import SD15_UNET
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(dev).eval()
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(a.rows, 4, a.size, a.size, device=dev, generator=g)
    emb = torch.randn(a.rows, 77, SD15_UNET["cross_attention_dim"], device=dev, generator=g)
    t = torch.tensor(a.timestep, device=dev)
    rel = lambda out, ref: ((out - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                 "rows": a.rows, "size": a.size, "timestep": a.timestep}
    with torch.no_grad():
        ref = unet(x, t, emb).sample.double()
        if dev.type == "cuda":
            unet.to(torch.bfloat16)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            eager = unet(x, t, emb).sample.double()
        res["eager_bf16_vs_fp32"] = rel(eager, ref)
        unet.compile(dynamic=False)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            compiled = unet(x, t, emb).sample.double()
        res["compile_s"] = time.perf_counter() - t0
        res["compiled_bf16_vs_fp32"] = rel(compiled, ref)
        res["compiled_vs_eager_bf16"] = rel(compiled, eager)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
