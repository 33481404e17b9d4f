"""`align image rm --data hf:...`: ranked image pairs from a `datasets` dataset in Pick-a-Pic's layout."""
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.data import DataError
from align.data.hf_images import load_hf_image_preferences

datasets = pytest.importorskip("datasets")

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9)}
NOUNS = ["cat", "house", "car", "tree", "boat", "bird", "cup", "chair"]


def _png_bytes(rgb, rng, size=(32, 32)) -> bytes:
    x = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 0.08, (*size, 3)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((x * 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def colour_pairs(seed=0):
    """(prompt, chosen PNG bytes, rejected PNG bytes, tie): the image of the prompt's colour wins; one tie."""
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    pairs = []
    for colour in COLOURS:
        for noun in NOUNS:
            other = prng.choice([c for c in COLOURS if c != colour])
            pairs.append((f"a {colour} image of a {noun}", _png_bytes(COLOURS[colour], rng),
                          _png_bytes(COLOURS[other], rng), False))
    pairs.append(("a red image of a cat, again", _png_bytes(COLOURS["green"], rng), _png_bytes(COLOURS["blue"], rng),
                  True))
    return pairs


def pickapic_rows(pairs, seed=0):
    """Pick-a-Pic's columns; the chosen image lands in jpg_0 or jpg_1 at random, as in the real data."""
    prng = random.Random(seed)
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label")}
    for prompt, chosen, rejected, tie in pairs:
        swap = prng.random() < 0.5 and not tie  # a tie keeps the JSONL's order, so the two runs batch alike
        rows["caption"].append(prompt)
        rows["jpg_0"].append(rejected if swap else chosen)
        rows["jpg_1"].append(chosen if swap else rejected)
        labels = (0.5, 0.5) if tie else ((0.0, 1.0) if swap else (1.0, 0.0))
        rows["label_0"].append(labels[0]), rows["label_1"].append(labels[1]), rows["has_label"].append(True)
    return rows


def as_jsonl(pairs, folder):
    (folder / "img").mkdir(parents=True)
    lines = []
    for i, (prompt, chosen, rejected, tie) in enumerate(pairs):
        (folder / "img" / f"{i}c.png").write_bytes(chosen), (folder / "img" / f"{i}r.png").write_bytes(rejected)
        lines.append(json.dumps({"prompt": prompt, "chosen": f"img/{i}c.png", "rejected": f"img/{i}r.png",
                                 **({"tie": True} if tie else {})}))
    (folder / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prefs.jsonl"


def test_pickapic_layout_reads_labels_ties_and_skips(tmp_path, caplog):
    pairs = colour_pairs()
    rows = pickapic_rows(pairs)
    same = rows["jpg_0"][0]
    for col, extra in (("caption", ["unlabelled", "same image", "  ", rows["caption"][0]]),
                       ("jpg_0", [same, same, same, same]), ("jpg_1", [rows["jpg_1"][1], same, rows["jpg_1"][2],
                                                                      rows["jpg_1"][0]]),
                       ("label_0", [0.0, 1.0, 1.0, rows["label_0"][0]]), ("label_1", [0.0, 0.0, 0.0, rows["label_1"][0]]),
                       ("has_label", [False, True, True, True])):  # the last: a repeat of row 0
        rows[col] += extra
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "pap"))
    with caplog.at_level("WARNING", logger="align.data.hf_images"):
        groups, images = load_hf_image_preferences(str(tmp_path / "pap"), "train")
    assert len(groups) == len(pairs)
    msg = caplog.text
    assert "1 row(s) with no preference" in msg and "1 row(s) with the same image twice" in msg and \
        "1 row(s) with an empty prompt" in msg and "1 row(s) with a repeat of an earlier row" in msg
    for g, (prompt, chosen, rejected, tie) in zip(groups, pairs):
        assert g.prompt == prompt and g.pairs[0].label == (0.5 if tie else 1.0)
        got = [images.open(c).read() for c in g.candidates]
        assert got == [chosen, rejected] or (tie and got == [rejected, chosen])  # a tie has no order
    assert images.where(groups[3].candidates[0])[1:] == (3, "jpg_1" if rows["label_1"][3] == 1.0 else "jpg_0")


def test_pickapic_rows_are_read_in_batches(monkeypatch):
    """`datasets` formats a row read alone at ~100 µs (2 s of 20k Pick-a-Pic rows, 100 s of a million): rows are read
    32 at a time."""
    def one_by_one(self):
        raise AssertionError("rows read one at a time")
    monkeypatch.setattr(datasets.Dataset, "__iter__", one_by_one)
    groups, _ = load_hf_image_preferences(datasets.Dataset.from_dict(pickapic_rows(colour_pairs())))
    assert len(groups) == len(colour_pairs())


def test_image_column_layout_and_splits(tmp_path):
    """prompt/chosen/rejected as `datasets.Image` columns, in a DatasetDict: read undecoded, split by name."""
    pairs = colour_pairs()[:6]
    feats = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                               "rejected": datasets.Image()})
    ds = datasets.Dataset.from_dict({"prompt": [p for p, *_ in pairs],
                                     "chosen": [{"bytes": c, "path": None} for _, c, _, _ in pairs],
                                     "rejected": [{"bytes": r, "path": None} for _, _, r, _ in pairs]}, features=feats)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    groups, images = load_hf_image_preferences(str(tmp_path / "dd"), "test")
    assert [g.prompt for g in groups] == [p for p, *_ in pairs]
    assert images.open(groups[2].candidates[1]).read() == pairs[2][2]
    with pytest.raises(DataError, match=r"no split 'train' \(splits: \['test'\]\)"):
        load_hf_image_preferences(str(tmp_path / "dd"), "train")


