"""DDPO in real processes: 2-process CPU `accelerate launch` keeps ranks identical; SIGKILL then --resume."""
import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from test_distributed_resume import HERE, VENV_BIN, env


def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square\na green triangle\n")
    return str(p)


COMMON = ["reward=image_rewards:brightness", "sample_batch_size=2", "num_batches_per_epoch=1", "train_batch_size=2",
          "num_steps=3", "lr=1e-3", "lora.r=4", "grid_seeds=[0]", "buffer_size=0"]


def test_two_process_accelerate_ddpo_keeps_ranks_identical(tiny_sd_path, tmp_path):
    out = tmp_path / "dist"
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "dist_worker.py"), "image", str(out),
           f"pipeline={tiny_sd_path}", f"prompts={prompts_file(tmp_path)}", "epochs=2", *COMMON]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    lora = [k for k in a if "lora_B" in k]
    assert lora and any(a[k].abs().sum() > 0 for k in lora), "LoRA B matrices never moved"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=f"ranks differ at {k}")


def ddpo_cmd(pipe, prompts, out, *extra):
    return [sys.executable, "-m", "align", "image", "ddpo", "--pipeline", pipe, "--prompts", prompts,
            "--out", str(out), "--threads", "1", "epochs=4", "save_every=1", *COMMON, *extra]


def test_ddpo_resume_after_kill_matches_uninterrupted(tiny_sd_path, tmp_path):
    prompts = prompts_file(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run(ddpo_cmd(tiny_sd_path, prompts, ref), env=env(), check=True, capture_output=True, timeout=300)
    out = tmp_path / "run"
    proc = subprocess.Popen(ddpo_cmd(tiny_sd_path, prompts, out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(ddpo_cmd(tiny_sd_path, prompts, out, "--resume"), env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    epochs = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "reward/mean" in l]
    assert epochs == [1, 2, 3, 4], epochs
    a = load_file(str(ref / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=f"resumed run differs at {k}")
