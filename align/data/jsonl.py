"""Read preference, SFT and prompt files (JSON Lines), failing loudly with file:line: field.

Preference records come in two shapes, one per line:

    {"prompt": str, "chosen": X, "rejected": X, "margin"?: number, "tie"?: bool}
    {"prompt": str, "completions": [X, ...], "ranking": [...]}        ("images" = "completions")

X is a text (candidates="text") or an image path relative to the JSONL file (candidates="path").
A ranking is best first, ties as inner lists: [[2, 0], 1, 3] (see `pairs_from_ranking`).
Optional fields may be null, which means absent. Keys not listed here are ignored.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator

from .records import Conversation, DataError, PreferenceGroup, group_from_pair, pairs_from_ranking

logger = logging.getLogger(__name__)

_PAIR_KEYS = ("chosen", "rejected")
_RANK_KEYS = ("completions", "images")
_ARRAY = "; a JSON array? JSON Lines is one object per line, e.g. `jq -c '.[]' in.json > out.jsonl`"


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; line numbers start at 1.

    A line that is not UTF-8, not valid JSON or not a JSON object raises DataError(path, line).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})",
                                path=path, line=lineno) from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # tolerate a byte-order mark
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                col = e.colno if e.lineno == 1 else len(text.splitlines()[0]) + 1  # a brace missing at the end
                array = _ARRAY if lineno == 1 and text.lstrip()[:1] == "[" else ""
                raise DataError(f"malformed JSON: {e.msg} (column {col}){array}", path=path, line=lineno) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}"
                                + (_ARRAY if isinstance(obj, list) and lineno == 1 else ""), path=path, line=lineno)
            yield lineno, obj


class _Record:
    """Field access for one record, raising DataError(path, line, field)."""

    def __init__(self, path, line, obj):
        self.path, self.line, self.obj = path, line, obj

    def error(self, message, field=None):
        return DataError(message, path=self.path, line=self.line, field=field)

    def get(self, field, types, type_name, *, required=True):
        if field not in self.obj or (self.obj[field] is None and not required):
            if required:
                raise self.error("missing", field)
            return None
        value = self.obj[field]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise self.error(f"expected {type_name}, got {_type_name(value)}", field)
        return value

    def require(self, field):
        if field not in self.obj:
            raise self.error("missing", field)
        return self.obj[field]

    def text(self, field, value):
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {_type_name(value)}", field)
        if not value.strip():
            raise self.error("empty", field)
        return value


def _type_name(value):
    return "null" if value is None else type(value).__name__


def _candidate(rec: _Record, field, value, kind, folder):
    """Check one candidate; for kind 'path', resolve it against the JSONL file's folder. A text candidate may be a
    conversational completion, [{"role": "assistant", "content": ...}]: its content."""
    if kind == "text" and isinstance(value, list):
        messages = _messages(rec, field, value, last="assistant")
        if len(messages) != 1:
            raise rec.error(f"a completion is one assistant message, got {len(messages)} messages", field)
        value = messages[0]["content"]
    value = rec.text(field, value)
    if kind == "text":
        return value
    resolved = os.path.normpath(os.path.join(folder, value))  # an absolute value wins
    if not os.path.isfile(resolved):
        raise rec.error(f"{'a folder, not a file' if os.path.isdir(resolved) else 'no such file'}: {resolved}", field)
    return resolved


def _pair_record(rec: _Record, prompt, kind, folder, source):
    chosen = _candidate(rec, "chosen", rec.require("chosen"), kind, folder)
    rejected = _candidate(rec, "rejected", rec.require("rejected"), kind, folder)
    if chosen == rejected:
        raise rec.error("identical candidates (chosen == rejected)", "rejected")
    tie = rec.get("tie", (bool,), "a bool", required=False) or False
    margin = rec.get("margin", (int, float), "a number", required=False)
    if margin is not None:
        try:
            finite = math.isfinite(margin)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise rec.error(f"must be finite, got {margin!r}", "margin")
        if tie:
            raise rec.error("a margin cannot be given with \"tie\": true", "margin")
    group = group_from_pair(prompt, chosen, rejected, margin=float(margin or 0.0), tie=tie,
                            source=source)
    return group, (prompt, chosen, rejected)


def _ranking_record(rec: _Record, prompt, kind, folder, source):
    if all(k in rec.obj for k in _RANK_KEYS):
        raise rec.error("give \"completions\" or \"images\", not both", "images")
    name = "images" if "images" in rec.obj else "completions"
    values = rec.get(name, (list,), "a list")
    if len(values) < 2:
        raise rec.error(f"needs at least 2 candidates, got {len(values)}", name)
    for key in ("margin", "tie"):
        if rec.obj.get(key) is not None:
            raise rec.error("only applies to chosen/rejected records (use the ranking: "
                            "ties are inner lists)", key)
    candidates, first = [], {}
    for i, value in enumerate(values):
        cand = _candidate(rec, f"{name}[{i}]", value, kind, folder)
        if cand in first:
            raise rec.error(f"duplicate of {name}[{first[cand]}]", f"{name}[{i}]")
        first[cand] = i
        candidates.append(cand)
    ranking = rec.get("ranking", (list,), "a list")
    pairs = pairs_from_ranking(ranking, len(candidates), where=(rec.path, rec.line, "ranking"))
    group = PreferenceGroup(prompt, candidates, pairs, source=source)
    canonical = tuple(tuple(x) if isinstance(x, list) else (x,) for x in ranking)
    return group, (prompt, tuple(candidates), canonical)


def _implicit_prompt(rec: _Record) -> tuple[Conversation, dict]:
    """TRL's implicit-prompt preference record, {"chosen": [messages], "rejected": [messages]}: the messages the
    two share are the prompt, and what follows in each must be one assistant message, the candidate."""
    chosen = _messages(rec, "chosen", rec.obj["chosen"], last="assistant")
    rejected = _messages(rec, "rejected", rec.require("rejected"), last="assistant")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    for field, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) - n != 1:
            raise rec.error(f"the two conversations differ before their last message ({field}[{n}]): a preference "
                            "compares two answers to one conversation", field)
    if n == 0 or chosen[n - 1]["role"] != "user":
        raise rec.error("the conversations share no user turn to answer", "chosen")
    return Conversation(chosen[:n]), {**rec.obj, "chosen": chosen[n:], "rejected": rejected[n:]}


def load_preferences(path, *, candidates="text", allow_duplicates=False) -> list[PreferenceGroup]:
    """Load a JSONL preference file into one `PreferenceGroup` per record.

    candidates: "text" (non-empty strings) or "path" (image files, relative to the file's
    folder, returned as absolute paths). A record repeated on a later line raises DataError
    naming both lines, unless allow_duplicates=True: then it is dropped and the count logged.
    """
    if candidates not in ("text", "path"):
        raise ValueError(f"candidates must be 'text' or 'path', got {candidates!r}")
    folder = os.path.dirname(os.path.abspath(path))
    groups, seen, dropped = [], {}, 0
    for line, obj in read_jsonl(path):
        rec = _Record(path, line, obj)
        is_pair = any(k in obj for k in _PAIR_KEYS)
        implicit = candidates == "text" and "prompt" not in obj and is_pair and isinstance(obj.get("chosen"), list)
        prompt = None if implicit else rec.get("prompt", (str, list) if candidates == "text" else (str,),
                                               "a string" + (" or a list of messages" if candidates == "text" else ""))
        is_rank = any(k in obj for k in _RANK_KEYS) or "ranking" in obj
        if is_pair and is_rank:
            raise rec.error("a record has either chosen/rejected or completions/ranking, "
                            "not both", "ranking" if "ranking" in obj else "completions")
        if not is_pair and not is_rank:
            raise rec.error("missing (a record needs \"chosen\" and \"rejected\", or "
                            f"\"completions\" and \"ranking\"; found keys {sorted(obj)})",
                            "chosen")
        source = f"{path}:{line}"
        if implicit:
            prompt, obj = _implicit_prompt(rec)  # TRL's implicit prompt: two whole conversations
            rec = _Record(path, line, obj)
        elif isinstance(prompt, list):
            prompt = Conversation(_messages(rec, "prompt", prompt, last="user"))
        build = _pair_record if is_pair else _ranking_record
        group, key = build(rec, prompt, candidates, folder, source)
        key = (is_pair,) + key
        if key in seen:
            if not allow_duplicates:
                raise rec.error(f"duplicate record: same as line {seen[key]} "
                                "(remove it, or set allow_duplicates=true to drop repeats)")
            dropped += 1
            continue
        seen[key] = line
        groups.append(group)
    if not groups:
        raise DataError("no records", path=path)
    if dropped:
        logger.warning("%s: dropped %d duplicate record(s)", path, dropped)
    return groups


ROLES = ("system", "user", "assistant", "tool")


def _messages(rec: _Record, field: str, value, last: str | None = None) -> list[dict]:
    """A conversation, TRL's conversational format: [{"role", "content"}, ...], each content a string (the last
    one non-empty), roles among ROLES; `last`: the role the conversation must end with."""
    if not isinstance(value, list) or not value:
        raise rec.error(f"expected a non-empty list of {{\"role\", \"content\"}} messages, got {_type_name(value)}",
                        field)
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise rec.error('expected {"role": str, "content": str}', where)
        if m["role"] not in ROLES:
            raise rec.error(f"role {m['role']!r} is not one of {', '.join(ROLES)}", where)
        out.append({"role": m["role"], "content": m["content"]})
    if last is not None and out[-1]["role"] != last:
        raise rec.error(f"the last message must be the {last}'s, got {out[-1]['role']!r}", f"{field}[{len(out) - 1}]")
    if not out[-1]["content"].strip():
        raise rec.error("empty", f"{field}[{len(out) - 1}]")
    return out


def load_sft(path, with_lines: bool = False):
    """Load {"prompt": str, "response": non-empty str} records as a list of such dicts; with_lines: also each
    record's "file:line", for errors found later (a prompt too long for the model).
    A conversational record, {"messages": [{"role", "content"}, ..., {"role": "assistant", ...}]} (TRL's format),
    becomes {"prompt": the messages before the last (a list: the trainer renders it with the chat template),
    "response": the last assistant message's content}."""
    records, where = [], []
    for line, obj in read_jsonl(path):
        rec = _Record(path, line, obj)
        if "messages" in obj and "prompt" not in obj:
            messages = _messages(rec, "messages", obj["messages"], last="assistant")
            if len(messages) < 2:
                raise rec.error("needs a message before the assistant's (what it answers)", "messages")
            prompt, response = messages[:-1], messages[-1]["content"]
        else:
            prompt = rec.get("prompt", (str,), "a string")
            response = rec.text("response", rec.require("response"))
        records.append({"prompt": prompt, "response": response})
        where.append(f"{path}:{line}")
    if not records:
        raise DataError("no records", path=path)
    return (records, where) if with_lines else records


def load_prompts(path) -> list:
    """Load prompts: {"prompt": non-empty str} per line for .jsonl/.json, else one per non-blank line. A
    conversational prompt (TRL's format: "prompt" or "messages" a list of {"role", "content"} ending with the
    user's) is kept as that list, for the trainer to render with the model's chat template."""
    prompts = []
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        for line, obj in read_jsonl(path):
            rec = _Record(path, line, obj)
            field = "messages" if "messages" in obj and "prompt" not in obj else "prompt"
            value = rec.require(field)
            prompts.append(_messages(rec, field, value, last="user") if isinstance(value, list) or field == "messages"
                           else rec.text(field, value))
    else:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})", path=path, line=lineno) from None
                if lineno == 1:
                    text = text.removeprefix("\ufeff")  # tolerate a byte-order mark
                if text.strip():
                    prompts.append(text.rstrip("\r\n"))
    if not prompts:
        raise DataError("no records", path=path)
    return prompts