@pytest.mark.parametrize("column, value, match", [
    ("label_0", 0.3, r"pap:train:2: field 'label_0': expected 0, 0.5 or 1, got 0.3"),
    ("label_1", 1.0, r"pap:train:2: field 'label_0': labels \[1.0, 1.0\] are not a preference"),
])
def test_bad_labels_name_row_and_column(tmp_path, column, value, match):
    rows = pickapic_rows(colour_pairs()[:4])
    rows["label_0"][2], rows["label_1"][2] = 1.0, 0.0
    rows[column][2] = value
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "pap"))
    with pytest.raises(DataError, match=match):
        load_hf_image_preferences(str(tmp_path / "pap"))


def test_unknown_layout_lists_the_columns(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"], "img": [b"x"]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataError, match=r"columns: \['text', 'img'\]\).*caption, jpg_0, jpg_1, label_0, label_1"):
        load_hf_image_preferences(str(tmp_path / "other"))


def test_local_folder_by_tilde_or_dot_and_a_single_shard_file(tmp_path, monkeypatch):
    """`hf:~/shards` read "~/shards" as a hub id and `hf:.` failed in `datasets` ("dataset_name should be specified"):
    a local folder is now passed resolved. One downloaded shard file loads as the split asked for."""
    pairs = colour_pairs()[:5]
    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "validation_unique-00000-of-00001.parquet"
    datasets.Dataset.from_dict(pickapic_rows(pairs)).to_parquet(str(shard))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "shards")
    for spec, split in (("~/shards", "validation"), (".", "validation"), (str(shard), "validation_unique")):
        groups, images = load_hf_image_preferences(spec, split)
        assert [g.prompt for g in groups] == [p for p, *_ in pairs], spec
        assert groups[0].source == f"{spec}:{split}:0"
    with pytest.raises(DataError, match="no dataset named"):  # `hf:` read the working directory (an IndexError before)
        load_hf_image_preferences("", "train")


def test_image_paths_relative_to_the_dataset_file(tmp_path, monkeypatch):
    """Image columns holding file paths: a relative one is read next to the data (as a JSONL's), from any directory."""
    pairs = colour_pairs()[:3]
    jsonl = as_jsonl(pairs, tmp_path / "data")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data" / "prefs.parquet"))
    monkeypatch.chdir(tmp_path)
    groups, images = load_hf_image_preferences(str(tmp_path / "data" / "prefs.parquet"))
    assert [Path(images.open(c)).read_bytes() for c in groups[1].candidates] == list(pairs[1][1:3])


def _rm_config(data, out, **kw):
    from image_rlhf.rm import ImageRMConfig
    return ImageRMConfig(clip="tiny-clip", data=str(data), out=str(out), epochs=2, max_pairs_per_batch=8, lr=2e-3,
                         logit_scale_lr=1e-2, eval_fraction=0.25, log_every=1, seed=0, **kw)


def test_hf_data_trains_the_same_rm_as_the_same_pairs_in_jsonl(tmp_path):
    """The same pairs (chosen in jpg_0 or jpg_1 at random, one tie) from a Pick-a-Pic-layout parquet file and from a
    JSONL with PNG files: the same groups, images and batches, so the same losses and the same final model."""
    from image_rlhf.clip_reward import ClipReward
    from image_rlhf.rm import run_image_rm
    pairs = colour_pairs()
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(pickapic_rows(pairs)).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    jsonl = as_jsonl(pairs, tmp_path / "js")
    torch.manual_seed(0)
    a = run_image_rm(_rm_config(f"hf:{tmp_path / 'pq'}", tmp_path / "run_hf"))
    torch.manual_seed(0)
    b = run_image_rm(_rm_config(jsonl, tmp_path / "run_js"))
    logs = [[json.loads(x) for x in (d.parent / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    losses = [[r["rm/loss"] for r in log if "rm/loss" in r] for log in logs]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    meta_a, meta_b = (json.loads((d / "align_reward.json").read_text()) for d in (a, b))
    assert meta_a["held_out"]["n_pairs"] > 0 and meta_a["held_out"] == pytest.approx(meta_b["held_out"], rel=1e-6)
    ra, rb = ClipReward.load(a).eval(), ClipReward.load(b).eval()
    for p, q in zip(ra.parameters(), rb.parameters()):
        torch.testing.assert_close(p, q)
    assert "hf:" in (a.parent / "report.md").read_text()


def test_corrupt_image_in_hf_data_names_row_and_column(tmp_path):
    from image_rlhf.rm import run_image_rm
    rows = pickapic_rows(colour_pairs())
    rows["jpg_1"][5] = b"not an image"
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "pap"))
    with pytest.raises(DataError, match=r"pap:train:5: field 'jpg_1': cannot read image"):
        run_image_rm(_rm_config(f"hf:{tmp_path / 'pap'}", tmp_path / "run"))
