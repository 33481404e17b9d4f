"""DDPO's numerics on the tiny random Stable Diffusion pipeline: a compiled UNet against eager, bf16 sampling
against the update's recomputation, `recompute_log_probs` against a sampler with other numerics, and the update's
gradient against ddpo-pytorch's accumulation."""
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_ddpo import PROMPTS, _cfg, _metrics  # noqa: E402

from align.rl.config import LoraParams  # noqa: E402
from image_rlhf.ddpo import run_ddpo  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_path):
    """conftest's tiny SD pipeline (latents (4, 16, 16), as test_ddpo's)."""
    return Path(tiny_sd_path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_compiled_unet_matches_eager(tiny_sd, prompts_file, tmp_path):
    """compile_unet=True (torch.compile, in place) samples the same trajectories and takes the same LoRA step as
    eager, and its LoRA saves and checkpoints like eager's (state_dict names unchanged by compile). The aot_eager
    backend: dynamo's capture of the peft-wrapped diffusers UNet and AOTAutograd's backward, as inductor gets them,
    without inductor's kernel generation (4.7 min for this test on 2 CPU cores, ~20 s with aot_eager; inductor's
    speed is measured in scripts/bench_gpu.py). The grid (1 prompt: 2 UNet rows, a shape sampling never uses) runs
    eager: on an SD-1.5 UNet its graph would be one more ~90 s compile."""
    from safetensors.torch import load_file
    from torch._dynamo import register_backend
    from torch._dynamo.backends.debugging import aot_eager

    graph_inputs = []

    @register_backend(name="align_test_aot_eager")
    def recording_aot_eager(gm, example_inputs, **kw):  # aot_eager that notes each graph's input shapes
        graph_inputs.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return aot_eager(gm, example_inputs, **kw)

    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        run_ddpo(_cfg(tiny_sd, prompts_file, out, lora=LoraParams(r=4, alpha=4.0), grid_prompts=PROMPTS[:1],
                      grid_seeds=[0], grid_every=1, compile_unet=compiled, compile_backend="align_test_aot_eager"))
        assert ("UNet compiled (align_test_aot_eager" in (out / "report.md").read_text()) == compiled
        runs[compiled] = (_metrics(out)[-1], load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")),
                          load_file(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors")))
    (m0, lora0, ck0), (m1, lora1, ck1) = runs[False], runs[True]
    for key in ("reward/mean", "reward/std", "policy/approx_kl", "policy/clipfrac", "grid/reward"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-7), key
    assert lora1.keys() == lora0.keys() and ck1.keys() == ck0.keys() and len(lora0) > 0
    for k in lora0:  # one Adam step of lr 1e-3 from the same start: equal to float32 rounding of the gradient
        assert torch.allclose(lora1[k], lora0[k], atol=2e-5), k
    batches = {s[0] for shapes in graph_inputs for s in shapes if len(s) == 4 and s[1:] == (4, 16, 16)}
    assert 8 in batches and 16 in batches, batches  # sampling: 4 images × CFG; training: 4 × 2 timesteps × CFG
    assert 2 not in batches, batches  # the grid's 1 prompt × CFG was never compiled
    with pytest.raises(ValueError, match="'nope' is not a torch.compile backend"):
        run_ddpo(_cfg(tiny_sd, prompts_file, tmp_path / "bad", compile_unet=True, compile_backend="nope"))
    assert not (tmp_path / "bad").exists()


def test_compile_checks_fail_fast_without_a_compiler_or_triton(monkeypatch):
    """inductor needs a C++ compiler on the CPU and triton on a GPU: said before the run starts."""
    import shutil

    import torch.utils._triton
    from image_rlhf.pipeline import check_compile
    check_compile("aot_eager")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="needs a working triton"):
        check_compile("inductor")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        check_compile("inductor")


def test_bf16_sampling_records_the_log_probs_training_recomputes(tiny_sd, prompts_file, tmp_path):
    """Mixed precision: the first optimiser step's ratios are exactly 1 (nothing clipped at DDPO's 1e-4), with
    sampling (16 UNet rows) and training (4 rows) batched differently. Before session 9 the sampler ran the
    DDIM step in the bf16 UNet's dtype while accelerate's prepared model hands training a float32 ε, and the CPU
    sampled in channels_last: approx_kl 2e-4 and a third of the ratios clipped before any update."""
    out = tmp_path / "run"
    run_ddpo(_cfg(tiny_sd, prompts_file, out, lora=LoraParams(r=4, alpha=4.0), mixed_precision="bf16",
                  grid_seeds=[], sample_batch_size=8, train_batch_size=2, gradient_accumulation_steps=4,
                  timesteps_per_forward=1))
    (row,) = [r for r in _metrics(out) if "policy/clipfrac" in r]
    assert row["policy/clipfrac"] == 0.0 and abs(row["policy/approx_kl"]) < 1e-9 and row["policy/ratio"] == 1.0, row
    # a bf16 pipeline without autocast (`align compare --dtype bf16`): x_t reaches the UNet in its weights' dtype
    from align.compare import ImageGenParams
    from image_rlhf.compare import ImageGenerator
    images = ImageGenerator(str(tiny_sd), ImageGenParams(num_steps=2), "cpu", torch.bfloat16)(PROMPTS[:2], 0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_recompute_log_probs_replaces_a_sampler_with_other_numerics(tiny_sd, prompts_file, tmp_path, monkeypatch):
    """recompute_log_probs: log π_old comes from the update's own UNet calls. A sampler whose recorded log-probs are
    off by 1e-3 (as a GPU's bf16 kernels round sampling's batch shapes differently from training's, by less)
    puts every ratio of the first step outside DDPO's clip range 1e-4; recomputed, the step is the one of an
    exact sampler (to float32 rounding), and the logged mean |difference| is the offset."""
    import image_rlhf.ddpo
    from safetensors.torch import load_file
    exact = image_rlhf.ddpo.sample_trajectories

    def off_sampler(*args, **kw):
        traj = exact(*args, **kw)
        traj.log_probs = traj.log_probs + 1e-3
        return traj

    runs = {}
    for name, sampler, recompute, compiled in (("exact", exact, False, False), ("off", off_sampler, False, False),
                                               ("recomputed", off_sampler, True, False),
                                               ("recomputed-compiled", off_sampler, True, True)):
        monkeypatch.setattr(image_rlhf.ddpo, "sample_trajectories", sampler)
        out = tmp_path / name
        run_ddpo(_cfg(tiny_sd, prompts_file, out, lora=LoraParams(r=4, alpha=4.0), grid_seeds=[],
                      recompute_log_probs=recompute, compile_unet=compiled, compile_backend="aot_eager"))
        (row,) = [r for r in _metrics(out) if "policy/clipfrac" in r]
        runs[name] = row, load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
        assert ("log π_old recomputed" in (out / "report.md").read_text()) == recompute
    (exact_row, exact_lora), (off_row, off_lora), (rec_row, rec_lora) = runs["exact"], runs["off"], runs["recomputed"]
    comp_row = runs["recomputed-compiled"][0]  # the recompute runs the compiled training graph
    assert comp_row["policy/clipfrac"] == 0.0 and comp_row["policy/ratio"] == 1.0, comp_row
    # float32, but sampling's and training's UNet calls differ in batch shape: on an AVX-512 CPU ~1e-7 apart
    assert exact_row["policy/clipfrac"] == 0.0 and exact_row["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    # every ratio e^−1e-3, outside 1 ± 1e-4: the clipped branch wins (no gradient) for the negative advantages
    assert off_row["policy/ratio"] == pytest.approx(math.exp(-1e-3), rel=1e-6) and off_row["policy/clipfrac"] > 0
    assert rec_row["policy/clipfrac"] == 0.0 and rec_row["policy/ratio"] == 1.0 and rec_row["policy/approx_kl"] == 0.0
    assert rec_row["policy/logp_recompute_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert "policy/logp_recompute_diff" not in exact_row
    gap = lambda lora: max((lora[k] - exact_lora[k]).abs().max().item() for k in exact_lora)  # noqa: E731
    assert gap(rec_lora) < 1e-6 < 1e-4 < gap(off_lora), (gap(rec_lora), gap(off_lora))  # Adam's first step: ±lr


def test_cpu_attention_product_runs_in_float32_under_bf16_autocast(tiny_sd):
    """CpuSdpaProcessor (the CPU's attention processor): under bf16 autocast at head dims < 32, softmax(QKᵀ)V is
    computed in float32 from autocast's bf16 q/k/v (torch's CPU flash-attention backward is slow in bf16 there),
    exactly as written out here; at head dim 32, or in float32, it is diffusers' AttnProcessor2_0, bit for bit."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from image_rlhf.pipeline import CpuSdpaProcessor, load_pipeline
    torch.manual_seed(0)
    x, enc = torch.randn(3, 64, 16), torch.randn(3, 7, 12)
    for attn, src in ((Attention(query_dim=16, heads=2, dim_head=8), x),
                      (Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8), enc)):
        cross = src is enc or None
        attn.set_processor(CpuSdpaProcessor())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(x, cross and enc)
            heads = lambda t: t.view(3, -1, 2, 8).transpose(1, 2)  # noqa: E731
            q, k, v = attn.to_q(x), attn.to_k(src), attn.to_v(src)
            with torch.autocast("cpu", enabled=False):
                product = F.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float())
            want = attn.to_out[0](product.to(torch.bfloat16).transpose(1, 2).reshape(3, -1, 16))
            attn.set_processor(AttnProcessor2_0())
            bf16_product = attn(x, cross and enc)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        assert not torch.equal(got, bf16_product)  # the product in bf16 rounds otherwise
        fp32 = attn(x, cross and enc)
        attn.set_processor(CpuSdpaProcessor())
        assert torch.equal(attn(x, cross and enc), fp32)
    wide = Attention(query_dim=64, heads=2, dim_head=32)  # head dim 32: bf16's own kernel is as fast
    x = torch.randn(3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = wide(x)
        wide.set_processor(CpuSdpaProcessor())
        assert torch.equal(wide(x), plain)
    procs = {type(p) for p in load_pipeline(tiny_sd).unet.attn_processors.values()}
    assert procs == {CpuSdpaProcessor}


def test_recompute_covers_every_inner_epochs_steps(tiny_sd, prompts_file, tmp_path, monkeypatch):
    """timestep_fraction < 1 trains other steps in each inner epoch; the recompute ran over the first inner epoch's
    calls only, so the second trained half its (sample, step)s against the sampler's record: at lr 0 a sampler off
    by 1e-3 left ratios e^−1e-3 and clipped ones. Now every trained entry is recomputed before any step."""
    import image_rlhf.ddpo
    exact = image_rlhf.ddpo.sample_trajectories

    def off_sampler(*args, **kw):
        traj = exact(*args, **kw)
        traj.log_probs = traj.log_probs + 1e-3
        return traj

    monkeypatch.setattr(image_rlhf.ddpo, "sample_trajectories", off_sampler)
    out = tmp_path / "run"
    run_ddpo(_cfg(tiny_sd, prompts_file, out, num_steps=4, lr=0.0, grid_seeds=[], recompute_log_probs=True,
                  inner_epochs=2, timestep_fraction=0.5))
    (row,) = [r for r in _metrics(out) if "policy/clipfrac" in r]
    assert row["policy/ratio"] == 1.0 and row["policy/clipfrac"] == 0.0, row
    assert row["policy/logp_recompute_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_update_gradient_equals_ddpo_pytorchs_accumulation(tiny_sd):
    """One optimiser step of `ddpo_update` is ddpo-pytorch's / TRL's: accelerate accumulates num_train_timesteps ×
    gradient_accumulation_steps per-step losses (each the batch mean of the clipped surrogate on that step's ratio
    π_θ/π_old, CFG as sampled), i.e. their mean over every trained (sample, step). Here against that mean written
    out (2 train batches × 2 accumulation steps, 3 DDIM steps in calls of 2, some ratios clipped; audit against
    TRL 0.23.1 itself, float64: equal to 1e-14). With a timestep_fraction below 1 each sample trains its own
    random steps, as ddpo-pytorch's per-sample permutation does."""
    from image_rlhf.ddpo import DDPOConfig
    from image_rlhf.ddpo_update import _update_calls, ddpo_update
    from image_rlhf.pipeline import encode_prompts, load_pipeline, negative_embeds
    from image_rlhf.sampling import sample_trajectories, step_log_prob
    from test_ddpo import _Acc, _RecordingOptimizer
    parts = load_pipeline(tiny_sd)
    unet, sched = parts.unet.double().requires_grad_(True), parts.scheduler          # float64: only the update's
    embeds, neg = encode_prompts(parts, PROMPTS).double(), negative_embeds(parts).double()  # float32 log π differ
    traj = sample_trajectories(unet, sched, embeds, neg, 3, 5.0, 1.0, generator=torch.Generator().manual_seed(0))
    old = traj.log_probs + 1e-4 * torch.randn(traj.log_probs.shape, generator=torch.Generator().manual_seed(1))
    adv, eps = torch.tensor([1.0, -0.5, 2.0, -1.5]), 1e-4
    cfg = DDPOConfig(train_batch_size=1, gradient_accumulation_steps=4, timesteps_per_forward=2, clip_range=eps,
                     max_grad_norm=0.0)
    opt = _RecordingOptimizer(unet.parameters())
    stats = ddpo_update(unet, unet, None, opt, _Acc(), sched, traj.latents, traj.timesteps, old, adv, embeds, neg,
                        5.0, torch.arange(3), 3, cfg, epoch=0, rank=0)
    assert len(opt.grads) == 1 and 0 < stats["policy/clipfrac"] < 1
    opt.zero_grad()
    for s, t in enumerate(traj.timesteps):  # the mean over the 4 × 3 (sample, step) losses, written out
        ratio = (step_log_prob(unet, sched, traj.latents[:, s], t, traj.latents[:, s + 1], embeds, neg, 5.0).float()
                 - old[:, s]).exp()                                                          # (4,)
        (torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean() / 3).backward()
    for mine, ref in zip(opt.grads[0], (p.grad for p in unet.parameters()), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-12)
    cfg = DDPOConfig(train_batch_size=8, timesteps_per_forward=1)
    calls = list(_update_calls(64, torch.arange(5), 2, cfg, torch.Generator().manual_seed(0), "cpu"))
    trained = [set() for _ in range(64)]
    for _, _, idx_m, s, _, _ in calls:
        for i, step in zip(idx_m.tolist(), s.tolist()):
            trained[i].add(step)
    assert all(len(steps) == 2 for steps in trained) and len({frozenset(x) for x in trained}) > 1
