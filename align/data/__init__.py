"""Preference data: rankings and pairs grouped per prompt, loaded from JSONL or the HF hub.

`align.data` needs only the standard library; `datasets` is imported lazily inside
`load_hf_preferences`, so `import align.data` works without it.
"""
from .hf import hf_spec, load_hf_preferences, split_hh
from .jsonl import load_preferences, load_prompts, load_sft, read_jsonl
from .records import (
    Conversation,
    DataError,
    Pair,
    PreferenceGroup,
    batch_groups,
    count_pairs,
    group_from_pair,
    pairs_from_ranking,
    ranking_from_scores,
)

__all__ = [
    "Conversation",
    "DataError",
    "Pair",
    "PreferenceGroup",
    "batch_groups",
    "count_pairs",
    "group_from_pair",
    "pairs_from_ranking",
    "ranking_from_scores",
    "read_jsonl",
    "load_preferences",
    "load_sft",
    "load_prompts",
    "load_hf_preferences",
    "hf_spec",
    "split_hh",
]
