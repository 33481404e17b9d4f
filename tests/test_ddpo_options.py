"""DDPO settings: configs that cannot work are refused before a run folder exists, --resume takes this config's
lr and names a LoRA of another rank, a mixed-precision full fine-tune saves a pipeline diffusers can run, and a LoRA on
convolutions too loads whole."""
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
    (dict(max_grad_norm=-1.0), "max_grad_norm must be >= 0"),                # clip_grad_norm_ flipped the gradient
    (dict(clip_range=-1e-4), "clip_range must be > 0"),                      # an inverted clip
    (dict(attention="flash"), "attention must be 'sdpa' or 'xformers'"),      # was refused after the run folder
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


def test_resume_with_another_lora_rank_names_the_mismatch(tiny_sd_path, prompts_file, tmp_path):
    """A LoRA run resumed with another lora.r: the names match, the shapes do not; that was torch's bare
    "The size of tensor a (8) must match the size of tensor b (4)" from inside copy_."""
    out = tmp_path / "run"
    run_ddpo(_cfg(tiny_sd_path, prompts_file, out, lora=LoraParams(r=4, alpha=4.0), grid_seeds=[]))
    other = _cfg(tiny_sd_path, prompts_file, out, lora=LoraParams(r=8, alpha=4.0), epochs=2, grid_seeds=[])
    with pytest.raises(ValueError, match=r"--resume: lora.r: 4 -> 8 would build another model"):  # from config.yaml
        run_ddpo(other, resume=True)
    (out / "config.yaml").unlink()  # no record to compare with: the checkpoint's shapes still say it
    with pytest.raises(ValueError, match=r"checkpoint does not match the model .*\(4, 16\) vs \(8, 16\).*LoRA"):
        run_ddpo(other, resume=True)


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


