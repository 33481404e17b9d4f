"""Preference pairs from a Hugging Face `datasets` dataset (Anthropic HH style by default).

Anthropic HH-RLHF (Bai et al. 2022) stores each side as a whole conversation,
"\\n\\nHuman: ...\\n\\nAssistant: ...", the two sides differing only in the last assistant turn.
`split_hh` cuts them at the last "\\n\\nAssistant:" they share, so prompt + response gives the
original text back (the response keeps its leading space, which BPE tokenizers care about).
`datasets` is imported inside the function: `align` must import with torch alone.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .records import DataError, PreferenceGroup, group_from_pair

logger = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) from two HH-style conversations.

    prompt is the longest shared prefix that ends with "\\n\\nAssistant:"; the responses are
    what follows it in each conversation. Raises DataError if they share no assistant turn.
    """
    n = _common_prefix_length(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, n)  # the marker must lie wholly in the shared prefix
    if cut < 0:
        raise DataError(f"the two conversations share no {ASSISTANT!r} turn "
                        "(expected Anthropic HH format, or pass prompt_field=)")
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _common_prefix_length(a: str, b: str) -> int:
    """len of the longest common prefix, by bisection on slice comparisons (C memcmp): a character loop in Python
    took 19 s of a 160k-row HH load (conversations of ~1.5k characters)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:  # the first `lo` characters are already known equal
            lo = mid
        else:
            hi = mid - 1
    return lo


def iter_rows(dataset, columns: list[str], batch_size: int = 1000):
    """The rows of `dataset` as dicts of `columns`, read in batches: `datasets` formats a row read one by one at
    ~70 µs (11 s of a 160k-row load), a batch's rows at ~1 µs each."""
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_preferences needs the `datasets` package: "
                          "pip install align[hub]") from e
    return datasets


def hf_spec(spec: str) -> tuple[str, str] | None:
    """(name, split) of a command line's `hf:NAME[:SPLIT]` (split "train" when not given); None for a file path."""
    if not spec.startswith("hf:"):
        return None
    name, _, split = spec[3:].partition(":")
    return name, split or "train"


def open_dataset(dataset, split: str = "train"):
    """(a `datasets.Dataset`, its name for messages) from a hub id, a local dataset folder (`load_dataset`'s:
    parquet/JSON/CSV files, or a `save_to_disk` folder), one such data file (read as `split`) or a built Dataset /
    DatasetDict, at `split`."""
    datasets = _import_datasets()
    if not isinstance(dataset, str):
        if isinstance(dataset, datasets.DatasetDict):
            dataset = _split(dataset, split, "<DatasetDict>")
        return dataset, getattr(dataset.info, "dataset_name", None) or f"<{type(dataset).__name__}>"
    if not dataset.strip():  # `hf:` or `hf::test`: not the working directory
        raise DataError("no dataset named: give hf:NAME[:SPLIT], NAME a hub id or a local folder (hf:. for this one)")
    name, folder = dataset, Path(dataset).expanduser()
    if folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(folder))  # what Dataset(Dict).save_to_disk wrote
        return (_split(loaded, split, name) if isinstance(loaded, datasets.DatasetDict) else loaded), name
    if folder.is_file() and folder.suffix in DATA_FILE_BUILDERS:  # one downloaded shard: its rows are `split`
        return datasets.load_dataset(DATA_FILE_BUILDERS[folder.suffix], data_files={split: str(folder)},
                                     split=split), name
    if folder.exists():  # resolved: `datasets` reads "~/x" as a hub id, and "." has no name to build from
        return datasets.load_dataset(str(folder.resolve()), split=split), name
    from align.runner import offline_unless_hub_reachable
    if offline_unless_hub_reachable():  # no hub: the local cache only, at once, not after datasets' retries
        datasets.config.HF_HUB_OFFLINE = True  # read from huggingface_hub when `datasets` was imported
    return datasets.load_dataset(dataset, split=split), name


