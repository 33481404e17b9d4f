"""scripts/bench_gpu.py keeps running: its CPU dry run (--tiny) drives the same code paths as the GPU runs
in the README (model building, FLOP counting, the attention and UNet micro-benchmarks, run_ddpo, run_ppo) on tiny configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_dry_run(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--out", str(out), "--tiny",
           "--parts", "attn,unet,ddpo,ppo", "--attention", "sdpa", "--ddpo-epochs", "2", "--ddpo-batches", "1",
           "--reps", "1", "--unet-batches", "4", "--ppo-iters", "2", "--ppo-variants", "lora16:lora.r=16"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench_gpu.json").read_text())
    assert res["flops"]["unet_cfg_fwd_bwd_per_sample_step"] > res["flops"]["unet_cfg_fwd_per_image_step"] > 0
    assert {k for k in res["unet"] if k.endswith("_ms")} == {f"{f}/{c}" for f in ("contiguous", "channels_last")
                                                             for c in ("sample_fwd_8img_ms", "train_fwd_bwd_4samples_ms")}
    cases = res["attn"]["cases"]
    assert [(c["q_tokens"], c["kv_tokens"]) for c in cases] == [(64, 64), (64, 77), (16, 16), (16, 77)]
    assert all(c["sdpa_fwd_bwd_ms"] > 0 and c["sdpa_fwd_ms"] > 0 for c in cases)
    (ddpo,), (ppo,) = res["ddpo"], res["ppo"]
    assert ddpo["processors"] == ["CpuSdpaProcessor"] and ddpo["train_ts_per_s"] > 0 and ddpo["sample_tflops"] > 0
    assert ppo["lora_r"] == 16 and ppo["merge_lora_generate"] and ppo["gen_tokens_per_s"] > 0
    assert "| sdpa | False | CpuSdpaProcessor |" in p.stdout and "| lora16 | 16 | True |" in p.stdout
