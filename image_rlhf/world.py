"""The image miniature world: coloured shapes, noisy "web" alt-text, and a gold judge from pixels.

    render / make_dataset   (B, 3, H, W) images in [0, 1] of one shape (circle, square, triangle ×
                            red, green, blue, yellow) with position, size and background clutter,
                            drawn from parameter tensors on a coordinate grid (no per-pixel loops)
    captions                alt-text that is often incomplete ("a circle", "red thing", "image"),
                            sometimes wrong, and tagged "masterpiece, best quality, ..." mostly on
                            clean images (no clutter, medium size, centred): tags select the clean
                            mode of the data, as in Stable Diffusion's training set
    gold_score              the labeler's judgement, read from the pixels only:
                            0.4·colour + 0.4·shape + 0.2·quality, each in [0, 1]
    gold_rank               a noisy labeler: Plackett-Luce ranking (Bradley-Terry for K = 2) of
                            gold scores at a temperature that makes two labelers agree ~75%

Held-out prompts: HELDOUT_PAIRS are never used as RLHF prompts, so `align demo` evaluates on
prompts the reward model and the policy never saw. The web captions do name them (the web covers
everything) unless `WorldConfig.withhold_heldout`, which also keeps them out of every correct full
caption, a test of composition (the base model then has to combine "yellow" and "triangle").
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PALETTE = torch.tensor([[0.90, 0.12, 0.12], [0.12, 0.70, 0.20], [0.15, 0.30, 0.90], [0.95, 0.85, 0.10]])
CLUTTER_GREY = (0.35, 0.35, 0.35)       # clutter is drawn in the other palette colours or this grey
SIZE_RANGES = ((0.17, 0.21), (0.24, 0.31), (0.35, 0.42))  # small/medium/large half-extent r, × image side
CENTRED_TOL = 0.06                      # |c − 0.5| ≤ this on both axes counts as centred
QUALITY_TAGS = ("masterpiece", "best quality", "high quality", "centered", "simple background")
ENGINEERED_TAGS = "masterpiece, best quality, centered, simple background"
HELDOUT_PAIRS = (("yellow", "triangle"), ("green", "circle"), ("blue", "square"))
SHAPE_WORDS = {**{w: "circle" for w in ("circle", "circles", "round", "disc", "ball")},
               **{w: "square" for w in ("square", "squares", "box")}, "triangle": "triangle", "triangles": "triangle"}


@dataclass
class WorldConfig:
    size: int = 16
    """Image side in pixels (16 default; 32 works too)."""
    antialias: bool = True
    """Soft edges (pixel coverage from the signed distance) instead of hard 0/1 edges."""
    p_clutter: float = 0.4
    """Probability that an image has background clutter (dots and lines in other colours)."""
    clutter_items: tuple[int, int] = (3, 6)
    """Min and max number of clutter items when there is clutter."""
    p_centred: float = 0.6
    """Probability that the shape is placed at the centre (±0.03); else anywhere inside the image."""
    size_probs: tuple[float, float, float] = (0.25, 0.5, 0.25)
    """Probabilities of small / medium / large (SIZE_RANGES)."""
    colour_jitter: float = 0.04
    """Uniform ± jitter on each channel of the shape colour."""
    p_tags_clean: float = 0.8
    """Probability that a clean image's caption carries quality tags."""
    p_tags_other: float = 0.02
    """Probability that any other image's caption carries them (web tags are noisy too)."""
    p_full: float = 0.5
    """Caption names colour and shape ("a red circle"); tagged captions: (1 + p_full) / 2."""
    p_colour_only: float = 0.15
    """Caption names the colour only ("red thing")."""
    p_shape_only: float = 0.15
    """Caption names the shape only ("a circle"); the rest name neither ("image", "img_0042.png")."""
    p_wrong: float = 0.15
    """Probability that a caption naming something names one attribute wrongly."""
    withhold_heldout: bool = False
    """No caption names a HELDOUT_PAIRS colour and shape together (composition test)."""


# ---------------------------------------------------------------------------- rendering

