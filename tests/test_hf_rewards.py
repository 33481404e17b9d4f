"""Published rewards on transformers' CLIP (image_rlhf/hf_rewards.py): PickScore and the LAION aesthetic
predictor, built tiny and random, saved with save_pretrained, loaded by path; checked against the
reference computation of their model cards (CLIPProcessor on PIL images, then the model)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from image_rlhf.hf_rewards import LaionAestheticMLP
from image_rlhf.rewards import load_reward
from image_rlhf.tiny import build_clip_tokenizer

PROMPTS = ["a red circle", "a blue square", "a red circle", "a green triangle"]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A random transformers CLIPModel + CLIPProcessor (shortest edge 30, crop 24), saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    d = tmp_path_factory.mktemp("hf_clip")
    tok = build_clip_tokenizer(d / "tok")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=6),
        projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 30},
                                                            crop_size={"height": 24, "width": 24}), tokenizer=tok)
    model.save_pretrained(d / "clip")
    proc.save_pretrained(d / "clip")
    return d / "clip"


def _reference_pickscore(folder, prompts, images_u8):
    """PickScore's model card: processor(images) / processor(text), get features, s·cos (per pair)."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    pil = [Image.fromarray(a) for a in images_u8]
    with torch.no_grad():
        inputs = proc(text=prompts, images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
        logits = model(**inputs).logits_per_image  # (B images, B texts) = s · cos
    return logits.diagonal().double()


def _images(n, h, w, seed=0):
    """Smooth random images, 8-bit: (float (n, 3, h, w) in [0, 1], uint8 (n, h, w, 3))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.float() / 255, u8.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("prefix", ["", "pickscore:"])
def test_pickscore_matches_model_card_at_crop_size(hf_clip, prefix):
    """An 8-bit image already at the processor's resize/crop size: the batched path is the processor exactly.
    (shortest edge 30 → resize is a no-op at 30×30, then crop 24.) The folder and `pickscore:FOLDER` agree."""
    x, u8 = _images(4, 30, 30)
    reward = load_reward(f"{prefix}{hf_clip}")
    got = reward(PROMPTS, x).double()
    ref = _reference_pickscore(hf_clip, PROMPTS, u8)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the same prompt gives the same text embedding: a repeated prompt is scored against its own image only
    assert not torch.allclose(got[0], got[2])
    # a prompt longer than the text tower's 77 positions is truncated, as the model card's processor call does
    long = ["a red circle " * 40] * 4
    torch.testing.assert_close(reward(long, x).double(), _reference_pickscore(hf_clip, long, u8), atol=1e-4, rtol=1e-4)


def test_pickscore_with_resize_close_to_pil(hf_clip):
    """64×48 images: resized on the tensor (bicubic, antialiased) vs PIL's bicubic in the processor.
    The interpolation differs in detail; the scores agree to 1% of their spread (measured: 0.1%)."""
    x, u8 = _images(4, 64, 48, seed=1)
    got = load_reward(str(hf_clip))(PROMPTS, x).double()
    ref = _reference_pickscore(hf_clip, PROMPTS, u8)
    assert (got - ref).abs().max() < 0.01 * (ref.max() - ref.min()), (got, ref)


def test_processor_that_resizes_to_an_exact_size(hf_clip, tmp_path):
    """A processor with size {height, width} and no centre crop resizes straight to that size (no aspect kept)."""
    import shutil

    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor
    folder = tmp_path / "exact"
    shutil.copytree(hf_clip, folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"height": 24, "width": 24}, do_center_crop=False),
                  tokenizer=AutoTokenizer.from_pretrained(hf_clip)).save_pretrained(folder)
    reward = load_reward(str(folder))
    assert reward.exact and reward.crop == (24, 24)
    x, u8 = _images(4, 40, 32, seed=4)
    got, ref = reward(PROMPTS, x).double(), _reference_pickscore(folder, PROMPTS, u8)
    assert (got - ref).abs().max() < 0.01 * (ref.max() - ref.min()), (got, ref)


def _laion_mlp_state(dim, seed=0):
    """LAION's MLP written out independently (as in TRL's DDPO example), random weights, its state dict."""
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                           nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return {f"layers.{k}": v for k, v in layers.state_dict().items()}, layers.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_trl_scorer(hf_clip, tmp_path, fmt):
    """aesthetic:CLIP,MLP = TRL's AestheticScorer: processor → image features → L2-normalise → LAION MLP."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    state, layers = _laion_mlp_state(16)
    f = tmp_path / f"aesthetic.{fmt}"
    if fmt == "pth":
        torch.save(state, f)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    x, u8 = _images(3, 30, 30, seed=2)
    got = load_reward(f"aesthetic:{hf_clip},{f}")(["ignored"] * 3, x).double()
    model, proc = CLIPModel.from_pretrained(hf_clip).eval(), CLIPProcessor.from_pretrained(hf_clip)
    with torch.no_grad():
        pix = proc(images=[Image.fromarray(a) for a in u8], return_tensors="pt")["pixel_values"]
        emb = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        ref = layers(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert isinstance(LaionAestheticMLP(16).layers[7], nn.Linear)


def test_bad_specs_name_the_problem(hf_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wrong = tmp_path / "wrong.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"not a LAION aesthetic MLP on 16-d"):
        load_reward(f"aesthetic:{hf_clip},{wrong}")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage.pth: not a readable state dict"):
        load_reward(f"aesthetic:{hf_clip},{garbage}")
    with pytest.raises(ValueError, match=r"expected aesthetic:CLIP,MLP"):
        load_reward(f"aesthetic:{hf_clip}")
    with pytest.raises(ValueError, match=r"neither a file nor REPO_ID/FILENAME"):
        load_reward(f"aesthetic:{hf_clip},nofile.pth")
    not_clip = tmp_path / "notclip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"no transformers CLIP config.json"):
        load_reward(f"pickscore:{not_clip}")
    with pytest.raises(ValueError, match=r"ClipReward.save"):  # a folder that is neither kind
        load_reward(str(not_clip))
    # the hub defaults, offline: one clear error naming what could not be loaded
    with pytest.raises(ValueError, match=r"cannot load CLIPModel 'yuvalkirstain/PickScore_v1'"):
        load_reward("pickscore")
    with pytest.raises(ValueError, match=r"cannot load CLIPModel 'openai/clip-vit-large-patch14'"):
        load_reward("aesthetic")
    with pytest.raises(ValueError, match=r"got 2 prompts for 3 images"):
        load_reward(str(hf_clip))(["a", "b"], torch.rand(3, 3, 24, 24))


def test_ddpo_and_compare_take_a_published_reward(tiny_sd_path, hf_clip, tmp_path):
    """The spec works wherever a reward is named: one DDPO epoch against PickScore (tiny), and compare's judge."""
    from align.compare import CompareConfig
    from align.rl.config import LoraParams
    from image_rlhf.compare import load_judge
    from image_rlhf.ddpo import DDPOConfig, run_ddpo
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "ddpo"
    run_ddpo(DDPOConfig(pipeline=tiny_sd_path, reward=f"pickscore:{hf_clip}", prompts=str(prompts), out=str(out),
                        epochs=1, sample_batch_size=2, num_batches_per_epoch=1, train_batch_size=2, num_steps=3,
                        lora=LoraParams(r=0), grid_seeds=[0], save_every=10, buffer_size=0))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "reward/mean" in x]
    assert len(rows) == 1 and np.isfinite(rows[0]["reward/mean"])
    for spec in (str(hf_clip), f"pickscore:{hf_clip}"):  # not taken for a module:function judge
        judge = load_judge(spec, CompareConfig(), "cpu")
        assert judge(["a red circle"], torch.rand(1, 3, 64, 64)).shape == (1,)
