"""The text miniature world: prompts, gold judge, noisy labeler, "internet" corpus, tokenizer.

Formats (one of each, used everywhere):
  plain prompt        "<instruction>\\n"           -> SFT response "<answer>" + EOS
  engineered prompt   "Q: <i1>\\nA: <a1>\\n\\n" ... "Q: <instruction>\\nA:"   (k solved examples)
  corpus              documents joined by EOS at training time; exam sheets list instructions one
                      per line with no answers, Q:/A: pages answer them (`make_corpus`).
Nothing here treats plain and engineered prompts differently: the judge reads the last instruction
found in any prompt and cuts any response at EOS or at a new "Q:" line (GPT-3's stop="\\nQ:"), so
a base model answers few-shot prompts and parrots plain ones only because of what its corpus holds.

The gold judge plays the human: `gold_score` for evaluation, `gold_rank` for preference labels
(Bradley-Terry noise calibrated to ~75% inter-labeler agreement; InstructGPT, Ouyang et al. 2022,
reports 72.6 ± 1.5% among training labelers and 77.3 ± 1.3% for held-out ones).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

from text_rlhf.world_tasks import (FAMILIES, NOUNS, Instruction, make_instructions, parse_instruction, render,
                                  sample_instruction)

EOS = "<eos>"
RAMBLE_COEF = 0.1
"""Each token after the answer multiplies the score by 1 / (1 + RAMBLE_COEF · extra): 10 extra -> ×0.5."""
LABEL_NOISE = 0.233
"""Bradley-Terry temperature of the simulated labeler: calibrate_noise(reference_candidates(400, 4,
seed=0)) = 0.233 gives 75% agreement between two independent labelers on that pool. Agreement
depends on the candidates: re-run calibrate_noise on real policy samples when they differ."""


# ---------------------------------------------------------------- prompts
def plain_prompt(instruction: str) -> str:
    return instruction + "\n"


def qa_block(instruction: str, answer: str) -> str:
    return f"Q: {instruction}\nA: {answer}"


def fewshot_prefix(k: int, rng: random.Random, *, difficulty: int = 1, families=None) -> str:
    """k solved Q:/A: examples (training split, mixed families), each followed by a blank line."""
    shots = [sample_instruction(rng, difficulty=difficulty, families=families) for _ in range(k)]
    return "".join(qa_block(s.text, s.answer) + "\n\n" for s in shots)


def engineered_prompt(instruction: str, prefix: str) -> str:
    return f"{prefix}Q: {instruction}\nA:"


# ---------------------------------------------------------------- gold judge
_STOP = re.compile(r"(?:^|\n)[ \t]*Q:")          # a new question starts: the answer is over
_TOKEN = re.compile(r"[a-z]+|\d+")               # answers compare as words/numbers; spacing and punctuation ignored


def last_instruction(prompt: str) -> Instruction | None:
    """The last line of `prompt` that parses as an instruction (a leading "Q:" is dropped)."""
    for line in reversed(prompt.splitlines()):
        ins = parse_instruction(re.sub(r"^\s*Q:", "", line))
        if ins is not None:
            return ins
    return None


def response_tokens(response: str) -> list[str]:
    """The judged part of a response: up to EOS or a new "Q:" line, as lowercase words/numbers."""
    for stop in (EOS, "<|endoftext|>", "<pad>"):
        response = response.split(stop, 1)[0]
    response = _STOP.split(response, 1)[0]
    return _TOKEN.findall(response.lower())


def answer_score(answer: list[str], tokens: list[str]) -> float:
    """Score in [0, 1] of response `tokens` against the right `answer` tokens; 1 iff equal.

    content = mean of (positional accuracy, bag-of-tokens overlap, correct-prefix length) of the
    first len(answer) tokens, each / len(answer); a single-number answer also gets up to 0.5 for
    being close (1 − |r − a| / (a + 1)). Rambling: × 1 / (1 + RAMBLE_COEF · extra tokens).
    """
    if not tokens:
        return 0.0
    n = len(answer)
    head = tokens[:n]
    pos = sum(h == a for h, a in zip(head, answer))
    bag = sum((Counter(head) & Counter(answer)).values())
    prefix = next((i for i, (h, a) in enumerate(zip(head, answer)) if h != a), min(len(head), n))
    content = (pos + bag + prefix) / (3 * n)
    if n == 1 and head[0].isdigit() and answer[0].isdigit() and head != answer:
        r, a = int(head[0]), int(answer[0])
        content = max(content, 0.5 * max(0.0, 1 - abs(r - a) / (a + 1)))
    extra = len(tokens) - len(head)
    return content / (1 + RAMBLE_COEF * extra)


def gold_score(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold score in [0, 1] of each response to the last instruction of its prompt.
    Exact answer then EOS / end of text = 1.0. A prompt without a world instruction is an error."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ins = last_instruction(p)
        if ins is None:
            raise ValueError(f"prompt {i} holds no text-world instruction: {p[-80:]!r}")
        out.append(answer_score(ins.answer.split(), response_tokens(r)))
    return out


def is_success(score: float) -> bool:
    return score >= 1.0 - 1e-9


# ---------------------------------------------------------------- the noisy labeler
def gold_rank(prompt: str, candidates: list[str], rng: random.Random, noise: float = LABEL_NOISE) -> list[int]:
    """A labeler's best-first ranking of candidate indices.

    Plackett-Luce with utilities s_i / noise (s = gold score): sort by s_i / noise + Gumbel noise.
    Its pairwise marginals are Bradley-Terry, P(i ≻ j) = σ((s_i − s_j) / noise), because the
    difference of two Gumbels is logistic. noise = 0: sort by gold score, ties in random order.
    """
    scores = gold_score([prompt] * len(candidates), candidates)
    if noise == 0:
        keys = [(s, rng.random()) for s in scores]
    else:
        keys = [(s / noise - math.log(-math.log(rng.random() or 1e-300)), 0.0) for s in scores]
    return sorted(range(len(candidates)), key=lambda i: keys[i], reverse=True)


def _pairs(candidates):
    """Index pairs of candidates with different texts (identical texts cannot be ranked)."""
    return [(i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates))
            if " ".join(candidates[i].split()) != " ".join(candidates[j].split())]


def labeler_agreement(groups: list[tuple[str, list[str]]], noise: float = LABEL_NOISE, seed: int = 0) -> float:
    """Measured: two independent labelers rank every group; share of candidate pairs they order alike."""
    a, b = random.Random(f"labeler-a:{seed}"), random.Random(f"labeler-b:{seed}")
    agree = total = 0
    for prompt, cands in groups:
        ra, rb = gold_rank(prompt, cands, a, noise), gold_rank(prompt, cands, b, noise)
        pa, pb = {c: r for r, c in enumerate(ra)}, {c: r for r, c in enumerate(rb)}
        for i, j in _pairs(cands):
            agree += (pa[i] < pa[j]) == (pb[i] < pb[j])
            total += 1
    return agree / max(total, 1)


def _score_gaps(groups: list[tuple[str, list[str]]]) -> list[float]:
    """s_i − s_j of every rankable candidate pair (see `_pairs`)."""
    gaps = []
    for prompt, cands in groups:
        s = gold_score([prompt] * len(cands), cands)
        gaps += [s[i] - s[j] for i, j in _pairs(cands)]
    return gaps


def _agreement(gaps: list[float], noise: float) -> float:
    if noise == 0:  # equal scores: each labeler flips a coin
        return sum(0.5 if g == 0 else 1.0 for g in gaps) / max(len(gaps), 1)
    ps = [1 / (1 + math.exp(-g / noise)) for g in gaps]
    return sum(p * p + (1 - p) * (1 - p) for p in ps) / max(len(ps), 1)


def expected_agreement(groups: list[tuple[str, list[str]]], noise: float) -> float:
    """Exact expectation of `labeler_agreement`: mean over pairs of p² + (1 − p)², p = σ(Δs / noise)."""
    return _agreement(_score_gaps(groups), noise)


def calibrate_noise(groups: list[tuple[str, list[str]]], target: float = 0.75) -> float:
    """The noise at which expected labeler agreement on `groups` is `target` (bisection in log-space;
    agreement falls monotonically from its noiseless value towards 0.5 as noise grows)."""
    gaps = _score_gaps(groups)
    if _agreement(gaps, 0.0) <= target:
        raise ValueError(f"even noiseless labelers agree on <= {target:.0%} of these pairs (too many equal scores)")
    lo, hi = 1e-4, 1e2
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _agreement(gaps, mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def _corrupt(ins: Instruction, other: Instruction, rng: random.Random) -> str:
    """One response of a mediocre policy: right, rambling, damaged, another question's answer, or parroting."""
    ans = ins.answer.split()
    kind = rng.randrange(7)
    if kind == 0:
        return ins.answer
    if kind == 1:
        return ins.answer + "\n" + other.text
    if kind == 2 and len(ans) > 1:
        ans = ans[:]
        del ans[rng.randrange(len(ans))]
    elif kind in (2, 3):
        ans = ans[:]
        i = rng.randrange(len(ans))
        ans[i] = str(rng.randint(0, 20)) if ans[i].isdigit() else rng.choice(NOUNS)
    elif kind == 4:
        ans = rng.sample(ans, len(ans)) + ans[: rng.randint(0, 2)]
    elif kind == 5:
        return other.answer
    else:
        return other.text + "\n" + sample_instruction(rng).text
    return " ".join(ans)


