"""`align compare`: bootstrap statistics, prompt files and templates, and end-to-end runs on tiny
random models (a GPT-2 and a Stable Diffusion pipeline) checked against a direct computation."""
import json

import pytest
import torch

from align.compare import (FunctionJudge, PromptItem, bootstrap_ci, compare_arms, compare_table, default_pairs,
                           load_compare_prompts, make_template, parse_models, splits_table, summarize, win_rate)
from align.data import DataError
from conftest import CORPUS


def length_judge(prompts, responses):
    """A gold-judge stand-in for tests: min(characters / 20, 1) — success = a long enough answer."""
    return [min(len(r) / 20.0, 1.0) for r in responses]


def prompt_echo_judge(prompts, responses):
    """1 when the judge was handed the plain prompt (never the engineered one), else 0."""
    return [0.0 if p.startswith("Q:") else 1.0 for p in prompts]


# ---------------------------------------------------------------------------- statistics

def test_bootstrap_ci_covers_true_mean_at_nominal_rate():
    """95% percentile CIs of the mean of N(0.3, 1) samples cover 0.3 about 95% of the time, and are
    about 2·1.96/√P wide (the normal-theory width)."""
    g = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for rep in range(200):
        x = 0.3 + torch.randn(100, generator=g, dtype=torch.float64)
        s = summarize(x, n_boot=1000, seed=rep)
        covered += s["ci_low"] <= 0.3 <= s["ci_high"]
        widths.append(s["ci_high"] - s["ci_low"])
    assert 0.90 <= covered / 200 <= 0.99
    assert sum(widths) / len(widths) == pytest.approx(2 * 1.96 / 100 ** 0.5, rel=0.1)


def test_ci_width_order():
    """4× the prompts halves the width; resampling seeds widens it when seeds have an effect."""
    g = torch.Generator().manual_seed(1)
    small, big = (summarize(torch.randn(p, generator=g), n_boot=2000) for p in (100, 1600))
    w = lambda s: s["ci_high"] - s["ci_low"]
    assert w(small) / w(big) == pytest.approx(4.0, rel=0.2)
    seeds = torch.randn(400, 4, generator=g) + torch.tensor([0.0, 0.5, 1.0, 1.5])  # a shift per seed
    crossed = summarize(seeds, n_boot=2000)
    prompts_only = bootstrap_ci(seeds.mean(1, keepdim=True)[None], n_boot=2000)
    assert crossed["mean"] == pytest.approx(prompts_only[0].item())
    assert w(crossed) > 3 * (prompts_only[2] - prompts_only[1]).item()


def test_bootstrap_is_seeded_and_chunk_consistent():
    x = torch.rand(50, 3, generator=torch.Generator().manual_seed(2))
    assert summarize(x, seed=7) == summarize(x, seed=7)
    assert summarize(x, seed=7) != summarize(x, seed=8)
    one, many = bootstrap_ci(x[None], 500, seed=3), bootstrap_ci(x[None], 500, seed=3, chunk_elems=50 * 7)
    assert torch.allclose(one[0], many[0])  # chunking changes the draws, not the estimate's scale
    assert (many[2] - many[1]).item() == pytest.approx((one[2] - one[1]).item(), rel=0.25)


def test_success_rate():
    s = summarize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.99]]), success_threshold=1.0, n_boot=500)
    assert s["success"] == pytest.approx(3 / 6) and s["mean"] == pytest.approx(4.49 / 6)
    assert 0 <= s["success_ci_low"] <= 0.5 <= s["success_ci_high"] <= 1
    assert summarize(torch.ones(4))["success"] is None


