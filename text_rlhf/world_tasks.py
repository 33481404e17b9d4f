"""Task families of the text world: plain instructions with checkable answers.

A family is a set of phrasings (templates with typed slots such as `{nums}`), an argument
sampler with a difficulty knob and a solver. Every phrasing compiles to a regex, so any
instruction the world writes can be parsed back into (family, args, answer) — that is how the
gold judge reads a prompt, plain or few-shot alike.

Held-out split (for evaluation), by arguments and by phrasings:
  * arguments: crc32(family, args) % 100 < HELDOUT_PERCENT marks an argument tuple eval-only;
    training instructions never use it, whatever the phrasing;
  * phrasings: the last HELDOUT_PHRASINGS templates of each family are eval-only, so they never
    appear in the corpus, the demonstrations or the RL prompts.
Eval instructions use held-out arguments with any phrasing (seen or held-out).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

HELDOUT_PERCENT = 20
"""Share (%) of argument tuples reserved for evaluation."""
HELDOUT_PHRASINGS = 1
"""Phrasings per family (the last ones) reserved for evaluation."""

NOUNS = ("cat", "dog", "bird", "fish", "apple", "pear", "cup", "pen", "book", "box", "hat", "tree")
"""Words for the count / last / repeat families (also the filler text's nouns)."""

# slot -> (regex, parse from text, render to text)
_ints = (r"\d+(?: \d+)*", lambda s: tuple(int(x) for x in s.split()), lambda v: " ".join(map(str, v)))
_words = (r"[a-z]+(?: [a-z]+)*", lambda s: tuple(s.split()), " ".join)
_int = (r"\d+", int, str)
_word = (r"[a-z]+", str, str)
SLOTS = {"nums": _ints, "items": _words, "word": _word, "n": _int, "a": _int, "b": _int}


def _max_value(d: int) -> int:
    """Largest number at difficulty d: 1 -> single digits, 2 -> up to 20, >= 3 -> up to 99."""
    return (9, 20, 99)[min(max(d, 1), 3) - 1]


def _nums(rng: random.Random, d: int) -> tuple[int, ...]:
    return tuple(rng.randint(0, _max_value(d)) for _ in range(rng.randint(2, 2 + d)))


def _items(rng: random.Random, d: int) -> tuple[str, ...]:
    return tuple(rng.choice(NOUNS) for _ in range(rng.randint(1, 3 + d)))


@dataclass(frozen=True)
class Family:
    name: str
    phrasings: tuple[str, ...]
    """Templates; the last HELDOUT_PHRASINGS are eval-only."""
    sample: Callable[[random.Random, int], dict]
    """(rng, difficulty) -> args (slot name -> value)."""
    solve: Callable[[dict], tuple]
    """args -> answer tokens."""

    @property
    def train_phrasings(self) -> tuple[str, ...]:
        return self.phrasings[:len(self.phrasings) - HELDOUT_PHRASINGS]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("reverse", ("reverse the list {nums}", "reverse: {nums}", "write {nums} backwards",
                       "what is {nums} reversed?"),
           lambda rng, d: {"nums": _nums(rng, d)}, lambda a: a["nums"][::-1]),
    Family("sort", ("sort: {nums}", "sort the numbers {nums}", "put {nums} in order",
                    "sort {nums} from small to large"),
           lambda rng, d: {"nums": _nums(rng, d)}, lambda a: tuple(sorted(a["nums"]))),
    Family("count", ("count the items: {items}", "how many words: {items}", "count the words in {items}",
                     "how many items are in {items}?"),
           lambda rng, d: {"items": _items(rng, d)}, lambda a: (len(a["items"]),)),
    Family("repeat", ("repeat {word} {n} times", "say {word} {n} times", "write the word {word} {n} times",
                      "write {word} {n} times"),
           lambda rng, d: {"word": rng.choice(NOUNS), "n": rng.randint(1, 2 + d)},
           lambda a: (a["word"],) * a["n"]),
    Family("add", ("add {a} and {b}", "what is {a} plus {b}?", "the sum of {a} and {b}", "{a} plus {b} equals"),
           lambda rng, d: {"a": rng.randint(0, _max_value(d)), "b": rng.randint(0, _max_value(d))},
           lambda a: (a["a"] + a["b"],)),
    Family("max", ("the largest of {nums}", "max: {nums}", "which is biggest: {nums}",
                   "find the largest number in {nums}"),
           lambda rng, d: {"nums": _nums(rng, d)}, lambda a: (max(a["nums"]),)),
    Family("last", ("the last word of {items}", "last: {items}", "which word comes last: {items}",
                    "what is the final word in {items}?"),
           lambda rng, d: {"items": _items(rng, d)}, lambda a: (a["items"][-1],)),
)}


