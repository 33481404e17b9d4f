"""`align sample`: K candidates per prompt from any generator, written for people to rank (InstructGPT's step 2:
"the model proposes several outputs, labelers rank them"; Ouyang et al. 2022, §3.5, K = 4..9).

    align sample --model runs/sft --prompts prompts.jsonl --k 4 --out runs/cands      (a causal LM)
    align sample --model runs/ddpo --prompts prompts.txt --k 4 --out runs/cands       (a diffusion pipeline)

OUT/candidates.jsonl has one line per prompt, in the prompt file's order:

    text    {"prompt", "completions": [...]}   the distinct, non-empty responses, in the order sampled; a prompt left
                                               with fewer than two is skipped (and counted in the report)
    image   {"prompt", "images": ["images/000000-0.png", ...]}   paths relative to the file; OUT/sheets/000000.png
                                               shows a prompt's K images in a row (its prompt above, each
                                               candidate's index below, 0 on the left)

Add "ranking" (best first, ties as inner lists: [2, [0, 3], 1]) to each line and the file is `align text rm` /
`align image rm --data` input as it is. With --judge (a reward model, an image built-in, or module:function: AI
feedback, or a world's gold judge) each line also gets the judge's "scores" and the "ranking" they imply (scores
within tie_tol of a tier's best tie), ready to train on, or to hand to people as a first ordering to correct.

Generation is `align compare`'s (`text.*` / `image.*` settings): text is sampled at text.temperature (K greedy
answers would be one answer), images come from the DDIM/CFG sampler at η = 1. Each generate call holds whole
prompts, each repeated K times, and draws from a seed of (seed, call index): a run is reproducible, and `--resume`
after a crash continues at the first prompt not written. OUT/progress.json (written as the run starts, then atomically
after each call's lines are flushed to disk) records how many prompts and how many lines of candidates.jsonl are
complete; a partial call's lines are cut away on resume, and rankings added to the complete lines are kept.
--out must be new, empty, or a sample run: another run's config.yaml and report.md are not written over.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.compare import (ADAPTERS, CompareConfig, ImageGenParams, PromptItem, TextGenParams, _batch_seed,
                           check_scores, infer_kind)

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    model: str = ""
    """Generator: a causal-LM folder or hub id, or an image pipeline / DDPO run folder / PIPELINE+LORA (as compare)."""
    kind: str = ""
    """text | image; empty = inferred from the model folder."""
    prompts: str = ""
    """A text file, one prompt per line, or JSONL {"prompt"} per line (text: also TRL conversations)."""
    out: str = ""
    k: int = 4
    """Candidates per prompt (InstructGPT: 4 to 9; a ranking of K gives K(K-1)/2 pairs)."""
    judge: str = ""
    """Optional: rank each prompt's candidates by this judge's scores (see the module docstring)."""
    tie_tol: float = 0.0
    """Judge scores within this of a tier's best score tie with it."""
    seed: int = 0
    limit: int = 0
    """The first N prompts only (0 = all)."""
    batch_size: int = 0
    """Outputs per generate call, rounded down to whole prompts × K (0 = 16 for text, 8 for images)."""
    device: str = ""
    """cuda | cpu | ...; empty = cuda when available."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 for the generator and a model judge."""
    text: TextGenParams = field(default_factory=lambda: TextGenParams(sample=True))
    image: ImageGenParams = field(default_factory=ImageGenParams)


# settings a resumed run must share with the run it continues (the rest, e.g. device, do not change what is written)
SAME_ON_RESUME = ("model", "kind", "prompts", "k", "judge", "tie_tol", "seed", "limit", "batch_size", "dtype",
                  "text", "image")


def _check(cfg: SampleConfig) -> None:
    for name in ("model", "prompts", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"sample: --{name} is required")
    for name, ok, want in (("k", cfg.k >= 2, ">= 2 (a ranking needs two candidates)"),
                           ("batch_size", cfg.batch_size >= 0, ">= 0 (0 = the default)"),
                           ("tie_tol", cfg.tie_tol >= 0, ">= 0"), ("limit", cfg.limit >= 0, ">= 0 (0 = all)")):
        if not ok:
            raise ValueError(f"sample: {name} must be {want}, got {getattr(cfg, name)}")


