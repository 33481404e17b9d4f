"""chat_template=true: prompts as a user turn of an instruct model's chat template, in SFT, the RM, PPO and compare
(TRL's conversational prompts, OpenRLHF's --apply_chat_template)."""
import json

import pytest
from tokenizers import processors

from align.config import load_config
from text_rlhf.models import chat_prompts, load_tokenizer
from text_rlhf.tiny import build_bpe_tokenizer, tiny_causal_lm

from conftest import CORPUS

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _chat_model(tmp_path, adds_bos: bool, template: str | None = TEMPLATE) -> str:
    tok = build_bpe_tokenizer(CORPUS, 300, pad=True)
    if adds_bos:  # as Llama's tokenizer: BOS before every text it encodes
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.chat_template = template
    out = tmp_path / f"chat-{adds_bos}-{template is not None}"
    tiny_causal_lm("llama", tok).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_chat_prompts_tokenize_as_the_template_does_with_one_bos(tmp_path, adds_bos):
    tok = load_tokenizer(_chat_model(tmp_path, adds_bos))
    prompts = ["add 2 and 3:", "the quick brown fox"]
    texts = chat_prompts(tok, prompts)
    for p, text in zip(prompts, texts):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        want = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ids == list(want), (ids, want)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's BOS, once
        assert text.rstrip().endswith("<|assistant|>") and p in text


def test_a_tokenizer_without_a_template_is_a_clear_error(tmp_path, data_files):
    from text_rlhf.sft import SFTConfig, run_sft
    path = _chat_model(tmp_path, False, template=None)
    cfg = load_config(SFTConfig, None, ["chat_template=true"], model=path, data=data_files["demos"],
                      out=str(tmp_path / "sft"))
    with pytest.raises(ValueError, match="has no chat template.*chat_template=false"):
        run_sft(cfg)
    assert not (tmp_path / "sft").exists()


