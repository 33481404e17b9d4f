"""The text trainers on what a new user brings: other architectures (OPT-350m's projected width), models with
float dropout rates, gradient checkpointing, the wrong kind of folder, long prompts, an RM with its own
tokenizer."""
import json

import pytest
import torch

from align.config import load_config
from text_rlhf.models import (ModelLoadError, SequenceScorer, encode_pairs, encode_prompts, load_causal_lm,
                              load_seq_scorer, load_tokenizer, pad_batch)
from text_rlhf.policy import PolicyWithValue, disable_dropout
from text_rlhf.ppo import PPOConfig, RewardFn, run_ppo
from text_rlhf.tiny import build_bpe_tokenizer, tiny_causal_lm

from conftest import CORPUS


def _save(tmp_path, name, arch, pad=True, **kw):
    tok = build_bpe_tokenizer(CORPUS, 300, pad=pad)
    out = tmp_path / name
    tiny_causal_lm(arch, tok, **kw).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["add 2 and 3:", "the quick brown", "a red"]))
    return str(path)


def _ppo(policy, prompts_file, out, *overrides, reward="rewards:vowels"):
    return load_config(PPOConfig, None, ["iterations=1", "batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
                                         "max_new_tokens=6", *overrides],
                       policy=policy, reward=reward, prompts=prompts_file, out=str(out))


def test_value_head_reads_the_width_the_lm_head_reads(tmp_path, prompts_file):
    """OPT-350m projects its hidden states (1024) to word_embed_proj_dim (512) before the LM head; the value
    head (shared trunk) and a separate critic read those projected states."""
    opt = _save(tmp_path, "opt", "opt", n_embd=32)
    lm = load_causal_lm(opt)
    assert lm.config.hidden_size == 32 and lm.config.word_embed_proj_dim == 16
    from transformers import AutoModel
    for critic in (None, AutoModel.from_pretrained(opt)):
        policy = PolicyWithValue(lm, critic)
        assert policy.value_head.in_features == 16
        ids = torch.randint(5, 200, (2, 7))
        log_prob, values = policy(ids, torch.ones_like(ids), 3)
        assert log_prob.shape == values.shape == (2, 3)
    for value_model in ("head", "separate"):
        run_ppo(_ppo(opt, prompts_file, tmp_path / value_model, f"value_model={value_model}"))


def test_ppo_checkpoints_layers_and_zeroes_float_dropout_rates(tmp_path, prompts_file, monkeypatch):
    """gradient_checkpointing=true checkpoints the policy's layers (transformers does only in train mode), and
    a model whose attention applies a float dropout rate in train mode (Llama's attention_dropout, OPT's)
    still has PPO ratios of exactly 1 at lr 0."""
    import transformers.modeling_utils as mu  # binds torch.utils.checkpoint.checkpoint when enabling
    calls = {"n": 0}
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    for arch in ("llama", "opt"):
        path = _save(tmp_path, arch, arch, dropout=0.5)
        assert load_causal_lm(path).config.attention_dropout == 0.5
        calls["n"] = 0
        out = tmp_path / f"ppo-{arch}"
        result = run_ppo(_ppo(path, prompts_file, out, "gradient_checkpointing=true", "lr=0.0"))
        assert calls["n"] > 0, arch
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert abs(row["policy/approx_kl"]) < 1e-7 and row["policy/clipfrac"] == 0.0, (arch, row)
        rates = [v for m in result.policy.modules() for k, v in vars(m).items() if "dropout" in k
                 and isinstance(v, float)]
        assert rates and not any(rates), arch
    m = torch.nn.Module()
    m.attention_dropout, m.other = 0.3, 0.3
    disable_dropout(m)
    assert (m.attention_dropout, m.other) == (0.0, 0.3)