def _grid(size: int):
    """Pixel-centre coordinates in [0, 1]: x (1, 1, W) varies along columns, y (1, H, 1) along rows."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return c.view(1, 1, size), c.view(1, size, 1)


def _coverage(sdf_px: torch.Tensor, antialias: bool) -> torch.Tensor:
    """Pixel coverage from a signed distance in pixels (< 0 inside): a 1-pixel linear ramp."""
    return (0.5 - sdf_px).clamp(0, 1) if antialias else (sdf_px <= 0).float()


def shape_sdf(shape, cx, cy, r, size: int) -> torch.Tensor:
    """(B, H, W) signed distance in pixels to shape[b] ∈ {0 circle, 1 square, 2 triangle}.

    circle radius r; axis-aligned square of half-side r; upright isosceles triangle with apex
    (cx, cy − r) and base from (cx − r, cy + r) to (cx + r, cy + r): all three fill a 2r × 2r box,
    with box fill ratios π/4, 1 and 1/2 — the feature the judge reads. The triangle's distance is
    the max over its three edges' half-planes (exact inside, a slight underestimate near corners).
    """
    x, y = _grid(size)
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)       # (B, H, W)
    r = r.view(-1, 1, 1)
    circle = dx.hypot(dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    edge = (2 * dx.abs() - (dy + r)) / math.sqrt(5)              # left/right edges, slope 2
    triangle = torch.maximum(edge, dy - r)
    sdf = torch.stack([circle, square, triangle], 1).gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, size, size))
    return sdf.squeeze(1) * size


def segment_sdf(x0, y0, x1, y1, size: int) -> torch.Tensor:
    """(B, K, H, W) distance in pixels to segments (B, K) (a point when the ends coincide)."""
    x, y = _grid(size)
    x0, y0, x1, y1 = (t[..., None, None] for t in (x0, y0, x1, y1))
    vx, vy, px, py = x1 - x0, y1 - y0, x - x0, y - y0
    t = ((px * vx + py * vy) / (vx * vx + vy * vy).clamp_min(1e-12)).clamp(0, 1)
    return (px - t * vx).hypot(py - t * vy) * size


def render(attrs: dict, size: int = 16, antialias: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from `sample_attributes`' tensors: background, then the
    clutter items in order, then the shape on top; each layer alpha-composited by its coverage."""
    img = attrs["background"].view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()
    k = attrs["clutter_colour"].shape[1]
    if k:
        dist = segment_sdf(attrs["clutter_x0"], attrs["clutter_y0"], attrs["clutter_x1"], attrs["clutter_y1"], size)
        width = attrs["clutter_width"][..., None, None] * size / 16  # half-widths are set for 16 px
        alpha = _coverage(dist - width, antialias) * attrs["clutter_on"][..., None, None]  # (B, K, H, W)
        for i in range(k):
            a = alpha[:, i, None]
            img = img * (1 - a) + attrs["clutter_colour"][:, i, :, None, None] * a
    a = _coverage(shape_sdf(attrs["shape"], attrs["cx"], attrs["cy"], attrs["r"], size), antialias)[:, None]
    img = img * (1 - a) + attrs["rgb"][..., None, None] * a
    return img.clamp(0, 1)