def _edit_json(path, **changes):
    import json
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit, match", [
    # StableDiffusionInpaintPipeline (in_channels 9; instruct-pix2pix 8, depth 5, x4 upscaler 7): crashed mid-run
    # on "The size of tensor a (9) must match the size of tensor b (4)"
    (lambda d: _edit_json(d / "unet" / "config.json", in_channels=9), r"unet/config.json has in_channels 9 but "),
    # SDXL: was "the text encoder's hidden_size is 32 but the UNet's cross_attention_dim is ..." after the run
    # folder was made, or a missing added_cond_kwargs mid-run
    (lambda d: _edit_json(d / "model_index.json", _class_name="StableDiffusionXLPipeline",
                          text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
     r"\(StableDiffusionXLPipeline\): model_index.json lists text_encoder_2"),
    (lambda d: _edit_json(d / "unet" / "config.json", addition_embed_type="text_time"),
     "unet/config.json has addition_embed_type='text_time'"),
    # DeepFloyd IF-style: a T5 folder was read as a CLIPTextModel with random weights (transformers only warns)
    (lambda d: _edit_json(d / "model_index.json", text_encoder=["transformers", "T5EncoderModel"]),
     "model_index.json says its text_encoder is a T5EncoderModel"),
])
def test_pipelines_that_are_not_text_to_image_sd_are_refused_naming_the_file(tiny_sd_path, prompts_file, tmp_path,
                                                                               edit, match):
    import shutil

    from image_rlhf.pipeline import PipelineLoadError
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd_path, folder)
    edit(folder)
    with pytest.raises(PipelineLoadError, match=match):
        run_ddpo(_cfg(folder, prompts_file, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_full_fine_tune_of_an_sd15_layout_keeps_its_safety_checker_and_samples_as_align(tiny_sd_path, prompts_file,
                                                                                      tmp_path):
    """SD 1.x ships safety_checker/ and feature_extractor/: out/pipeline was saved without them (requires_safety_checker
    false), silently dropping the NSFW filter. Also: diffusers' pipeline on the saved folder draws the same images
    as align's sampler with the trained UNet (same DDIM scheduler, η = 1, CFG, generator)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from image_rlhf.pipeline import encode_prompts, load_pipeline, negative_embeds
    from image_rlhf.sampling import decode_latents, sample_trajectories
    tiny = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, vision_config=dict(
        tiny, image_size=32, patch_size=4), projection_dim=32))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=checker,
                                                   feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    base.save_pretrained(tmp_path / "sd15")
    out = tmp_path / "run"
    result = run_ddpo(_cfg(tmp_path / "sd15", prompts_file, out, lr=1e-2, grid_seeds=[]))
    pipe = StableDiffusionPipeline.from_pretrained(result.model_dir)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.feature_extractor is not None
    assert not torch.equal(pipe.unet.conv_out.weight, base.unet.conv_out.weight)
    pipe.safety_checker = None  # random: it may black out an image
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    parts = load_pipeline(result.model_dir)
    traj = sample_trajectories(result.unet.eval(), parts.scheduler, encode_prompts(parts, PROMPTS[:2]),
                               negative_embeds(parts), 3, 5.0, 1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(decode_latents(parts.vae, traj.final_latents), theirs, rtol=0, atol=1e-6)


def test_lora_on_convolutions_too_loads_whole_in_diffusers_and_compare(tiny_sd_path, prompts_file, tmp_path):
    """LoRA on the ResNet convolutions as well as attention: diffusers' key map knows the attention projections
    only, and a file mixing its keys with PEFT's loaded with the attention adapters silently dropped. Both
    loaders (diffusers' pipeline and `align compare`'s generator) must give the trained UNet's output."""
    from align.compare import ImageGenParams
    from image_rlhf.compare import ImageGenerator
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    result = run_ddpo(_cfg(tiny_sd_path, prompts_file, tmp_path / "run", lr=3e-2, epochs=2,
                           lora=LoraParams(r=4, alpha=8.0, target_modules=targets)))
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([500, 500])
    with torch.no_grad():
        trained = result.unet.eval()(x, t, c).sample
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        pipe.load_lora_weights(result.model_dir)
        generator = ImageGenerator(str(tmp_path / "run"), ImageGenParams(num_steps=3))
        for unet in (pipe.unet, generator.parts.unet):
            assert sum("lora_B" in n for n, _ in unet.named_parameters()) == sum(
                "lora_B" in n for n, _ in result.unet.named_parameters())
            torch.testing.assert_close(unet(x, t, c).sample, trained, atol=1e-6, rtol=1e-5)


def test_a_lora_run_of_a_relative_pipeline_path_compares_from_another_folder(tiny_sd_path, prompts_file, tmp_path,
                                                                            monkeypatch):
    """config.yaml kept `--pipeline` as typed: `align compare --model aligned=RUN` (which reads the LoRA's base from
    it) run from any other folder failed with "sd15: no such folder". The local base is recorded absolute."""
    import shutil

    from align.compare import ImageGenParams
    from image_rlhf.compare import ImageGenerator, resolve_model
    shutil.copytree(tiny_sd_path, tmp_path / "work" / "sd15")
    monkeypatch.chdir(tmp_path / "work")
    run_ddpo(_cfg("sd15", prompts_file, "run", lora=LoraParams(r=2, alpha=2.0), grid_seeds=[]))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("work/run") == (str(tmp_path / "work" / "sd15"), "work/run/lora")
    assert ImageGenerator("work/run", ImageGenParams(num_steps=2))(["a cat"], 0).shape == (1, 3, 32, 32)


def test_a_broken_tokenizer_or_weights_file_names_the_component(tiny_sd_path, tmp_path, caplog):
    """A truncated weights file raised safetensors' bare "Error while deserializing header" (no component named); an
    empty tokenizer/ loaded (transformers 5: two special tokens) and one without tokenizer_config.json got
    model_max_length 1e30: both ended in a traceback inside the tokenizer at the first prompt. A single-file
    checkpoint (.safetensors) is pointed to diffusers' converter."""
    import logging
    import shutil
    from pathlib import Path

    from image_rlhf.pipeline import PipelineLoadError, encode_prompts, load_pipeline
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd_path, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineLoadError, match="cannot load 'text_encoder' of the pipeline folder: .*header"):
        load_pipeline(folder)
    with pytest.raises(PipelineLoadError, match=r"not a folder .*from_single_file\(FILE\)"):  # a single-file checkpoint
        load_pipeline(weights)
    shutil.copy(Path(tiny_sd_path) / "text_encoder" / "model.safetensors", weights)
    (folder / "tokenizer" / "tokenizer_config.json").unlink()
    with caplog.at_level(logging.INFO, logger="image_rlhf.pipeline"):
        parts = load_pipeline(folder)
    assert parts.tokenizer.model_max_length == 77 and "max_position_embeddings" in caplog.text
    assert encode_prompts(parts, ["a cat"]).shape == (1, 77, 32)
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(PipelineLoadError, match="cannot load 'tokenizer' .*no vocabulary"):
        load_pipeline(folder)
