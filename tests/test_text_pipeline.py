"""The text recipe end to end on tiny random models: SFT -> RM -> PPO, LoRA, CLI, bad input."""
import json
import random

import pytest
import torch

from align.cli import main as cli
from align.config import load_config
from text_rlhf.ppo import PPOConfig, run_ppo
from text_rlhf.rm import RMConfig, run_rm
from text_rlhf.sft import SFTConfig, run_sft

WORDS = "the quick brown fox jumps over lazy dog red circle blue square".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_data")
    rng = random.Random(0)
    demos = [{"prompt": f"add {a} and {b}:", "response": f" {a + b}"} for a in range(8) for b in range(6)]
    # learnable preference: the chosen response ends with "good", the rejected with "bad"; K=3 rankings too
    prefs = []
    for i in range(160):
        p, stem = " ".join(rng.choices(WORDS, k=3)), " ".join(rng.choices(WORDS, k=2))
        if i % 4 == 0:
            prefs.append({"prompt": p, "completions": [stem + " bad", stem + " good", stem + " so so"], "ranking": [1, 2, 0]})
        else:
            prefs.append({"prompt": p, "chosen": stem + " good", "rejected": stem + " bad"})
    prompts = [{"prompt": " ".join(rng.choices(WORDS, k=3))} for _ in range(12)]
    return {"demos": write_jsonl(d / "demos.jsonl", demos), "prefs": write_jsonl(d / "prefs.jsonl", prefs),
            "prompts": write_jsonl(d / "prompts.jsonl", prompts), "dir": d}


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_lowers_held_out_loss_with_lora_on_llama(tiny_llama, data, tmp_path):
    cfg = load_config(SFTConfig, None, ["epochs=6", "batch_size=8", "lr=2e-2", "lora.r=8", "eval_fraction=0.2"],
                      model=tiny_llama, data=data["demos"], out=str(tmp_path / "sft"))
    model_dir = run_sft(cfg)
    evals = [r["sft/eval_loss"] for r in metrics(tmp_path / "sft") if "sft/eval_loss" in r]
    assert evals[-1] < evals[0] - 0.3
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(model_dir)  # merged, loadable by path
    assert (model_dir / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "sft" / "report.md").read_text().startswith("# SFT report")


def test_reward_model_reaches_90_percent_held_out(tiny_gpt2, data, tmp_path):
    cfg = load_config(RMConfig, None, ["epochs=3", "lr=1e-3", "max_pairs_per_batch=16", "eval_fraction=0.2"],
                      model=tiny_gpt2, data=data["prefs"], out=str(tmp_path / "rm"))
    model_dir = run_rm(cfg)
    held = json.loads((model_dir / "align.json").read_text())["held_out"]
    assert held["accuracy"] >= 0.9, held
    assert held["n_pairs"] > 20
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(model_dir).config.num_labels == 1



def test_rm_tokenizes_each_pair_once_and_evaluates_the_final_model_once(tiny_gpt2, data, tmp_path, monkeypatch):
    """Over 3 epochs and 3 held-out evaluations every distinct (prompt, response) is tokenized once; the last step's
    held-out evaluation is the report's, not run again on the same weights (it was, by _finish)."""
    import text_rlhf.rm as rm
    rows, evals = [], []
    encode, evaluate = rm.encode_pairs, rm.evaluate_pairs
    monkeypatch.setattr(rm, "encode_pairs", lambda tok, p, r, n: rows.extend(zip(p, r)) or encode(tok, p, r, n))
    monkeypatch.setattr(rm, "evaluate_pairs", lambda *a, **k: evals.append(evaluate(*a, **k)) or evals[-1])
    cfg = load_config(RMConfig, None, ["epochs=3", "max_pairs_per_batch=16", "eval_fraction=0.2", "log_every=1"],
                      model=tiny_gpt2, data=data["prefs"], out=str(tmp_path / "rm"))
    model_dir = run_rm(cfg)
    groups = rm.load_groups(data["prefs"])
    assert sorted(rows) == sorted({(g.prompt, c) for g in groups for c in g.candidates})
    assert len(evals) == 3
    held = json.loads((model_dir / "align.json").read_text())["held_out"]
    assert held == evals[-1]
    logged = [r for r in metrics(tmp_path / "rm") if "rm/eval_loss" in r][-1]
    assert logged["rm/eval_loss"] == held["loss"] and logged["step"] == max(r["step"] for r in metrics(tmp_path / "rm"))