def test_the_wrong_kind_of_folder_is_an_error(tmp_path, tiny_llama, tiny_gpt2, monkeypatch):
    """An SFT (causal-LM) folder as a reward model would score with a random head; an RM folder as a policy
    would generate with a random LM head. Both are errors; RM training starts a fresh head on purpose."""
    with pytest.raises(ModelLoadError, match="holds no trained reward head"):
        load_seq_scorer(tiny_llama)
    rm = load_seq_scorer(tiny_llama, new_head=True)
    rm.save_pretrained(tmp_path / "rm")
    assert load_seq_scorer(str(tmp_path / "rm")).score.in_features == 32
    with pytest.raises(ModelLoadError, match="no language-model head"):
        load_causal_lm(str(tmp_path / "rm"))
    # GPT-2 ties its LM head to the input embedding, so nothing is missing: align.json says what the folder is
    load_seq_scorer(tiny_gpt2, new_head=True).save_pretrained(tmp_path / "gpt2-rm")
    (tmp_path / "gpt2-rm" / "align.json").write_text('{"kind": "text_reward_model"}')
    with pytest.raises(ModelLoadError, match="tied embedding was never trained as an LM head; it is a text_reward"):
        load_causal_lm(str(tmp_path / "gpt2-rm"))
    # runs/sftt, where runs/ exists: a typo, not a hub id org/name (no minute of hub retries)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match="no such folder 'runs/sftt'"):
        load_causal_lm("runs/sftt")
    # an image pipeline or an image RM (run folder) given to a text command: said, not a tokenizer traceback
    for folder, marker, kind in (("pipe", "model_index.json", "a diffusers pipeline"),
                                 ("clip/model", "align_reward.json", "an image reward model run")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / marker).write_text("{}")
        with pytest.raises(ModelLoadError, match=f"is {kind} folder .*not a transformers language model"):
            load_tokenizer(folder.split("/")[0])


def test_long_prompts_keep_their_end_and_bos():
    from tokenizers.processors import TemplateProcessing
    tok = build_bpe_tokenizer(CORPUS, 300)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", bos)])  # a tokenizer that prepends BOS, as OPT's, Llama's and Gemma's do
    prompts = ["the quick brown fox jumps over the lazy dog Assistant:", "a red"]
    full = tok(prompts)["input_ids"]
    assert full[0][0] == bos and len(full[0]) > 6
    ids, mask = encode_prompts(tok, prompts, 6)
    assert ids.shape == (2, 6) and ids[0].tolist() == [bos] + full[0][-5:]  # BOS + the instruction's end
    assert ids[1, -len(full[1]):].tolist() == full[1] and mask[1].sum() == len(full[1])  # short: left-padded


def test_ppo_fits_prompts_to_the_positions_and_refuses_conflicting_settings(tiny_gpt2, prompts_file, tmp_path,
                                                                            caplog):
    """Prompts are cut from the left to leave max_new_tokens of the model's positions (128 here) for the
    response, instead of an index error deep in the position embedding (a device-side assert on a GPU)."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": " ".join(CORPUS) + " Assistant:"}) + "\n")
    with caplog.at_level("WARNING"):
        run_ppo(_ppo(tiny_gpt2, str(long), tmp_path / "long", "max_new_tokens=100", "stop_at_eos=false"))
    assert "prompts are longer than 28 tokens: kept their last tokens" in caplog.text
    with pytest.raises(ValueError, match="max_new_tokens = 128 leaves no room for a prompt"):
        run_ppo(_ppo(tiny_gpt2, prompts_file, tmp_path / "a", "max_new_tokens=128"))
    with pytest.raises(ValueError, match="missing_eos_penalty needs stop_at_eos"):
        run_ppo(_ppo(tiny_gpt2, prompts_file, tmp_path / "b", "missing_eos_penalty=1.0", "stop_at_eos=false"))
    assert not (tmp_path / "b").exists()


def test_rm_with_another_tokenizer_scores_the_eos_it_was_trained_on(tmp_path, tiny_gpt2):
    """PPO re-encodes the text for an RM whose tokenizer differs from the policy's; a response that ended at
    EOS gets the RM tokenizer's EOS, as `align text rm` trained it (encode_pairs adds one)."""
    rm_tok = build_bpe_tokenizer(CORPUS[:3] * 2, 280)
    lm = tiny_causal_lm("llama", rm_tok)
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    lm.config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(lm.config)
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    policy_tok = load_tokenizer(tiny_gpt2, padding_side="left")
    reward = RewardFn(str(tmp_path / "rm"), policy_tok, "cpu", 8)
    assert not reward.same_tok
    prompts, texts = ["add 2 and 3:", "a red"], [" 5", " circle"]
    got = reward(prompts, texts, None, None, torch.tensor([True, False]))
    scorer = SequenceScorer(load_seq_scorer(str(tmp_path / "rm"))).eval()
    want = []
    for p, t, eos in zip(prompts, texts, (True, False)):
        ids, _ = encode_pairs(rm_tok, [p], [t], 10 ** 6, add_eos=eos)
        want.append(scorer(*pad_batch(ids, rm_tok.pad_token_id)))
    torch.testing.assert_close(got, torch.cat(want))
    assert not torch.allclose(got, reward(prompts, texts, None, None, torch.tensor([False, False])))