def reference_candidates(n_prompts: int, k: int, seed: int = 0, *, difficulty: int = 1) -> list[tuple[str, list[str]]]:
    """(plain prompt, k candidate responses) groups from a simulated mediocre policy — the pool
    LABEL_NOISE is calibrated on."""
    rng = random.Random(f"reference:{seed}")
    groups = []
    for ins in make_instructions(n_prompts, seed, difficulty=difficulty):
        cands = [_corrupt(ins, sample_instruction(rng, difficulty=difficulty), rng) for _ in range(k)]
        groups.append((plain_prompt(ins.text), cands))
    return groups


def preference_groups(prompts: list[str], candidates: list[list[str]], rng: random.Random, noise: float = LABEL_NOISE):
    """K-way gold rankings as align.data PreferenceGroups (all K(K−1)/2 pairs of each prompt)."""
    from align.data import PreferenceGroup, pairs_from_ranking
    return [PreferenceGroup(p, list(c), pairs_from_ranking(gold_rank(p, c, rng, noise), len(c)))
            for p, c in zip(prompts, candidates)]


# ---------------------------------------------------------------- the "internet" corpus
_SUBJECTS = ("the cat", "my dog", "a bird", "the teacher", "our class", "the fish", "a girl", "the man")
_VERBS = ("sat on", "looked at", "likes", "found", "wants", "saw", "has")
_OBJECTS = tuple(f"{d} {n}" for d in ("the", "a", "my") for n in ("apple", "book", "box", "hat", "tree", "cup", "pen"))
_TAILS = ("", " today", " in the morning", " at school", " again")
_HEADERS = ("homework", "exercises for today", "practice sheet", "quiz", "test questions", "more exercises")
_QA_HEADERS = ("answers", "questions and answers", "solved exercises", "answer key")


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."