def _start(cfg: SampleConfig, out: Path, resume: bool) -> dict:
    """The progress of the run in `out` ({"prompts": 0, "bytes": 0, ...} for a new one); candidates.jsonl cut back
    to its last complete call. Refuses to write over another run (a sample run's or a training run's config.yaml,
    report.md), or to resume with other settings. A new run records its progress at once, so a run killed in its
    first call resumes; one that wrote no prompt yet is started over without --resume (as training runs are)."""
    from align.config import config_dict, load_config, save_config
    from align.runner import atomic_write_json
    fresh = {"prompts": 0, "bytes": 0, "written": 0, "skipped": 0, "seconds": 0.0}
    cands, progress = out / "candidates.jsonl", out / "progress.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    if not resume:
        if progress.is_file() and json.loads(progress.read_text()).get("prompts", 0):
            raise ValueError(f"{out} already holds a sample run (candidates.jsonl): --resume continues it, or choose "
                             "another --out")
        ours = [n for n in ("config.yaml", "report.md", "images", "sheets") if (out / n).exists()]
        if not progress.is_file() and (ours or (cands.exists() and cands.stat().st_size)):
            raise ValueError(f"{out} holds another run's files ({', '.join(ours) or 'candidates.jsonl'}), which "
                             "align sample would write over: choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        cands.write_bytes(b"")
        atomic_write_json(progress, fresh)
        return fresh
    if not progress.is_file():
        raise ValueError(f"--resume: {out} holds no sample run (no progress.json)")
    old = config_dict(load_config(SampleConfig, out / "config.yaml"))
    new = config_dict(cfg)
    changed = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in SAME_ON_RESUME if old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"--resume: {'; '.join(changed)}: the run in {out} was sampled with other settings; resume "
                         f"with its own (--config {out / 'config.yaml'} --out {out} --resume), or choose another --out")
    state = {**fresh, **json.loads(progress.read_text())}
    _keep_lines(cands, state["written"])
    log.info("--resume: %d prompts done (%d written, %d skipped), continuing", state["prompts"], state["written"],
             state["skipped"])
    return state


def _keep_lines(cands: Path, n: int) -> None:
    """Cut candidates.jsonl after its first n lines, those of the complete calls: a call whose lines were written but
    not recorded is dropped (it is redone). Lines, not bytes: rankings added to the written lines are kept."""
    with open(cands, "r+b") as f:
        lines = f.read().splitlines(keepends=True)
        if len(lines) < n:
            raise ValueError(f"--resume: {cands} has {len(lines)} lines where {n} were written: lines were removed "
                             "since; restore them (or choose another --out)")
        end = sum(len(x) for x in lines[:n])
        f.truncate(end)
        if n and not lines[n - 1].endswith(b"\n"):  # an editor dropped the last newline: the next line starts anew
            f.seek(end)
            f.write(b"\n")


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t.strip()))


