"""HPSv2 as a reward (image_rlhf/hps_reward.py): a random tiny open_clip model saved in HPSv2's checkpoint
format, loaded by `hpsv2:FILE,CLIP`, checked against HPSv2's own computation (open_clip's PIL preprocess,
model(image, text) with output_dict, the diagonal of image_features @ text_features.T)."""
import pytest
import torch

from image_rlhf.clip_reward import ClipReward
from image_rlhf.rewards import load_reward

PROMPTS = ["a red circle", "a blue square", "a red circle", "a green triangle"]


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    """A random tiny-clip's whole state dict under "state_dict", as xswu/HPSv2's files hold it."""
    torch.manual_seed(0)
    model = ClipReward.create("tiny-clip").model
    f = tmp_path_factory.mktemp("hps") / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, f)
    return f


def _reference(ckpt, prompts, images_u8):
    """HPSv2's `score`: create_model_and_transforms, load_state_dict(checkpoint['state_dict']), preprocess_val
    on PIL images, model(image, text) → diagonal of image_features @ text_features.T."""
    import open_clip
    from PIL import Image
    model, _, preprocess_val = open_clip.create_model_and_transforms("tiny-clip", output_dict=True)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["state_dict"])
    model.eval()
    image = torch.stack([preprocess_val(Image.fromarray(a)) for a in images_u8])
    text = open_clip.get_tokenizer("tiny-clip")(prompts)
    with torch.no_grad():
        out = model(image, text)
    return (out["image_features"] @ out["text_features"].T).diagonal().double()


def _images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return u8.float() / 255, u8.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("fmt", ["pt", "module-prefixed", "safetensors"])
def test_hpsv2_matches_its_own_score_at_model_size(hps_ckpt, tmp_path, fmt):
    """32 × 32 images (tiny-clip's input size): HPSv2's computation exactly, whichever way the state dict is stored."""
    ckpt = hps_ckpt
    state = torch.load(hps_ckpt)["state_dict"]
    if fmt == "module-prefixed":  # saved from a DDP-wrapped model, without the "state_dict" wrapper
        ckpt = tmp_path / "ddp.pth"
        torch.save({f"module.{k}": v for k, v in state.items()}, ckpt)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        ckpt = tmp_path / "hps.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    x, u8 = _images(4, 32, 32)
    reward = load_reward(f"hpsv2:{ckpt},tiny-clip")
    got = reward(PROMPTS, x).double()
    ref = _reference(hps_ckpt, PROMPTS, u8)
    assert got.shape == (4,) and ref.abs().max() <= 1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[2])  # the same prompt, another image
    # a float image is quantised to 8 bits first, as HPSv2 saw PIL images
    torch.testing.assert_close(reward(PROMPTS, x + 0.4 / 255), got.float(), atol=1e-6, rtol=0)


def test_hpsv2_with_resize_close_to_pil(hps_ckpt):
    """64 × 64 images: resized on the tensor (bicubic, antialiased) vs PIL's bicubic in open_clip's transform.
    The interpolation differs in detail; the scores agree to 1% of their spread (measured: 0.15%)."""
    x, u8 = _images(4, 64, 64, seed=1)
    got = load_reward(f"hpsv2:{hps_ckpt},tiny-clip")(PROMPTS, x).double()
    ref = _reference(hps_ckpt, PROMPTS, u8)
    assert (got - ref).abs().max() < 0.01 * (ref.max() - ref.min()), (got, ref)


def test_bad_hps_specs_name_the_problem(hps_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = torch.load(hps_ckpt)["state_dict"]
    partial = tmp_path / "partial.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("visual.")}}, partial)
    with pytest.raises(ValueError, match=r"partial.pt: not an open_clip tiny-clip state dict"):
        load_reward(f"hpsv2:{partial},tiny-clip")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage.pt: not a readable state dict"):
        load_reward(f"hpsv2:{garbage},tiny-clip")
    odd = tmp_path / "odd.pt"
    torch.save({"state_dict": {"a": 1}}, odd)
    with pytest.raises(ValueError, match=r"odd.pt: expected a state dict of tensors"):
        load_reward(f"hpsv2:{odd},tiny-clip")
    with pytest.raises(ValueError, match=r"neither a file nor REPO_ID/FILENAME"):
        load_reward("hpsv2:nofile.pt,tiny-clip")
    with pytest.raises(ValueError, match=r"expected hpsv2, hpsv2.1 or hpsv2:CHECKPOINT"):
        load_reward(f"hpsv2.1:{hps_ckpt}")
    # the hub defaults, offline: one clear error naming the file and the repo
    for spec, name in (("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")):
        with pytest.raises(ValueError, match=rf"cannot load HPSv2 checkpoint '{name}' from 'xswu/HPSv2'"):
            load_reward(spec)
    with pytest.raises(ValueError, match=r"got 2 prompts for 3 images"):
        load_reward(f"hpsv2:{hps_ckpt},tiny-clip")(["a", "b"], torch.rand(3, 3, 32, 32))


def test_compare_takes_hpsv2_as_judge(hps_ckpt):
    """`align compare --judge hpsv2:...` is the published reward, not a module:function spec."""
    from align.compare import CompareConfig
    from image_rlhf.compare import load_judge
    judge = load_judge(f"hpsv2:{hps_ckpt},tiny-clip", CompareConfig(), "cpu")
    assert judge(["a red circle"], torch.rand(1, 3, 64, 64)).shape == (1,)
