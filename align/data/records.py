"""Preference records: one prompt, its K candidates and every pair among them.

A K-way ranking of candidates yields K(K-1)/2 pairwise comparisons (InstructGPT, Ouyang et al.
2022, §3.5). InstructGPT keeps all comparisons of one prompt in one batch: shuffled into
separate batches, each completion is seen K-1 times per epoch and the reward model overfits
after a single epoch. `PreferenceGroup` is that unit and `batch_groups` never splits it.

Ties become soft labels (P(winner preferred) = 0.5) rather than being dropped; a pair's optional
`margin` is the Llama-2 margin term, loss = -log σ(r_w - r_l - m) (Touvron et al. 2023, §3.2.2).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field as dc_field
from typing import Iterable, Iterator


class DataError(ValueError):
    """Bad input, naming where: str(e) == "path:line: field 'x': message".

    Parts that are None are left out ("path: message", "line 3: field 'x': message", ...).
    The parts stay available as `.path`, `.line`, `.field` and `.message`.
    """

    def __init__(self, message, *, path=None, line=None, field=None):
        self.message = str(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        parts = []
        if self.path is not None and line is not None:
            parts.append(f"{self.path}:{line}")
        elif self.path is not None:
            parts.append(self.path)
        elif line is not None:
            parts.append(f"line {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join(parts + [self.message]))


class Conversation(str):
    """A prompt that is a conversation (TRL's conversational format: [{"role", "content"}, ...], ending with the
    user's turn), kept as `.messages`. As a str it is their JSON, so it hashes, sorts and compares like any prompt
    (held-out splits, duplicate checks); the trainer renders it with the model's chat template
    (`text_rlhf.models.format_prompts`)."""

    messages: list

    def __new__(cls, messages):
        import json
        obj = super().__new__(cls, json.dumps(list(messages), ensure_ascii=False))
        obj.messages = [dict(m) for m in messages]
        return obj

    def __reduce__(self):  # pickles (accelerate's gather_object) as a Conversation, not a bare str
        return Conversation, (self.messages,)


@dataclass(frozen=True)
class Pair:
    """One comparison between two candidates of a `PreferenceGroup`.

    winner, loser: indices into `group.candidates`.
    label:  P(winner preferred); 1.0 for a strict preference, 0.5 for a tie (soft label,
            so the Bradley-Terry loss pulls the two rewards together instead of apart).
    margin: Llama-2 style margin m in -log σ(r_w - r_l - m); only meaningful for strict pairs.
    """

    winner: int
    loser: int
    label: float = 1.0
    margin: float = 0.0

    def __post_init__(self):
        for name in ("winner", "loser"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"must be a non-negative int, got {value!r}", field=name)
        if self.winner == self.loser:
            raise DataError(f"a pair needs two different candidates, got {self.winner} twice")
        if not 0.0 <= self.label <= 1.0:
            raise DataError(f"must be a probability in [0, 1], got {self.label!r}", field="label")
        if not math.isfinite(self.margin):
            raise DataError(f"must be finite, got {self.margin!r}", field="margin")
        if self.margin != 0.0 and self.label != 1.0:
            raise DataError("a margin only applies to strict pairs (label 1.0)", field="margin")


@dataclass
class PreferenceGroup:
    """One prompt, its K candidates and all the pairs among them.

    All pairs of a prompt stay in one batch (InstructGPT §3.5: splitting a K-way ranking over
    batches makes the RM overfit). `candidates` are texts, or absolute image paths (str) for
    the image side; `source` is "file:line" for error messages.
    """

    prompt: str
    candidates: list
    pairs: list[Pair] = dc_field(default_factory=list)
    source: str | None = None

    def __post_init__(self):
        k = len(self.candidates)
        for pair in self.pairs:
            if pair.winner >= k or pair.loser >= k:
                raise DataError(f"pair {pair} points past the {k} candidates", path=self.source)


def _ranking_error(message, where):
    path, line, field = where if where is not None else (None, None, None)
    return DataError(message, path=path, line=line, field=field)


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def pairs_from_ranking(ranking, k: int, *, where=None) -> list[Pair]:
    """All K(K-1)/2 pairs implied by a best-first ranking of k candidates.

    ranking: best first; each element is a candidate index or a list of indices that tie,
    e.g. [[2, 0], 1, 3] means 2 ~ 0 > 1 > 3. It must name every index 0..k-1 exactly once.
    Candidates in better tiers win with label 1.0; candidates of one tier pair with label 0.5.
    where: optional (path, line, field) named in the DataError.
    """
    if not isinstance(ranking, (list, tuple)):
        raise _ranking_error(f"must be a list, got {type(ranking).__name__}", where)
    tiers: list[list[int]] = []
    seen: dict[int, int] = {}  # index -> position in `ranking`
    for pos, item in enumerate(ranking):
        tier = list(item) if isinstance(item, (list, tuple)) else [item]
        if not tier:
            raise _ranking_error(f"position {pos} is an empty tie group", where)
        for idx in tier:
            if not _is_index(idx):
                raise _ranking_error(
                    f"position {pos}: expected a candidate index (int) or a list of them, "
                    f"got {idx!r}", where)
            if not 0 <= idx < k:
                raise _ranking_error(
                    f"index {idx} at position {pos} is out of range for {k} candidates "
                    f"(0..{k - 1})", where)
            if idx in seen:
                raise _ranking_error(
                    f"index {idx} is repeated (positions {seen[idx]} and {pos})", where)
            seen[idx] = pos
        tiers.append(tier)
    missing = [i for i in range(k) if i not in seen]
    if missing:
        raise _ranking_error(
            f"index {missing[0]} is missing (every candidate 0..{k - 1} must be ranked; "
            f"missing: {missing})", where)

    pairs = []
    for t, tier in enumerate(tiers):
        for a in range(len(tier)):  # ties within the tier
            for b in range(a + 1, len(tier)):
                pairs.append(Pair(tier[a], tier[b], label=0.5))
        for worse in tiers[t + 1:]:
            for w in tier:
                for l in worse:
                    pairs.append(Pair(w, l))
    return pairs


def ranking_from_scores(scores, tie_tol: float = 0.0) -> list:
    """The best-first ranking (`pairs_from_ranking`'s form) that scores imply: [0.1, 0.5, 0.5, 0.2] -> [[1, 2], 3, 0].

    A candidate within tie_tol of its tier's best joins that tier (ties as inner lists); the order within a tier is
    the candidates' order. Scores must be finite."""
    values = [float(x) for x in scores]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"scores must be finite, got {values}")
    tiers: list[list[int]] = []
    for i in sorted(range(len(values)), key=lambda j: (-values[j], j)):
        if tiers and values[tiers[-1][0]] - values[i] <= tie_tol:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return [sorted(t) if len(t) > 1 else t[0] for t in tiers]


def group_from_pair(prompt, chosen, rejected, *, margin=0.0, tie=False,
                    source=None) -> PreferenceGroup:
    """A K=2 group: candidates [chosen, rejected] and the single pair between them."""
    if tie and margin != 0.0:
        raise DataError("a margin cannot be given with tie=True", path=source, field="margin")
    pair = Pair(0, 1, label=0.5 if tie else 1.0, margin=float(margin))
    return PreferenceGroup(prompt, [chosen, rejected], [pair], source=source)


def count_pairs(groups: Iterable[PreferenceGroup]) -> int:
    """Total number of pairs over `groups`."""
    return sum(len(g.pairs) for g in groups)


def batch_groups(groups, max_pairs: int, *, shuffle=False,
                 seed=0) -> Iterator[list[PreferenceGroup]]:
    """Pack whole groups, in order (or shuffled with `seed`), into batches of <= max_pairs pairs.

    Greedy next-fit: a group that does not fit closes the current batch. A group is never
    split (InstructGPT §3.5); one with more than max_pairs pairs forms a batch on its own.
    The input is not modified; the same seed gives the same batches.
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive int, got {max_pairs!r}")
    order = list(groups)
    if shuffle:
        random.Random(seed).shuffle(order)
    batch: list[PreferenceGroup] = []
    n = 0
    for group in order:
        size = len(group.pairs)
        if batch and n + size > max_pairs:
            yield batch
            batch, n = [], 0
        batch.append(group)
        n += size
    if batch:
        yield batch