def sample_attributes(n: int, gen: torch.Generator, cfg: WorldConfig = WorldConfig(),
                      colour: torch.Tensor | None = None, shape: torch.Tensor | None = None) -> dict:
    """Random scene parameters for n images (colour/shape indices may be forced). Keys, all (n,)
    unless noted: colour, shape (indices into COLOURS, SHAPES), rgb (n, 3), cx, cy, r (fractions of
    the side), size_bucket (0 small, 1 medium, 2 large), centred, clutter (bool), n_clutter, clean
    (no clutter ∧ medium ∧ centred), background (grey level); clutter_* (n, K) segments whose
    colours (n, K, 3) are the other palette colours or grey, clutter_on masks unused slots."""
    u = lambda *s: torch.rand(*s, generator=gen)
    colour = torch.randint(len(COLOURS), (n,), generator=gen) if colour is None else colour.long()
    shape = torch.randint(len(SHAPES), (n,), generator=gen) if shape is None else shape.long()
    rgb = (PALETTE[colour] + (2 * u(n, 3) - 1) * cfg.colour_jitter).clamp(0, 1)
    bucket = torch.multinomial(torch.tensor(cfg.size_probs, dtype=torch.float32), n, replacement=True, generator=gen)
    lo, hi = torch.tensor(SIZE_RANGES).T
    r = lo[bucket] + (hi - lo)[bucket] * u(n)
    at_centre = u(n) < cfg.p_centred
    cx = torch.where(at_centre, 0.5 + 0.06 * (u(n) - 0.5), r + (1 - 2 * r) * u(n))
    cy = torch.where(at_centre, 0.5 + 0.06 * (u(n) - 0.5), r + (1 - 2 * r) * u(n))
    centred = ((cx - 0.5).abs() <= CENTRED_TOL) & ((cy - 0.5).abs() <= CENTRED_TOL)
    clutter = u(n) < cfg.p_clutter
    k_lo, k_hi = cfg.clutter_items
    n_clutter = torch.where(clutter, torch.randint(k_lo, k_hi + 1, (n,), generator=gen), 0)
    on = (torch.arange(k_hi)[None] < n_clutter[:, None]).float()                     # (n, K)
    # clutter colour: one of the 3 other palette colours (offset 1..3 mod 4) or grey (choice 3)
    choice = torch.randint(4, (n, k_hi), generator=gen)
    other = (colour[:, None] + 1 + choice.clamp(max=2)) % len(COLOURS)
    ccol = torch.where((choice == 3)[..., None], torch.tensor(CLUTTER_GREY), PALETTE[other])
    is_dot = u(n, k_hi) < 0.5
    x0, y0, ang = u(n, k_hi), u(n, k_hi), 2 * math.pi * u(n, k_hi)
    length = torch.where(is_dot, 0.0, 0.3 + 0.4 * u(n, k_hi))
    x1, y1 = x0 + length * ang.cos(), y0 + length * ang.sin()
    width = torch.where(is_dot, 0.6 + 0.4 * u(n, k_hi), 0.35 + 0.2 * u(n, k_hi))  # half-width, px at 16
    return dict(colour=colour, shape=shape, rgb=rgb, cx=cx, cy=cy, r=r, size_bucket=bucket, centred=centred,
                clutter=clutter, n_clutter=n_clutter, clean=~clutter & (bucket == 1) & centred,
                background=0.85 + 0.15 * u(n), clutter_x0=x0, clutter_y0=y0, clutter_x1=x1, clutter_y1=y1,
                clutter_width=width, clutter_colour=ccol, clutter_on=on)


# ---------------------------------------------------------------------------- captions and prompts

_FULL = ("a {c} {s}", "{c} {s}", "a {s} in {c}", "{c} {s} drawing", "picture of a {c} {s}")
_COLOUR_ONLY = ("{c} thing", "something {c}", "{c} shape", "a {c} object")
_SHAPE_ONLY = ("a {s}", "{s}", "{s} shape", "picture of a {s}")
_GENERIC = ("image", "photo", "untitled", "drawing", "shapes", "img_{n:04d}.png")