def run_sample(cfg: SampleConfig, resume: bool = False) -> dict:
    """The `align sample` job (see the module docstring). Returns the summary written to OUT/progress.json."""
    from align.data import load_prompts, ranking_from_scores
    from align.runner import atomic_write_json, atomic_write_text, progress
    _check(cfg)
    kind = cfg.kind or infer_kind(cfg.model)
    if kind not in ADAPTERS:
        raise ValueError(f"--kind {kind!r}: expected text or image")
    if kind == "text" and not cfg.text.sample:
        raise ValueError("sample: text.sample=false is greedy decoding, one answer per prompt, not K: sample "
                         "(text.temperature sets how far apart the candidates are)")
    prompts = load_prompts(cfg.prompts)
    prompts = prompts[:cfg.limit] if cfg.limit else prompts
    if kind == "image" and any(isinstance(p, list) for p in prompts):  # load_prompts keeps a conversation a list
        raise ValueError(f"{cfg.prompts}: conversation prompts are for text models; an image pipeline takes text")
    adapter = importlib.import_module(ADAPTERS[kind])
    adapter.check_model(cfg.model)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ccfg = CompareConfig(dtype=cfg.dtype, text=cfg.text, image=cfg.image)
    judge = adapter.load_judge(cfg.judge, ccfg, device) if cfg.judge else None
    gen = adapter.load_generator(cfg.model, ccfg, device)
    if kind == "text":  # conversations without a chat template, a prompt over the context: before --out is touched
        gen.check_prompts([PromptItem(f"line {i + 1}", p, p) for i, p in enumerate(prompts)])
        if hasattr(judge, "check_prompts"):  # a reward model's tokenizer must render them too
            judge.check_prompts(prompts)
    out = Path(cfg.out)
    state = _start(cfg, out, resume)
    per_call = max(1, (cfg.batch_size or adapter.DEFAULT_BATCH_SIZE) // cfg.k)
    calls = list(range(0, len(prompts), per_call))
    t0 = time.perf_counter() - state["seconds"]
    with open(out / "candidates.jsonl", "ab") as f, \
            progress(total=len(calls), desc=f"sample K={cfg.k}") as bar:
        bar.update(sum(start < state["prompts"] for start in calls))
        for call, start in enumerate(calls):
            if start < state["prompts"]:
                continue
            chunk = prompts[start:start + per_call]
            outputs = gen([p for p in chunk for _ in range(cfg.k)], _batch_seed(cfg.seed, call))
            kept = []  # (index, prompt, record, candidates) of the call's prompts left with two or more
            for i, prompt in enumerate(chunk, start=start):
                record = {"prompt": prompt}  # a conversation stays its list of messages
                j = (i - start) * cfg.k
                if kind == "text":
                    cands = _distinct(outputs[j:j + cfg.k])
                    if len(cands) < 2:
                        state["skipped"] += 1
                        continue
                    record["completions"] = cands
                else:
                    cands = outputs[j:j + cfg.k]
                    record["images"] = adapter.save_candidates(cands, out, i, prompt)
                kept.append((i, prompt, record, cands))
            if judge is not None and kept:  # one judge call for the generate call's candidates, not one per prompt
                n = [len(cands) for *_, cands in kept]
                scores = check_scores(
                    judge([p for (_, p, _, _), k in zip(kept, n) for _ in range(k)],
                          [c for *_, cands in kept for c in cands] if kind == "text" else
                          torch.cat([cands for *_, cands in kept])),
                    sum(n), cfg.judge, ids=[f"{cfg.prompts}: prompt {i + 1}" for (i, *_), k in zip(kept, n)
                                            for _ in range(k)]).tolist()
                for (*_, record, _), k in zip(kept, n):
                    mine, scores = scores[:k], scores[k:]
                    record["scores"] = [round(s, 6) for s in mine]  # the ranking is that of the scores as written
                    record["ranking"] = ranking_from_scores(record["scores"], cfg.tie_tol)
            lines = [json.dumps(record, ensure_ascii=False) + "\n" for _, _, record, _ in kept]
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            state.update(prompts=start + len(chunk), bytes=f.tell(), written=state["written"] + len(lines),
                         seconds=time.perf_counter() - t0)
            atomic_write_json(out / "progress.json", state)
            bar.update(1)
    atomic_write_text(out / "report.md", _report(cfg, kind, out, state, len(prompts)))
    log.info("sample: %d prompts × K=%d -> %s (%d written, %d skipped with < 2 distinct candidates), %.1f s",
             len(prompts), cfg.k, out / "candidates.jsonl", state["written"], state["skipped"], state["seconds"])
    if not state["written"]:
        log.warning("sample: no prompt got 2 distinct non-empty responses, so there is nothing to rank: sample further "
                    "apart (a higher text.temperature, more text.max_new_tokens)")
    return state


def _report(cfg: SampleConfig, kind: str, out: Path, state: dict, n_prompts: int) -> str:
    from itertools import islice

    from align.data import read_jsonl
    from align.report import markdown_table
    # read_jsonl's lines end at \n only: str.splitlines also splits inside a completion holding U+2028 or U+0085
    rows = [obj for _, obj in islice(read_jsonl(out / "candidates.jsonl"), 3)]
    how = (f"sampled at temperature {cfg.text.temperature:g}, ≤ {cfg.text.max_new_tokens} new tokens"
           + (", prompts as chat-template user turns" if cfg.text.chat_template else "") if kind == "text"
           else f"{cfg.image.num_steps} DDIM steps, η = {cfg.image.eta:g}, guidance {cfg.image.guidance_scale:g}")
    text = (f"# Candidates for ranking\n\nModel `{cfg.model}`, {n_prompts} prompts from `{cfg.prompts}`, K = {cfg.k} "
            f"candidates each ({how}; seed {cfg.seed}); {state['seconds']:.1f} s.\n\n"
            f"- `candidates.jsonl`: {state['written']} prompts"
            + (f"; {state['skipped']} skipped, with fewer than 2 distinct non-empty responses" if state["skipped"]
               else "") + ".\n")
    if kind == "image":
        text += ("- `images/`: one PNG per candidate; `sheets/`: a prompt's K in a row, index 0 on the left, the "
                 "prompt above and each candidate's index below.\n")
    trunk = "--model SFT_MODEL" if kind == "text" else "--clip CLIP"  # the RM's trunk, which sample does not know
    chat = " chat_template=true" if kind == "text" and cfg.text.chat_template else ""  # the RM reads them so too
    ranked = f"rm {trunk} --data {out / 'candidates.jsonl'}{chat}"
    if cfg.judge:
        text += (f"- Ranked by the judge `{cfg.judge}` (`scores`, `ranking`; ties within {cfg.tie_tol:g}): train on "
                 f"them with `align {kind} {ranked}`, or correct the rankings first.\n")
    else:
        text += (f"- Next: add `\"ranking\"` to each line, best first, ties as inner lists (`[2, [0, 3], 1]`), then "
                 f"`align {kind} {ranked}`.\n")
    if rows and kind == "text":
        text += "\n## First prompts\n\n" + markdown_table([
            {"prompt": repr(r["prompt"])[:80], "candidate": j, "output": repr(c)[:120],
             **({"score": r["scores"][j]} if "scores" in r else {})}
            for r in rows for j, c in enumerate(r["completions"])])
    elif rows:
        text += "\n## First prompts\n\n" + markdown_table([
            {"prompt": repr(r["prompt"])[:80],
             "candidates, 0 on the left": f"![](sheets/{Path(r['images'][0]).stem.rsplit('-', 1)[0]}.png)",
             **({"scores": ", ".join(f"{x:.3g}" for x in r["scores"]), "ranking": json.dumps(r["ranking"])}
                if "scores" in r else {})} for r in rows])
    return text