def make_corpus(n_docs: int, seed: int, qa_fraction: float = 0.2, filler_fraction: float = 0.3, *,
                difficulty: int = 1, families=None) -> list[str]:
    """Documents of the world's internet (join them with EOS to pretrain on them).

    Per document, independently: with p = qa_fraction a Q:/A: page (2–6 solved instructions,
    optional header); with p = filler_fraction ordinary prose (2–6 sentences); else an exam sheet
    (3–8 instructions one per line, NO answers, optional header or intro sentence). With the
    defaults ~75% of instruction occurrences are unanswered. Training split only.
    """
    if not 0 <= qa_fraction + filler_fraction <= 1:
        raise ValueError(f"qa_fraction + filler_fraction must be in [0, 1], got {qa_fraction} + {filler_fraction}")
    rng = random.Random(f"corpus:{seed}")
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        if u < qa_fraction:
            blocks = [qa_block(i.text, i.answer) for i in
                      (sample_instruction(rng, difficulty=difficulty, families=families) for _ in range(rng.randint(2, 6)))]
            head = [rng.choice(_QA_HEADERS)] if rng.random() < 0.3 else []
            docs.append("\n\n".join(head + blocks))
        elif u < qa_fraction + filler_fraction:
            docs.append(" ".join(filler_sentence(rng) for _ in range(rng.randint(2, 6))))
        else:
            lines = [sample_instruction(rng, difficulty=difficulty, families=families).text
                     for _ in range(rng.randint(3, 8))]
            r = rng.random()
            head = [rng.choice(_HEADERS)] if r < 0.3 else [filler_sentence(rng)] if r < 0.5 else []
            docs.append("\n".join(head + lines))
    return docs