def caption(colour: str, shape: str, a: dict, i: int, rnd: random.Random, cfg: WorldConfig) -> tuple[str, dict]:
    """One alt-text for image i of attributes `a` (its true colour/shape given as words), and what
    it says: kind ∈ {full, colour, shape, generic}, wrong (names an attribute wrongly), tagged."""
    clean = bool(a["clean"][i])
    tagged = rnd.random() < (cfg.p_tags_clean if clean else cfg.p_tags_other)
    p_full = (1 + cfg.p_full) / 2 if tagged else cfg.p_full   # curated (tagged) pages describe more
    scale = (1 - p_full) / (1 - cfg.p_full) if cfg.p_full < 1 else 0.0   # the rest keeps its proportions
    t = rnd.random()
    kind = ("full" if t < p_full else "colour" if t < p_full + scale * cfg.p_colour_only else
            "shape" if t < p_full + scale * (cfg.p_colour_only + cfg.p_shape_only) else "generic")
    c, s, wrong = colour, shape, False
    if kind != "generic" and rnd.random() < cfg.p_wrong:
        wrong = True
        if kind == "colour" or (kind == "full" and rnd.random() < 0.5):
            c = rnd.choice([x for x in COLOURS if x != colour])
        else:
            s = rnd.choice([x for x in SHAPES if x != shape])
    if cfg.withhold_heldout and kind == "full" and (c, s) in HELDOUT_PAIRS:   # never name the pair
        kind = rnd.choice(["colour", "shape"])
        wrong = c != colour if kind == "colour" else s != shape
    if kind in ("full", "shape") and int(a["size_bucket"][i]) != 1 and rnd.random() < 0.3:
        s = ("small " if int(a["size_bucket"][i]) == 0 else "big ") + s
    text = rnd.choice({"full": _FULL, "colour": _COLOUR_ONLY, "shape": _SHAPE_ONLY, "generic": _GENERIC}[kind])
    text = text.format(c=c, s=s, n=rnd.randrange(10000))
    if not bool(a["centred"][i]) and rnd.random() < 0.2:
        text += rnd.choice([" in the corner", " on the side", ", off-center"])
    if bool(a["clutter"][i]) and rnd.random() < 0.3:
        text += rnd.choice([" with scribbles", ", messy", ", cluttered"])
    if tagged:
        tags = rnd.sample(QUALITY_TAGS, rnd.randint(2, 4))
        text = ", ".join(tags) + ", " + text if rnd.random() < 0.3 else text + ", " + ", ".join(tags)
    return text, dict(kind=kind, wrong=wrong, tagged=tagged)


