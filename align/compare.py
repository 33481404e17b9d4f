"""Plain vs engineered prompts: any generator × any judge -> mean score, success rate and win rate,
with percentile-bootstrap confidence intervals.

The question (InstructGPT, Ouyang et al. 2022, §4.1 / Fig. 1): does an aligned model asked
plainly do as well as the base model coaxed by prompt engineering (a few-shot `Q:/A:` prefix for
text, `masterpiece, best quality` tags for images)? Each (model, prompt variant) pair is an *arm*;
every arm answers the same P prompts under the same S seeds, so arms are paired by (prompt, seed)
and one arm's win rate over another is the share of pairs it scores higher (ties count half).

    scores    (P, S)  judge score of each prompt under each seed (the judge always sees the PLAIN
                      prompt: the engineered variant is a trick for the generator, not the task)
    success   (P, S)  score ≥ success_threshold
    win       (P, S)  1 if a > b + tie_tol, ½ if |a − b| ≤ tie_tol, 0 otherwise

Every statistic here is a grid mean over (P, S), so one bootstrap serves them all: resample the P
prompts with replacement and, when S > 1, the S seeds too, independently (the "pigeonhole"
bootstrap for crossed factors, Owen 2007, slightly conservative), and read the percentile interval
of the resampled means. Resamples are drawn as multiplicity weights, (n_boot, P) and (n_boot, S),
so each resampled mean is one einsum: vectorised, no Python loop over resamples or samples.

Generators and judges are modality code (text_rlhf.compare, image_rlhf.compare), imported by
name; this module imports torch only.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from align.bootstrap import _as_grid, bootstrap_ci, summarize, win_rate  # noqa: F401 (re-exported)
from align.compare_prompts import (QA_EXAMPLE, QA_QUERY, SD_TAGS, PromptItem, Template,  # noqa: F401 (re-exported)
                                   load_compare_prompts, make_template)
from align.reward import as_scores

log = logging.getLogger(__name__)

__all__ = ["CompareConfig", "TextGenParams", "ImageGenParams", "PromptItem", "Arm", "Template",
           "make_template", "load_compare_prompts", "bootstrap_ci", "summarize", "win_rate",
           "default_pairs", "compare_arms", "to_markdown", "compare_table", "FunctionJudge",
           "check_scores", "evaluate", "run_compare"]

ADAPTERS = {"text": "text_rlhf.compare", "image": "image_rlhf.compare"}
VARIANTS = ("plain", "engineered")


# ---------------------------------------------------------------------------- config

@dataclass
class TextGenParams:
    max_new_tokens: int = 64
    sample: bool = False
    """False: greedy decoding (deterministic, seeds ignored). True: sample at `temperature`."""
    temperature: float = 1.0
    stop: str = ""
    """Cut each response at the first occurrence of this string (e.g. "\\nQ:" for few-shot
    prompts, whose raw continuation may go on to invent the next question); empty = EOS only."""
    chat_template: bool = False
    """Give every prompt (plain and engineered) to the model as a user turn of its chat template (instruct
    models; `text_rlhf.models.chat_prompts`). A reward-model judge gets the prompt as a user turn of its own
    tokenizer's template (as `align text rm chat_template=true` trained it); a module:function judge the prompt as
    written."""


@dataclass
class ImageGenParams:
    num_steps: int = 50
    """DDIM steps per image."""
    guidance_scale: float = 5.0
    """Classifier-free guidance w (1 = off). DDPO's default; SD's own pipeline uses 7.5."""
    eta: float = 1.0
    """DDIM η: 1 samples the stochastic policy DDPO trains; 0 is deterministic DDIM given x_T."""
    resolution: int = 0
    """Image size in pixels (0 = the UNet's native size)."""


@dataclass
class CompareConfig:
    models: list[str] = field(default_factory=list)
    """Generators, each PATH or NAME=PATH (text: causal-LM folder or hub id; image: pipeline folder,
    DDPO run folder, or PIPELINE+LORA_DIR). The first is the baseline (e.g. the base model)."""
    kind: str = ""
    """text | image; empty = inferred from the first model folder."""
    prompts: str = ""
    """JSONL of {"prompt", "engineered"?, "id"?}, or a text file of plain prompts (one per line)."""
    judge: str = ""
    """A reward-model folder (text RM, CLIP reward), an image built-in, or module:function scoring
    (prompts, outputs) -> scores (a gold judge)."""
    template: str = ""
    """Engineered variant of prompts that have none: fewshot-qa, sd-tags, or text with {prompt}."""
    fewshot: str = ""
    """{"prompt", "response"} JSONL of the examples for --template fewshot-qa."""
    fewshot_k: int = 0
    """Shots per prompt, drawn from --fewshot (seeded by the prompt); 0 = every example in the file."""
    seeds: list[int] = field(default_factory=lambda: [0])
    success_threshold: float | None = None
    """success = score >= this; None = 1.0 for module:function judges, no success rate otherwise."""
    tie_tol: float = 0.0
    """|a − b| <= tie_tol is a tie (half a win)."""
    n_boot: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    limit: int = 0
    """Use the first N prompts only (0 = all)."""
    batch_size: int = 0
    """Prompts per generate call (0 = 16 for text, 8 for images)."""
    device: str = ""
    """cuda | cpu | ...; empty = cuda when available."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 for the generator and model judges."""
    out: str = ""
    """Folder for compare.md and compare.json (+ sample grids); empty = print only."""
    text: TextGenParams = field(default_factory=TextGenParams)
    image: ImageGenParams = field(default_factory=ImageGenParams)


def torch_dtype(name: str) -> torch.dtype:
    names = {"no": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in names:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(names)}")
    return names[name]


def is_function_spec(spec: str) -> bool:
    """'module:function' or 'path/to/file.py:function' (and not an existing path that happens to contain a colon)."""
    module, sep, name = str(spec).rpartition(":")
    return (bool(sep and module and name) and not Path(spec).exists()
            and ("/" not in module or module.endswith(".py")))


# ---------------------------------------------------------------------------- arms and tables

@dataclass
class Arm:
    """One (model, variant): what it produced and how the judge scored it."""
    name: str
    model: str
    variant: str
    prompt_ids: list[str]
    seeds: list[int]
    scores: torch.Tensor                   # (P, S) float64
    outputs: list[list] | None = None      # (P, S) texts; None for images
    samples: list = field(default_factory=list)   # outputs of the first prompts at the first seed (grids)
    seconds: float = 0.0


def default_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every later model's plain arm over the first model's engineered arm (InstructGPT's question:
    aligned-plain vs base-engineered), then engineered over plain for each model (the prompt trick's gain)."""
    pairs = [(f"{m}-plain", f"{models[0]}-engineered") for m in models[1:]]
    return pairs + [(f"{m}-engineered", f"{m}-plain") for m in models]


def _grid_of(arm) -> torch.Tensor:
    return arm.scores if isinstance(arm, Arm) else _as_grid(arm)


def compare_arms(arms: dict, pairs: Sequence[tuple[str, str]], success_threshold: float | None = None,
                 n_boot: int = 2000, seed: int = 0, confidence: float = 0.95, tie_tol: float = 0.0) -> dict:
    """{"arms": {name: summarize(...)}, "pairs": [{"a", "b", **win_rate(...)}]} for arms given as
    `Arm`s or (P, S) score arrays. Arms must be paired: same prompts and seeds (checked for `Arm`s)."""
    for a, b in pairs:
        for name in (a, b):
            if name not in arms:
                raise ValueError(f"pair ({a}, {b}): no arm named {name!r} (arms: {', '.join(arms)})")
        if isinstance(arms[a], Arm) and isinstance(arms[b], Arm):
            if (arms[a].prompt_ids, arms[a].seeds) != (arms[b].prompt_ids, arms[b].seeds):
                raise ValueError(f"arms {a} and {b} were not run on the same prompts and seeds")
    kw = dict(n_boot=n_boot, seed=seed, confidence=confidence)
    return {"confidence": confidence, "n_boot": n_boot, "success_threshold": success_threshold,
            "arms": {name: summarize(_grid_of(arm), success_threshold, **kw) for name, arm in arms.items()},
            "pairs": [{"a": a, "b": b, **win_rate(_grid_of(arms[a]), _grid_of(arms[b]), tie_tol=tie_tol, **kw)}
                      for a, b in pairs]}


def _ci(low, high) -> str:
    return "" if low is None or low != low else f"[{low:.3f}, {high:.3f}]"


def to_markdown(results: dict) -> str:
    """The two tables of `compare_arms` results: per-arm score/success, then pairwise win rates."""
    from align.report import markdown_table
    pct = f"{results['confidence']:.0%} CI"
    thr = results["success_threshold"]
    arm_rows = []
    for name, s in results["arms"].items():
        row = {"arm": name, "prompts": s["n_prompts"], "seeds": s["n_seeds"], "mean score": s["mean"],
               pct: _ci(s["ci_low"], s["ci_high"])}
        if thr is not None:
            row.update({f"success (≥ {thr:g})": s["success"],
                        f"success {pct}": _ci(s["success_ci_low"], s["success_ci_high"])})
        arm_rows.append(row)
    pair_rows = [{"A": p["a"], "B": p["b"], "A wins": p["win_rate"], pct: _ci(p["ci_low"], p["ci_high"]),
                  "W/T/L": f"{p['wins']}/{p['ties']}/{p['losses']}", "mean A − B": p["mean_diff"],
                  f"diff {pct}": _ci(p["diff_ci_low"], p["diff_ci_high"])} for p in results["pairs"]]
    text = markdown_table(arm_rows)
    if pair_rows:
        text += "\nWin rate of A over B, paired by (prompt, seed); ties count half.\n\n" + markdown_table(pair_rows)
    return text


def splits_table(named: dict[str, dict], arms: Sequence[str], pair: tuple[str, str]) -> str:
    """One Markdown row per split of an evaluation ({split name: `compare_arms` result holding `arms` and
    `pair`}): prompts × seeds, each arm's mean score, then pair[0] over pair[1] (win rate, mean difference,
    with their bootstrap CIs)."""
    from align.report import markdown_table
    rows = []
    for name, res in named.items():
        p = next(q for q in res["pairs"] if (q["a"], q["b"]) == tuple(pair))
        first = res["arms"][arms[0]]
        rows.append({"prompts": name, "n": f"{first['n_prompts']} × {first['n_seeds']}",
                     **{a: res["arms"][a]["mean"] for a in arms},
                     f"{pair[0]} wins vs {pair[1]}": f"{p['win_rate']:.1%} [{p['ci_low']:.0%}, {p['ci_high']:.0%}]",
                     "mean diff": f"{p['mean_diff']:+.3f} [{p['diff_ci_low']:+.3f}, {p['diff_ci_high']:+.3f}]"})
    return markdown_table(rows)


def compare_table(arms: dict, pairs: Sequence[tuple[str, str]] | None = None, **kw) -> str:
    """Markdown tables for arms {name: (P, S) scores or Arm}; pairs default to every ordered pair
    of the first arm against the others."""
    names = list(arms)
    pairs = [(n, names[0]) for n in names[1:]] if pairs is None else pairs
    return to_markdown(compare_arms(arms, pairs, **kw))


# ---------------------------------------------------------------------------- judges and the run

def check_scores(out, n: int, spec: str, ids: Sequence[str] | None = None, where: str = "") -> torch.Tensor:
    """A judge's output as (n,) float64 on the CPU; a wrong count or a NaN is a ValueError naming the judge
    and, given the batch's prompt `ids` (and `where`: arm and seed), the prompt that got it."""
    scores = as_scores(out, n, repr(spec), "outputs", torch.float64, role="judge")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        at = f"prompt id {ids[i]!r}" if ids is not None else f"index {i}"
        raise ValueError(f"judge {spec!r}: non-finite score {scores[i].item()} for {at}"
                         + (f" ({where})" if where else "") + f"; {len(bad)} of {n} scores in that batch are NaN/inf")
    return scores


class FunctionJudge:
    """An importable `module:function(prompts, outputs) -> scores` (a gold judge, a test function).
    As with `python -m`, a module in the working directory is found even from the `align` script."""

    def __init__(self, spec: str):
        from align.config import import_function
        self.fn = import_function(spec, "judge")
        self.spec = spec

    def __call__(self, prompts, outputs):
        try:
            return self.fn(list(prompts), outputs)
        except Exception as e:  # e.g. a text judge handed images: say whose error it is, and what it was given
            given = f"a {tuple(outputs.shape)} image tensor" if torch.is_tensor(outputs) else f"{len(outputs)} texts"
            raise ValueError(f"judge {self.spec!r} raised {type(e).__name__}: {e} (called with {len(prompts)} plain "
                             f"prompts and {given})") from e


def _batch_seed(seed: int, batch: int) -> int:
    """Seed of one generate call: from (seed, batch index) only, so the plain and engineered arms of a
    model draw the same noise for the same prompt slot (common random numbers: paired comparisons)."""
    return hash((int(seed), int(batch))) & (2**63 - 1)


def evaluate(models: dict[str, str], items: Sequence[PromptItem], load_generator: Callable, judge: Callable,
             seeds: Sequence[int], batch_size: int, judge_spec: str = "judge", n_samples: int = 8) -> dict[str, Arm]:
    """Run every model on both variants of every prompt under every seed; score with `judge`.

    load_generator(path) -> gen, gen(prompts, seed) -> outputs (a list, or a tensor batch); a gen with
    `deterministic = True` (greedy decoding) runs once and its scores are repeated over the seeds.
    A gen with `check_prompts(items)` checks them all when loaded. Models are loaded one at a time. The
    judge sees the plain prompts.
    """
    from align.runner import progress

    plain = [it.plain for it in items]
    ids = [it.id for it in items]
    P, S = len(items), len(seeds)
    arms: dict[str, Arm] = {}
    all_deterministic = True
    for model, path in models.items():
        gen = load_generator(path)
        if hasattr(gen, "check_prompts"):  # e.g. a prompt over the context: fail before generating, not mid-arm
            gen.check_prompts(items)
        runs = 1 if getattr(gen, "deterministic", False) else S
        if runs < S:
            log.info("%s: deterministic decoding, so one run serves all %d seeds", model, S)
        for variant in VARIANTS:
            prompts = plain if variant == "plain" else [it.engineered for it in items]
            t0 = time.perf_counter()
            scores = torch.zeros(P, S, dtype=torch.float64)
            outputs = [[None] * S for _ in range(P)]
            samples = []
            with progress(total=runs * -(-P // batch_size), desc=f"{model}-{variant}") as bar:
                for s in range(runs):
                    for b, start in enumerate(range(0, P, batch_size)):
                        end = min(P, start + batch_size)
                        out = gen(prompts[start:end], _batch_seed(seeds[s], b))
                        scores[start:end, s] = check_scores(judge(plain[start:end], out), end - start, judge_spec,
                                                            ids[start:end], f"arm {model}-{variant}, seed {seeds[s]}")
                        for i in range(start, end):
                            o = out[i - start]
                            outputs[i][s] = o if isinstance(o, str) else None
                            if s == 0 and len(samples) < n_samples:
                                samples.append(o.detach().cpu() if torch.is_tensor(o) else o)
                        bar.update(1)
            for s in range(runs, S):
                scores[:, s] = scores[:, 0]
                for row in outputs:
                    row[s] = row[0]
            texts = outputs if all(isinstance(o, str) for row in outputs for o in row) else None
            name = f"{model}-{variant}"
            arms[name] = Arm(name, model, variant, ids, list(seeds), scores, texts, samples,
                             time.perf_counter() - t0)
            log.info("%s: mean score %.4f (%.1f s)", name, scores.mean().item(), arms[name].seconds)
        del gen
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        all_deterministic = all_deterministic and runs == 1
    if all_deterministic and S > 1:
        # every generator is deterministic: S copies of one grid would count each comparison S times in W/T/L and
        # show "seeds S" where one output per prompt exists; keep one seed (means and CIs are the same)
        log.warning("deterministic decoding: every output is the same under seeds %s, so the tables count each "
                    "prompt once (seed %d); sample (e.g. --sample) to compare over seeds", list(seeds), seeds[0])
        for arm in arms.values():
            arm.scores, arm.seeds = arm.scores[:, :1].clone(), arm.seeds[:1]
            if arm.outputs is not None:
                arm.outputs = [row[:1] for row in arm.outputs]
    return arms


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """['base=runs/base', 'runs/sft/model', ...] -> {name: path}. A name defaults to the folder's name
    (its parent's when that is a generic model/pipeline/lora folder), made unique with -2, -3 ..."""
    out: dict[str, str] = {}
    for spec in (s.strip() for item in specs for s in str(item).split(",")):
        if not spec:
            continue
        name, eq, path = spec.partition("=")
        if not eq:
            p, path = Path(spec.split("+")[-1].rstrip("/")), spec
            base = (p.parent.name if p.name in ("model", "pipeline", "lora") else p.name) or "model"
            name, k = base, 2
            while name in out:
                name, k = f"{base}-{k}", k + 1
        elif not name or not path:
            raise ValueError(f"--model {spec!r}: expected PATH or NAME=PATH")
        if name in out:
            raise ValueError(f"--model: the name {name!r} is given twice")
        out[name] = path
    if not out:
        raise ValueError("compare: --model is required")
    return out


def infer_kind(path: str) -> str:
    """text for a causal-LM folder (config.json, or an align run folder's model/), image for a
    diffusers pipeline (model_index.json or unet/), a DDPO run folder (lora/ or pipeline/) or BASE+LORA."""
    p = Path(path.split("+")[0])
    if "+" in path or any((p / f).exists() for f in ("model_index.json", "unet", "lora", "pipeline",
                                                     "pytorch_lora_weights.safetensors")):
        return "image"
    if (p / "config.json").exists() or (p / "model" / "config.json").exists():
        return "text"
    raise ValueError(f"cannot tell whether {path!r} is a text model or an image pipeline: pass --kind text|image")


def run_compare(cfg: CompareConfig, echo: bool = True) -> dict:
    """The `align compare` job: prompts × models × judge -> tables (printed when `echo`, written to
    cfg.out/compare.md and compare.json when cfg.out is set). Returns the compare.json content plus
    "arm_objects": {name: Arm} (scores, texts, image samples) for callers such as `align demo`."""
    for name in ("prompts", "judge"):
        if not getattr(cfg, name):
            raise ValueError(f"compare: --{name} is required")
    models = parse_models(cfg.models)
    kind = cfg.kind or infer_kind(next(iter(models.values())))
    if kind not in ADAPTERS:
        raise ValueError(f"--kind {kind!r}: expected text or image")
    seeds = [int(s) for s in cfg.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: give one or more distinct seeds")
    # before any generation: a bad value found at the table would cost the whole run (batch_size < 0 would
    # generate nothing and report zeros; tie_tol < 0 would count equal scores as neither tie nor loss)
    for name, ok, want in (("batch_size", cfg.batch_size >= 0, ">= 0 (0 = the default)"),
                           ("n_boot", cfg.n_boot >= 0, ">= 0"), ("tie_tol", cfg.tie_tol >= 0, ">= 0"),
                           ("confidence", 0 < cfg.confidence < 1, "in (0, 1), e.g. 0.95")):
        if not ok:
            raise ValueError(f"compare: {name} must be {want}, got {getattr(cfg, name)}")
    template = make_template(cfg.template, cfg.fewshot or None, cfg.fewshot_k) if cfg.template else None
    if cfg.fewshot and not cfg.template:
        raise ValueError("--fewshot needs --template fewshot-qa")
    items = load_compare_prompts(cfg.prompts, template)
    if cfg.limit > 0:
        items = items[:cfg.limit]
    if kind == "image" and any(isinstance(v, list) for it in items for v in (it.plain, it.engineered)):
        raise ValueError(f"{cfg.prompts}: conversation prompts are for chat models; an image pipeline takes text")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = importlib.import_module(ADAPTERS[kind])
    for path in models.values():  # a typo or a wrong folder in a later --model fails now, not after the first's arms
        adapter.check_model(path)
    batch_size = cfg.batch_size or adapter.DEFAULT_BATCH_SIZE
    judge = adapter.load_judge(cfg.judge, cfg, device)
    if hasattr(judge, "check_prompts"):  # e.g. conversations need a reward model's chat template: before generating
        judge.check_prompts([it.plain for it in items])
    threshold = cfg.success_threshold
    if threshold is None and isinstance(judge, FunctionJudge):  # not pickscore:MODEL, whose scale is its own
        threshold = 1.0
    log.info("compare: %d models × %d prompts × 2 variants × %d seeds, judge %s, %s", len(models), len(items),
             len(seeds), cfg.judge, adapter.describe(cfg))
    t0 = time.perf_counter()
    arms = evaluate(models, items, lambda path: adapter.load_generator(path, cfg, device), judge, seeds,
                    batch_size, judge_spec=cfg.judge)
    results = compare_arms(arms, default_pairs(list(models)), threshold, cfg.n_boot, cfg.bootstrap_seed,
                           cfg.confidence, cfg.tie_tol)
    used_seeds = next(iter(arms.values())).seeds
    header = (f"Models: {', '.join(f'{n} = `{p}`' for n, p in models.items())}. Judge: `{cfg.judge}`. "
              f"{len(items)} prompts from `{cfg.prompts}`"
              + (f", engineered by template `{template.name}`" if template else "")
              + f"; seeds {used_seeds}" + (f" (deterministic decoding: one output per prompt, not one per seed of "
                                             f"{seeds})" if used_seeds != seeds else "")
              + f"; {adapter.describe(cfg)}. The judge scores every output against the plain "
              f"prompt. {cfg.confidence:.0%} percentile-bootstrap CIs over prompts"
              + (" and seeds" if len(used_seeds) > 1 else "") + f" ({cfg.n_boot} resamples, seed {cfg.bootstrap_seed})"
              + (f"; success = score ≥ {threshold:g}" if threshold is not None else "") + ".\n\n")
    table = to_markdown(results)
    if echo:
        print(table, end="")
    results.update(config=dataclasses.asdict(cfg), kind=kind, models=models, seconds=time.perf_counter() - t0,
                   per_prompt={name: {"ids": arm.prompt_ids, "seeds": arm.seeds, "scores": arm.scores.tolist(),
                                      "outputs": arm.outputs} for name, arm in arms.items()},
                   prompts=[dataclasses.asdict(it) for it in items])
    if cfg.out:
        from align.runner import atomic_write_text
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        samples = adapter.samples_markdown(arms, items, out)
        text = ("# Plain vs engineered prompts\n\n" + header + table
                + (f"\n## Samples\n\n{samples.rstrip()}\n" if samples else ""))
        atomic_write_text(out / "compare.md", text)
        atomic_write_text(out / "compare.json", json.dumps(results, indent=1) + "\n")
        log.info("compare: wrote %s and %s", out / "compare.md", out / "compare.json")
    results["arm_objects"] = arms
    return results
