"""Prompts for `align compare`: each plain prompt with its prompt-engineered variant, from a JSONL file
or a plain list plus a template (few-shot `Q:/A:` for text, `masterpiece, ...` tags for images).
Re-exported by align.compare."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from align.data.jsonl import _Record, read_jsonl
from align.data.records import DataError

SD_TAGS = "masterpiece, best quality, highly detailed"
QA_EXAMPLE = "Q: {prompt}\nA: {response}\n\n"
# No space after the final "A:": byte-level BPE tokenizers (GPT-2's) fold the space into the
# answer's first token (" 5"), so a trailing space would leave the model an unusual split.
QA_QUERY = "Q: {prompt}\nA:"


@dataclass(frozen=True)
class PromptItem:
    id: str
    plain: str
    engineered: str


class Template:
    """plain prompt -> engineered prompt. Built by `make_template`."""

    def __init__(self, name: str, render: Callable[[str], str]):
        self.name, self._render = name, render

    def __call__(self, prompt: str) -> str:
        return self._render(prompt)

    def __repr__(self):
        return f"Template({self.name!r})"


def make_template(spec: str, fewshot=None, k: int = 0) -> Template:
    """A named template or a custom one:

    - "fewshot-qa": the {"prompt", "response"} examples of the `fewshot` JSONL as `Q: p\\nA: r\\n\\n`
      blocks (p and r stripped), then `Q: <prompt>\\nA:`; an example whose prompt is the one asked
      is left out (it would hand the model the answer); k > 0: k of them per prompt, drawn at random
      (seeded by the prompt, so every model and seed sees the same shots), as GPT-3's few-shot evaluation;
    - "sd-tags": `<prompt>, masterpiece, best quality, highly detailed` (trailing spaces and dots of the
      prompt dropped);
    - any text containing "{prompt}": that text with the prompt put in (no other braces interpreted).
    """
    if fewshot and spec != "fewshot-qa":
        raise ValueError(f"--fewshot only applies to --template fewshot-qa (got --template {spec!r})")
    if spec == "fewshot-qa":
        if not fewshot:
            raise ValueError("--template fewshot-qa needs --fewshot FILE ({\"prompt\", \"response\"} per line)")
        from align.data.jsonl import load_sft
        examples = load_sft(fewshot)
        if any(isinstance(e["prompt"], list) for e in examples):
            raise ValueError(f"--fewshot {fewshot}: Q:/A: examples are text records {{\"prompt\", \"response\"}}, "
                             "not conversations (\"messages\")")

        def render(prompt: str) -> str:
            pool = [e for e in examples if e["prompt"] != prompt]
            if 0 < k < len(pool):
                import random
                import zlib
                pool = random.Random(zlib.crc32(prompt.encode())).sample(pool, k)
            shots = "".join(QA_EXAMPLE.format(prompt=e["prompt"].strip(), response=e["response"].strip())
                            for e in pool)
            return shots + QA_QUERY.format(prompt=prompt)
        return Template(spec, render)
    if spec == "sd-tags":
        return Template(spec, lambda prompt: f"{prompt.rstrip(' .')}, {SD_TAGS}")
    if "{prompt}" in spec:
        return Template("custom", lambda prompt: spec.replace("{prompt}", prompt))
    raise ValueError(f"--template {spec!r}: expected fewshot-qa, sd-tags, or a text containing {{prompt}}")


def load_compare_prompts(path, template: Template | None = None) -> list[PromptItem]:
    """Read prompts and their engineered variants.

    JSONL (.jsonl/.json): {"prompt": plain, "engineered"?: variant, "id"?: str|int} per line; a
    line without "engineered" takes `template(prompt)`, and a line with it must not also get a
    template. Any other file: one plain prompt per non-blank line, engineered by `template`.
    A prompt (and its "engineered") may be a conversation in TRL's format, a list of {"role", "content"} ending
    with the user's turn, for chat models (rendered with their chat template); a template then rewrites the content
    of that last user turn: what the user writes is what prompt engineering changes.
    Ids default to the line number. Errors are DataError "file:line: field 'x': message".
    """
    from align.data.jsonl import _messages
    items, seen = [], {}
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        for line, obj in read_jsonl(path):
            rec = _Record(path, line, obj)
            plain = rec.require("prompt")
            plain = (_messages(rec, "prompt", plain, last="user") if isinstance(plain, list)
                     else rec.text("prompt", plain))
            engineered = rec.get("engineered", (str, list), "a string or a conversation", required=False)
            if engineered is not None:
                engineered = (_messages(rec, "engineered", engineered, last="user") if isinstance(engineered, list)
                              else rec.text("engineered", engineered))
                if template is not None:
                    raise rec.error(f"given here and by --template {template.name!r}: use one or the other",
                                    "engineered")
            elif template is None:
                raise rec.error("missing (give it on every line, or pass --template)", "engineered")
            elif isinstance(plain, list):  # the template rewrites the user's last turn
                engineered = plain[:-1] + [{"role": "user", "content": template(plain[-1]["content"])}]
            else:
                engineered = template(plain)
            pid = rec.get("id", (str, int), "a string or an integer", required=False)
            pid = str(line) if pid is None else str(pid)
            if pid in seen:
                raise rec.error(f"duplicate id {pid!r} (first on line {seen[pid]})", "id")
            seen[pid] = line
            items.append(PromptItem(pid, plain, engineered))
    else:
        with open(path, encoding="utf-8-sig") as f:
            for line, text in enumerate(f, start=1):
                plain = text.rstrip("\r\n")
                if not plain.strip():
                    continue
                if template is None:
                    raise DataError("a plain prompt list has no engineered variants: pass --template "
                                    "(fewshot-qa, sd-tags, or text with {prompt}), or use JSONL with "
                                    "\"engineered\"", path=path, line=line)
                items.append(PromptItem(str(line), plain, template(plain)))
    if not items:
        raise DataError("no prompts", path=path)
    return items