def make_dataset(n: int, seed: int, cfg: WorldConfig = WorldConfig(), chunk: int = 4096):
    """(images (n, 3, H, W) in [0, 1], captions [n], attributes) — deterministic given the seed.
    attributes: `sample_attributes`' tensors plus caption_kind (list), caption_wrong, tagged (n,)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    attrs = sample_attributes(n, gen, cfg)
    images = torch.cat([render({k: v[i:i + chunk] for k, v in attrs.items()}, cfg.size, cfg.antialias)
                        for i in range(0, n, chunk)]) if n else torch.zeros(0, 3, cfg.size, cfg.size)
    said = [caption(COLOURS[attrs["colour"][i]], SHAPES[attrs["shape"][i]], attrs, i, rnd, cfg) for i in range(n)]
    captions = [text for text, _ in said]
    attrs.update(caption_kind=[info["kind"] for _, info in said],
                 caption_wrong=torch.tensor([info["wrong"] for _, info in said], dtype=torch.bool),
                 tagged=torch.tensor([info["tagged"] for _, info in said], dtype=torch.bool))
    return images, captions, attrs


def plain_prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def engineered_prompt(colour: str, shape: str) -> str:
    """The SD-style engineered variant: the quality tags that select the clean mode."""
    return f"{plain_prompt(colour, shape)}, {ENGINEERED_TAGS}"


def prompt_pairs(split: str = "all") -> list[tuple[str, str]]:
    """(colour, shape) pairs: 'train' (RLHF prompts), 'heldout' (HELDOUT_PAIRS, evaluation) or 'all'."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in pairs if split == "all" or (p in HELDOUT_PAIRS) == (split == "heldout")]


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """(colour, shape) wanted by a prompt: the first palette colour word and the first shape word
    (plurals/synonyms allowed), anywhere among tags and in any order; None where absent."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS), None)
    return colour, shape


# ---------------------------------------------------------------------------- gold judge

W_COLOUR, W_SHAPE, W_QUALITY = 0.4, 0.4, 0.2
RESID_TAU = 0.25           # max RGB distance of a pixel from the background→colour line to count
BG_TOL = 0.2               # a non-object pixel within this distance of the background is clean
MIN_PIXELS = 3             # fewer solid pixels of every colour = no object
TEMPLATE_GROW = (0.0, 0.5)  # px added to the box's half-sides when fitting the ideal shapes
SHAPE_TEMPERATURE = 0.03   # softmax over the IoUs of the mask with the three ideal shapes


def _open(m: torch.Tensor, k: int) -> torch.Tensor:
    """Morphological opening of (B, C, H, W) 0/1 masks with a k×k square (the union of the k×k
    squares that fit inside the mask; outside the image counts as neither): removes anything
    thinner than k pixels — clutter lines and dots — and keeps solid shapes."""
    lo, hi = (k - 1) // 2, k // 2                                     # window [i − lo, i + hi]
    eroded = -F.max_pool2d(F.pad(-m, (lo, hi, lo, hi), value=-math.inf), k, 1)
    return F.max_pool2d(F.pad(eroded, (hi, lo, hi, lo), value=0.0), k, 1)


def gold_details(prompts: list[str], images: torch.Tensor) -> dict:
    """Everything the gold judge reads, per image (B,). Recipe:
    1. background = per-channel median of the border pixels;
    2. each pixel x is unmixed as bg + α·(c − bg) for each palette colour c (least squares); it
       belongs to the c of smallest residual among those with α ∈ [0.5, 1.5] — pixel centres inside
       an antialiased edge, so masks are unbiased — if that residual is under RESID_TAU;
    3. solid pixels of each colour = that mask opened with a k×k square (k = 2 up to 24 px, else 3);
       the dominant colour has the most solid pixels; colour score = n_wanted / n_dominant;
    4. the object = the wanted colour's pixels if it has ≥ half the dominant count, else the
       dominant colour's, near its solid part. Its bounding box (fill ratio: circle π/4, square 1,
       triangle 1/2) is filled with the three ideal shapes; softmax(IoU / SHAPE_TEMPERATURE) over
       them is the shape distribution, its argmax the predicted shape; shape score = p(wanted);
    5. quality = mean(clean: 1 − 3·(fraction of non-object pixels off the background), clamped;
       centred: 1 − (distance of the box centre from the image centre) / 0.3, clamped;
       size: 1 − |box side / image side − 0.55| / 0.3, clamped — 0.55 is the medium size).
    An unspecified colour or shape scores 1 when there is an object; no object scores 0 on all but
    `clean`. score = W_COLOUR·colour + W_SHAPE·shape + W_QUALITY·quality. Tensors come back on
    the CPU; success = an object whose dominant colour and predicted shape are the ones asked for."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {getattr(images, 'shape', images)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    x = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"the gold judge expects square images, got {h}×{w}")
    k_open, k_near = (2, 3) if h <= 24 else (3, 5)
    dilate = lambda m: F.max_pool2d(m[:, None], k_near, 1, k_near // 2).squeeze(1)   # (B, H, W) by k_near²
    # 1.-2. background and per-pixel colour classes
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)   # (B, 3, 2W + 2H)
    bg = border.median(2).values                                                      # (B, 3)
    diff = x - bg[..., None, None]                                                    # (B, 3, H, W)
    dirs = PALETTE[None] - bg[:, None]                                                # (B, P, 3)
    alpha = torch.einsum("bchw,bpc->bphw", diff, dirs) / dirs.pow(2).sum(-1).clamp(min=1e-6)[..., None, None]  # (B, P, H, W)
    resid = (diff[:, None] - alpha[:, :, None] * dirs[..., None, None]).norm(dim=2)  # (B, P, H, W)
    resid = resid.masked_fill((alpha < 0.5) | (alpha > 1.5), float("inf"))
    best, cls = resid.min(1)
    fg = best < RESID_TAU
    member = F.one_hot(cls, len(COLOURS)).permute(0, 3, 1, 2).float() * fg[:, None]  # (B, P, H, W)
    d_bg = diff.norm(dim=1)                                                            # (B, H, W)
    # 3. colour
    solid = _open(member, k_open)
    counts = solid.sum((2, 3))                                                         # (B, P)
    n_dom, dominant = counts.max(1)
    present = n_dom >= MIN_PIXELS
    wanted = [parse_prompt(p) for p in prompts]
    want_c = torch.tensor([COLOURS.index(c) if c else -1 for c, _ in wanted])
    want_s = torch.tensor([SHAPES.index(s) if s else -1 for _, s in wanted])
    n_want = counts.gather(1, want_c.clamp(min=0)[:, None]).squeeze(1)
    colour = torch.where(want_c >= 0, n_want / n_dom.clamp(min=MIN_PIXELS), 1.0) * present
    obj = torch.where((want_c >= 0) & (n_want >= 0.5 * n_dom), want_c, dominant)
    pick = lambda t: t.gather(1, obj.view(-1, 1, 1, 1).expand(-1, 1, h, w)).squeeze(1)
    mask = pick(member) * dilate(pick(solid))                                         # (B, H, W)
    # 4. shape: the object's bounding box and the ideal shapes fitted to it
    area = mask.sum((1, 2)).clamp(min=1)
    ys, xs = torch.arange(h), torch.arange(w)
    rows, cols = mask.amax(2) > 0, mask.amax(1) > 0                                    # (B, H), (B, W)
    y0, y1 = torch.where(rows, ys, h).amin(1), torch.where(rows, ys, -1).amax(1)
    x0, x1 = torch.where(cols, xs, w).amin(1), torch.where(cols, xs, -1).amax(1)
    box_h, box_w = (y1 - y0 + 1).clamp(min=1).float(), (x1 - x0 + 1).clamp(min=1).float()
    fill = area / (box_h * box_w)
    yc, xc = (y0 + y1 + 1).float() / 2, (x0 + x1 + 1).float() / 2                    # box centre, px
    # IoU of the mask with each ideal shape sampled at pixel centres, best over the box and the box
    # grown by half a pixel a side (the true edge lies between the last pixel centre in and out)
    ious = []
    for grow in TEMPLATE_GROW:
        u = (xs.view(1, 1, w) + 0.5 - xc.view(-1, 1, 1)) / (box_w / 2 + grow).view(-1, 1, 1)
        v = (ys.view(1, h, 1) + 0.5 - yc.view(-1, 1, 1)) / (box_h / 2 + grow).view(-1, 1, 1)
        templates = torch.stack([u * u + v * v <= 1, (u.abs() <= 1) & (v.abs() <= 1),
                                 (2 * u.abs() <= v + 1) & (v <= 1)], 1).float()          # (B, 3, H, W)
        inter = (templates * mask[:, None]).sum((2, 3))
        ious.append(inter / (templates.sum((2, 3)) + area[:, None] - inter).clamp(min=1))  # (B, 3)
    iou = torch.stack(ious).amax(0)
    shape_p = torch.softmax(iou / SHAPE_TEMPERATURE, 1)
    shape = torch.where(want_s >= 0, shape_p.gather(1, want_s.clamp(min=0)[:, None]).squeeze(1), 1.0) * present
    # 5. quality
    near_obj = dilate(mask)
    off_bg = (d_bg > BG_TOL).float() * (1 - near_obj)
    clean = (1 - 3 * off_bg.sum((1, 2)) / (1 - near_obj).sum((1, 2)).clamp(min=1)).clamp(0, 1)
    centre_dist = torch.hypot(xc / w - 0.5, yc / h - 0.5)
    centred = (1 - centre_dist / 0.3).clamp(0, 1) * present
    size = (1 - ((torch.maximum(box_h / h, box_w / w)) - 0.55).abs() / 0.3).clamp(0, 1) * present
    quality = (clean + centred + size) / 3
    return dict(score=W_COLOUR * colour + W_SHAPE * shape + W_QUALITY * quality, colour=colour, shape=shape,
                quality=quality, clean=clean, centred=centred, size=size, present=present,
                pred_colour=dominant, pred_shape=shape_p.argmax(1), fill=fill, iou=iou,
                success=present & ((want_c < 0) | (dominant == want_c))
                & ((want_s < 0) | (shape_p.argmax(1) == want_s)))