def test_win_rate_identical_arms_and_ties_half():
    x = torch.rand(30, 2, generator=torch.Generator().manual_seed(3))
    same = win_rate(x, x.clone())
    assert same["win_rate"] == 0.5 and same["ties"] == 60
    assert same["ci_low"] == pytest.approx(0.5) and same["ci_high"] == pytest.approx(0.5)
    a, b = torch.tensor([1.0, 0.0, 1.0, 0.5]), torch.tensor([0.0, 0.0, 0.5, 1.0])  # W, T, W, L
    r = win_rate(a, b, n_boot=200)
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["mean_diff"] == pytest.approx(0.25)
    assert win_rate(a, b + 0.4, tie_tol=0.5)["win_rate"] == 0.5  # all within tolerance
    with pytest.raises(ValueError, match="paired"):
        win_rate(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        win_rate(torch.tensor([float("nan")]), torch.ones(1))


def test_compare_table_structure():
    arms = {"base": torch.zeros(5, 2), "aligned": torch.ones(5, 2)}
    md = compare_table(arms, success_threshold=1.0, n_boot=100)
    lines = md.splitlines()
    assert lines[0].startswith("| arm | prompts | seeds | mean score | 95% CI | success (≥ 1)")
    assert "| aligned | base | 1.000 | [1.000, 1.000] | 10/0/0 | 1.000 |" in md
    assert default_pairs(["base", "sft", "aligned"]) == [
        ("sft-plain", "base-engineered"), ("aligned-plain", "base-engineered"),
        ("base-engineered", "base-plain"), ("sft-engineered", "sft-plain"), ("aligned-engineered", "aligned-plain")]


def test_splits_table_one_row_per_split():
    """Split A: aligned beats base on 3 of 4 prompts and ties one (win 7/8); split B: always loses."""
    a = {"base": torch.tensor([[0.5], [0.5], [0.5], [1.0]]), "aligned": torch.tensor([[1.0], [0.9], [0.6], [1.0]])}
    b = {"base": torch.ones(2, 3), "aligned": torch.zeros(2, 3)}
    named = {name: compare_arms(arms, [("aligned", "base")], n_boot=200) for name, arms in (("A", a), ("B", b))}
    md = splits_table(named, ("base", "aligned"), ("aligned", "base"))
    lines = md.splitlines()
    assert lines[0] == "| prompts | n | base | aligned | aligned wins vs base | mean diff |"
    assert lines[2].startswith("| A | 4 × 1 | 0.625 | 0.875 | 87.5% [") and "| +0.250 [" in lines[2]
    assert lines[3] == "| B | 2 × 3 | 1.000 | 0.000 | 0.0% [0%, 0%] | -1.000 [-1.000, -1.000] |"


# ---------------------------------------------------------------------------- prompt files and templates

def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_templates_render(tmp_path):
    shots = _write(tmp_path / "shots.jsonl", ['{"prompt": "add 2 and 3", "response": " 5"}',
                                              '{"prompt": "reverse 1 2", "response": " 2 1"}'])
    qa = make_template("fewshot-qa", shots)
    assert qa("sort 3 1") == "Q: add 2 and 3\nA: 5\n\nQ: reverse 1 2\nA: 2 1\n\nQ: sort 3 1\nA:"
    assert qa("add 2 and 3") == "Q: reverse 1 2\nA: 2 1\n\nQ: add 2 and 3\nA:"  # no answer leaked
    many = _write(tmp_path / "many.jsonl", [json.dumps({"prompt": f"add {i} and 1", "response": f" {i + 1}"})
                                            for i in range(20)])
    k3 = make_template("fewshot-qa", many, k=3)
    assert k3("sort 3 1").count("Q: ") == 4 and k3("sort 3 1") == make_template("fewshot-qa", many, k=3)("sort 3 1")
    assert k3("sort 3 1") != k3("sort 2 1") and "Q: add 4 and 1\n" not in k3("add 4 and 1")[:-20]
    assert make_template("fewshot-qa", many)("x").count("Q: ") == 21
    assert make_template("sd-tags")("a red circle ") == "a red circle, masterpiece, best quality, highly detailed"
    assert make_template("Instruction: {prompt} {json: 1}")("x") == "Instruction: x {json: 1}"
    with pytest.raises(ValueError, match="needs --fewshot"):
        make_template("fewshot-qa")
    with pytest.raises(ValueError, match="expected fewshot-qa, sd-tags"):
        make_template("fewshot")
    with pytest.raises(ValueError, match="only applies"):
        make_template("sd-tags", shots)
    bad = _write(tmp_path / "bad_shots.jsonl", ['{"prompt": "p", "response": ""}'])
    with pytest.raises(DataError, match=r"bad_shots.jsonl:1: field 'response': empty"):
        make_template("fewshot-qa", bad)


def test_prompt_file_variants(tmp_path):
    f = _write(tmp_path / "p.jsonl", ['{"prompt": "a", "engineered": "A!", "id": "x"}', "",
                                      '{"prompt": "b", "engineered": "B!"}'])
    assert load_compare_prompts(f) == [PromptItem("x", "a", "A!"), PromptItem("3", "b", "B!")]
    g = _write(tmp_path / "p.txt", ["a red circle", "", "a blue square"])
    assert load_compare_prompts(g, make_template("sd-tags"))[1] == PromptItem(
        "3", "a blue square", "a blue square, masterpiece, best quality, highly detailed")
    h = _write(tmp_path / "q.jsonl", ['{"prompt": "a", "id": 7}'])
    assert load_compare_prompts(h, make_template("<{prompt}>")) == [PromptItem("7", "a", "<a>")]


@pytest.mark.parametrize("lines, template, message", [
    (['{"prompt": "a", "engineered": "b"}', '{"engineered": "b"}'], None, r":2: field 'prompt': missing"),
    (['{"prompt": 3, "engineered": "b"}'], None, r":1: field 'prompt': expected a string, got int"),
    (['{"prompt": "a", "engineered": ""}'], None, r":1: field 'engineered': empty"),
    (['{"prompt": "a"}'], None, r":1: field 'engineered': missing \(give it on every line, or pass --template\)"),
    (['{"prompt": "a", "engineered": "b"}'], "sd-tags", r":1: field 'engineered': given here and by --template"),
    (['{"prompt": "a", "engineered": "b", "id": 1}', '{"prompt": "c", "engineered": "d", "id": "1"}'], None,
     r":2: field 'id': duplicate id '1' \(first on line 1\)"),
    (['{"prompt": "a", "engineered": "b", "id": [1]}'], None, r":1: field 'id': expected a string or an integer"),
    (['{"prompt": "a", "engineered": "b"', ], None, r":1: malformed JSON"),
    ([''], None, r"p.jsonl: no prompts"),
])
def test_prompt_file_errors_name_file_line_field(tmp_path, lines, template, message):
    f = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=r"p\.jsonl" + message if message.startswith(":") else message):
        load_compare_prompts(f, make_template(template) if template else None)