def test_compare_refuses_a_judge_without_a_template_before_generating(tmp_path, data_files, monkeypatch):
    """text.chat_template formats the RM judge's prompts too: a judge without a template failed only at its first
    score, after the first model's generations (minutes with a real model)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import text_rlhf.compare as text_compare
    from align.compare import CompareConfig, run_compare
    plain = _chat_model(tmp_path, False, template=None)
    cfg = AutoModelForSequenceClassification.from_pretrained(plain, num_labels=1).config
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    load_tokenizer(plain).save_pretrained(tmp_path / "rm")
    monkeypatch.setattr(text_compare.TextGenerator, "__call__", lambda *a: pytest.fail("generated before the check"))
    with pytest.raises(ValueError, match=r"the judge .*rm.*has no chat template"):
        run_compare(load_config(CompareConfig, None, ["text.chat_template=true"], models=[f"m={_chat_model(tmp_path, True)}"],
                                prompts=data_files["prompts"], judge=str(tmp_path / "rm"), template="Please, {prompt}"))


@pytest.fixture
def data_files(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)
    return {"demos": write("demos.jsonl", [{"prompt": f"add {a} and 2:", "response": f" {a + 2}"} for a in range(8)]),
            "prefs": write("prefs.jsonl", [{"prompt": f"add {a} and 2:", "chosen": f" {a + 2}", "rejected": f" {a}"}
                                           for a in range(1, 9)]),
            "prompts": write("prompts.jsonl", [{"prompt": f"add {a} and 3:"} for a in range(4)])}


def test_sft_rm_ppo_and_compare_format_prompts_with_the_template(tmp_path, data_files, monkeypatch):
    import text_rlhf.rm as rm_mod
    import text_rlhf.sft as sft_mod
    from align.compare import CompareConfig, run_compare
    from text_rlhf.ppo import PPOConfig, run_ppo
    model = _chat_model(tmp_path, True)
    tok = load_tokenizer(model)
    want = dict(zip([f"add {a} and 2:" for a in range(9)], chat_prompts(tok, [f"add {a} and 2:" for a in range(9)])))
    seen = {}
    encode_sft, pair_schedule = sft_mod.encode_sft, rm_mod.pair_schedule
    monkeypatch.setattr(sft_mod, "encode_sft", lambda t, records, *a, **k: (
        seen.setdefault("sft", []).extend(r["prompt"] for r in records), encode_sft(t, records, *a, **k))[1])
    monkeypatch.setattr(rm_mod, "pair_schedule", lambda groups, *a: (
        seen.setdefault("rm", []).extend(g.prompt for g in groups), pair_schedule(groups, *a))[1])
    sft_mod.run_sft(load_config(sft_mod.SFTConfig, None, ["chat_template=true", "epochs=1", "batch_size=4"],
                                model=model, data=data_files["demos"], out=str(tmp_path / "sft")))
    rm_mod.run_rm(load_config(rm_mod.RMConfig, None, ["chat_template=true", "epochs=1", "eval_fraction=0.25"],
                              model=model, data=data_files["prefs"], out=str(tmp_path / "rm")))
    assert seen["sft"] and all(p in want.values() for p in seen["sft"]), seen["sft"][:2]
    assert seen["rm"] and all(p in want.values() for p in seen["rm"]), seen["rm"][:2]
    run_ppo(load_config(PPOConfig, None, ["chat_template=true", "iterations=1", "batch_size=4",
                                          "ppo.mini_batch_size=4", "max_new_tokens=4", "log_samples=4"],
                        policy=model, reward=str(tmp_path / "rm"), prompts=data_files["prompts"],
                        out=str(tmp_path / "ppo")))
    logged = [json.loads(x)["prompt"] for x in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert logged and all(p in chat_prompts(tok, [f"add {a} and 3:" for a in range(4)]) for p in logged), logged
    run_compare(load_config(CompareConfig, None, ["text.chat_template=true", "text.max_new_tokens=4", "n_boot=50"],
                            models=[f"m={model}"], prompts=data_files["prompts"], judge=str(tmp_path / "rm"),
                            template="Please, {prompt}", out=str(tmp_path / "cmp")))
    assert "chat-template user turns" in (tmp_path / "cmp" / "compare.md").read_text()
    from align.compare import TextGenParams
    from text_rlhf.compare import RMJudge, TextGenerator
    gen = TextGenerator(model, TextGenParams(max_new_tokens=4, chat_template=True))
    plain = TextGenerator(model, TextGenParams(max_new_tokens=4))
    prompts = [f"add {a} and 3:" for a in range(4)]
    assert gen(prompts, 0) == plain(chat_prompts(tok, prompts), 0)  # the model saw the formatted prompt
    judged = RMJudge(str(tmp_path / "rm"), chat_template=True)(prompts, ["5"] * 4)
    assert judged.tolist() == RMJudge(str(tmp_path / "rm"))(chat_prompts(tok, prompts), ["5"] * 4).tolist()


def test_ppo_reward_with_its_own_chat_template_scores_the_conversation_as_trained(tmp_path):
    """reward_chat_template: an RM with another tokenizer and a chat template of its own (a conversation RM such as
    Skywork-Reward, trained by TRL on apply_chat_template's ids) scores [user: prompt as written, assistant: response]
    exactly as transformers scores those ids; the policy's own formatting does not reach it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from text_rlhf.ppo import RewardFn
    rm_tok = build_bpe_tokenizer(CORPUS[:3] * 2, 340, pad=True)
    rm_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{rm_tok.bos_token} $A", special_tokens=[(rm_tok.bos_token, rm_tok.bos_token_id)])
    rm_tok.chat_template = TEMPLATE.replace("<|", "[").replace("|>", "]")
    lm = tiny_causal_lm("llama", rm_tok)
    lm.config.num_labels = 1
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(lm.config)
    torch.nn.init.normal_(rm.score.weight)
    rm.save_pretrained(tmp_path / "rm"), rm_tok.save_pretrained(tmp_path / "rm")
    prompts, responses = ["add 2 and 3:", "the quick brown fox"], ["5", "jumps over the lazy dog"]
    conv = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    def template_ids(c):
        ids = rm_tok.apply_chat_template(c, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    with torch.no_grad():  # transformers: logits at the last non-pad token of the template's own ids
        want = torch.stack([rm(input_ids=torch.tensor([template_ids(c)])).logits[0, 0] for c in conv])
    policy_tok = load_tokenizer(_chat_model(tmp_path, False))
    formatted = chat_prompts(policy_tok, prompts)
    reward = RewardFn(str(tmp_path / "rm"), policy_tok, "cpu", 8, chat_template=True,
                      raw_prompts=dict(zip(formatted, prompts)))
    torch.testing.assert_close(reward(formatted, responses, None, None), want)
    rm_tok.chat_template = None
    rm.save_pretrained(tmp_path / "rm-no-template"), rm_tok.save_pretrained(tmp_path / "rm-no-template")
    with pytest.raises(ValueError, match="reward_chat_template: the tokenizer .* has no chat template"):
        RewardFn(str(tmp_path / "rm-no-template"), policy_tok, "cpu", 8, chat_template=True)


CONV = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "add 2 and 3:"},
        {"role": "assistant", "content": " 5"}]