def gold_score(prompts: list[str], images: torch.Tensor) -> torch.Tensor:
    """(B,) gold score in [0, 1] on the images' device; a reward `score(prompts, images)` (see gold_details)."""
    return gold_details(prompts, images)["score"].to(images.device)


# ---------------------------------------------------------------------------- noisy labelers

# Bradley-Terry temperature β: P(labeler prefers i over j) = σ((g_i − g_j) / β). Calibrated with
# calibrate_noise on reference_pairs(4000, seed=0) to an expected agreement between two independent
# labelers of 0.75 (InstructGPT §3.4: 72.6 ± 1.5% among training labelers, 77.3 ± 1.3%
# for held-out ones). Agreement depends on how far apart the pairs' gold scores are, so a run
# whose pairs differ from the reference (a better policy's samples are closer) should recalibrate.
DEFAULT_NOISE = 0.17


def _bt_prob(g_a: torch.Tensor, g_b: torch.Tensor, noise: float) -> torch.Tensor:
    """P(a ≻ b) = σ((g_a − g_b)/β); β = 0 is the noiseless labeler (ties go to b)."""
    return torch.sigmoid((g_a - g_b) / noise) if noise > 0 else (g_a > g_b).float()


def gold_rank(prompt: str, images: torch.Tensor, rng: torch.Generator, noise: float = DEFAULT_NOISE):
    """(K,) indices of K images of one prompt, best first, by a noisy labeler: Plackett-Luce sampling
    of utilities g/β (sorting g/β + Gumbel noise), whose pairwise marginal for K = 2 is exactly
    Bradley-Terry σ((g_i − g_j)/β). noise = 0 ranks by the gold score itself."""
    g = gold_details([prompt] * len(images), images)["score"]
    if noise <= 0:
        return g.argsort(descending=True)
    gumbel = -torch.log(-torch.log(torch.rand(len(g), generator=rng).clamp(1e-12, 1 - 1e-12)))
    return (g / noise + gumbel).argsort(descending=True)


