"""The image miniature world: renderer, web captions, prompt parsing, gold judge, noisy labelers."""
import pytest
import torch

from image_rlhf.world import (COLOURS, DEFAULT_NOISE, HELDOUT_PAIRS, PALETTE, SHAPES, WorldConfig, calibrate_noise,
                              engineered_prompt, expected_agreement, gold_details, gold_prefer, gold_rank, gold_score,
                              labeler_agreement, make_dataset, parse_prompt, plain_prompt, prompt_pairs,
                              reference_pairs, render, sample_attributes)


def _scene(colour, shape, n=1, clutter=False, size=16, seed=0):
    """Attributes of n centred, medium-sized shapes, with or without clutter (same seed, same scene)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = WorldConfig(size=size, p_clutter=1.0 if clutter else 0.0, p_centred=1.0, size_probs=(0, 1, 0))
    full = lambda i: torch.full((n,), i)
    return sample_attributes(n, gen, cfg, full(COLOURS.index(colour)), full(SHAPES.index(shape)))


def _hand_drawn_disc(rgb, size=16, radius=4.5):
    """A disc on a white background drawn without the world's renderer (hard edges)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 <= radius ** 2
    img = torch.ones(1, 3, size, size)
    img[0, :, inside] = torch.tensor(rgb)[:, None]
    return img


@pytest.mark.parametrize("size", [16, 32])
def test_render_batch_shapes_range_and_determinism(size):
    a, b = make_dataset(64, 0, WorldConfig(size=size)), make_dataset(64, 0, WorldConfig(size=size))
    images, captions, attrs = a
    assert images.shape == (64, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, b[0]) and captions == b[1] and torch.equal(attrs["colour"], b[2]["colour"])
    assert not torch.equal(images, make_dataset(64, 1, WorldConfig(size=size))[0])
    assert set(attrs["shape"].tolist()) == {0, 1, 2} and set(attrs["colour"].tolist()) == {0, 1, 2, 3}


def test_hand_drawn_red_circle_is_a_red_circle():
    img = _hand_drawn_disc((0.9, 0.1, 0.1))
    d = gold_details(["a red circle"], img)
    assert COLOURS[d["pred_colour"]] == "red" and SHAPES[d["pred_shape"]] == "circle" and d["success"].item()
    assert d["score"].item() > 0.9
    assert gold_score(["a blue circle"], img).item() < 0.6          # right shape, wrong colour
    assert gold_score(["a red square"], img).item() < 0.7           # right colour, wrong shape


def test_blue_square_for_a_red_circle_scores_low():
    red_circle = render(_scene("red", "circle"))
    blue_square = render(_scene("blue", "square"))
    right, wrong = gold_score(["a red circle"] * 2, torch.cat([red_circle, blue_square]))
    assert right > 0.9 and wrong < 0.25
    # the same images judged against prompts with tags and another word order
    assert gold_score(["masterpiece, a blue square, best quality"], blue_square).item() > 0.9
    assert not gold_details(["a red circle"], blue_square)["success"].item()


def test_clutter_lowers_quality_but_not_the_object():
    attrs = _scene("green", "triangle", n=8, clutter=True)
    cluttered = render(attrs)
    clean = render({**attrs, "clutter_on": torch.zeros_like(attrs["clutter_on"])})
    prompts = ["a green triangle"] * 8
    dc, dn = gold_details(prompts, cluttered), gold_details(prompts, clean)
    assert (dc["quality"] < dn["quality"]).all() and (dn["clean"] == 1).all()
    assert (dc["clean"] < 1).all() and dc["clean"].mean() < 0.85
    assert dc["success"].all() and dn["success"].all()


@pytest.mark.parametrize("size,clutter,min_acc", [(16, 0.0, 0.95), (16, 1.0, 0.80), (32, 0.0, 0.95), (32, 1.0, 0.80)])
def test_judge_accuracy_on_random_rendered_shapes(size, clutter, min_acc):
    images, _, a = make_dataset(300, 7, WorldConfig(size=size, p_clutter=clutter))
    prompts = [plain_prompt(COLOURS[c], SHAPES[s]) for c, s in zip(a["colour"], a["shape"])]
    d = gold_details(prompts, images)
    assert (d["pred_shape"] == a["shape"]).float().mean() >= min_acc
    assert (d["pred_colour"] == a["colour"]).float().mean() >= min_acc


def test_judge_rejects_blank_and_flat_images_and_bad_input():
    blank, flat = torch.ones(1, 3, 16, 16), PALETTE[0].view(1, 3, 1, 1).expand(1, 3, 16, 16)
    for img in (blank, flat):
        d = gold_details(["a red circle"], img)
        assert not d["present"].item() and d["score"].item() < 0.1
    with pytest.raises(ValueError, match="B, 3, H, W"):
        gold_score(["a red circle"], torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="prompts"):
        gold_score(["a", "b"], blank)