@pytest.mark.parametrize("messages, field, match", [
    (CONV[:2], "messages[1]", "the last message must be the assistant's, got 'user'"),
    (CONV[:2] + [{"role": "assistant", "content": "  "}], "messages[2]", "empty"),
    ([{"role": "bot", "content": "x"}] + CONV[1:], "messages[0]", "role 'bot' is not one of"),
    ([CONV[0], {"role": "user"}, CONV[2]], "messages[1]", 'expected {"role": str, "content": str}'),
    ("add 2 and 3:", "messages", "expected a non-empty list"),
    (CONV[2:], "messages", "needs a message before the assistant's"),
])
def test_conversational_sft_records_are_checked_with_file_line_and_field(tmp_path, messages, field, match):
    from align.data import DataError, load_sft
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: field '{field}'.*{match}".replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        load_sft(path)


def test_a_conversation_the_template_refuses_is_a_one_line_error(tmp_path):
    """Gemma's and Mistral's templates `raise_exception` on a system turn (or turns that do not alternate): that was a
    jinja2 traceback out of `align text sft`; now a ValueError naming the conversation, before any run folder."""
    from text_rlhf.sft import SFTConfig, run_sft
    model = _chat_model(tmp_path, False, template="{% if messages[0]['role'] == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{% endif %}" + TEMPLATE)
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"messages": CONV[1:]}) + "\n" + json.dumps({"messages": CONV}) + "\n")
    with pytest.raises(ValueError, match=r"refuses the conversation with roles \['system', 'user'\] \(starting "
                                         r"'You add numbers.'\): System role not supported"):
        run_sft(load_config(SFTConfig, None, [], model=model, data=str(demos), out=str(tmp_path / "sft")))
    assert not (tmp_path / "sft").exists()

