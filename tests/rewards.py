"""Reward functions importable as `rewards:NAME` in tests (tests/ is on sys.path under pytest)."""
import math


def short(prompts, responses):
    """Prefers short responses: −(characters) / 10. Learnable by any policy: emit EOS early."""
    return [-len(r) / 10.0 for r in responses]


def nan_after_first(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)


def wrong_count(prompts, responses):
    return [0.0]


def vowels(prompts, responses):
    """Share of the response's characters that are vowels: a dense signal every token moves."""
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def returns_none(prompts, responses):
    return None


def returns_strings(prompts, responses):
    return ["1.0"] * len(responses)


def returns_leaf_with_grad(prompts, responses):
    import torch
    return torch.zeros(len(responses), requires_grad=True)


def vowels_x100(prompts, responses):
    """`vowels` on another scale and offset: 100 × share + 7 (a hub RM's scores span ±10 or more)."""
    return [100.0 * v + 7.0 for v in vowels(prompts, responses)]