def test_one_epoch_rm_keeps_no_training_token_ids(tiny_gpt2, data, tmp_path, monkeypatch):
    """One epoch scores each training pair once: its ids were kept all the same (~0.5 GB for HH's 160k pairs). Only
    the held-out pairs', scored at every evaluation, are kept; with more epochs the training pairs' too (above)."""
    import text_rlhf.rm as rm
    scorers = []

    class Recording(rm.TextScorer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            scorers.append(self)
    monkeypatch.setattr(rm, "TextScorer", Recording)
    cfg = load_config(RMConfig, None, ["epochs=1", "max_pairs_per_batch=16", "eval_fraction=0.2"],
                      model=tiny_gpt2, data=data["prefs"], out=str(tmp_path / "rm"))
    run_rm(cfg)
    train, held = scorers
    assert train.ids is None and held.ids
    held_prompts = {p for p, _ in held.ids}
    assert len(held_prompts) == int(len({g.prompt for g in rm.load_groups(data["prefs"])}) * 0.2)


def test_ppo_raises_reward_with_bounded_kl(tiny_gpt2, data, tmp_path):
    # seeds 0-2 measured: the vowel share goes 0.10-0.11 -> 0.14-0.16 (last 3 vs first 3 iterations), KL ~1
    cfg = load_config(PPOConfig, None, ["iterations=10", "batch_size=64", "ppo.mini_batch_size=32", "lr=3e-3",
                                        "max_new_tokens=16", "save_every=5", "ppo.kl.kl_coef=0.05"],
                      policy=tiny_gpt2, reward="rewards:vowels", prompts=data["prompts"], out=str(tmp_path / "ppo"))
    run_ppo(cfg)
    rows = metrics(tmp_path / "ppo")
    scores = [r["env/raw_score"] for r in rows]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.02, scores
    kls = [r["objective/kl"] for r in rows]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the reference policy itself
    assert max(kls) < 20.0, kls
    assert all(r["objective/kl_coef"] > 0 for r in rows)
    report = (tmp_path / "ppo" / "report.md").read_text()
    assert "RM score" in report and (tmp_path / "ppo" / "curves.png").exists()


def test_scale_reward_makes_ppo_invariant_to_the_rms_scale(tiny_gpt2, data, tmp_path):
    """scale_reward (Ziegler et al. 2019: mean 0, variance 1 under the initial policy): the same reward on a 100× scale
    with an offset gives the same normalised scores, hence the same updates and policy; a resumed run keeps the scale
    of its first rollout. reward_clip bounds the scores."""
    def run(reward, out, *extra):
        return run_ppo(load_config(PPOConfig, None, ["iterations=3", "batch_size=16", "ppo.mini_batch_size=8",
                                                     "max_new_tokens=8", "lr=1e-3", "save_every=1", *extra],
                                   policy=tiny_gpt2, reward=reward, prompts=data["prompts"], out=str(tmp_path / out)))
    a = run("rewards:vowels", "a", "scale_reward=true").policy
    b = run("rewards:vowels_x100", "b", "scale_reward=true").policy
    sa, sb = ([r["env/score"] for r in metrics(tmp_path / d)] for d in "ab")
    assert sa == pytest.approx(sb, rel=1e-4, abs=1e-5) and max(map(abs, sa)) > 0.05
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert "scale (reference std, divided by)" in (tmp_path / "b" / "report.md").read_text()
    run("rewards:vowels_x100", "c", "scale_reward=true", "iterations=1")
    run_ppo(load_config(PPOConfig, None, ["iterations=3", "batch_size=16", "ppo.mini_batch_size=8", "max_new_tokens=8",
                                          "lr=1e-3", "save_every=1", "scale_reward=true"],
                        policy=tiny_gpt2, reward="rewards:vowels_x100", prompts=data["prompts"],
                        out=str(tmp_path / "c")), resume=True)  # the scale comes back from the checkpoint
    assert [r["env/score"] for r in metrics(tmp_path / "c")] == pytest.approx(sb, rel=1e-4, abs=1e-5)
    run("rewards:vowels_x100", "e", "scale_reward=true", "reward_clip=1e-6")  # b's scores, clipped
    assert all(abs(r["env/score"]) <= 1e-6 for r in metrics(tmp_path / "e"))  # b's reached > 0.05
    with pytest.raises(ValueError, match="scale_reward needs normalize_reward"):
        run("rewards:vowels", "f", "scale_reward=true", "normalize_reward=false")


def test_ppo_with_learned_rm_and_lora_reference_via_cli(tiny_gpt2, data, tmp_path):
    """The RM path (same tokenizer: token ids reused) and LoRA (reference = adapters off), via the CLI."""
    rm_out = tmp_path / "rm"
    assert cli(["text", "rm", "--model", tiny_gpt2, "--data", data["prefs"], "--out", str(rm_out), "epochs=1",
                "max_pairs_per_batch=32"]) == 0
    out = tmp_path / "ppo"
    assert cli(["text", "ppo", "--policy", tiny_gpt2, "--reward", str(rm_out), "--prompts", data["prompts"],
                "--out", str(out), "iterations=2", "batch_size=8", "ppo.mini_batch_size=4", "max_new_tokens=8",
                "lora.r=4", "lr=1e-3"]) == 0
    rows = metrics(out)
    assert len(rows) == 2 and rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert abs(rows[1]["objective/kl"]) > 1e-6  # the adapters moved the policy (k1 may be < 0 on a batch)
    assert (out / "model" / "adapter" / "adapter_config.json").exists()


def test_ppo_lora_dropout_does_not_make_the_ratio_random(tiny_gpt2, data, tmp_path):
    """A LoRA dropout from a preset (lora.dropout > 0) must not reach PPO. With lr = 0 the policy never
    changes, so the update's log π equals the rollout's (approx-KL 0 up to float rounding) only if log π is
    deterministic; two mini-batches, so the old log-probs come from their own pass. The policy trains in
    train mode (transformers checkpoints layers only there), so the dropouts, LoRA's too, must be zeroed."""
    result = run_ppo(load_config(PPOConfig, None, ["iterations=1", "batch_size=8", "ppo.mini_batch_size=4",
                                                   "ppo.ppo_epochs=1", "max_new_tokens=6", "lora.r=4",
                                                   "lora.dropout=0.5", "lr=0.0"],
                                 policy=tiny_gpt2, reward="rewards:vowels", prompts=data["prompts"],
                                 out=str(tmp_path / "ppo")))
    assert abs(metrics(tmp_path / "ppo")[0]["policy/approx_kl"]) < 1e-6
    assert all(m.p == 0.0 for m in result.policy.modules() if isinstance(m, torch.nn.Dropout))


def test_ppo_reference_other_than_the_initial_policy(tiny_gpt2, data, tmp_path):
    """Iterated RLHF starts a round from the last policy and keeps π_ref = the SFT model: with a
    reference that differs from the policy the first rollout's KL is that distance (> 0), not 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    m.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(other)
    cfg = load_config(PPOConfig, None, ["iterations=1", "batch_size=16", "ppo.mini_batch_size=8", "max_new_tokens=8"],
                      policy=tiny_gpt2, reference=str(other), reward="rewards:vowels", prompts=data["prompts"],
                      out=str(tmp_path / "ppo"))
    run_ppo(cfg)
    assert metrics(tmp_path / "ppo")[0]["objective/kl"] > 0.1
    with pytest.raises(ValueError, match="LoRA"):
        run_ppo(load_config(PPOConfig, None, ["lora.r=4"], policy=tiny_gpt2, reference=str(other),
                            reward="rewards:vowels", prompts=data["prompts"], out=str(tmp_path / "ppo2")))


@pytest.mark.parametrize("preset", ["tiny", "gpt2-hh", "pythia-hh"])
def test_preset_loads_for_each_stage(preset):
    from text_rlhf.ppo_config import check_config
    path = f"configs/text/{preset}.yaml"
    for stage, cls in (("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig)):
        cfg = load_config(cls, path, section=stage)
        assert cfg is not None
    check_config(load_config(PPOConfig, path, section="ppo", policy="P", reward="R", prompts="p", out="o"))
    assert load_config(PPOConfig, "configs/text/gpt2-hh.yaml", section="ppo").lora.r == 16


# ---------------------------------------------------------------------------- bad input

def run_cli(args, caplog):
    caplog.clear()
    code = cli(args)
    return code, caplog.text


@pytest.mark.parametrize("lines,needle", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "b"', '{"prompt": "c", "response": "d"}'], ":2:"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], "field 'response'"),
    (['{"prompt": "a", "response": "   "}'], "empty"),
])
def test_sft_bad_input_names_file_line_field(tiny_gpt2, tmp_path, caplog, lines, needle):
    f = tmp_path / "demos.jsonl"
    f.write_text("\n".join(lines) + "\n")
    code, text = run_cli(["text", "sft", "--model", tiny_gpt2, "--data", str(f), "--out", str(tmp_path / "o")], caplog)
    assert code == 2 and "demos.jsonl" in text and needle in text


def test_rm_duplicate_pair_is_an_error(tiny_gpt2, tmp_path, caplog):
    row = {"prompt": "p", "chosen": "a good", "rejected": "a bad"}
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}) + "\n")
    code, text = run_cli(["text", "rm", "--model", tiny_gpt2, "--data", str(f), "--out", str(tmp_path / "o")], caplog)
    assert code == 2 and "prefs.jsonl:2" in text and "identical" in text
    f.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    code, text = run_cli(["text", "rm", "--model", tiny_gpt2, "--data", str(f), "--out", str(tmp_path / "o2")], caplog)
    assert code == 2 and "duplicate" in text and "line 1" in text


def test_nonexistent_model_path(tmp_path, data, caplog):
    code, text = run_cli(["text", "sft", "--model", str(tmp_path / "missing"), "--data", data["demos"],
                          "--out", str(tmp_path / "o")], caplog)
    assert code == 2 and "no such folder" in text and "missing" in text


def test_nan_reward_stops_cleanly_and_keeps_checkpoint(tiny_gpt2, data, tmp_path, caplog):
    out = tmp_path / "ppo"
    base = ["text", "ppo", "--policy", tiny_gpt2, "--prompts", data["prompts"], "--out", str(out), "batch_size=4",
            "ppo.mini_batch_size=4", "max_new_tokens=4", "save_every=1"]
    assert cli(base + ["--reward", "rewards:short", "iterations=1"]) == 0
    ckpt = sorted((out / "checkpoints").glob("step-*"))
    before = {p.name: p.stat().st_size for p in ckpt[-1].iterdir()}
    code, text = run_cli(base + ["--reward", "rewards:nan_after_first", "iterations=3", "--resume"], caplog)
    assert code == 2 and "nan" in text.lower() and "iteration 2" in text
    assert {p.name: p.stat().st_size for p in ckpt[-1].iterdir()} == before
    assert [r["step"] for r in metrics(out)] == [1]  # nothing half-logged
    code, text = run_cli(base + ["--reward", "rewards:wrong_count", "iterations=3", "--resume"], caplog)
    assert code == 2 and "returned 1 scores for 4" in text


def test_out_dir_with_a_run_needs_resume(tiny_gpt2, data, tmp_path, caplog):
    out = tmp_path / "ppo"
    args = ["text", "ppo", "--policy", tiny_gpt2, "--reward", "rewards:short", "--prompts", data["prompts"],
            "--out", str(out), "iterations=1", "batch_size=4", "ppo.mini_batch_size=4", "max_new_tokens=4"]
    assert cli(args) == 0
    code, text = run_cli(args, caplog)
    assert code == 2 and "--resume" in text


def test_reward_model_with_lora_on_llama_saves_merged_and_adapter(tiny_llama, data, tmp_path):
    cfg = load_config(RMConfig, None, ["epochs=1", "lr=1e-3", "max_pairs_per_batch=32", "lora.r=4"],
                      model=tiny_llama, data=data["prefs"], out=str(tmp_path / "rm"))
    model_dir = run_rm(cfg)
    assert (model_dir / "adapter" / "adapter_config.json").exists()
    from text_rlhf.models import SequenceScorer, load_seq_scorer
    scorer = SequenceScorer(load_seq_scorer(str(model_dir)))
    assert torch.isfinite(scorer(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))).all()


def test_bad_input_leaves_no_run_folder_behind(tiny_gpt2, tmp_path, caplog):
    """A typo in --data must not create a half-made run that then demands --resume."""
    f = tmp_path / "demos.jsonl"
    f.write_text('{"prompt": "a"}\n')
    out = tmp_path / "o"
    code, _ = run_cli(["text", "sft", "--model", tiny_gpt2, "--data", str(f), "--out", str(out)], caplog)
    assert code == 2 and not out.exists()


def test_lora_with_bf16_keeps_the_frozen_base_in_bf16_and_trains_float32(tiny_gpt2, tiny_llama, data, tmp_path):
    """mixed_precision=bf16 + LoRA (CPU autocast here): SFT, RM and PPO keep the frozen base in bf16 (the
    saved merged model is bf16) and train the adapters (and the RM's score head) in float32."""
    from safetensors.torch import load_file
    sft = run_sft(load_config(SFTConfig, None, ["epochs=1", "batch_size=8", "lr=1e-3", "lora.r=4",
                                               "mixed_precision=bf16"],
                              model=tiny_llama, data=data["demos"], out=str(tmp_path / "sft")))
    rm = run_rm(load_config(RMConfig, None, ["epochs=1", "lr=1e-3", "max_pairs_per_batch=32", "lora.r=4",
                                             "mixed_precision=bf16"],
                            model=tiny_gpt2, data=data["prefs"], out=str(tmp_path / "rm")))
    for model_dir in (sft, rm):
        merged = load_file(str(next(model_dir.glob("*.safetensors"))))
        adapter = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
        assert {v.dtype for k, v in merged.items() if "score" not in k} == {torch.bfloat16}, model_dir
        assert {v.dtype for v in adapter.values()} == {torch.float32}, model_dir
    assert any("score" in k for k in load_file(str(rm / "adapter" / "adapter_model.safetensors")))
    result = run_ppo(load_config(PPOConfig, None, ["iterations=2", "batch_size=8", "ppo.mini_batch_size=4",
                                                   "max_new_tokens=6", "lora.r=4", "mixed_precision=bf16"],
                                 policy=tiny_gpt2, reward=str(rm), prompts=data["prompts"], out=str(tmp_path / "ppo")))
    trained = {p.dtype for p in result.policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in result.policy.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(r["env/raw_score"])) for r in metrics(tmp_path / "ppo"))


def test_ppo_resume_keeps_one_copy_of_each_iterations_samples(tiny_gpt2, data, tmp_path):
    """A run stopped after its checkpoint at 2 but past iteration 2 redoes iteration 3 on --resume: samples.jsonl
    (and the report's samples) hold iteration 3 once, as metrics.jsonl does."""
    import shutil
    args = ["iterations=3", "batch_size=8", "ppo.mini_batch_size=8", "max_new_tokens=6", "save_every=2", "log_samples=2"]
    cfg = load_config(PPOConfig, None, args, policy=tiny_gpt2, reward="rewards:vowels", prompts=data["prompts"],
                      out=str(tmp_path / "ppo"))
    run_ppo(cfg)
    ckpts = tmp_path / "ppo" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000003")  # as if it had crashed while writing the last checkpoint
    (ckpts / "latest").unlink()
    run_ppo(cfg, resume=True)
    iterations = [json.loads(l)["iteration"] for l in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert iterations == [1, 1, 2, 2, 3, 3]
    assert [r["step"] for r in metrics(tmp_path / "ppo")] == [1, 2, 3]
    report = (tmp_path / "ppo" / "report.md").read_text()
    assert report.count("- it 3,") == 2


def test_rm_report_counts_prompts_and_says_when_nothing_is_held_out(tiny_gpt2, data, tmp_path):
    """eval_fraction=0: no empty held-out table; the split counts prompts and ranked groups apart."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "same prompt", "chosen": f"{w} good", "rejected": f"{w} bad"}
                                                   for w in WORDS])
    cfg = load_config(RMConfig, None, ["epochs=1", "eval_fraction=0"], model=tiny_gpt2, data=prefs,
                      out=str(tmp_path / "rm"))
    run_rm(cfg)
    report = (tmp_path / "rm" / "report.md").read_text()
    assert "1 prompt (12 ranked groups, 12 pairs) for training, 0 prompts (0 ranked groups, 0 pairs) held out" in report
    assert "No held-out pairs (eval_fraction=0)" in report and "| held-out metric |" not in report
    assert "| pairwise accuracy (ties half) |" in report  # the last training batch's, labelled as such


def test_sft_without_held_out_set(tiny_gpt2, data, tmp_path):
    """eval_fraction=0 trained nothing: encoding the empty held-out list raised IndexError (a traceback)."""
    cfg = load_config(SFTConfig, None, ["epochs=1", "batch_size=8", "eval_fraction=0"], model=tiny_gpt2,
                      data=data["demos"], out=str(tmp_path / "sft"))
    run_sft(cfg)
    report = (tmp_path / "sft" / "report.md").read_text()
    assert "no held-out demonstrations (eval_fraction=0)" in report and "| train loss" in report


def test_sft_gradient_accumulation_is_token_weighted(tmp_path):
    """batch_size = micro_batch_size × accumulation: micro-batches with different numbers of response tokens
    must give the gradient of the whole batch (each token weighted once), not a mean of micro-batch means."""
    from transformers import AutoModelForCausalLM
    from text_rlhf.tiny import save_tiny
    from conftest import CORPUS
    base = save_tiny(tmp_path / "base", "gpt2", CORPUS, vocab_size=300, dropout=0.0)  # no dropout: same forward
    rng = random.Random(0)
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"add {i} and 1:", "response": " " + " ".join(
        rng.choices(WORDS, k=rng.randint(1, 10)))} for i in range(16)])
    weights = []
    for micro in (0, 2):
        out = tmp_path / f"sft{micro}"
        run_sft(load_config(SFTConfig, None, ["epochs=1", "batch_size=8", f"micro_batch_size={micro}", "lr=1e-3",
                                              "eval_fraction=0", "warmup_ratio=0"],
                            model=str(base), data=demos, out=str(out)))
        weights.append(AutoModelForCausalLM.from_pretrained(out / "model").state_dict())
        assert metrics(out)[-1]["sft/grad_norm"] > 0
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=2e-6, rtol=0)


def test_sft_resume_uses_the_configs_lr_not_the_checkpoints(tiny_gpt2, data, tmp_path):
    """torch's load_state_dict restores the checkpoint's lr (and LambdaLR its base lr): resumed with lr=0, SFT
    went on at the old one. Now the resumed steps run at this config's lr on the same schedule: weights unchanged."""
    from safetensors.torch import load_file
    out = tmp_path / "sft"
    run_sft(load_config(SFTConfig, None, ["epochs=1", "batch_size=8", "lr=1e-2", "eval_fraction=0", "log_every=1"],
                        model=tiny_gpt2, data=data["demos"], out=str(out)))
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    n_first = len(metrics(out))
    saved = load_file(str(ckpt / "model" / "model.safetensors"))
    run_sft(load_config(SFTConfig, None, ["epochs=2", "batch_size=8", "lr=0", "eval_fraction=0", "log_every=1"],
                        model=tiny_gpt2, data=data["demos"], out=str(out)), resume=True)
    lrs = [r["sft/lr"] for r in metrics(out) if "sft/lr" in r]  # an epoch at 1e-2's schedule, one resumed at 0
    assert len(lrs) == 2 * n_first and lrs[0] > 0 and lrs[n_first:] == [0.0] * n_first, lrs
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in saved.items())


class _Acc:
    """The slice of accelerate.Accelerator that text PPO's `_update` uses, single process."""
    device = torch.device("cpu")
    num_processes = 1
    no_sync = autocast = staticmethod(lambda *a: __import__("contextlib").nullcontext())
    backward = staticmethod(lambda loss: loss.backward())
    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)
    gather = staticmethod(lambda t: t)