def test_plain_list_needs_a_template(tmp_path):
    with pytest.raises(DataError, match=r"p.txt:1: a plain prompt list has no engineered variants"):
        load_compare_prompts(_write(tmp_path / "p.txt", ["a red circle"]))


def test_parse_models_and_function_judge():
    assert parse_models(["runs/base/model,aligned=runs/ppo", "runs/x/model"]) == {
        "base": "runs/base/model", "aligned": "runs/ppo", "x": "runs/x/model"}
    assert list(parse_models(["a/model", "a/model"])) == ["a", "a-2"]
    with pytest.raises(ValueError, match="given twice"):
        parse_models(["a=x", "a=y"])
    assert FunctionJudge("test_compare:length_judge")(["p"], ["x" * 10]) == [0.5]
    with pytest.raises(ValueError, match="cannot import"):
        FunctionJudge("test_compare:nope")


# ---------------------------------------------------------------------------- end to end: text

@pytest.fixture(scope="module")
def tiny_gpt2_b(tmp_path_factory):
    """A second tiny GPT-2 (other random weights, same tokenizer): the 'aligned' model."""
    from text_rlhf.tiny import save_tiny
    return str(save_tiny(tmp_path_factory.mktemp("gpt2b"), "gpt2", CORPUS, vocab_size=300, pad=False, seed=1))


