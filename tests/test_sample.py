"""`align sample`: K candidates per prompt for ranking, and the file they make is reward-model input as it is."""
import json
import os
import re

import numpy as np
import pytest
import torch

from align.data import load_preferences, pairs_from_ranking, ranking_from_scores


def length_judge(prompts, responses):
    return [float(len(r)) for r in responses]


def crashing_judge(prompts, responses):
    """length_judge, but raises at the prompt named by $SAMPLE_CRASH_AT (a crash mid-run)."""
    if os.environ.get("SAMPLE_CRASH_AT") in prompts:
        raise RuntimeError("killed")
    return length_judge(prompts, responses)


JUDGE_CALLS = []


def counting_judge(prompts, responses):
    """length_judge, recording each call's prompts; NaN for the prompt named by $SAMPLE_NAN_AT."""
    JUDGE_CALLS.append(list(prompts))
    return [float("nan") if p == os.environ.get("SAMPLE_NAN_AT") else float(len(r)) for p, r in zip(prompts, responses)]


def mean_judge(prompts, images):
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("scores,tol,ranking", [
    ([0.1, 0.5, 0.5, 0.2], 0.0, [[1, 2], 3, 0]),
    ([3.0, 2.0, 1.0], 0.0, [0, 1, 2]),
    ([1.0, 1.05, 0.5, 0.98], 0.1, [[0, 1, 3], 2]),   # within 0.1 of the tier's best (1.05)
    ([1.0, 0.95, 0.9], 0.06, [[0, 1], 2]),           # 0.9 is 0.1 below the tier's best: a tier of its own
])
def test_ranking_from_scores(scores, tol, ranking):
    assert ranking_from_scores(scores, tol) == ranking
    pairs = pairs_from_ranking(ranking, len(scores))
    assert len(pairs) == len(scores) * (len(scores) - 1) // 2
    for p in pairs:  # every pair agrees with the scores: the winner scores higher, a tie within tol
        a, b = scores[p.winner], scores[p.loser]
        assert (a > b) if p.label == 1.0 else abs(a - b) <= tol + 1e-12
    with pytest.raises(ValueError, match="finite"):
        ranking_from_scores([1.0, float("nan")])


def _prompts(path, n=5):
    path.write_text("".join(f"count the words {i}\n" for i in range(n)))
    return str(path)


def _run(tmp_path, model, prompts, out, *extra):
    from align.cli import main
    return main(["sample", "--model", model, "--prompts", prompts, "--k", "3", "--out", str(out),
                 "text.max_new_tokens=6", "batch_size=6", *extra])


def test_text_candidates_judge_ranking_and_rm_input(tmp_path, tiny_gpt2):
    prompts = _prompts(tmp_path / "p.txt")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "plain") == 0
    lines = [json.loads(x) for x in (tmp_path / "plain" / "candidates.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == [f"count the words {i}" for i in range(5)]
    for r in lines:  # distinct, non-empty, and nothing to rank with yet
        assert 2 <= len(r["completions"]) == len(set(r["completions"])) <= 3 and all(c.strip() for c in r["completions"])
        assert "ranking" not in r
    assert (tmp_path / "plain" / "report.md").read_text().count("add `\"ranking\"`") == 1
    # a judge ranks them: the same candidates (same seed), ranked by its scores, and align text rm reads the file
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "judged", "--judge", "test_sample:length_judge") == 0
    judged = [json.loads(x) for x in (tmp_path / "judged" / "candidates.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in judged] == [r["completions"] for r in lines]
    for r in judged:
        assert r["scores"] == [float(len(c)) for c in r["completions"]]
        assert r["ranking"] == ranking_from_scores(r["scores"])
    groups = load_preferences(tmp_path / "judged" / "candidates.jsonl")
    assert [g.candidates for g in groups] == [r["completions"] for r in judged]
    # another seed draws other candidates
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "seed1", "seed=1") == 0
    assert (tmp_path / "seed1" / "candidates.jsonl").read_text() != (tmp_path / "plain" / "candidates.jsonl").read_text()


def test_resume_after_a_crash_gives_the_uninterrupted_file(tmp_path, tiny_gpt2, monkeypatch):
    prompts = _prompts(tmp_path / "p.txt", n=6)
    judge = ["--judge", "test_sample:crashing_judge"]
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "whole", *judge) == 0
    monkeypatch.setenv("SAMPLE_CRASH_AT", "count the words 4")  # the third call of 2 prompts each
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge) == 2  # the judge's error, in one line
    assert json.loads((tmp_path / "cut" / "progress.json").read_text())["prompts"] == 4
    with open(tmp_path / "cut" / "candidates.jsonl", "ab") as f:  # a call written but not recorded: cut on resume
        f.write(b'{"prompt": "half a li')
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge) == 2  # not without --resume
    monkeypatch.delenv("SAMPLE_CRASH_AT")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge, "seed=1", "--resume") == 2  # other settings
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge, "--resume") == 0
    assert (tmp_path / "cut" / "candidates.jsonl").read_bytes() == (tmp_path / "whole" / "candidates.jsonl").read_bytes()