def _split(dataset_dict, split: str, name: str):
    if split not in dataset_dict:
        raise DataError(f"no split {split!r} (splits: {sorted(dataset_dict)})", path=name)
    return dataset_dict[split]


def _row_texts(row, row_idx, name, fields, prompt_field, chosen_field, rejected_field):
    """(prompt, chosen, rejected) of one row; None for a conversational row with an empty last message."""
    if isinstance(row[chosen_field], list):  # TRL's conversational form: two conversations, the prompt shared
        from .jsonl import _implicit_prompt, _Record
        last = [c[-1].get("content") for c in (row[chosen_field], row[rejected_field])
                if isinstance(c, list) and c and isinstance(c[-1], dict)]
        if any(isinstance(x, str) and not x.strip() for x in last):
            return None
        prompt, obj = _implicit_prompt(_Record(name, row_idx, {"chosen": row[chosen_field],
                                                               "rejected": row[rejected_field]}))
        return prompt, obj["chosen"][0]["content"], obj["rejected"][0]["content"]
    for f in fields:
        if not isinstance(row[f], str):
            raise DataError(f"expected a string, got {type(row[f]).__name__}", path=name, line=row_idx, field=f)
    if prompt_field is not None:
        return row[prompt_field], row[chosen_field], row[rejected_field]
    try:
        return split_hh(row[chosen_field], row[rejected_field])
    except DataError as e:
        raise DataError(e.message, path=name, line=row_idx, field=chosen_field) from None


def load_hf_preferences(dataset, split="train", *, chosen_field="chosen",
                        rejected_field="rejected", prompt_field=None,
                        limit=None) -> list[PreferenceGroup]:
    """One K=2 `PreferenceGroup` per row of a `datasets` dataset.

    dataset: a hub id or local path for `datasets.load_dataset(dataset, split=split)`, or a
    built `datasets.Dataset` (a `DatasetDict` is indexed by `split`).
    prompt_field=None: both fields hold full HH conversations, cut by `split_hh`, or two conversations in TRL's
    conversational form (lists of {"role", "content"}; e.g. trl-lib/ultrafeedback_binarized), whose shared messages
    are the prompt (an `align.data.Conversation`) and last assistant messages the candidates; otherwise
    prompt, chosen and rejected are read from their own columns.
    limit: read at most this many rows (before skipping).
    Rows whose responses are identical or empty, and exact repeats of an earlier row (HH has some), are skipped and
    the counts logged. Errors name
    the dataset, the 0-based row index (as the line) and the column.
    """
    dataset, name = open_dataset(dataset, split)
    fields = [f for f in (prompt_field, chosen_field, rejected_field) if f is not None]
    for f in fields:
        if f not in dataset.column_names:
            raise DataError(f"no such column (columns: {dataset.column_names})",
                            path=name, field=f)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        dataset = dataset.select(range(min(limit, len(dataset))))

    groups, identical, empty, repeats, seen = [], 0, 0, 0, set()
    for row_idx, row in enumerate(iter_rows(dataset, fields)):
        texts = _row_texts(row, row_idx, name, fields, prompt_field, chosen_field, rejected_field)
        if texts is None:  # a conversation whose last message is empty
            empty += 1
            continue
        prompt, chosen, rejected = texts
        if not chosen.strip() or not rejected.strip():
            empty += 1
            continue
        if chosen == rejected:
            identical += 1
            continue
        if (prompt, chosen, rejected) in seen:
            repeats += 1
            continue
        seen.add((prompt, chosen, rejected))
        groups.append(group_from_pair(prompt, chosen, rejected, source=f"{name}:{row_idx}"))
    if identical or empty or repeats:
        logger.warning("%s: skipped %d row(s) with identical responses, %d with an empty response and %d repeating "
                       "an earlier row; kept %d", name, identical, empty, repeats, len(groups))
    if not groups:
        raise DataError("no usable rows", path=name)
    return groups