def test_rm_sharing_the_tokenizer_scores_an_end_of_turn_stop_as_its_eos(tmp_path):
    """A Llama-3-style checkpoint stops on <|eot_id|> (its generation_config) as well as the tokenizer's EOS. The RM
    read the policy's own ids at that <|eot_id|>, where it was trained on, and `align compare --judge` scores,
    prompt + response + EOS: the same response got another score in PPO than in the judge."""
    from text_rlhf.compare import RMJudge
    tok = build_bpe_tokenizer(CORPUS, 300, pad=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    lm = tiny_causal_lm("llama", tok)
    lm.config.num_labels = 1
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(lm.config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / "align.json").write_text(json.dumps({"kind": "text_reward_model"}))
    policy_tok = load_tokenizer(str(tmp_path / "rm"), padding_side="left")
    reward = RewardFn(str(tmp_path / "rm"), policy_tok, "cpu", 8)
    assert reward.same_tok
    prompts, texts = ["add 2 and 3:", "add 2 and 3:", "a red"], [" 5", " 5", " circle"]
    p_ids, p_mask = encode_prompts(policy_tok, prompts, 64)
    r_ids = [policy_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ends = [[eot], [policy_tok.eos_token_id], []]  # stopped on <|eot_id|>, on EOS, cut at max_new_tokens
    resp, r_mask = pad_batch([r + e for r, e in zip(r_ids, ends)], policy_tok.pad_token_id)
    seq, mask = torch.cat([p_ids, resp], 1), torch.cat([p_mask, r_mask], 1)
    got = reward(prompts, texts, seq, mask, torch.tensor([True, True, False]))
    want = RMJudge(str(tmp_path / "rm"))(prompts[:2], texts[:2])
    torch.testing.assert_close(got[:2], want)  # both stops score as prompt + response + EOS
    torch.testing.assert_close(got[2:], reward(prompts[2:], texts[2:], seq[2:], mask[2:], torch.tensor([False])))
    assert (seq[0] == eot).sum() == 1  # the rollout itself is left as it was


def test_long_pairs_lose_the_prompts_start_not_the_response():
    """max_length cuts a long prompt from its start (BOS kept), so two candidates stay different and end at
    the EOS the score is read at; a response longer than max_length alone keeps its start and the EOS."""
    from tokenizers.processors import TemplateProcessing
    tok = build_bpe_tokenizer(CORPUS, 300)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", bos)])
    prompt = "the quick brown fox jumps over the lazy dog and reverse the list"
    (a, b), lengths = encode_pairs(tok, [prompt, prompt], [" red", " blue"], 8)
    r_a, r_b = (tok(x, add_special_tokens=False)["input_ids"] for x in (" red", " blue"))
    assert len(a) <= 8 and len(b) <= 8 and a != b
    assert a[0] == bos and a[-1] == eos and a[-1 - len(r_a):-1] == r_a and b[-1 - len(r_b):-1] == r_b
    assert a[1:lengths[0]] == tok(prompt)["input_ids"][-(lengths[0] - 1):]  # the prompt's end
    (c,), _ = encode_pairs(tok, ["a"], [" the quick brown fox jumps over the lazy dog"], 6)
    long_r = tok(" the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    assert c == [bos] + long_r[:4] + [eos]
    (d,), _ = encode_pairs(tok, ["a"], [" red"], 64)  # short: untouched
    assert d == tok("a")["input_ids"] + r_a + [eos]


@pytest.mark.parametrize("override, message", [
    ("ppo.max_grad_norm=-1", "max_grad_norm"),      # torch's clip_grad_norm_ would flip every gradient
    ("ppo.early_stop_kl=-0.1", "early_stop_kl"),    # would stop after the first mini-batch of every rollout
    ("ppo.clip_range=-0.2", "clip_range"),
    ("ppo.kl.estimator=k4", "estimator"),
    ("value_model=critic", "value_model"),
    ("temperature=0", "temperature"),
    ("top_p=1.5", "top_p"),
    ("reward_batch_size=0", "reward_batch_size"),
    ("ppo.lam=1.5", "ppo.lam"),
])
def test_ppo_refuses_settings_that_cannot_work_before_any_folder(tiny_gpt2, prompts_file, tmp_path, override,
                                                                 message):
    with pytest.raises(ValueError, match=message):
        run_ppo(_ppo(tiny_gpt2, prompts_file, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def _rm_with_own_tokenizer(tmp_path, vocab_size: int) -> str:
    """An RM folder (trained head or not: the critic only takes its trunk) whose tokenizer is not the policy's."""
    from transformers import AutoModelForSequenceClassification
    rm_tok = build_bpe_tokenizer(CORPUS[:3] * 2, vocab_size)
    lm = tiny_causal_lm("gpt2", rm_tok)
    lm.config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(lm.config)
    out = tmp_path / f"rm{vocab_size}"
    rm.save_pretrained(out)
    rm_tok.save_pretrained(out)
    return str(out)


def test_separate_critic_reads_the_policys_tokens(tmp_path, tiny_llama, prompts_file, caplog):
    """value_model=separate starts the critic from the RM by default; an RM with its own tokenizer (which PPO
    supports by re-encoding the text) must not become the critic's trunk: it would read the policy's token ids
    (an index error mid-run, or with a larger vocabulary a critic silently reading other tokens)."""
    big = _rm_with_own_tokenizer(tmp_path, 340)  # more embeddings than the policy's 300: no index error would warn
    with caplog.at_level("WARNING"):
        res = run_ppo(_ppo(tiny_llama, prompts_file, tmp_path / "default", "value_model=separate", reward=big))
    assert "critic starts from the policy" in caplog.text
    assert res.policy.critic.config.vocab_size == res.policy.lm.config.vocab_size
    with pytest.raises(ValueError, match="value_init .* another tokenizer"):
        run_ppo(_ppo(tiny_llama, prompts_file, tmp_path / "explicit", "value_model=separate", f"value_init={big}"))
    assert not (tmp_path / "explicit").exists()


# ---------------------------------------------------------------- reward models align did not train (hub, TRL)

def _hub_rm(tmp_path, name, model_cls, cfg, tok):
    torch.manual_seed(0)
    model = model_cls(cfg)
    for n, p in model.named_parameters():  # a visible head, so a score read at the wrong place shows
        if n.split(".")[0] in ("score", "classifier", "pooler"):
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _hf_scores(path, tok, *texts):
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.stack([hf(**tok(*t, return_tensors="pt")).logits[0, 0] for t in zip(*texts)])


PROMPTS, RESPONSES = ["Q: add 2 and 3 A:", "the quick brown fox"], [" 5", " jumps over the lazy dog and the red circle"]


@pytest.mark.parametrize("arch", ["deberta", "bert"])
def test_encoder_rm_is_scored_at_cls_as_transformers_scores_it(tmp_path, tiny_gpt2, arch):
    """OpenAssistant's DeBERTa RMs (and BERT-style ones) pool at [CLS] through their own pooler and are used as
    `tokenizer(question, answer)`: the judge and PPO's reward read them there, not at a last token."""
    from transformers import (BertConfig, BertForSequenceClassification, DebertaV2Config,
                              DebertaV2ForSequenceClassification)
    from text_rlhf.compare import RMJudge
    from text_rlhf.tiny import build_wordpiece_tokenizer
    tok = build_wordpiece_tokenizer(CORPUS)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1)
    if arch == "deberta":  # deberta-v3's layout: relative attention, no absolute positions, no token types
        cfg = DebertaV2Config(**common, type_vocab_size=0, relative_attention=True, position_buckets=16,
                              norm_rel_ebd="layer_norm", position_biased_input=False, pos_att_type=["p2c", "c2p"])
        path = _hub_rm(tmp_path, arch, DebertaV2ForSequenceClassification, cfg, tok)
    else:
        path = _hub_rm(tmp_path, arch, BertForSequenceClassification, BertConfig(**common), tok)
    want = _hf_scores(path, tok, PROMPTS, RESPONSES)
    judge = RMJudge(path)
    torch.testing.assert_close(judge(PROMPTS, RESPONSES), want, atol=1e-4, rtol=1e-4)  # batched: right-padded
    torch.testing.assert_close(judge(PROMPTS[:1], RESPONSES[:1]), want[:1], atol=1e-4, rtol=1e-4)
    reward = RewardFn(path, load_tokenizer(tiny_gpt2), "cpu", 8)
    torch.testing.assert_close(reward(PROMPTS, RESPONSES, None, None, torch.tensor([True, False])), want,
                               atol=1e-4, rtol=1e-4)
    long = " ".join(CORPUS[:4] * 3)  # longer than its 64 positions: cut, not an index error
    assert torch.isfinite(judge([long], [" a red circle"])).all()


def test_trl_rm_with_pad_eos_is_read_where_transformers_read_it_in_training(tmp_path, tiny_gpt2):
    """A GPT-2 RM trained by TRL's RewardTrainer (pad = EOS in its config, EOS appended to every text): transformers
    pooled at the last non-pad id, the token before the EOS, so that is where its score means something. An align
    RM (align.json) is still read at the EOS it was trained on."""
    from transformers import AutoModelForSequenceClassification
    from text_rlhf.compare import RMJudge
    tok = load_tokenizer(tiny_gpt2, padding_side="left")
    lm = tiny_causal_lm("gpt2", tok)
    lm.config.num_labels, lm.config.pad_token_id = 1, tok.eos_token_id
    path = _hub_rm(tmp_path, "trl", AutoModelForSequenceClassification.from_config, lm.config, tok)
    want = _hf_scores(path, tok, [p + r + tok.eos_token for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(RMJudge(path)(PROMPTS, RESPONSES), want, atol=1e-4, rtol=1e-4)
    reward = RewardFn(path, tok, "cpu", 8)  # the policy's tokenizer: its left-padded ids are scored as they are
    assert reward.same_tok
    ids, _ = encode_pairs(tok, PROMPTS, RESPONSES, 64)
    seq, mask = pad_batch(ids, tok.pad_token_id, side="left")
    torch.testing.assert_close(reward(PROMPTS, RESPONSES, seq, mask), want, atol=1e-4, rtol=1e-4)
    (tmp_path / "trl" / "align.json").write_text(json.dumps({"kind": "text_reward_model"}))
    assert not torch.allclose(RMJudge(path)(PROMPTS, RESPONSES), want)


def test_reencoded_reward_fits_the_rms_positions(tmp_path, tiny_llama):
    """An RM with its own tokenizer and fewer positions than the policy's text: the prompt's start is cut (as
    `align text rm` cuts), not an index error (a device-side assert on a GPU)."""
    from transformers import AutoModelForSequenceClassification
    rm_tok = build_bpe_tokenizer(CORPUS[:3] * 2, 280)
    lm = tiny_causal_lm("llama", rm_tok, n_positions=32)
    lm.config.num_labels = 1
    path = _hub_rm(tmp_path, "rm", AutoModelForSequenceClassification.from_config, lm.config, rm_tok)
    reward = RewardFn(path, load_tokenizer(tiny_llama), "cpu", 8)
    assert not reward.same_tok
    long = " ".join(CORPUS[:5] * 2)
    got = reward([long, "a red"], [" circle", " blue"], None, None, torch.tensor([True, True]))
    ids, _ = encode_pairs(rm_tok, [long], [" circle"], 32)
    want = reward.scorer(*pad_batch(ids, rm_tok.pad_token_id))
    torch.testing.assert_close(got[:1], want)


def test_a_classifier_with_several_labels_is_no_reward_model(tmp_path, tiny_gpt2):
    """e.g. a positive/negative sentiment classifier: a clear error, not transformers' size-mismatch report."""
    from transformers import AutoModelForSequenceClassification
    tok = load_tokenizer(tiny_gpt2)
    lm = tiny_causal_lm("gpt2", tok)
    lm.config.num_labels = 2
    path = _hub_rm(tmp_path, "cls", AutoModelForSequenceClassification.from_config, lm.config, tok)
    with pytest.raises(ModelLoadError, match="classifier with 2 labels.*module:function"):
        RewardFn(path, tok, "cpu", 8)
    load_seq_scorer(path, new_head=True)  # as the start of an RM, its head is replaced as any other