def test_conversational_records_train_sft_and_prompt_ppo_in_the_template(tmp_path, monkeypatch):
    """TRL's conversational formats: SFT {"messages": [..., assistant]} trains the last assistant turn after the
    others rendered by the chat template (whatever chat_template says: a conversation has no other text form); PPO
    prompts {"prompt": [messages]} / {"messages": [...]} end with the user's turn and are rendered with the
    generation prompt. A model without a template refuses them."""
    import text_rlhf.sft as sft_mod
    from align.data import load_prompts, load_sft
    from text_rlhf.ppo import PPOConfig, run_ppo
    model = _chat_model(tmp_path, True)
    tok = load_tokenizer(model)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [CONV[0], {"role": "user", "content": f"add {a} and 3:"},
                                                      {"role": "assistant", "content": f" {a + 3}"}]}) + "\n"
                             for a in range(6)))
    records = load_sft(demos)
    assert records[1] == {"prompt": [CONV[0], {"role": "user", "content": "add 1 and 3:"}], "response": " 4"}
    seen = []
    encode_sft = sft_mod.encode_sft
    monkeypatch.setattr(sft_mod, "encode_sft", lambda t, recs, *a, **k: (seen.extend(r["prompt"] for r in recs),
                                                                         encode_sft(t, recs, *a, **k))[1])
    sft_mod.run_sft(load_config(sft_mod.SFTConfig, None, ["epochs=1", "batch_size=3"], model=model, data=str(demos),
                                out=str(tmp_path / "sft")))
    want = chat_prompts(tok, [r["prompt"] for r in records])
    assert sorted(seen) == sorted(want) and all("You add numbers." in p and "<|system|>" in p for p in seen)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "add 4 and 4:"}]}) + "\n" +
                       json.dumps({"messages": CONV[:2]}) + "\n" + json.dumps({"prompt": "add 1 and 1:"}) + "\n")
    loaded = load_prompts(prompts)
    assert loaded[1] == CONV[:2] and loaded[2] == "add 1 and 1:"
    run_ppo(load_config(PPOConfig, None, ["iterations=1", "batch_size=3", "ppo.mini_batch_size=3", "max_new_tokens=4",
                                          "log_samples=3"],
                        policy=model, reward="rewards:vowels", prompts=str(prompts), out=str(tmp_path / "ppo")))
    logged = {json.loads(x)["prompt"] for x in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()}
    assert logged == {*chat_prompts(tok, loaded[:2]), "add 1 and 1:"}  # a text prompt stays text (chat_template off)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": CONV}) + "\n")
    from align.data import DataError
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'prompt\[2\]': the last message must be the user's"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="has no chat template"):
        sft_mod.run_sft(load_config(sft_mod.SFTConfig, None, ["epochs=1"], model=_chat_model(tmp_path, False, None),
                                    data=str(demos), out=str(tmp_path / "sft2")))