def test_caption_statistics():
    _, captions, a = make_dataset(6000, 0)
    tagged, clean = a["tagged"], a["clean"]
    assert 0.1 < clean.float().mean() < 0.3                     # the clean mode is a minority
    assert tagged[clean].float().mean() > 0.7                   # clean images mostly carry tags
    assert tagged[a["clutter"]].float().mean() < 0.05           # cluttered ones rarely
    assert clean[tagged].float().mean() > 0.8                   # so tags select the clean mode
    assert 0.08 < a["caption_wrong"].float().mean() < 0.2
    kinds = a["caption_kind"]
    assert 0.3 < sum(k != "full" for k in kinds) / len(kinds) < 0.6   # often incomplete
    assert {"full", "colour", "shape", "generic"} == set(kinds)
    for text, kind, wrong, c, s in zip(captions, kinds, a["caption_wrong"], a["colour"], a["shape"]):
        said = parse_prompt(text)
        assert said[0] is not None if kind in ("full", "colour") else said[0] is None
        assert said[1] is not None if kind in ("full", "shape") else said[1] is None
        truth = (COLOURS[c] if said[0] else None, SHAPES[s] if said[1] else None)
        assert (said != truth) == bool(wrong), text
    assert all(("masterpiece" in t or "quality" in t or "center" in t) == bool(g) for t, g in zip(captions, tagged)
               if "off-center" not in t)


def test_heldout_pairs_and_withheld_captions():
    train, heldout = prompt_pairs("train"), prompt_pairs("heldout")
    assert set(heldout) == set(HELDOUT_PAIRS) and not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(COLOURS) * len(SHAPES)
    _, captions, _ = make_dataset(3000, 0, WorldConfig(withhold_heldout=True))
    assert not any(parse_prompt(t) in HELDOUT_PAIRS for t in captions)
    _, captions, _ = make_dataset(3000, 0)
    assert any(parse_prompt(t) in HELDOUT_PAIRS for t in captions)


def test_parse_prompt_is_robust_to_tags_and_order():
    assert parse_prompt("masterpiece, a red circle, best quality") == ("red", "circle")
    assert parse_prompt("best quality, Triangle, YELLOW") == ("yellow", "triangle")
    assert parse_prompt("a box in blue") == ("blue", "square")
    assert parse_prompt("image, masterpiece") == (None, None)
    for c, s in prompt_pairs():
        assert parse_prompt(plain_prompt(c, s)) == parse_prompt(engineered_prompt(c, s)) == (c, s)
        assert engineered_prompt(c, s).startswith(plain_prompt(c, s)) and "masterpiece" in engineered_prompt(c, s)


def test_labelers_agree_about_75_percent():
    prompts, a, b = reference_pairs(800, seed=1)
    ga, gb = gold_score(prompts, a), gold_score(prompts, b)
    assert 0.72 < expected_agreement(ga, gb, DEFAULT_NOISE) < 0.78
    assert abs(expected_agreement(ga, gb, calibrate_noise(ga, gb, 0.75)) - 0.75) < 1e-3
    assert 0.70 <= labeler_agreement(ga, gb, DEFAULT_NOISE, torch.Generator().manual_seed(0)) <= 0.80
    # two labelers, each with its own generator, labelling the same pairs from pixels
    first = gold_prefer(prompts, a, b, torch.Generator().manual_seed(1))
    second = gold_prefer(prompts, a, b, torch.Generator().manual_seed(2))
    assert 0.70 <= (first == second).float().mean() <= 0.80
    assert torch.equal(first, gold_prefer(prompts, a, b, torch.Generator().manual_seed(1)))
    # gold_rank with K = 2 is the same labeler: the win rate of a matches σ((g_a − g_b)/β) on average
    r = torch.Generator().manual_seed(3)
    wins = [gold_rank(p, torch.stack([x, y]), r)[0].item() == 0 for p, x, y in zip(prompts[:200], a, b)]
    expected = torch.sigmoid((ga[:200] - gb[:200]) / DEFAULT_NOISE).mean().item()
    assert abs(sum(wins) / 200 - expected) < 0.08


def test_gold_rank_orders_by_gold_without_noise_and_is_seeded():
    images = torch.cat([render(_scene("yellow", "square")), render(_scene("red", "circle")),
                        render(_scene("yellow", "square", clutter=True))])
    assert gold_rank("a yellow square", images, torch.Generator(), noise=0).tolist() == [0, 2, 1]
    g = lambda s: gold_rank("a yellow square", images, torch.Generator().manual_seed(s)).tolist()
    assert g(5) == g(5) and len(set(map(tuple, (g(s) for s in range(30))))) > 1