def corpus_stats(docs: list[str]) -> dict:
    """What the corpus holds, read back from its text with the judge's parser."""
    qa_pages = answered = unanswered = 0
    for doc in docs:
        lines = doc.split("\n")
        qa_pages += any(l.startswith("Q: ") for l in lines)
        for i, line in enumerate(lines):
            if parse_instruction(re.sub(r"^Q:", "", line)) is not None:
                has_answer = i + 1 < len(lines) and lines[i + 1].startswith("A: ")
                answered += has_answer
                unanswered += not has_answer
    total = max(answered + unanswered, 1)
    return {"docs": len(docs), "qa_page_fraction": qa_pages / max(len(docs), 1),
            "instructions": answered + unanswered, "unanswered_fraction": unanswered / total}


# ---------------------------------------------------------------- data sets for the recipe
def make_demos(n: int = 200, seed: int = 0, *, difficulty: int = 1, families=None) -> list[dict]:
    """SFT demonstrations {"prompt", "response"}: plain prompt -> " answer" (SFT appends EOS).

    The answer keeps the leading space it has after "A:" in the corpus: the world's tokens are
    words with their leading space, and a word at the very start of a line ("cup") is not in the
    vocabulary, so a demonstration written that way would teach the model to say <unk>."""
    return [{"prompt": plain_prompt(i.text), "response": " " + i.answer}
            for i in make_instructions(n, seed, difficulty=difficulty, families=families)]


def make_rl_prompts(n: int, seed: int = 1, *, difficulty: int = 1, families=None) -> list[str]:
    """Plain training-split prompts for reward-model sampling and PPO."""
    return [plain_prompt(i.text) for i in make_instructions(n, seed, difficulty=difficulty, families=families)]


def make_eval_prompts(n: int, seed: int = 0, k_shot: int = 3, *, difficulty: int = 1, families=None) -> list[dict]:
    """Held-out instructions as {"family", "plain", "engineered", "answer"}; each engineered prompt
    gets its own k-shot prefix of training-split examples."""
    rng = random.Random(f"eval-prefix:{seed}")
    return [{"family": i.family, "plain": plain_prompt(i.text), "answer": i.answer,
             "engineered": engineered_prompt(i.text, fewshot_prefix(k_shot, rng, difficulty=difficulty, families=families))}
            for i in make_instructions(n, seed, difficulty=difficulty, split="eval", families=families)]


# ---------------------------------------------------------------- tokenizer and model
_PIECES = r"\n| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"
"""Word-level pieces that keep their leading space (GPT-2 style), digits one by one, so the
vocabulary stays small and decode(encode(text)) == text."""

TINY_GPT2 = dict(n_layer=4, n_embd=96, n_head=4, n_positions=256)
"""~0.48M parameters with this vocabulary (DESIGN: 0.48M learns one task to 92% in ~40 s on 2 cores)."""


def _lexicon_texts() -> list[str]:
    """Texts that use every word the world can write, in every leading-space form it can take."""
    texts = make_corpus(400, seed=0, qa_fraction=0.3) + [d["engineered"] for d in make_eval_prompts(200, seed=0)]
    rng = random.Random("lexicon")
    texts += [render(name, i, fam.sample(rng, 3)).text for name, fam in FAMILIES.items()
              for i in range(len(fam.phrasings)) for _ in range(3)]
    texts += [" ".join(NOUNS), " " + " ".join(NOUNS), " ".join("0123456789"), "0123456789", "Q: A:"]
    texts += [" ".join(p) for p in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS, _HEADERS, _QA_HEADERS)]
    texts += list(_SUBJECTS + _HEADERS + _QA_HEADERS)  # the forms that start a line
    return texts


def build_world_tokenizer():
    """A word-level tokenizer over the world's lexicon (<pad>=0, <eos>=1, <unk>=2), exact round trip."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = sorted({p for t in _lexicon_texts() for p in re.findall(_PIECES, t)})
    specials = ["<pad>", EOS, "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token=EOS, bos_token=EOS,
                                   unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=256)


def build_tiny_gpt2(tokenizer, seed: int = 0, **overrides):
    """A random GPT-2 of the recommended TINY_GPT2 size for this world."""
    from text_rlhf.tiny import tiny_causal_lm
    return tiny_causal_lm("gpt2", tokenizer, seed=seed, **{**TINY_GPT2, **overrides})