class _RecordingOptimizer:
    """Keeps the gradient of every optimiser step and steps nothing."""
    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_ppo_update_gradient_is_the_clipped_objective_and_micro_batch_invariant():
    """One PPO mini-batch on a tiny random GPT-2 (float64, pad = EOS): `_update`'s gradient equals the clipped
    surrogate + vf_coef × clipped value loss written out here (token means over the response mask, EOS included,
    pads after it excluded; TRL ppo_trainer's loss with align's mask), whatever the micro-batch split."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from align.rl.config import PPOParams
    from text_rlhf.policy import PolicyWithValue, disable_dropout, response_mask
    from text_rlhf.ppo import _update
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)).double()
    disable_dropout(lm)
    g = torch.Generator().manual_seed(1)
    B, P, T, eos = 6, 4, 6, 0
    prompt, pmask = torch.randint(1, 40, (B, P), generator=g), torch.ones(B, P, dtype=torch.long)
    for i, n in enumerate([0, 2, 1, 0, 3, 1]):  # left padding
        prompt[i, :n], pmask[i, :n] = eos, 0
    resp = torch.randint(1, 40, (B, T), generator=g)
    for i, e in [(0, 2), (1, 0), (2, T - 1), (4, 4)]:  # EOS then pads (= EOS); rows 3 and 5 truncated
        resp[i, e:] = eos
    seq, m = torch.cat([prompt, resp], 1), response_mask(resp, eos).double()
    mask = torch.cat([pmask, m.long()], 1)
    old_log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) - 3.0
    old_values, advantages, returns = (torch.randn(B, T, generator=g, dtype=torch.float64) * m for _ in range(3))
    head = torch.nn.Linear(16, 1).double()

    def definition():
        lm.zero_grad(), head.zero_grad()
        out = lm(input_ids=seq, attention_mask=mask, position_ids=mask.cumsum(1) - mask, output_hidden_states=True)
        log_prob = out.logits[:, P - 1:-1].log_softmax(-1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        values = head(out.hidden_states[-1][:, P - 1:-1]).squeeze(-1)
        ratio = (log_prob - old_log_prob).exp()
        pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        v_clip = old_values + (values - old_values).clamp(-0.2, 0.2)
        vf = 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2)
        ((pg * m).sum() / m.sum() + 0.1 * (vf * m).sum() / m.sum()).backward()
        return {**{f"lm.{k}": p.grad.clone() for k, p in lm.named_parameters()},
                **{f"value_head.{k}": p.grad.clone() for k, p in head.named_parameters()}}

    expected = definition()
    for micro in (0, 2, 1):
        model = PolicyWithValue(lm).double()
        model.value_head.load_state_dict(head.state_dict())
        model.zero_grad()
        opt = _RecordingOptimizer(model)
        cfg = PPOConfig(batch_size=B, ppo=PPOParams(ppo_epochs=1, mini_batch_size=B, micro_batch_size=micro,
                                                    max_grad_norm=0.0))
        stats = _update(model, opt, _Acc(), seq, mask, m, T, old_log_prob, old_values, advantages, returns, cfg,
                        micro or B)
        assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["policy/vf_clipfrac"] < 1, stats  # both branches
        (grads,) = opt.grads
        assert grads.keys() == expected.keys()
        for k in expected:  # log-probs are taken in float32 (token_log_probs): float32-level agreement
            torch.testing.assert_close(grads[k], expected[k], rtol=1e-5, atol=1e-7, msg=f"micro={micro} {k}")


@pytest.mark.parametrize("disable", [True, False])
def test_rm_trains_without_the_trunks_dropout_by_default(tiny_gpt2, data, tmp_path, monkeypatch, disable):
    """TRL's RewardTrainer default: with dropout the chosen and rejected texts of a pair are scored under different
    masks (GPT-2: 0.1 everywhere). disable_dropout=false keeps it; LoRA's own dropout is kept either way."""
    import text_rlhf.rm as rm_mod
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, lora, *a, **k):
        seen["p"] = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})
        raise Stop

    monkeypatch.setattr(rm_mod, "apply_lora", capture)
    cfg = load_config(RMConfig, None, [f"disable_dropout={str(disable).lower()}"], model=tiny_gpt2,
                      data=data["prefs"], out=str(tmp_path / "rm"))
    with pytest.raises(Stop):
        run_rm(cfg)
    assert seen["p"] == ([0.0] if disable else [0.1])