def test_a_completion_with_a_unicode_line_separator_is_one_line(tmp_path, tiny_gpt2, monkeypatch):
    """The report read candidates.jsonl with str.splitlines, which also splits at U+2028 and U+0085 (written raw:
    ensure_ascii=False): a model that sampled one had the run fail at its end, with no report. The file itself is
    one line per prompt, as the RM reads it."""
    from text_rlhf.compare import TextGenerator
    monkeypatch.setattr(TextGenerator, "__call__",
                        lambda self, prompts, seed: [["a\u2028b", "c\x85d", "e\u2029f"][i % 3] for i in range(len(prompts))])
    prompts = _prompts(tmp_path / "p.txt", n=2)
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "s", "--judge", "test_sample:length_judge") == 0
    assert "'a\\u2028b'" in (tmp_path / "s" / "report.md").read_text()
    groups = load_preferences(str(tmp_path / "s" / "candidates.jsonl"), allow_duplicates=True)
    assert [g.candidates for g in groups] == [["a\u2028b", "c\x85d", "e\u2029f"]] * 2


def test_judge_scores_each_generate_call_at_once(tmp_path, tiny_gpt2, monkeypatch, caplog):
    """The judge was called once per prompt, K candidates at a time (10k prompts: 10k calls of 4, ~5 ms each with a
    tiny RM, a quarter of the run): now once per generate call, with the scores split back per prompt; a NaN still
    names its prompt."""
    JUDGE_CALLS.clear()
    prompts = _prompts(tmp_path / "p.txt", n=5)
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "j", "--judge", "test_sample:counting_judge") == 0
    assert [sorted(set(c)) for c in JUDGE_CALLS] == [[f"count the words {i}" for i in (0, 1)],
                                                     [f"count the words {i}" for i in (2, 3)], ["count the words 4"]]
    for r in (json.loads(x) for x in (tmp_path / "j" / "candidates.jsonl").read_text().splitlines()):
        assert r["scores"] == [float(len(c)) for c in r["completions"]]
    monkeypatch.setenv("SAMPLE_NAN_AT", "count the words 3")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "nan", "--judge", "test_sample:counting_judge") == 2
    assert "p.txt: prompt 4" in caplog.text


def test_bad_settings_fail_before_the_folder(tmp_path, tiny_gpt2, caplog):
    prompts = _prompts(tmp_path / "p.txt")
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    for extra, prompt_file, message in (
            (["k=1"], prompts, "k must be >= 2"),
            (["text.sample=false"], prompts, "greedy decoding, one answer per prompt"),
            ([], str(conv), "text.chat_template: the tokenizer .* has no chat template"),
            (["text.max_new_tokens=10000"], prompts, "exceeds the model's .* positions")):
        caplog.clear()
        assert _run(tmp_path, tiny_gpt2, prompt_file, tmp_path / "bad", *extra) == 2
        assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text
        assert not (tmp_path / "bad").exists()


def test_image_candidates_sheets_and_image_rm_input(tmp_path, tiny_sd_path):
    from PIL import Image
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    from align.sample import SampleConfig, run_sample
    cfg = SampleConfig(model=tiny_sd_path, prompts=str(tmp_path / "p.txt"), k=3, out=str(tmp_path / "i"),
                       judge="test_sample:mean_judge", batch_size=6)
    cfg.image.num_steps = 3
    run_sample(cfg)
    lines = [json.loads(x) for x in (tmp_path / "i" / "candidates.jsonl").read_text().splitlines()]
    assert [r["images"] for r in lines] == [[f"images/{i:06d}-{j}.png" for j in range(3)] for i in range(2)]
    for r in lines:  # the judge's scores are those of the PNGs as written (lossless), and the ranking follows them
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "i" / p)))
                            for p in r["images"]]).permute(0, 3, 1, 2).float() / 255
        assert torch.allclose(mean_judge(None, imgs), torch.tensor(r["scores"]), atol=3e-3)
        assert r["ranking"] == ranking_from_scores(r["scores"])
    sheet = np.array(Image.open(tmp_path / "i" / "sheets" / "000001.png").convert("L"))
    tile = (sheet.shape[1] - 2) / 3  # K = 3 in a row, each >= 96 px, with its prompt above and its index below
    assert tile >= 96 and sheet.shape[0] < 1.6 * tile
    strip = 20  # the text strips above and below the images (14 px font)
    for rows in (sheet[:strip], sheet[-strip:]):  # dark text on white
        assert rows.mean() > 200 and (rows < 128).any()
    for j in range(3):  # each index, under its own image
        assert (sheet[-strip:, int(j * tile + 0.3 * tile):int(j * tile + 0.7 * tile)] < 128).any()
    groups = load_preferences(tmp_path / "i" / "candidates.jsonl", candidates="path")
    assert len(groups) == 2 and groups[0].candidates[0].endswith("images/000000-0.png")