TEXT_PROMPTS = ["reverse the list 3 1 2", "sort the numbers 9 4 7", "add 2 and 3", "count the words",
                "the quick brown fox"]


def _greedy(path, prompts, max_new_tokens):
    """Direct computation: one prompt at a time, no padding, plain `generate`, decoded up to EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, lm = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        texts.append(tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out))
    return texts


def test_compare_text_end_to_end(tmp_path, tiny_gpt2, tiny_gpt2_b):
    from align.cli import main
    prompts = _write(tmp_path / "prompts.txt", TEXT_PROMPTS)
    shots = _write(tmp_path / "shots.jsonl", ['{"prompt": "add 1 and 1", "response": " 2"}'])
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", f"base={tiny_gpt2},aligned={tiny_gpt2_b}", "--prompts", str(prompts),
               "--judge", "test_compare:length_judge", "--template", "fewshot-qa", "--fewshot", str(shots),
               "--max-new-tokens", "12", "--batch-size", "2", "--seeds", "0,1", "--out", str(out),
               "--success-threshold", "0.9", "n_boot=500"])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    assert list(res["arms"]) == ["base-plain", "base-engineered", "aligned-plain", "aligned-engineered"]
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [
        ("aligned-plain", "base-engineered"), ("base-engineered", "base-plain"),
        ("aligned-engineered", "aligned-plain")]
    # the outputs are what the models produce one prompt at a time (batching and left padding
    # change nothing) and the scores are the judge's on them; greedy: both seeds alike
    items = res["prompts"]
    assert items[2]["engineered"] == "Q: add 1 and 1\nA: 2\n\nQ: add 2 and 3\nA:"
    for model, path in res["models"].items():
        for variant in ("plain", "engineered"):
            arm = res["per_prompt"][f"{model}-{variant}"]
            direct = _greedy(path, [it[variant] for it in items], 12)
            assert [row[0] for row in arm["outputs"]] == direct
            # greedy: one output per prompt, counted once however many seeds were asked for
            assert arm["seeds"] == [0] and all(len(row) == 1 for row in arm["outputs"])
            expected = length_judge(None, direct)
            assert arm["scores"] == [[s] for s in expected]
            summary = res["arms"][f"{model}-{variant}"]
            assert summary["mean"] == pytest.approx(sum(expected) / len(expected))
            assert summary["success"] == pytest.approx(sum(s >= 0.9 for s in expected) / len(expected))
            assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    a, b = (torch.tensor(res["per_prompt"][n]["scores"]) for n in ("aligned-plain", "base-engineered"))
    wins = ((a > b).double() + 0.5 * (a == b).double()).mean().item()
    assert res["pairs"][0]["win_rate"] == pytest.approx(wins)
    p0 = res["pairs"][0]
    assert p0["wins"] + p0["ties"] + p0["losses"] == p0["n"] == len(items)  # not len(items) × 2 seeds
    md = (out / "compare.md").read_text()
    assert "| aligned-plain | base-engineered |" in md and "success (≥ 0.9)" in md and "## Samples" in md
    assert "greedy decoding" in md and "CIs over prompts (" in md and "not one per seed of [0, 1]" in md


def test_compare_text_sampling_seeds_and_stop(tmp_path, tiny_gpt2):
    from align.compare import CompareConfig, run_compare
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": p, "engineered": "Q: " + p + "\nA:"})
                                            for p in TEXT_PROMPTS[:4]])
    cfg = CompareConfig(models=[f"gpt2={tiny_gpt2}"], prompts=str(prompts), judge="test_compare:prompt_echo_judge",
                        seeds=[0, 1], n_boot=50)
    cfg.text.sample, cfg.text.max_new_tokens = True, 8
    res = run_compare(cfg)
    arm = res["arm_objects"]["gpt2-engineered"]
    assert arm.scores.shape == (4, 2) and bool((arm.scores == 1).all())  # the judge saw plain prompts only
    assert [r[0] for r in arm.outputs] != [r[1] for r in arm.outputs]  # seeds differ
    again = run_compare(cfg)["arm_objects"]["gpt2-engineered"]
    assert again.outputs == arm.outputs  # and are reproducible
    cfg.text.stop = " "
    cut = run_compare(cfg)["arm_objects"]["gpt2-engineered"]
    assert [[o.split(" ", 1)[0] for o in row] for row in arm.outputs] == cut.outputs


def test_compare_user_errors(tmp_path, tiny_gpt2):
    from align.compare import CompareConfig, run_compare
    prompts = _write(tmp_path / "p.txt", ["a"])
    with pytest.raises(ValueError, match="--template"):
        run_compare(CompareConfig(models=[tiny_gpt2], prompts=str(prompts), judge="test_compare:length_judge"))
    with pytest.raises(ValueError, match="returned 2 scores for 1 outputs"):
        run_compare(CompareConfig(models=[tiny_gpt2], prompts=str(prompts), template="{prompt}:", n_boot=10,
                                  judge="test_compare:two_scores"))
    with pytest.raises(ValueError, match="pass --kind"):
        run_compare(CompareConfig(models=[str(tmp_path)], prompts=str(prompts), template="{prompt}:",
                                  judge="test_compare:length_judge"))


def two_scores(prompts, outputs):
    return [0.0, 1.0]


JUDGED = []


def recording_judge(prompts, outputs):
    """length_judge, noting each call (to tell whether anything was generated before an error)."""
    JUDGED.append(len(prompts))
    return length_judge(prompts, outputs)


def nan_for_count(prompts, responses):
    return [float("nan") if p == "count the words" else 0.0 for p in prompts]


def words_judge(prompts, responses):
    return [float(len(r.split())) for r in responses]


def test_judge_errors_name_the_prompt_and_the_judge(tmp_path, tiny_gpt2):
    """A NaN names the prompt's id (not its index in the batch) and the arm; a judge's own exception (here a
    text judge handed images) names the judge and what it was given."""
    from align.compare import CompareConfig, run_compare
    prompts = _write(tmp_path / "p.txt", TEXT_PROMPTS)  # "count the words" is line 4: batch 2, index 1
    cfg = CompareConfig(models=[f"gpt2={tiny_gpt2}"], prompts=str(prompts), judge="test_compare:nan_for_count",
                        template="{prompt}:", batch_size=3, n_boot=10)
    cfg.text.max_new_tokens = 2
    with pytest.raises(ValueError, match=r"non-finite score nan for prompt id '4' \(arm gpt2-plain, seed 0\)"):
        run_compare(cfg)
    with pytest.raises(ValueError, match=r"judge 'test_compare:words_judge' raised TypeError: .* \(called with "
                                         r"2 plain prompts and a \(2, 3, 8, 8\) image tensor\)"):
        FunctionJudge("test_compare:words_judge")(["a", "b"], torch.zeros(2, 3, 8, 8))


def test_file_py_judge(tmp_path, tiny_gpt2):
    """--judge path/to/judges.py:function (as README documents for rewards) is a function judge, success ≥ 1."""
    from align.compare import CompareConfig, is_function_spec, run_compare
    judge = tmp_path / "sub" / "my_judges.py"
    judge.parent.mkdir()
    judge.write_text("def one(prompts, responses):\n    return [1.0] * len(prompts)\n")
    assert is_function_spec(f"{judge}:one") and is_function_spec("test_compare:one")
    assert not is_function_spec("runs/rm") and not is_function_spec(str(judge))
    cfg = CompareConfig(models=[tiny_gpt2], prompts=str(_write(tmp_path / "p.txt", TEXT_PROMPTS[:2])),
                        judge=f"{judge}:one", template="{prompt}:", n_boot=10)
    cfg.text.max_new_tokens = 2
    res = run_compare(cfg)
    assert res["success_threshold"] == 1.0 and all(a["success"] == 1.0 for a in res["arms"].values())


def test_bad_settings_and_models_fail_before_generating(tmp_path, tiny_gpt2, tiny_sd_path):
    """Bad values and a wrong later --model (a typo, a reward model, an image pipeline) fail before the first model's
    arms are generated; so does a prompt too long for the context, naming its id and variant."""
    import shutil
    from align.compare import CompareConfig, run_compare
    prompts = _write(tmp_path / "p.txt", TEXT_PROMPTS[:2])
    rm = tmp_path / "rm"
    shutil.copytree(tiny_gpt2, rm)
    (rm / "align.json").write_text('{"kind": "text_reward_model"}')

    def run(match, models=(tiny_gpt2,), prompts=prompts, template="{prompt}:", **kw):
        JUDGED.clear()
        cfg = CompareConfig(models=list(models), prompts=str(prompts), judge="test_compare:recording_judge",
                            template=template, n_boot=10, **kw)
        cfg.text.max_new_tokens = 4
        with pytest.raises(ValueError, match=match):
            run_compare(cfg)
        assert JUDGED == []
    run("batch_size must be >= 0", batch_size=-1)  # used to generate nothing and report zeros
    run(r"confidence must be in \(0, 1\)", confidence=95)
    run("tie_tol must be >= 0", tie_tol=-0.1)
    run("no such folder", models=[tiny_gpt2, str(tmp_path / "ppoo")])
    run("is a reward model", models=[tiny_gpt2, str(rm)])
    run("diffusers pipeline folder", models=[tiny_gpt2, tiny_sd_path])
    long = _write(tmp_path / "long.jsonl", ['{"prompt": "a", "engineered": "b", "id": "ok"}',
                                            json.dumps({"prompt": "a", "engineered": "a b " * 100, "id": "long"})])
    run(r"prompt id 'long' \(engineered\) is \d+ tokens: with max_new_tokens 4 it exceeds the model's 128 positions",
        prompts=long, template="")


def test_image_prompts_cut_at_77_tokens_warn(tiny_sd_path, caplog):
    """Tags appended to a prompt past CLIP's 77 tokens never reach the text encoder: the pair is a tie by
    construction, and the run says so."""
    from align.compare import ImageGenParams
    from image_rlhf.compare import ImageGenerator, check_model
    gen = ImageGenerator(tiny_sd_path, ImageGenParams(num_steps=1))
    tags = make_template("sd-tags")
    items = [PromptItem("short", "a red circle", tags("a red circle")),
             PromptItem("long", "a red circle " + "on a table " * 30, tags("a red circle " + "on a table " * 30))]
    with caplog.at_level("WARNING"):
        gen.check_prompts(items)
    assert "2 of 4 prompts (plain or engineered) are longer than the text encoder's 77 tokens" in caplog.text
    assert "1 engineered prompts are their plain prompt once cut to 77 tokens" in caplog.text and "(ids long)" in caplog.text
    caplog.clear()
    gen.check_prompts(items[:1])
    assert caplog.text == ""
    with pytest.raises(ValueError, match="no such LoRA folder"):
        check_model(f"{tiny_sd_path}+{tiny_sd_path}-nope")


# ---------------------------------------------------------------------------- end to end: image

def test_compare_image_end_to_end(tmp_path, tiny_sd_path):
    from align.compare import CompareConfig, run_compare
    from image_rewards import brightness
    prompts = _write(tmp_path / "p.txt", ["a red circle", "a blue square", "a green triangle"])
    cfg = CompareConfig(models=[f"base={tiny_sd_path}"], prompts=str(prompts), template="sd-tags",
                        judge="image_rewards:brightness", seeds=[0, 1], batch_size=2, n_boot=100,
                        out=str(tmp_path / "out"))
    cfg.image.num_steps = 2
    res = run_compare(cfg)
    assert res["kind"] == "image" and res["success_threshold"] == 1.0
    plain = res["arm_objects"]["base-plain"]
    assert plain.scores.shape == (3, 2) and plain.outputs is None and len(plain.samples) == 3
    assert plain.scores[:, 0].tolist() != plain.scores[:, 1].tolist()  # seeds give other images
    assert plain.scores[:, 0].tolist() == pytest.approx(brightness(None, torch.stack(plain.samples)).tolist())
    assert (tmp_path / "out" / "samples" / "base-plain.png").is_file()
    assert "![base-engineered](samples/base-engineered.png)" in (tmp_path / "out" / "compare.md").read_text()
    assert [p["a"] for p in res["pairs"]] == ["base-engineered"]


def test_image_lora_and_run_folder_resolve(tmp_path, tiny_sd_path):
    """A DDPO run folder's lora/ loads on the base pipeline from its config.yaml, and changes the UNet."""
    from align.rl.config import LoraParams
    from image_rlhf.compare import ImageGenerator, resolve_model
    from image_rlhf.pipeline import add_unet_lora, load_pipeline, save_unet_lora
    from align.compare import ImageGenParams

    parts = load_pipeline(tiny_sd_path)
    add_unet_lora(parts.unet, LoraParams(r=2, alpha=2.0))
    torch.manual_seed(0)
    for n, p in parts.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    run = tmp_path / "ddpo"
    save_unet_lora(parts.unet, run / "lora")
    (run / "config.yaml").write_text(f"pipeline: {tiny_sd_path}\n")
    assert resolve_model(str(run)) == (tiny_sd_path, str(run / "lora"))
    assert resolve_model(f"{tiny_sd_path}+{run / 'lora'}") == (tiny_sd_path, str(run / "lora"))
    params = ImageGenParams(num_steps=2)
    tuned, base = ImageGenerator(str(run), params), ImageGenerator(tiny_sd_path, params)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    c = torch.randn(1, 77, 32)
    with torch.no_grad():
        expect = parts.unet(x, t, encoder_hidden_states=c).sample
        assert torch.allclose(tuned.parts.unet(x, t, encoder_hidden_states=c).sample, expect, atol=1e-5)
        assert not torch.allclose(base.parts.unet(x, t, encoder_hidden_states=c).sample, expect, atol=1e-3)


