"""The text world's data side: tasks, gold judge, noisy labeler, corpus, tokenizer (no training)."""
import random
import re

import pytest

from text_rlhf.world import (LABEL_NOISE, calibrate_noise, corpus_stats, engineered_prompt, expected_agreement,
                             fewshot_prefix, gold_rank, gold_score, labeler_agreement, make_corpus, make_demos,
                             make_eval_prompts, make_rl_prompts, plain_prompt, preference_groups,
                             reference_candidates)
from text_rlhf.world_tasks import FAMILIES, make_instructions, parse_instruction

QA = re.compile(r"^Q: (.*)\nA: (.*)$", re.M)


def test_gold_judge_hand_cases():
    p = plain_prompt("reverse the list 3 1 4")
    right, spaced, wrong, partial, ramble, long_ramble, empty, parrot, eos = gold_score(
        [p] * 9, ["4 1 3", "  4   1 3 \n", "9 9 9", "4 1", "4 1 3\nsort: 9 2 5", "4 1 3" + " 7" * 20, "",
                  "sort: 9 2 5\nadd 1 and 2", "4 1 3<eos> 8 8"])
    assert right == spaced == eos == 1.0
    assert wrong == empty == parrot == 0.0
    assert 0 < partial < right and wrong < partial
    assert 0 < long_ramble < ramble < right
    assert all(0 <= s <= 1 for s in (right, wrong, partial, ramble, long_ramble))
    exact, close, far = gold_score(["add 9 and 9\n"] * 3, ["18", "17", "2"])
    assert exact == 1.0 > close > far
    assert gold_score(["repeat cat 3 times\n"], ["cat cat cat"]) == [1.0]
    assert gold_score(["how many words: cat dog cup\n"], ["3"]) == [1.0]
    assert gold_score(["sort: 9 2 5\n"], ["2 5 9"]) == [1.0]
    with pytest.raises(ValueError, match="no text-world instruction"):
        gold_score(["tell me a story\n"], ["once"])


def test_fewshot_prompt_judges_the_last_instruction_up_to_the_next_question():
    prefix = "Q: sort: 9 2 5\nA: 2 5 9\n\nQ: add 2 and 3\nA: 5\n\n"
    p = engineered_prompt("reverse the list 3 1 4", prefix)
    assert p.endswith("Q: reverse the list 3 1 4\nA:")
    scores = gold_score([p] * 4, [" 4 1 3\n\nQ: max: 1 2\nA: 2", " 4 1 3", " 5", " 2 5 9"])
    assert scores[0] == scores[1] == 1.0 and scores[2] < 1 and scores[3] < 1
    prefix2 = fewshot_prefix(3, random.Random(0))
    assert len(QA.findall(prefix2)) == 3 and prefix2.endswith("\n\n")


def test_every_phrasing_parses_back_to_its_task():
    for split in ("train", "eval"):
        for d in (1, 2, 3):
            for ins in make_instructions(300, seed=d, difficulty=d, split=split):
                assert parse_instruction(ins.text) == ins
                assert gold_score([plain_prompt(ins.text)], [ins.answer]) == [1.0]
    assert len(FAMILIES) >= 5 and all(len(f.phrasings) >= 3 for f in FAMILIES.values())


def test_corpus_has_the_claimed_properties():
    docs = make_corpus(1000, seed=0, qa_fraction=0.2)
    stats = corpus_stats(docs)
    assert abs(stats["qa_page_fraction"] - 0.2) < 0.04
    assert stats["unanswered_fraction"] > 0.65  # instructions mostly appear without answers
    assert abs(corpus_stats(make_corpus(500, seed=1, qa_fraction=0.5))["qa_page_fraction"] - 0.5) < 0.06
    qa = [(q, a) for d in docs for q, a in QA.findall(d)]
    assert len(qa) > 300
    assert gold_score([f"Q: {q}\nA:" for q, _ in qa], [" " + a for _, a in qa]) == [1.0] * len(qa)
    # on exam sheets an instruction line is followed by another instruction (or the end), never an answer
    followers = [b for d in docs if "Q: " not in d for a, b in zip(d.split("\n"), d.split("\n")[1:])
                 if parse_instruction(a) is not None]
    assert followers and all(parse_instruction(b) is not None for b in followers)
    assert any(not parse_instruction(line) for d in docs for line in d.split("\n"))  # filler text exists


