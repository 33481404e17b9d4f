"""scripts/make_image_example.py (the offline example behind scripts/image_pipeline.sh) writes what
the CLI reads: a pipeline folder `--pipeline` loads, ranked samples `align image rm --data` loads
(paths relative to the JSONL file, every image decodable), prompt files for DDPO and compare."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_make_image_example_writes_what_the_cli_reads(tmp_path):
    from align.data import load_preferences
    from image_rlhf.pipeline import load_pipeline
    from image_rlhf.rm import ImageStore
    from image_rlhf.world import ENGINEERED_TAGS, gold_score

    spec = importlib.util.spec_from_file_location("make_image_example", ROOT / "scripts" / "make_image_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ex"
    mod.main(str(out), steps=60, batch_size=16)  # a short base (the formats are under test), long enough to draw blobs

    parts = load_pipeline(out / "base")
    assert parts.vae is None and parts.unet.config.in_channels == 3  # the pixel-space layout
    groups = load_preferences(str(out / "prefs.jsonl"), candidates="path")
    assert len(groups) == 12 * mod.GROUPS and all(len(g.candidates) == mod.K for g in groups)
    store = ImageStore((16, 16)).add(groups)  # decodes every PNG, named relative to the JSONL file
    images = store.load(groups[0].candidates)
    assert images.shape == (mod.K, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    # the labels are the noisy gold labeler's: over all pairs, the winner has the higher gold score more
    # often than not (a noisy labeler, so not always)
    gold = gold_score([g.prompt for g in groups for _ in g.candidates],
                      store.load([c for g in groups for c in g.candidates])).view(len(groups), mod.K)
    w, l_ = (torch.tensor([[p.winner, p.loser] for g in groups for p in g.pairs]).view(len(groups), -1, 2).unbind(-1))
    gw, gl = gold.gather(1, w), gold.gather(1, l_)
    decided = gw != gl
    assert decided.sum() > 100 and (gw > gl)[decided].float().mean() > 0.55
    prompts = (out / "prompts.txt").read_text().split("\n")[:-1]
    assert len(prompts) == 12 and prompts[0] == "a red circle"
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["engineered"].endswith(ENGINEERED_TAGS) for r in rows)


def test_example_scripts_take_help_instead_of_writing_a_folder_named_help(tmp_path):
    """`python scripts/make_image_example.py --help` trained a base model for minutes into ./--help."""
    import subprocess
    import sys
    for script in ("make_text_example.py", "make_image_example.py"):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout and "DIR" in done.stdout, done.stderr
    assert list(tmp_path.iterdir()) == []