def gold_prefer(prompts: list[str], images_a: torch.Tensor, images_b: torch.Tensor, rng: torch.Generator,
                noise: float = DEFAULT_NOISE) -> torch.Tensor:
    """(B,) bool, True where a noisy labeler prefers images_a[i] to images_b[i]: gold_rank with K = 2,
    batched over pairs."""
    g_a, g_b = gold_details(prompts, images_a)["score"], gold_details(prompts, images_b)["score"]
    return torch.rand(len(g_a), generator=rng) < _bt_prob(g_a, g_b, noise)


def expected_agreement(gold_a: torch.Tensor, gold_b: torch.Tensor, noise: float) -> float:
    """Mean over pairs of p² + (1 − p)², p = P(a ≻ b): two independent BT labelers agree."""
    p = _bt_prob(gold_a, gold_b, noise)
    return float((p * p + (1 - p) * (1 - p)).mean())


def labeler_agreement(gold_a: torch.Tensor, gold_b: torch.Tensor, noise: float, rng: torch.Generator) -> float:
    """Measured agreement: two simulated labelers each pick a winner of every pair (a_i, b_i)."""
    p = _bt_prob(gold_a, gold_b, noise)
    first, second = torch.rand(len(p), generator=rng) < p, torch.rand(len(p), generator=rng) < p
    return float((first == second).float().mean())


def calibrate_noise(gold_a: torch.Tensor, gold_b: torch.Tensor, target: float = 0.75) -> float:
    """β with expected_agreement = target on these pairs (bisection on log β, 50 steps)."""
    lo, hi = math.log(1e-4), math.log(100.0)
    if expected_agreement(gold_a, gold_b, math.exp(lo)) < target:
        raise ValueError(f"agreement {target} is unreachable: the pairs' gold scores are too close")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_agreement(gold_a, gold_b, math.exp(mid)) > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def reference_pairs(n: int, seed: int, cfg: WorldConfig = WorldConfig()):
    """(prompts, images_a, images_b): n pairs for one plain prompt each, where each image shows
    the prompt's colour and shape with probability 1/2 (else random) — a half-trained model's
    samples, the distribution DEFAULT_NOISE is calibrated on."""
    gen = torch.Generator().manual_seed(seed)
    pairs = prompt_pairs()
    which = torch.randint(len(pairs), (n,), generator=gen)
    want_c = torch.tensor([COLOURS.index(pairs[i][0]) for i in which])
    want_s = torch.tensor([SHAPES.index(pairs[i][1]) for i in which])
    out = []
    for _ in range(2):
        keep = torch.rand(n, generator=gen) < 0.5
        c = torch.where(keep, want_c, torch.randint(len(COLOURS), (n,), generator=gen))
        s = torch.where(keep, want_s, torch.randint(len(SHAPES), (n,), generator=gen))
        out.append(render(sample_attributes(n, gen, cfg, c, s), cfg.size, cfg.antialias))
    return [plain_prompt(*pairs[i]) for i in which], out[0], out[1]
