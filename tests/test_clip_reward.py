"""CLIP reward (open_clip, built offline from a tiny config), image rewards and the image RM trainer."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from align.data import DataError, PreferenceGroup, Pair, batch_groups
from align.reward import evaluate_pairs

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9)}
NOUNS = ["cat", "house", "car", "tree", "boat", "bird", "cup", "chair", "lamp", "shoe"]


def _png(folder, name, rgb, rng, size=(32, 32), noise=0.08):
    h, w = size
    x = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, noise, (h, w, 3)), 0, 1)
    Image.fromarray((x * 255).astype(np.uint8), "RGB").save(folder / name)
    return name


def _mix(a, b, t=0.5):
    return tuple(t * x + (1 - t) * y for x, y in zip(COLOURS[a], COLOURS[b]))


def make_colour_prefs(folder, nouns, seed, tie=True):
    """prefs.jsonl: "a <colour> image of a <noun>"; the image of that colour wins. Half the records
    are K=3 rankings (pure > half-blend > other colour), half chosen/rejected pairs, plus a tie
    between two wrong colours. Images come in several sizes (the RM resizes to the model's)."""
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records, n = [], 0
    for colour in COLOURS:
        for noun in nouns:
            others = [c for c in COLOURS if c != colour]
            other = prng.choice(others)
            size = prng.choice([(32, 32), (40, 40), (36, 48)])
            prompt = f"a {colour} image of a {noun}"
            names = []
            for rgb in (COLOURS[colour], _mix(colour, other), COLOURS[other]):
                names.append("img/" + _png(folder / "img", f"{n}.png", rgb, rng, size)), (n := n + 1)
            if len(records) % 2:
                records.append({"prompt": prompt, "chosen": names[0], "rejected": names[2]})
            else:  # shuffled candidates, ranking best first
                order = prng.sample(range(3), 3)
                records.append({"prompt": prompt, "images": [names[i] for i in order],
                                "ranking": [order.index(i) for i in range(3)]})
    if tie:
        a = "img/" + _png(folder / "img", "tie_a.png", COLOURS["green"], rng)
        b = "img/" + _png(folder / "img", "tie_b.png", COLOURS["blue"], rng)
        records.append({"prompt": f"a red image of a {nouns[0]}, again", "chosen": a, "rejected": b, "tie": True})
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One image RM run: train on 7 nouns, held-out file with 3 unseen nouns (+ a tie)."""
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    root = tmp_path_factory.mktemp("image_rm")
    train = make_colour_prefs(root / "train", NOUNS[:7], seed=0, tie=False)
    held = make_colour_prefs(root / "held", NOUNS[7:], seed=1, tie=True)
    cfg = ImageRMConfig(clip="tiny-clip", data=str(train), eval_data=str(held), out=str(root / "run"),
                        epochs=12, max_pairs_per_batch=16, lr=2e-3, logit_scale_lr=1e-2, log_every=5, seed=0)
    torch.manual_seed(0)
    model_dir = run_image_rm(cfg)
    return cfg, model_dir, held


def test_tiny_clip_builds_offline_saves_and_reloads(tmp_path):
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.rewards import load_reward
    torch.manual_seed(0)
    reward = ClipReward.create("tiny-clip").eval()
    assert reward.image_size == (32, 32)
    prompts = ["a red image", "a blue image", "a red image"]
    images = torch.rand(3, 3, 45, 61)  # another size, non-square: resized + centre-cropped on the tensor
    with torch.no_grad():
        before = reward(prompts, images)
    assert before.shape == (3,) and torch.isfinite(before).all()
    reward.save(tmp_path / "clip")
    again = ClipReward.load(tmp_path / "clip").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(prompts, images), before)
    frozen = load_reward(str(tmp_path / "clip"))
    out = frozen(prompts, images)
    assert not out.requires_grad and not frozen.training
    torch.testing.assert_close(out, before)
    # the score is the PickScore formula, s·cos(text, image)
    with torch.no_grad():
        cos = (reward.text_features(prompts) * reward.image_features(images)).sum(-1)
    torch.testing.assert_close(before, reward.logit_scale * cos)
    # gradients flow through the tensor preprocessing (resize + normalise) to the pixels
    px = images.clone().requires_grad_(True)
    reward(prompts, px).sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0


def test_image_rm_learns_colour_preferences(trained):
    from image_rlhf.rewards import load_reward
    cfg, model_dir, held = trained
    meta = json.loads((model_dir / "align_reward.json").read_text())
    acc = meta["held_out"]["accuracy"]
    print(f"held-out pairwise accuracy {acc:.3f}, loss {meta['held_out']['loss']:.3f}, s={meta['logit_scale']:.2f}")
    assert acc >= 0.9
    out = model_dir.parent
    assert (out / "report.md").exists() and "accuracy" in (out / "report.md").read_text()
    assert (out / "curves.png").exists() and any((out / "tb").iterdir())
    assert (out / "checkpoints" / "latest").exists()
    assert 0 < meta["logit_scale"] <= 100 + 1e-4
    reward = load_reward(str(model_dir))  # scores a red image above a blue one for an unseen noun
    img = torch.tensor([COLOURS["red"], COLOURS["blue"]]).view(2, 3, 1, 1).expand(2, 3, 24, 24)
    s = reward(["a red image of a chair"] * 2, img)
    assert s[0] > s[1]
    # the run folder itself names the same reward (README: `--reward runs/img-rm`)
    torch.testing.assert_close(load_reward(str(out))(["a red image of a chair"] * 2, img), s)
    with pytest.raises(ValueError, match="align_reward.json"):
        load_reward(str(out / "tb"))


def test_ties_get_half_credit(trained):
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.rm import ImageScorer, ImageStore
    _, model_dir, held = trained
    reward = ClipReward.load(model_dir).eval()
    img = sorted((held.parent / "img").glob("tie_*.png"))
    tie = PreferenceGroup("a red image", [str(p) for p in img], [Pair(0, 1, label=0.5)])
    store = ImageStore(reward.image_size).add([tie])
    m = evaluate_pairs(ImageScorer(reward, store, "cpu"), batch_groups([tie], 8))
    assert m["accuracy"] == 0.5


def test_split_by_prompt_holds_out_whole_prompts(tmp_path):
    from align.data import load_preferences
    from image_rlhf.rm import split_by_prompt
    groups = load_preferences(make_colour_prefs(tmp_path, NOUNS[:4], seed=2), candidates="path")
    train, held = split_by_prompt(groups, 0.25, seed=0)
    assert held and train and not {g.prompt for g in train} & {g.prompt for g in held}
    assert len(train) + len(held) == len(groups)


def test_decode_image_modes_and_sizes(tmp_path):
    """Any PIL mode becomes (3, H, W) uint8 at the CLIP's size (shortest side, centre crop): 16-bit greyscale
    scaled to 8 bits (PIL's convert would clip it to white), L/P/RGBA/JPEG as open_clip's preprocessing."""
    from image_rlhf.rm import decode_image
    grey16 = np.full((20, 30), 32896, dtype=np.uint16)  # 128 · 257
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.new("L", (30, 20), 128).save(tmp_path / "l.png")
    Image.new("RGBA", (20, 40), (128, 128, 128, 255)).save(tmp_path / "rgba.png")
    Image.new("RGB", (16, 16), (128, 128, 128)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    Image.new("RGB", (64, 48), (128, 128, 128)).save(tmp_path / "c.jpg", quality=95)
    for name in ("g16.png", "l.png", "rgba.png", "p.png", "c.jpg"):
        x = decode_image(tmp_path / name, (8, 8))
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8, name
        assert (x.int() - 128).abs().max() <= 1, (name, x.float().mean())


def test_decode_image_composites_transparency_onto_white(tmp_path):
    """Alpha is not dropped: a transparent pixel is white whatever colour it stores (as transformers'
    CLIPImageProcessor and an image viewer have it), a half-transparent one is blended with white."""
    from image_rlhf.rm import decode_image
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")            # transparent "black"
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "half.png")         # half-transparent red
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)                                       # palette, transparent index
    for name in ("clear.png", "la.png", "p.png"):
        assert (decode_image(tmp_path / name, (8, 8)) == 255).all(), name
    half = decode_image(tmp_path / "half.png", (8, 8)).int()
    assert (half[0] == 255).all() and ((half[1:] - 127).abs() <= 1).all(), half[:, 0, 0]


def test_decode_image_applies_exif_orientation(tmp_path):
    """A JPEG stored landscape with EXIF Orientation 6 (rotate 90°, as phones write) is the portrait image a viewer
    and `datasets.Image` show; it was read on its side."""
    from image_rlhf.rm import decode_image
    x = np.zeros((16, 32, 3), np.uint8)
    x[:, :16] = 255                                   # stored: white left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(x).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    Image.fromarray(np.rot90(x, -1).copy()).save(tmp_path / "upright.png")  # shown: white top, black bottom
    a, b = decode_image(tmp_path / "phone.jpg", (32, 16)).int(), decode_image(tmp_path / "upright.png", (32, 16)).int()
    assert (a - b).abs().max() <= 8 and a[:, :8].min() > 200 and a[:, -8:].max() < 50


# make_colour_prefs writes a ranking on line 1 (img/0-2.png) and a chosen/rejected pair on line 2.
def _corrupt(folder, records):
    (folder / "img" / "1.png").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))
    return 1, "images[", "cannot read image"


def _missing(folder, records):
    records[1]["rejected"] = "img/nope.png"
    return 2, "rejected", "no such file"


def _bad_rank(folder, records):
    records[0]["ranking"] = [0, 1, 3]
    return 1, "ranking", "out of range"


@pytest.mark.parametrize("break_it", [_corrupt, _missing, _bad_rank], ids=["corrupt", "missing", "rank"])
def test_bad_inputs_name_file_line_and_field(tmp_path, break_it):
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    path = make_colour_prefs(tmp_path / "d", NOUNS[:2], seed=3)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert "ranking" in records[0] and "rejected" in records[1]
    line, fld, what = break_it(tmp_path / "d", records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = ImageRMConfig(data=str(path), out=str(tmp_path / "run"), epochs=1)
    with pytest.raises(DataError) as err:
        run_image_rm(cfg)
    msg = str(err.value)
    assert f"{path}:{line}" in msg and f"field '{fld}" in msg and what in msg, msg


def test_jpeg_rewards_and_brightness():
    from image_rlhf.rewards import brightness, jpeg_compressibility, jpeg_incompressibility, load_reward
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)])  # flat, noise
    prompts = ["a", "b"]
    comp = jpeg_compressibility(prompts, images)
    assert comp.shape == (2,) and comp[0] > comp[1]  # −kB: the flat image is more compressible
    torch.testing.assert_close(jpeg_incompressibility(prompts, images), -comp)
    assert load_reward("jpeg") is jpeg_compressibility and load_reward("incompressibility") is jpeg_incompressibility
    torch.testing.assert_close(load_reward("brightness")(prompts, images), images.mean(dim=(1, 2, 3)))
    assert brightness(prompts, torch.ones(1, 3, 4, 4)).item() == 1.0


def nan_reward(prompts, images):
    return [0.0, math.nan, 1.0][: len(prompts)]


def list_reward(prompts, images):
    return [float(i) for i in range(len(prompts))]


def one_reward(prompts, images):
    return torch.zeros(1)


def test_load_reward_module_function_checks_output():
    from image_rlhf.rewards import load_reward
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(load_reward("test_clip_reward:list_reward")(["p"] * 3, images),
                               torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"test_clip_reward:nan_reward.*index 1"):
        load_reward("test_clip_reward:nan_reward")(["p"] * 3, images)
    with pytest.raises(ValueError, match="returned 1 scores for 3"):
        load_reward("test_clip_reward:one_reward")(["p"] * 3, images)
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("test_clip_reward:no_such_fn")


def ddpo_pytorch_reward(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def images_first_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def keyword_reward(prompts, images, *, scale=2.0):
    return images.mean(dim=(1, 2, 3)) * scale


def test_load_reward_refuses_a_ddpo_pytorch_signature_up_front():
    """ddpo-pytorch's reward_fn(images, prompts, metadata): the run failed at its first batch with a bare TypeError
    (3 parameters), or with a list of prompts where the function expected images (images first)."""
    from image_rlhf.rewards import load_reward
    with pytest.raises(ValueError, match=r"called as fn\(prompts, images\).*\(images, prompts, metadata\).*wrapper"):
        load_reward("test_clip_reward:ddpo_pytorch_reward")
    with pytest.raises(ValueError, match="first parameter is 'images'.*swap them"):
        load_reward("test_clip_reward:images_first_reward")
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(load_reward("test_clip_reward:keyword_reward")(["a", "b"], images),
                               images.mean(dim=(1, 2, 3)) * 2)


def test_aesthetic_head_regresses_scalar_scores():
    from image_rlhf.clip_reward import ClipReward
    torch.manual_seed(0)
    reward = ClipReward.create("tiny-clip", mode="aesthetic", head_hidden=(64, 16))
    reward.model.requires_grad_(False)  # LAION: an MLP on a frozen CLIP's normalised image embedding
    images = torch.rand(32, 3, 32, 32) * torch.rand(32, 1, 1, 1)
    targets = images.mean(dim=(1, 2, 3)) * 10  # a "rating" in [0, 10]
    opt = torch.optim.Adam(reward.head.parameters(), lr=3e-3)
    first = reward.aesthetic_loss(images, targets).item()
    for _ in range(150):
        loss = reward.aesthetic_loss(images, targets)
        opt.zero_grad(), loss.backward(), opt.step()
    reward.eval()
    last = reward.aesthetic_loss(images, targets).item()
    assert last < 0.2 * first, (first, last)
    assert reward(["ignored"] * 32, images).shape == (32,)



def test_frozen_image_tower_runs_once_per_image(tmp_path, monkeypatch):
    """Aesthetic mode (towers frozen): each image is embedded once, not once per epoch and per held-out evaluation,
    and the last step's held-out evaluation is the report's, not run again; the kept embeddings score as the images
    do. A ranking's prompt goes through the text tower once (pickscore)."""
    from align.data import load_preferences
    from image_rlhf import rm
    from image_rlhf.clip_reward import ClipReward
    embedded, evals = [], []
    features, evaluate = ClipReward.image_features, rm.evaluate_pairs
    monkeypatch.setattr(ClipReward, "image_features", lambda self, x: embedded.append(len(x)) or features(self, x))
    monkeypatch.setattr(rm, "evaluate_pairs", lambda *a, **k: evals.append(evaluate(*a, **k)) or evals[-1])
    path = make_colour_prefs(tmp_path / "d", NOUNS[:4], seed=4)
    cfg = rm.ImageRMConfig(data=str(path), out=str(tmp_path / "run"), mode="aesthetic", epochs=3, max_pairs_per_batch=8,
                           lr=1e-3, eval_fraction=0.25, head_hidden=[16], log_every=1)
    model_dir = rm.run_image_rm(cfg)
    groups = load_preferences(str(path), candidates="path")
    assert sum(embedded) == len({c for g in groups for c in g.candidates}) and len(evals) == 3
    meta = json.loads((model_dir / "align_reward.json").read_text())
    assert meta["held_out"] == evals[-1]
    _, held = rm.split_by_prompt(groups, cfg.eval_fraction, cfg.seed)
    reward = ClipReward.load(model_dir).eval()
    fresh = evaluate(rm.ImageScorer(reward, rm.ImageStore(reward.image_size).add(held), "cpu"), batch_groups(held, 8))
    for k, v in meta["held_out"].items():
        assert v == pytest.approx(fresh[k], rel=1e-5, abs=1e-6), k
    texts = []
    monkeypatch.setattr(ClipReward, "text_features", lambda self, p: texts.append(list(p)) or torch.zeros(len(p), 32))
    ClipReward.create("tiny-clip")(["a", "b", "a", "a", "b"], torch.rand(5, 3, 32, 32))
    assert texts == [["a", "b"]]


def test_image_rm_resumes_from_checkpoint(tmp_path):
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    path = make_colour_prefs(tmp_path / "d", NOUNS[:4], seed=4)
    cfg = ImageRMConfig(data=str(path), out=str(tmp_path / "run"), epochs=1, max_pairs_per_batch=8, lr=1e-3,
                        eval_fraction=0.25, log_every=1)
    run_image_rm(cfg)
    first = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cfg.epochs = 2
    run_image_rm(cfg, resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:len(first)] == first and max(steps) == 2 * max(first)
    assert (tmp_path / "run" / "model" / "align_reward.json").exists()


@pytest.mark.parametrize("keep", [1, 3, 0])
def test_keep_checkpoints_and_epochs_whose_batch_count_depends_on_the_order(tmp_path, keep):
    """keep_checkpoints (TRL's save_total_limit; every stage has it, start_run applies it): the newest N, 0 = all.
    The data mixes pairs and 3-way rankings (3 pairs, over max_pairs_per_batch = 2), so next-fit packing gives 8
    batches in file order and 7 in the epoch's shuffled order: the image RM derived its step count from the first and
    looped forever at step 7 (its steps are now listed per epoch, as the text RM's)."""
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    path = make_colour_prefs(tmp_path / "d", NOUNS[:4], seed=4)
    cfg = ImageRMConfig(data=str(path), out=str(tmp_path / "run"), epochs=1, max_pairs_per_batch=2, lr=1e-3,
                        eval_fraction=0.25, log_every=1, save_every=1, keep_checkpoints=keep)
    run_image_rm(cfg)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 7
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == list(range(1, 8))[-keep if keep else 0:], kept


def test_clip_spec_takes_a_run_folder_and_names_unknown_tags(tmp_path):
    """--clip accepts an `align image rm` run folder (its model/), as --reward does; an unknown pretrained tag is
    a one-line error listing the model's tags, not a traceback."""
    from image_rlhf.clip_reward import ClipReward
    reward = ClipReward.create("tiny-clip", mode="aesthetic", head_hidden=(8,))
    reward.save(tmp_path / "run" / "model")
    again = ClipReward.create(str(tmp_path / "run"))
    assert again.mode == "aesthetic" and again.image_size == reward.image_size
    assert ClipReward.create(str(tmp_path / "run"), image_size=reward.image_size[0]).image_size == reward.image_size
    with pytest.raises(ValueError, match="a saved reward keeps its input size 32; image_size=48"):
        ClipReward.create(str(tmp_path / "run"), image_size=48)  # was silently ignored
    with pytest.raises(ValueError, match=r"pretrained='nosuchtag'.*\(tags of tiny-clip: none; or a checkpoint"):
        ClipReward.create("tiny-clip", "nosuchtag")


@pytest.mark.parametrize("kw, match", [(dict(eval_fraction=1.0), "eval_fraction must be in"),    # no training pairs
                                       (dict(eval_fraction=-0.5), "eval_fraction must be in"),   # held out half
                                       (dict(log_every=0), "log_every must be >= 1"),            # crashed at step 1
                                       (dict(epochs=0), "epochs must be > 0")])                  # trained 1 step
def test_image_rm_refuses_configs_that_cannot_work(tmp_path, kw, match):
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    path = make_colour_prefs(tmp_path / "d", NOUNS[:4], seed=4)
    with pytest.raises(ValueError, match=match):
        run_image_rm(ImageRMConfig(data=str(path), out=str(tmp_path / "run"), **kw))
    assert not (tmp_path / "run").exists()


def test_image_rm_resume_uses_the_configs_lr(tmp_path):
    """Resumed with lr = logit_scale_lr = 0, the model stays the checkpoint's (the checkpoint's lr was used)."""
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.rm import ImageRMConfig, run_image_rm
    path = make_colour_prefs(tmp_path / "d", NOUNS[:4], seed=4)
    cfg = ImageRMConfig(data=str(path), out=str(tmp_path / "run"), epochs=1, max_pairs_per_batch=8, lr=1e-3,
                        eval_fraction=0.25, log_every=1)
    run_image_rm(cfg)
    before = ClipReward.load(tmp_path / "run" / "model").state_dict()
    cfg.epochs, cfg.lr, cfg.logit_scale_lr = 2, 0.0, 0.0
    after = ClipReward.load(run_image_rm(cfg, resume=True)).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pretrained_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    """pretrained=FILE of another architecture or not a checkpoint at all: one line naming the file (before: a
    traceback of open_clip's UnpicklingError or AssertionError, or "Error(s) in loading state_dict for CLIP: (tags
    of tiny-clip: none; or a checkpoint file path)" with the mismatch cut off)."""
    from image_rlhf.clip_reward import ClipReward
    ClipReward.create("tiny-clip").save(tmp_path / "tiny")
    (tmp_path / "other.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {
        "image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}))
    ClipReward.create(str(tmp_path / "other.json")).save(tmp_path / "other")
    weights = tmp_path / "tiny" / "open_clip_model.safetensors"
    assert ClipReward.create("tiny-clip", str(weights)).pretrained == str(weights)
    with pytest.raises(ValueError, match=r"other.json': not a checkpoint of tiny-clip \(UnpicklingError"):
        ClipReward.create("tiny-clip", str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"open_clip_model.safetensors': not a checkpoint of tiny-clip \(\w+Error: \w"):
        ClipReward.create("tiny-clip", str(tmp_path / "other" / "open_clip_model.safetensors"))


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE set, a pretrained tag or a published reward failed only after huggingface_hub's
    retries (55 s for `--clip ViT-B-32 pretrained=laion2b_s34b_b79k`, 57 s for `pickscore`); now the hub is probed
    once, and what is not cached fails at once, before the towers are built."""
    import time

    import huggingface_hub.constants as hub

    import align.runner
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.rewards import load_reward
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))      # nothing cached
    monkeypatch.setattr(align.runner, "_HUB_OFFLINE", None)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="pretrained='laion2b_s34b_b79k': cannot get its weights"):
        ClipReward.create("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="cannot load HPSv2 checkpoint"):
        load_reward("hpsv2")
    assert hub.HF_HUB_OFFLINE and time.perf_counter() - start < 10


@pytest.mark.parametrize("text, match", [
    ('{"embed_dim": 8, "vison_cfg": {}, "text_cfg": {}}', "ViT-B-32.json: missing vision_cfg"),       # built the real ViT-B-32
    ('{"model_cfg": {}, "preprocess_cfg": {}}', "an open_clip local-dir config"),                     # "unknown CLIP"
    ("not json", "ViT-B-32.json: not JSON")])                                                         # a bare JSONDecodeError
def test_clip_config_json_is_checked_before_open_clip_skips_it(tmp_path, text, match):
    """open_clip registers a model-config .json only if it has embed_dim, vision_cfg and text_cfg, silently: a typo in
    ViT-B-32.json built open_clip's own ViT-B-32 (a file of another name: "unknown CLIP ... a model-config .json")."""
    from image_rlhf.clip_reward import ClipReward
    (tmp_path / "ViT-B-32.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        ClipReward.create(str(tmp_path / "ViT-B-32.json"))