@dataclass(frozen=True)
class Instruction:
    family: str
    text: str
    """The plain instruction, e.g. "reverse the list 3 1 4"."""
    answer: str
    """The right answer, tokens joined by single spaces, e.g. "4 1 3"."""
    args: tuple
    """Canonical (slot, value) pairs, sorted by slot."""
    phrasing: int
    """Index into the family's phrasings."""

    @property
    def unseen_phrasing(self) -> bool:
        """An eval-only phrasing: in no corpus page, demonstration or RL prompt."""
        return self.phrasing >= len(FAMILIES[self.family].train_phrasings)

    @property
    def heldout(self) -> bool:
        return is_heldout(self.family, self.args) or self.unseen_phrasing


def _canonical(args: dict) -> tuple:
    return tuple(sorted(args.items()))


def is_heldout(family: str, args) -> bool:
    """True when this argument tuple is reserved for evaluation (stable across runs and machines)."""
    args = args if isinstance(args, tuple) else _canonical(args)
    return zlib.crc32(f"{family}:{args!r}".encode()) % 100 < HELDOUT_PERCENT


def render(family: str, phrasing: int, args: dict) -> Instruction:
    fam = FAMILIES[family]
    text = re.sub(r"\{(\w+)\}", lambda m: SLOTS[m.group(1)][2](args[m.group(1)]), fam.phrasings[phrasing])
    answer = " ".join(map(str, fam.solve(args)))
    return Instruction(family, text, answer, _canonical(args), phrasing)


def sample_instruction(rng: random.Random, *, difficulty: int = 1, split: str = "train",
                       families=None) -> Instruction:
    """One instruction of the split: "train" (seen phrasings, non-held-out args) or "eval"
    (held-out args, any phrasing). The family is uniform over `families` (default: all)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[rng.choice(names)]
    n_phrasings = len(fam.train_phrasings) if split == "train" else len(fam.phrasings)
    phrasing = rng.randrange(n_phrasings)
    for _ in range(1000):  # rejection: 20% of argument tuples are eval-only
        args = fam.sample(rng, difficulty)
        if is_heldout(fam.name, args) == (split == "eval"):
            return render(fam.name, phrasing, args)
    raise RuntimeError(f"no {split} arguments for {fam.name!r} at difficulty {difficulty} after 1000 draws")


def make_instructions(n: int, seed: int, *, difficulty: int = 1, split: str = "train",
                      families=None) -> list[Instruction]:
    rng = random.Random(f"instructions:{seed}:{split}:{difficulty}")
    return [sample_instruction(rng, difficulty=difficulty, split=split, families=families) for _ in range(n)]


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{SLOTS[p][0]})" for i, p in enumerate(parts))
    return re.compile(rx)


_PATTERNS = [(name, i, _compile(t)) for name, fam in FAMILIES.items() for i, t in enumerate(fam.phrasings)]


def parse_instruction(text: str) -> Instruction | None:
    """The Instruction written by `text` (case and whitespace ignored), or None."""
    norm = " ".join(text.lower().split())
    for name, i, rx in _PATTERNS:
        m = rx.fullmatch(norm)
        if m:
            args = {k: SLOTS[k][1](v) for k, v in m.groupdict().items()}
            return render(name, i, args)
    return None