def test_labelers_agree_about_three_quarters_of_the_time():
    assert calibrate_noise(reference_candidates(400, 4, seed=0)) == pytest.approx(LABEL_NOISE, abs=0.005)
    groups = reference_candidates(300, 4, seed=1)
    assert 0.70 <= labeler_agreement(groups, LABEL_NOISE, seed=1) <= 0.80
    assert 0.70 <= expected_agreement(groups, LABEL_NOISE) <= 0.80
    assert labeler_agreement(groups, 0.0) > labeler_agreement(groups, LABEL_NOISE) > labeler_agreement(groups, 10.0)
    p = plain_prompt("sort: 9 2 5")
    assert gold_rank(p, ["9 2 5", "2 5 9", "2 5"], random.Random(0), noise=0.0) == [1, 2, 0]
    (group,) = preference_groups([p], [["9 2 5", "2 5 9", "2 5", "5"]], random.Random(0))
    assert len(group.pairs) == 6


def test_heldout_split_is_disjoint_from_training_data():
    evals = make_instructions(500, seed=0, split="eval")
    key = lambda i: (i.family, i.args)
    eval_keys = {key(i) for i in evals}
    train_texts = [d["prompt"].rstrip("\n") for d in make_demos(200, seed=0)] + \
                  [p.rstrip("\n") for p in make_rl_prompts(500, seed=1)] + \
                  [line.removeprefix("Q: ") for d in make_corpus(500, seed=0) for line in d.split("\n")] + \
                  [q for _ in range(20) for q, _ in QA.findall(fewshot_prefix(3, random.Random(_)))]
    train = [i for i in map(parse_instruction, train_texts) if i is not None]
    assert len(train) > 1000
    assert not eval_keys & {key(i) for i in train}
    assert not any(i.heldout for i in train)
    assert all(i.heldout for i in evals)
    seen = {(i.family, i.phrasing) for i in train}
    held = {(f.name, k) for f in FAMILIES.values() for k in range(len(f.train_phrasings), len(f.phrasings))}
    assert not seen & held and held & {(i.family, i.phrasing) for i in evals}


def test_everything_is_deterministic_given_a_seed():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3) != make_corpus(50, seed=4)
    assert make_demos(20, seed=3) == make_demos(20, seed=3) != make_demos(20, seed=4)
    assert make_eval_prompts(20, seed=3) == make_eval_prompts(20, seed=3)
    assert fewshot_prefix(3, random.Random(7)) == fewshot_prefix(3, random.Random(7))
    cands = ["2 5 9", "9 2 5", "2 5", "2 9 5", "5"]
    p = plain_prompt("sort: 9 2 5")
    assert gold_rank(p, cands, random.Random(1)) == gold_rank(p, cands, random.Random(1))


def test_demos_and_prompts_use_the_plain_format():
    demos = make_demos(200, seed=0)
    assert len(demos) == 200 and all(d["prompt"].endswith("\n") and "Q:" not in d["prompt"] for d in demos)
    assert gold_score([d["prompt"] for d in demos], [d["response"] for d in demos]) == [1.0] * 200
    ev = make_eval_prompts(10, seed=0)
    assert all(e["engineered"].endswith("Q: " + e["plain"].rstrip("\n") + "\nA:") for e in ev)


def test_world_tokenizer_round_trips_and_sizes_the_tiny_gpt2(tmp_path):
    from transformers import AutoTokenizer

    from text_rlhf.world import build_tiny_gpt2, build_world_tokenizer

    build_world_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) < 200 and tok.eos_token == "<eos>" and tok.pad_token_id != tok.eos_token_id
    texts = make_corpus(200, seed=9) + make_corpus(100, seed=9, qa_fraction=0.5, difficulty=3) + \
        [e["engineered"] for e in make_eval_prompts(50, seed=9, difficulty=3)]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == t
    # SFT and the RM tokenize the response apart from the prompt: a word at the start of a response
    # must be a known token too (a demonstration "cup" once taught the model to answer <unk>)
    demos = make_demos(300, seed=9, difficulty=3)
    for d in demos:
        assert tok.unk_token_id not in tok(d["response"], add_special_tokens=False)["input_ids"], d
    n_params = sum(p.numel() for p in build_tiny_gpt2(tok).parameters())
    assert 0.4e6 < n_params < 0.6e6
    import torch
    from text_rlhf.world_train import BaseLMConfig
    m = build_tiny_gpt2(tok, dropout=BaseLMConfig().dropout).train()  # the base LM pretrains without dropout
    ids = torch.tensor([tok(texts[0])["input_ids"][:32]])
    assert torch.equal(m(ids).logits, m(ids).logits)
