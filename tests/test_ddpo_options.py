"""DDPO settings: configs that cannot work are refused before a run folder exists, --resume takes this config's
lr, and a mixed-precision full fine-tune saves a pipeline diffusers can run."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline  # noqa: E402
from test_ddpo import PROMPTS, _cfg  # noqa: E402

from align.rl.config import LoraParams  # noqa: E402
from image_rlhf.ddpo import run_ddpo  # noqa: E402


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.mark.parametrize("kw, match", [
    (dict(eta=1.5), "eta must be <= 1"),                                     # σ_t² > 1 − ᾱ_(t−1): NaN latents
    (dict(lora=LoraParams(r=4, alpha=4.0, dropout=0.1)), "lora.dropout must be 0"),  # ratios != 1 at lr 0
    (dict(lora=LoraParams(r=-1)), "lora.r must be"),                         # was silently full fine-tuning
    (dict(guidance_scale=0.5), "guidance_scale must be >= 1"),               # was silently guidance 1
    (dict(buffer_size=4, min_count=8), "min_count 8 > buffer_size 4"),       # per-prompt stats never used
    (dict(adv_clip=0.0), "adv_clip must be > 0"),                            # every advantage clipped to 0
])
def test_configs_that_cannot_work_are_refused_up_front(tiny_sd_path, prompts_file, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_ddpo(_cfg(tiny_sd_path, prompts_file, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad").exists()


def test_resume_uses_the_configs_lr_not_the_checkpoints(tiny_sd_path, prompts_file, tmp_path):
    """torch's optimizer.load_state_dict restores the checkpoint's lr: a run resumed with lr=0 (config.yaml says 0)
    went on training at the old lr. Resumed at lr 0 the weights stay those of the checkpoint, bit for bit."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    run_ddpo(_cfg(tiny_sd_path, prompts_file, out, lr=1e-2, grid_seeds=[]))
    saved = load_file(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    result = run_ddpo(_cfg(tiny_sd_path, prompts_file, out, lr=0.0, epochs=2, grid_seeds=[]), resume=True)
    now = dict(result.unet.named_parameters())
    assert all(torch.equal(now[k].detach().cpu(), v) for k, v in saved.items())


def test_full_fine_tuning_in_bf16_saves_float32_frozen_parts(tiny_sd_path, prompts_file, tmp_path):
    """The VAE and text encoder run in bf16 under mixed precision; out/pipeline got those bf16 copies, which
    diffusers' StableDiffusionPipeline then could not run ("mat1 and mat2 must have the same dtype")."""
    out = tmp_path / "run"
    run_ddpo(_cfg(tiny_sd_path, prompts_file, out, mixed_precision="bf16", lr=0.0, grid_seeds=[]))
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    assert {p.dtype for m in (pipe.vae, pipe.text_encoder, pipe.unet) for p in m.parameters()} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    run = lambda p: p("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),  # noqa: E731
                      output_type="pt").images
    assert torch.equal(run(pipe), run(base))  # lr 0: the saved pipeline is the base one