def test_out_of_another_run_or_a_file_is_refused_untouched(tmp_path, tiny_gpt2, caplog):
    """--out pointing at a training run's folder wrote its config.yaml and report.md over; a file was an Errno."""
    prompts = _prompts(tmp_path / "p.txt")
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.yaml").write_text("lr: 0.001\n")
    (sft / "report.md").write_text("# SFT\n")
    assert _run(tmp_path, tiny_gpt2, prompts, sft) == 2
    assert "holds another run's files (config.yaml, report.md)" in caplog.text
    assert sorted(p.name for p in sft.iterdir()) == ["config.yaml", "report.md"]
    assert (sft / "config.yaml").read_text() == "lr: 0.001\n" and (sft / "report.md").read_text() == "# SFT\n"
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "file") == 2
    assert "is a file, not a folder" in caplog.text
    (tmp_path / "empty").mkdir()  # an empty folder, or one holding other files (the prompts), is fine
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "empty") == 0


def test_resume_of_a_run_killed_in_its_first_call_and_of_a_ranked_file(tmp_path, tiny_gpt2, monkeypatch):
    """A run killed before its first call was recorded had no progress.json, so --resume refused it; --resume of a
    finished (or partial) run cut candidates.jsonl at the recorded byte count, through the rankings added to it."""
    prompts = _prompts(tmp_path / "p.txt", n=4)
    judge = ["--judge", "test_sample:crashing_judge"]
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "whole", *judge) == 0
    monkeypatch.setenv("SAMPLE_CRASH_AT", "count the words 0")  # dies in the first call
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge) == 2
    monkeypatch.delenv("SAMPLE_CRASH_AT")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "cut", *judge, "--resume") == 0
    whole = (tmp_path / "whole" / "candidates.jsonl").read_text()
    assert (tmp_path / "cut" / "candidates.jsonl").read_text() == whole
    # nothing written yet: a new run (other settings) starts over in the folder without --resume
    monkeypatch.setenv("SAMPLE_CRASH_AT", "count the words 0")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "redo", *judge) == 2
    monkeypatch.delenv("SAMPLE_CRASH_AT")
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "redo", *judge, "seed=1") == 0
    # a labeler ranks the first line of a finished run (the editor drops the final newline), then --resume
    cands = tmp_path / "whole" / "candidates.jsonl"
    lines = [json.loads(x) for x in whole.splitlines()]
    lines[0]["ranking"] = [[1, 0]] + list(range(2, len(lines[0]["completions"])))
    cands.write_text("\n".join(json.dumps(r) for r in lines))
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "whole", *judge, "--resume") == 0
    assert [json.loads(x) for x in cands.read_text().splitlines()] == lines
    assert load_preferences(cands)[0].pairs[0].label == 0.5  # the labeler's tie, kept
    cands.write_text("\n".join(json.dumps(r) for r in lines[:2]) + "\n")  # lines lost since: refused, not padded
    assert _run(tmp_path, tiny_gpt2, prompts, tmp_path / "whole", *judge, "--resume") == 2


def _chat_lm(tmp_path):
    from text_rlhf.tiny import build_bpe_tokenizer, tiny_causal_lm
    from conftest import CORPUS
    tok = build_bpe_tokenizer(CORPUS, 300, pad=True)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tiny_causal_lm("llama", tok).save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    return str(tmp_path / "chat")


def test_conversations_a_judge_or_a_pipeline_cannot_read_fail_before_the_folder(tmp_path, tiny_gpt2, tiny_sd_path,
                                                                               caplog):
    """A reward-model judge without a chat template failed at its first score, after generating, with --out written;
    conversation prompts to an image pipeline reached its tokenizer (a cryptic type error), --out written."""
    from transformers import AutoModelForSequenceClassification

    from text_rlhf.models import load_tokenizer
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "count the words"}]}) + "\n")
    torch.manual_seed(0)
    cfg = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=1).config
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_gpt2).save_pretrained(tmp_path / "rm")
    assert _run(tmp_path, _chat_lm(tmp_path), str(conv), tmp_path / "o", "--judge", str(tmp_path / "rm")) == 2
    assert re.search(r"--judge .*rm: the tokenizer .* has no chat template", caplog.text), caplog.text
    assert _run(tmp_path, tiny_sd_path, str(conv), tmp_path / "o") == 2
    assert "conversation prompts are for text models" in caplog.text
    assert not (tmp_path / "o").exists()


def test_a_json_array_of_prompts_is_named(tmp_path):
    from align.data import DataError, load_prompts
    for text in ('[{"prompt": "a"}, {"prompt": "b"}]\n', '[\n  {"prompt": "a"}\n]\n'):
        (tmp_path / "p.json").write_text(text)
        with pytest.raises(DataError, match=r"p.json:1: .*a JSON array\? JSON Lines is one object per line"):
            load_prompts(tmp_path / "p.json")