def test_cli_flags_and_config_file(tmp_path, monkeypatch):
    """Flags, a YAML of CompareConfig fields and key=value overrides all reach the config."""
    import align.compare
    from align.cli import main
    seen = []
    monkeypatch.setattr(align.compare, "run_compare", lambda cfg: seen.append(cfg))
    yaml = _write(tmp_path / "c.yaml", ["judge: gold:score", "image:", "  guidance_scale: 7.5", "seeds: [4]"])
    assert main(["compare", "--config", str(yaml), "--model", "a", "--model", "b=x,c", "--prompts", "p.jsonl",
                 "--stop", "\\nQ:", "--num-steps", "3", "--sample", "n_boot=10"]) == 0
    cfg = seen[-1]
    assert (cfg.models, cfg.judge, cfg.seeds, cfg.n_boot) == (["a", "b=x,c"], "gold:score", [4], 10)
    assert (cfg.text.stop, cfg.text.sample, cfg.image.num_steps, cfg.image.guidance_scale) == ("\nQ:", True, 3, 7.5)
    assert main(["compare", "--seeds", "1,2", "--judge", "j:f"]) == 0 and seen[-1].seeds == [1, 2]
    assert main(["compare", "--template", "Q: {prompt}\\nA:", "fewshot_k=2"]) == 0  # as a shell passes '\n'
    assert (seen[-1].template, seen[-1].fewshot_k) == ("Q: {prompt}\nA:", 2)
    with pytest.raises(ValueError, match="--seeds '0,a': expected integers"):
        main(["-v", "compare", "--seeds", "0,a"])  # -v: the error itself, not its one-line report
