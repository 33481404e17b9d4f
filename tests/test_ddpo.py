"""DDPO end to end on the tiny random Stable Diffusion pipeline (CPU, seconds per epoch).

Why the reward test steps on 64 samples at a time: on a random UNet the policy gradient of a few
samples is mostly noise, and Adam turns noise into full-size steps whose second-order effect
drifts brightness one way whatever the reward (measured: with 8 samples per step, `brightness` and
`darkness` both made images brighter). Stepping on 64, 4 epochs at lr 2e-3 raised the epoch-mean
reward by +0.006..+0.009 for `brightness` and +0.002..+0.007 for `darkness` (seeds 0-3), against
a sampling noise of the epoch mean of ~0.0003. ddpo-pytorch likewise steps on 64-128 samples.
"""
import contextlib
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline  # noqa: E402

from align.rl import PerPromptStatTracker  # noqa: E402
from image_rlhf.ddpo import DDPOConfig, compute_advantages, draw_batch, run_ddpo, trainable_steps  # noqa: E402
from image_rlhf.pipeline import (PipelineLoadError, encode_prompts, load_pipeline,  # noqa: E402
                                 save_pixel_pipeline)
from image_rlhf.tiny import tiny_sd_pipeline  # noqa: E402
from align.rl.config import LoraParams  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """Latents (4, 16, 16) -> 32×32 images; UNet ~0.07M parameters."""
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), sample_size=16)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _cfg(tiny_sd, prompts_file, out, **kw):
    base = dict(pipeline=str(tiny_sd), reward="image_rewards:brightness", prompts=str(prompts_file), out=str(out),
                epochs=1, sample_batch_size=4, num_batches_per_epoch=1, train_batch_size=4, num_steps=3,
                lr=1e-3, lora=LoraParams(r=0), grid_seeds=[0], save_every=1, buffer_size=0)
    base.update(kw)
    return DDPOConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sd2_layout_v_prediction(tmp_path, prompts_file):
    """An SD 2.x-style pipeline: v-prediction, "trailing" timestep spacing, linear attention projections and
    upcast attention (stable-diffusion-2-1's configs). One LoRA epoch runs and the log-probs recorded while
    sampling are finite (the DDIM step's v-prediction branch is checked against diffusers in test_ddim)."""
    from diffusers import UNet2DConditionModel
    sd2 = tiny_sd_pipeline(tmp_path / "sd2", sample_size=16)
    sched = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    sched.update(prediction_type="v_prediction", timestep_spacing="trailing")
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    unet_cfg = json.loads((sd2 / "unet" / "config.json").read_text())
    unet_cfg.update(use_linear_projection=True, upcast_attention=True)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(unet_cfg).save_pretrained(sd2 / "unet")
    out = tmp_path / "run"
    run_ddpo(_cfg(sd2, prompts_file, out, lora=LoraParams(r=4, alpha=4.0), save_every=10))
    rows = [r for r in _metrics(out) if "reward/mean" in r]
    assert len(rows) == 1 and all(math.isfinite(v) for k, v in rows[0].items() if isinstance(v, float))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_ddpo_raises_brightness_and_writes_the_run(tiny_sd, prompts_file, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_sd, prompts_file, out, epochs=4, sample_batch_size=32, num_batches_per_epoch=2,
               train_batch_size=32, gradient_accumulation_steps=2, num_steps=6, guidance_scale=5.0, lr=2e-3,
               save_every=2, grid_every=3)
    result = run_ddpo(cfg).model_dir
    rows = [r for r in _metrics(out) if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 4
    assert rewards[-1] - rewards[0] > 0.003, rewards                # +0.006..0.009 measured; noise ~0.0003
    assert all(abs(r["policy/approx_kl"]) < 1e-3 for r in rows)     # one optimiser step per epoch: ratio = 1
    # the run folder: grids before training, every grid_every epochs and after the last; report, curves,
    # TensorBoard, checkpoints
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["epoch-000.png", "epoch-003.png", "epoch-004.png"]
    assert [r["step"] for r in _metrics(out) if "grid/reward" in r] == [0, 3, 4]
    report = (out / "report.md").read_text()
    assert "grids/epoch-000.png" in report and "grids/epoch-004.png" in report and "| reward" in report
    assert "n/a" not in report and "| monitor" not in report and "KL penalty" not in report  # only what was logged
    assert (out / "curves.png").is_file() and any((out / "tb").iterdir())
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-00000004" and (latest / "trainable.safetensors").is_file()
    assert "tracker" in json.loads((latest / "state.json").read_text())
    # full fine-tuning writes a whole pipeline folder that diffusers loads
    assert result == out / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(result)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert not torch.equal(pipe.unet.conv_out.weight, base.unet.conv_out.weight)


def test_lora_weights_load_with_diffusers(tiny_sd, prompts_file, tmp_path):
    out = tmp_path / "lora_run"
    cfg = _cfg(tiny_sd, prompts_file, out, lora=LoraParams(r=4, alpha=8.0), kl_coef=0.1, lr=1e-2)
    result = run_ddpo(cfg).model_dir
    assert result == out / "lora" and (result / "pytorch_lora_weights.safetensors").is_file()
    assert "(`StableDiffusionPipeline.load_lora_weights`)" in (out / "report.md").read_text()
    assert "policy/kl_ref" in _metrics(out)[-1]                     # the reference = adapters disabled
    from safetensors.torch import load_file
    trained = load_file(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    lora_b = {k: v for k, v in trained.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at 0: every one was trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(result)
    loaded = dict(pipe.unet.named_parameters())
    for name, value in lora_b.items():
        match = [v for n, v in loaded.items() if "lora_B" in n and n.replace(".default_0", "").replace(
            ".default", "") == name.replace(".default", "")]
        assert match and torch.allclose(match[0].detach(), value), name
    # alpha travels in the file's metadata: the loaded adapter scales by alpha / r = 2
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert pytest.approx(list(layer.scaling.values())[0]) == 2.0


def test_advantages_are_clipped_and_batch_normalised_without_buffer():
    rewards = torch.zeros(64)
    rewards[0] = 100.0                                      # one outlier: z ≈ √63 ≈ 7.9 before the clip
    prompts = ["p"] * 64
    adv = compute_advantages(PerPromptStatTracker(buffer_size=0, min_count=1), prompts, rewards, adv_clip=5.0)
    assert adv.max().item() == pytest.approx(5.0) and adv.min().item() > -5.0
    z = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)   # batch statistics
    torch.testing.assert_close(adv, z.clamp(-5, 5))
    # per-prompt statistics once a prompt has min_count rewards buffered
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    adv = compute_advantages(tracker, ["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 30.0]), adv_clip=5.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_noise_groups_share_prompt_and_initial_noise(tiny_sd, prompts_file, tmp_path):
    """noise_group_size G: each sampling batch is B/G groups of one prompt and one x_T; the run trains on
    group-centred advantages; a G that does not divide the batch is refused before the run folder exists."""
    g = torch.Generator().manual_seed(0)
    prompts, x_T = draw_batch(PROMPTS, 8, 4, (4, 16, 16), g)
    assert x_T.shape == (8, 4, 16, 16) and len(prompts) == 8
    for k in range(2):
        rows = slice(4 * k, 4 * k + 4)
        assert len(set(prompts[rows])) == 1 and (x_T[rows] == x_T[4 * k]).all()
    assert not torch.equal(x_T[0], x_T[4])
    # without groups: the draw is the one runs made before the option existed
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert draw_batch(PROMPTS, 8, 0, (4, 16, 16), g0) == (
        [PROMPTS[j] for j in torch.randint(len(PROMPTS), (8,), generator=g1).tolist()], None)
    out = tmp_path / "groups"
    run_ddpo(_cfg(tiny_sd, prompts_file, out, noise_group_size=2, epochs=2, save_every=2))
    rows = [r for r in _metrics(out) if "reward/mean" in r]
    assert len(rows) == 2 and all(abs(r["policy/approx_kl"]) < 1e-3 for r in rows)
    with pytest.raises(ValueError, match="noise_group_size"):
        run_ddpo(_cfg(tiny_sd, prompts_file, tmp_path / "bad", noise_group_size=3))
    assert not (tmp_path / "bad").exists()


def test_pipeline_errors_and_pixel_layout(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(PipelineLoadError, match=r"missing 'unet' \(model_index.json lists .*text_encoder.*vae"):
        load_pipeline(broken)
    with pytest.raises(PipelineLoadError, match="no such folder"):
        load_pipeline(tmp_path / "does-not-exist")
    with pytest.raises(PipelineLoadError, match="missing 'unet'"):  # before any run folder is made
        run_ddpo(DDPOConfig(pipeline=str(broken), reward="brightness", prompts=str(tmp_path / "p.txt"),
                            out=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
    # pixel layout: no VAE; the UNet's channels are RGB
    from diffusers import DDIMScheduler

    from image_rlhf.tiny import SD_DDIM_CONFIG, tiny_pixel_unet
    parts = load_pipeline(tiny_sd)
    pixel = save_pixel_pipeline(tmp_path / "pixel", tiny_pixel_unet(sample_size=8, block_out_channels=(8, 16)),
                                parts.text_encoder, parts.tokenizer, DDIMScheduler(**SD_DDIM_CONFIG))
    px = load_pipeline(pixel)
    assert px.vae is None and px.latent_shape() == (3, 8, 8) and isinstance(px.scheduler, DDIMScheduler)
    # its report named StableDiffusionPipeline.load_lora_weights, which cannot load a pipeline without a VAE
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    run_ddpo(_cfg(pixel, prompts, tmp_path / "px-run", lora=LoraParams(r=2, alpha=2.0), save_every=10))
    report = (tmp_path / "px-run" / "report.md").read_text()
    assert "StableDiffusionPipeline" not in report and f"align compare --model aligned={tmp_path / 'px-run'}" in report
    shutil.rmtree(pixel / "tokenizer")
    with pytest.raises(PipelineLoadError, match="missing 'tokenizer'"):
        load_pipeline(pixel)
    embeds = encode_prompts(parts, PROMPTS)
    assert embeds.shape == (4, parts.tokenizer.model_max_length, parts.text_encoder.config.hidden_size)


def test_hub_style_folders_load_as_diffusers_would(tiny_sd, tmp_path, caplog, capfd):
    """Folders as hub checkpoints ship them: a PNDM (SD 1.5) or Euler v-prediction (SD 2.x) scheduler saved by
    current diffusers, which lacks DDIM's keys, and weights saved only as the fp16 variant. DDIM's own defaults
    would clip SD latents to ±1 every step (clip_sample) and leave the last step without noise."""
    import json
    import logging

    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

    from image_rlhf.pipeline import ddim_scheduler
    from image_rlhf.tiny import SD_DDIM_CONFIG
    betas = {k: SD_DDIM_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    for sched in (PNDMScheduler(**betas, skip_prk_steps=True),
                  EulerDiscreteScheduler(**betas, prediction_type="v_prediction", timestep_spacing="linspace")):
        folder = tmp_path / type(sched).__name__
        shutil.copytree(tiny_sd, folder)
        sched.save_pretrained(folder / "scheduler")
        raw = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert "clip_sample" not in raw  # as current diffusers writes them (Euler: no set_alpha_to_one either)
        with caplog.at_level(logging.INFO, logger="image_rlhf.pipeline"):
            got = load_pipeline(folder).scheduler.config
        assert (got.clip_sample, got.set_alpha_to_one, got.steps_offset, got.timestep_spacing) == (
            False, False, 1, "leading")
        assert got.prediction_type == sched.config.prediction_type
        assert f"scheduler {type(sched).__name__} -> DDIMScheduler" in caplog.text
        assert {k: got[k] for k in betas} == betas
    # a latent pipeline's DDIM config with clip_sample on (diffusers' pipeline turns it off), a pixel one keeps it
    assert not ddim_scheduler({**SD_DDIM_CONFIG, "clip_sample": True}).config.clip_sample
    assert ddim_scheduler({**SD_DDIM_CONFIG, "clip_sample": True}, latent=False).config.clip_sample
    assert ddim_scheduler(dict(SD_DDIM_CONFIG)).config == DDIMScheduler(**SD_DDIM_CONFIG).config  # unchanged
    # weights saved only as the fp16 variant (diffusion_pytorch_model.fp16.safetensors, ...)
    variant = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(variant, variant="fp16")
    assert not list((variant / "unet").glob("diffusion_pytorch_model.safetensors"))
    capfd.readouterr()
    caplog.clear()
    parts = load_pipeline(variant)
    assert "An error occurred" not in capfd.readouterr().err + caplog.text  # diffusers' ERROR line for plain files
    ref = load_pipeline(tiny_sd)
    assert torch.equal(next(parts.unet.parameters()), next(ref.unet.parameters()))
    # no weights at all: the error names the component; a text encoder of another width than the UNet's
    for f in (variant / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(PipelineLoadError, match="cannot load 'unet' of the pipeline folder"):
        load_pipeline(variant)
    wide = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"),
                                             "cross_attention_dim": 64})
    wide.save_pretrained(variant / "unet")
    with pytest.raises(PipelineLoadError, match="hidden_size is 32 but the UNet's cross_attention_dim is 64"):
        load_pipeline(variant)


def test_xformers_fallback_says_why(tiny_sd, monkeypatch, caplog):
    """attention=xformers on a CUDA device falls back to SDPA and logs the reason: here an xformers whose
    CUDA extension did not load (as a CUDA-12 wheel on a CUDA-13 torch, missing libcudart.so.12)."""
    import logging
    import sys
    import types

    from diffusers.models.attention_processor import AttnProcessor2_0

    from image_rlhf.pipeline import _set_attention
    unet = load_pipeline(tiny_sd).unet
    cpp = types.ModuleType("xformers._cpp_lib")
    try:
        raise RuntimeError("xFormers can't load C++/CUDA extensions.") from OSError(
            "libcudart.so.12: cannot open shared object file")
    except RuntimeError as e:
        cpp._cpp_library_load_exception = e
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers._cpp_lib", cpp)
    monkeypatch.setattr(type(unet), "enable_xformers_memory_efficient_attention",
                        lambda self: (_ for _ in ()).throw(ValueError("xFormers wasn't build with CUDA support")))
    with caplog.at_level(logging.INFO, logger="image_rlhf.pipeline"):
        _set_attention(unet, "xformers", "cuda")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert "xFormers wasn't build with CUDA support" in caplog.text and "libcudart.so.12" in caplog.text
    with pytest.raises(ValueError, match="'sdpa' or 'xformers'"):
        _set_attention(unet, "flash", "cpu")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_reward_stops_cleanly_and_resume_continues(tiny_sd, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "nan_run"
    cfg = _cfg(tiny_sd, prompts_file, out, reward="image_rewards:nan_when_flagged")
    run_ddpo(cfg)
    ckpt = out / "checkpoints" / "step-00000001"
    before = _digest(ckpt)
    monkeypatch.setenv("ALIGN_TEST_NAN_REWARD", "1")
    cfg.epochs = 2
    with pytest.raises(FloatingPointError, match=r"(?s)nan.*epoch 2.*last checkpoint is intact"):
        run_ddpo(cfg, resume=True)
    assert _digest(ckpt) == before
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert not (out / "checkpoints" / "step-00000002").exists()
    monkeypatch.delenv("ALIGN_TEST_NAN_REWARD")
    run_ddpo(cfg, resume=True)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert [r["step"] for r in _metrics(out) if "reward/mean" in r] == [1, 2]


def test_cli_presets_parse(monkeypatch):
    """`align image ddpo|rm --config PRESET ... key=value` builds the configs (runs are stubbed out)."""
    import image_rlhf.ddpo
    import image_rlhf.rm
    from align.cli import main
    from image_rlhf.ddpo_config import check_config
    seen = []
    monkeypatch.setattr(image_rlhf.ddpo, "run_ddpo", lambda cfg, resume=False: seen.append(cfg))
    monkeypatch.setattr(image_rlhf.rm, "run_image_rm", lambda cfg, resume=False: seen.append(cfg))
    for preset in ("configs/image/tiny.yaml", "configs/image/sd15-pickscore.yaml"):
        assert main(["image", "ddpo", "--config", preset, "--pipeline", "P", "--reward", "jpeg", "--prompts", "x.txt",
                     "--out", "o", "epochs=3"]) == 0
        cfg = seen[-1]
        check_config(cfg)
        assert cfg.epochs == 3 and cfg.pipeline == "P" and cfg.reward == "jpeg" and cfg.clip_range == 1e-4
        assert cfg.sample_batch_size * cfg.num_batches_per_epoch % (cfg.train_batch_size *
                                                                   cfg.gradient_accumulation_steps) == 0
        assert main(["image", "rm", "--config", preset, "--clip", "tiny-clip", "--data", "p.jsonl", "--out", "o"]) == 0
        assert seen[-1].data == "p.jsonl" and seen[-1].clip == "tiny-clip"
        # the SD preset's pretrained tag is ViT-H-14's: pretrained=null unsets it for another CLIP (not 'null')
        assert main(["image", "rm", "--config", preset, "--clip", "tiny-clip", "--data", "p.jsonl", "--out", "o",
                     "pretrained=null"]) == 0
        assert seen[-1].pretrained is None
    # the aesthetic preset names its reward itself (DDPO's aesthetic experiment; prompts: the animals it ships)
    assert main(["image", "ddpo", "--config", "configs/image/sd15-aesthetic.yaml", "--pipeline", "P",
                 "--prompts", "configs/image/animals.txt", "--out", "o"]) == 0
    cfg = seen[-1]
    check_config(cfg)
    assert cfg.reward == "aesthetic" and cfg.resolution == 512
    assert len(Path(cfg.prompts).read_text().split()) == 45
    assert cfg.sample_batch_size * cfg.num_batches_per_epoch // (cfg.train_batch_size * cfg.gradient_accumulation_steps) == 2


@pytest.mark.parametrize("lora_r", [0, 4])
def test_monitor_and_kl_to_reference_are_logged(tiny_sd, prompts_file, tmp_path, lora_r):
    """monitor = darkness (a gold judge that is −reward on the same images); kl/ref = 0 before any update
    (the policy is the reference: LoRA B = 0, or the frozen copy), then > 0 once updated."""
    out = tmp_path / f"mon_{lora_r}"
    cfg = _cfg(tiny_sd, prompts_file, out, epochs=3, sample_batch_size=4, num_batches_per_epoch=2,
               train_batch_size=4, lr=1e-2, monitor="image_rewards:darkness", log_kl=True, guidance_scale=5.0,
               lora=LoraParams(r=lora_r, alpha=4.0), save_every=10)
    run_ddpo(cfg)
    rows = [r for r in _metrics(out) if "reward/mean" in r]
    assert len(rows) == 3
    for r in rows:   # scored on the epoch's sampled images, never trained on
        assert r["monitor/mean"] == pytest.approx(-r["reward/mean"], abs=1e-6)
        assert r["monitor/std"] == pytest.approx(r["reward/std"], abs=1e-6)
    kl = [r["kl/ref"] for r in rows]
    assert abs(kl[0]) <= 1e-12, kl
    assert kl[1] > 1e-6 and kl[2] > 1e-6, kl    # moved off the reference (not monotone: Adam steps are noisy)
    assert "KL to reference per trajectory" in (out / "report.md").read_text()


def test_kl_leash_keeps_the_policy_near_the_reference(tiny_sd, prompts_file, tmp_path):
    """The same run (full fine-tuning, brightness, 4 epochs) with no leash and with DPOK's closed-form leash
    (kl_estimator=gaussian, weight 10): the leashed policy ends nearer the reference (kl/ref, the exact KL over
    whole trajectories; measured 631 vs 3150 nats) and logs its penalty, the per-element KL of trained steps."""
    kls = {}
    for coef in (0.0, 10.0):
        out = tmp_path / f"leash_{coef}"
        run_ddpo(_cfg(tiny_sd, prompts_file, out, epochs=4, sample_batch_size=4, num_batches_per_epoch=2,
                      log_kl=True, kl_coef=coef, grid_seeds=[], save_every=10))
        rows = [r for r in _metrics(out) if "kl/ref" in r]
        kls[coef] = rows[-1]["kl/ref"]
        if coef:
            assert all(r["policy/kl_penalty"] >= 0 for r in rows) and rows[-1]["policy/kl_penalty"] > 0
            report = (out / "report.md").read_text()
            assert "KL coef 10.0 (gaussian)" in report and "| KL penalty per step (closed form, nats per element)" in report
    assert kls[0.0] > 100 and kls[10.0] < 0.5 * kls[0.0], kls
    with pytest.raises(ValueError, match="kl_estimator must be 'gaussian' or 'k2'"):
        run_ddpo(_cfg(tiny_sd, prompts_file, tmp_path / "bad", kl_estimator="k3"))


def test_kl_samples_bounds_the_trajectories(tiny_sd, prompts_file, tmp_path):
    """kl_samples = 3 of 8 per process (across two sampling batches of 4); train_cfg=False: the policy and
    the KL are the conditional ε alone. Before the first update ~0: the reference forward runs on 3 rows where
    sampling ran on 4, and float32 kernels round a little differently per batch size (measured 7.7e-9 nats)."""
    out = tmp_path / "kl_n"
    cfg = _cfg(tiny_sd, prompts_file, out, epochs=2, sample_batch_size=4, num_batches_per_epoch=2, lr=1e-2,
               train_batch_size=4, log_kl=True, kl_samples=3, train_cfg=False, lora=LoraParams(r=4, alpha=4.0),
               grid_seeds=[])
    run_ddpo(cfg)
    assert not (out / "grids").exists() or not any((out / "grids").iterdir())   # grid_seeds=[]: no grid
    assert not any("grid/reward" in r for r in _metrics(out))
    kl = [r["kl/ref"] for r in _metrics(out) if "reward/mean" in r]
    assert abs(kl[0]) < 1e-6 and kl[1] > 1e-3, kl
    assert "monitor/mean" not in _metrics(out)[-1]


class _Acc:
    """The slice of accelerate.Accelerator that `ddpo_update` uses, single process."""
    device = torch.device("cpu")
    no_sync = autocast = staticmethod(lambda *a: contextlib.nullcontext())
    backward = staticmethod(lambda loss: loss.backward())
    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)
    gather = staticmethod(lambda t: t)


class _RecordingOptimizer:
    """Keeps the gradient of every optimiser step (after clipping) and steps nothing."""
    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("kl_coef,kl_estimator", [(0.0, "gaussian"), (0.1, "gaussian"), (0.1, "k2")])
def test_timesteps_per_forward_gives_the_same_gradient(tiny_sd, kl_coef, kl_estimator):
    """k steps per UNet call (k = 2 leaves a remainder of 1 of 5, k = 5 is all at once) sum the same per-step
    losses as one call per step: the same gradients at every optimiser step and the same logged statistics."""
    from image_rlhf.ddpo_update import ddpo_update
    from image_rlhf.pipeline import add_unet_lora, negative_embeds
    from image_rlhf.sampling import sample_trajectories
    parts = load_pipeline(tiny_sd)
    add_unet_lora(parts.unet, LoraParams(r=4, alpha=4.0))
    with torch.no_grad():  # LoRA B starts at 0: move it, so that the policy is not the reference
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    embeds, neg = encode_prompts(parts, PROMPTS), negative_embeds(parts)
    traj = sample_trajectories(parts.unet, parts.scheduler, embeds, neg, 5, 5.0, 1.0,
                               generator=torch.Generator().manual_seed(0))
    old_log_probs = traj.log_probs + 1e-4 * torch.randn(traj.log_probs.shape,
                                                        generator=torch.Generator().manual_seed(1))  # some clipped
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    results = {}
    for k in (1, 2, 5):
        cfg = DDPOConfig(train_batch_size=2, gradient_accumulation_steps=1, timesteps_per_forward=k, kl_coef=kl_coef,
                         kl_estimator=kl_estimator, max_grad_norm=1.0)
        opt = _RecordingOptimizer(p for p in parts.unet.parameters() if p.requires_grad)
        stats = ddpo_update(parts.unet, parts.unet, None, opt, _Acc(), parts.scheduler, traj.latents, traj.timesteps,
                        old_log_probs, advantages, embeds, neg, 5.0, torch.arange(5), 5, cfg, epoch=0, rank=0)
        results[k] = (opt.grads, stats)
    grads1, stats1 = results[1]
    assert len(grads1) == 2 and any(g.abs().sum() > 0 for g in grads1[0])      # 2 train batches of 2 samples
    assert 0 < stats1["policy/clipfrac"] < 1
    assert ("policy/kl_penalty" in stats1) == (kl_coef > 0) and stats1.get("policy/kl_penalty", 1) > 0
    for k in (2, 5):
        grads, stats = results[k]
        for step1, stepk in zip(grads1, grads, strict=True):
            for a, b in zip(step1, stepk, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
        assert stats.keys() == stats1.keys()
        for key in stats:
            assert stats[key] == pytest.approx(stats1[key], rel=1e-4, abs=1e-7), key


def test_min_std_dev_trains_only_the_stochastic_steps(tiny_sd):
    """trainable_steps keeps the steps with σ_t ≥ min_std_dev (all of them at 0), and ddpo_update then trains
    only those: a gradient from a step whose σ_t is tiny would scale as 1/σ_t and swamp the others."""
    from image_rlhf.ddim import ddim_std_dev
    from image_rlhf.ddpo_update import ddpo_update
    from image_rlhf.pipeline import negative_embeds
    from image_rlhf.sampling import sample_trajectories
    parts = load_pipeline(tiny_sd)
    sched = parts.scheduler
    assert trainable_steps(sched, 5, 1.0, 0.0).tolist() == [0, 1, 2, 3, 4]
    sched.set_timesteps(5)
    std = ddim_std_dev(sched, sched.timesteps, 1.0)                                          # (5,)
    cut = float(std.sort().values[2])                                                        # keeps the 3 largest
    keep = trainable_steps(sched, 5, 1.0, cut)
    assert keep.tolist() == (std >= cut).nonzero().flatten().tolist() and len(keep) == 3
    with pytest.raises(ValueError, match="no step"):
        trainable_steps(sched, 5, 1.0, float(std.max()) + 1)

    class Spy(torch.nn.Module):  # records the timesteps the update trains on
        def __init__(self, unet):
            super().__init__()
            self.unet, self.seen = unet, []

        def forward(self, x, t, **kw):
            self.seen += torch.as_tensor(t).reshape(-1).tolist()
            return self.unet(x, t, **kw)

    parts.unet.requires_grad_(True)
    embeds, neg = encode_prompts(parts, PROMPTS), negative_embeds(parts)
    traj = sample_trajectories(parts.unet, sched, embeds, neg, 5, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
    spy = Spy(parts.unet)
    opt = torch.optim.SGD(parts.unet.parameters(), lr=0.0)
    cfg = DDPOConfig(train_batch_size=4, timesteps_per_forward=1)
    ddpo_update(spy, parts.unet, None, opt, _Acc(), sched, traj.latents, traj.timesteps, traj.log_probs,
            torch.tensor([1.0, -1.0, 0.5, -0.5]), embeds, neg, 5.0, keep, 3, cfg, epoch=0, rank=0)
    assert set(spy.seen) == set(traj.timesteps[keep].tolist())