def test_conversational_preferences_from_jsonl_and_datasets(tmp_path, monkeypatch):
    """TRL's conversational preference records: an explicit prompt (a list of messages) with completions as one
    assistant message or text, and the implicit prompt (two whole conversations, the messages they share are the
    prompt); the RM renders them with the chat template whatever chat_template says."""
    import pickle

    import datasets

    import text_rlhf.rm as rm_mod
    from align.data import Conversation, DataError, load_hf_preferences, load_preferences
    user = [{"role": "user", "content": "add 2 and 3:"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [{"prompt": user, "chosen": answer(" 5"), "rejected": " 6"},
            {"chosen": CONV, "rejected": CONV[:2] + answer(" 7")},
            {"prompt": user, "completions": [" 5", answer(" 4"), " 9"], "ranking": [0, 1, 2]}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = load_preferences(path)
    assert [type(g.prompt) for g in groups] == [Conversation] * 3
    assert groups[0].prompt.messages == user and groups[0].candidates == [" 5", " 6"]
    assert groups[1].prompt.messages == CONV[:2] and groups[1].candidates == [" 5", " 7"]
    assert groups[2].prompt == groups[0].prompt and groups[2].candidates == [" 5", " 4", " 9"]
    assert pickle.loads(pickle.dumps(groups[1].prompt)).messages == CONV[:2]
    other = [CONV[0], {"role": "user", "content": "add 9 and 9:"}] + answer("x")
    for bad, field, match in (({"chosen": CONV, "rejected": other}, "chosen", "differ before"),
                              ({"prompt": user, "chosen": CONV[1:], "rejected": "x"}, "chosen",
                               "one assistant message, got 2"),
                              ({"prompt": CONV, "chosen": "a", "rejected": "b"}, r"prompt\[2\]", "must be the user's")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"prefs.jsonl:1: field '{field}'.*{match}"):
            load_preferences(path)
    ds = datasets.Dataset.from_list([{"chosen": CONV, "rejected": CONV[:2] + answer(" 6")},
                                     {"chosen": CONV, "rejected": CONV[:2] + answer("  ")}])
    hf_groups = load_hf_preferences(ds)  # trl-lib/ultrafeedback_binarized's form; the empty answer is skipped
    assert len(hf_groups) == 1 and hf_groups[0].prompt.messages == CONV[:2] and hf_groups[0].candidates == [" 5", " 6"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3) +
                    "".join(json.dumps({"prompt": [{"role": "user", "content": f"add {a} and 1:"}],
                                        "chosen": f" {a + 1}", "rejected": f" {a}"}) + "\n" for a in range(8)))
    model = _chat_model(tmp_path, True)
    seen = []
    pair_schedule = rm_mod.pair_schedule
    monkeypatch.setattr(rm_mod, "pair_schedule", lambda gs, *a: (seen.extend(g.prompt for g in gs),
                                                                pair_schedule(gs, *a))[1])
    rm_mod.run_rm(load_config(rm_mod.RMConfig, None, ["epochs=1", "eval_fraction=0.2", "allow_duplicates=true"],
                              model=model, data=str(path), out=str(tmp_path / "rm")))
    tok = load_tokenizer(model)
    rendered = set(chat_prompts(tok, [g.prompt.messages for g in load_preferences(path, allow_duplicates=True)]))
    assert seen and set(seen) <= rendered and all(type(p) is str for p in seen)  # the held-out fifth aside
    with pytest.raises(ValueError, match="has no chat template"):
        rm_mod.run_rm(load_config(rm_mod.RMConfig, None, ["epochs=1", "allow_duplicates=true"],
                                  model=_chat_model(tmp_path, False, None), data=str(path), out=str(tmp_path / "rm2")))


def test_compare_takes_conversation_prompts_and_templates_the_last_user_turn(tmp_path, tiny_gpt2, tiny_sd_path):
    """align compare with TRL conversations as prompts: the chat model gets them in its template, a --template
    rewrites the user's last turn (the engineered variant of what the user writes), and the judge sees the plain
    conversation; a model or an image pipeline that cannot read them fails before generating."""
    from align.compare import CompareConfig, load_compare_prompts, make_template, run_compare
    model = _chat_model(tmp_path, True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": CONV[:2]}) + "\n" + json.dumps({"prompt": "add 1 and 1:"}) + "\n")
    items = load_compare_prompts(prompts, make_template("Please: {prompt}"))
    assert items[0].plain == CONV[:2]
    assert items[0].engineered == [CONV[0], {"role": "user", "content": "Please: " + CONV[1]["content"]}]
    assert items[1].engineered == "Please: add 1 and 1:"
    cfg = CompareConfig(models=[f"chat={model}"], prompts=str(prompts), judge="test_chat_template:prompt_kind",
                        template="Please: {prompt}", n_boot=10)
    cfg.text.max_new_tokens = 3
    res = run_compare(cfg)
    assert res["arm_objects"]["chat-plain"].scores[:, 0].tolist() == [1.0, 0.0]  # the judge saw the plain prompts
    with pytest.raises(ValueError, match="has no chat template"):
        run_compare(CompareConfig(models=[tiny_gpt2], prompts=str(prompts), judge="test_chat_template:prompt_kind",
                                  template="Please: {prompt}"))
    with pytest.raises(ValueError, match="conversation prompts are for chat models"):
        run_compare(CompareConfig(models=[tiny_sd_path], prompts=str(prompts), judge="brightness",
                                  template="Please: {prompt}"))


def prompt_kind(prompts, outputs):
    """1 for a conversation (the plain one: its last turn not rewritten), 0 for a text prompt."""
    return [float(isinstance(p, list) and not p[-1]["content"].startswith("Please")) for p in prompts]
