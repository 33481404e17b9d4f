"""The text world of `align demo`: base LM -> SFT -> gold-ranked SFT samples -> RM -> PPO -> evaluation.

Every stage is the real one (`run_sft`, `run_rm`, `run_ppo`, `align.compare.evaluate`) on models
trained here; the world supplies only data and the gold judge (`text_rlhf.world`). The gold judge
labels the preferences (noisy, ~75% inter-labeler agreement, calibrated on the actual SFT samples)
and scores the evaluation; PPO only ever sees the learned RM. The judge is also *logged* during PPO
(never optimised) so the report can show proxy vs gold reward as KL grows (Gao et al. 2022).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.demo import StageTimer, WorldResult
from text_rlhf import world
from text_rlhf.world_train import BaseLMConfig, base_model

logger = logging.getLogger(__name__)

GOLD = "text_rlhf.world:gold_score"


@dataclass
class TextDemoConfig:
    base: BaseLMConfig = field(default_factory=BaseLMConfig)
    n_demos: int = 3000
    """SFT demonstrations (plain prompt -> answer): the small, expensive kind of human data. Measured
    on the default base: 1500 -> held-out SFT-plain gold 0.708, 3000 -> 0.750 (base few-shot: 0.705)."""
    sft_epochs: float = 4.0
    sft_lr: float = 1e-3
    n_rank_prompts: int = 12000
    """Prompts whose K SFT samples the (noisy) gold labeler ranks for the RM (~40% of them give >= 2
    distinct samples and so a ranking). RM held-out accuracy grows slowly with data: ~420 rankings
    0.52, ~1550 0.59, ~3500 0.64 (gold-label agreement 0.68)."""
    k: int = 6
    """Samples ranked per prompt (InstructGPT: K = 4..9); each ranking gives K(K−1)/2 pairs."""
    rank_temperature: float = 1.5
    """Sampling temperature of the candidates the labeler ranks. Hotter samples make more varied
    mistakes, so the RM sees more of what a wrong answer looks like. Measured (3 RM epochs; agreement
    of the RM with the gold ordering of held-out pairs): T = 1, 20k prompts, 1500-demo SFT: 0.68;
    T = 1.5, 12k prompts, 3000-demo SFT: 0.76 (not a controlled comparison: the SFT differs too)."""
    rm_epochs: float = 5.0
    """The RM under-fits: on the same 12k-prompt T = 1.5 data, 3 epochs -> held-out accuracy 0.66
    (gold-order agreement 0.76), 10 epochs -> 0.70 (0.81) at 3x the time. The better RM does not make a
    better policy (session 5, seed 0, held-out plain gold after PPO; SFT 0.750): 5 epochs 0.738, 10 epochs
    0.701 at the default PPO lr 3e-5 and 0.637 at lr 1e-4 (where the RM score stays flat while the gold
    score of PPO's own samples falls 0.895 -> 0.821)."""
    rm_lr: float = 1e-3
    ppo_iterations: int = 40
    ppo_batch: int = 128
    ppo_lr: float = 3e-5
    """Oracle check (session 6, seed 0): with the gold judge itself as PPO's reward, default settings,
    held-out aligned-plain is 0.749 (SFT 0.745 in that run; the learned RM: 0.738). The limit is not the RM:
    the SFT policy's own samples of the RL prompts score ~0.95 gold from the first iteration, so RL has
    little to climb; held-out plain gold is 0.90 in training phrasings and 0.36 in the never-seen
    phrasings (report: "seen vs never-seen phrasings"), which no stage trains on."""
    kl_coef: float = 0.2
    kl_target: float = 2.0
    """With an RM this weak, PPO gains nothing on held-out prompts and loses when it moves far.
    Measured (held-out plain gold): from a 1500-demo SFT at 0.708, lr 3e-4, β 0.05, batch 64 -> 0.41
    (KL 4-6 nats, the policy says "bird bird" to everything), lr 1e-4, β 0.5 -> 0.66; from a
    3000-demo SFT at 0.750, lr 1e-4, β 0.5 -> 0.69, lr 1e-5, batch 128 -> 0.749 (KL 0.02: PPO
    barely moves). With 400 demos and an RM agreeing with the gold order on 75% of pairs: lr 1e-4
    -> 0.55, lr 1e-5 -> 0.62 (+0.03)."""
    max_new_tokens: int = 16
    n_eval: int = 200
    """Held-out instructions (held-out arguments and phrasings) in the evaluation."""
    k_shot: int = 3
    """Solved Q:/A: examples in each engineered (few-shot) prompt."""
    n_boot: int = 2000
    seed: int = 0


PRESETS = {
    "default": TextDemoConfig(),
    "five": TextDemoConfig(base=BaseLMConfig(steps=900, qa_fraction=0.7, filler_fraction=0.05,
                                             families=("count", "max", "add", "last", "repeat"))),
    # the end-to-end test: same recipe, small enough for the suite (seconds per stage)
    "small": TextDemoConfig(base=BaseLMConfig(n_docs=6000, steps=250, n_layer=2, n_embd=64), n_demos=400,
                            sft_epochs=8, n_rank_prompts=120, rm_epochs=2, ppo_iterations=12, ppo_batch=32,
                            n_eval=64, n_boot=500),
}


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sample(model_dir: Path, prompts: list[str], k: int, max_new_tokens: int, seed: int,
            temperature: float = 1.0) -> list[list[str]]:
    """k samples per prompt from a model folder at `temperature`, cut at EOS."""
    from align.compare import TextGenParams
    from text_rlhf.compare import TextGenerator
    params = TextGenParams(max_new_tokens=max_new_tokens, sample=True, temperature=temperature)
    gen = TextGenerator(str(model_dir), params)
    out = [[] for _ in prompts]
    for j in range(k):
        for start in range(0, len(prompts), 64):
            for i, text in enumerate(gen(prompts[start:start + 64], seed * 1000 + j * 97 + start)):
                out[start + i].append(text)
    return out


def rank_samples(prompts: list[str], samples: list[list[str]], seed: int) -> tuple[list[dict], float, float]:
    """Gold-labeler K-way rankings of distinct, non-empty samples (prompts with < 2 are skipped), the
    labeler noise calibrated to 75% agreement on exactly these candidates, and that agreement."""
    groups = []
    for p, cands in zip(prompts, samples):
        distinct = list(dict.fromkeys(c for c in cands if c.strip()))
        if len(distinct) >= 2:
            groups.append((p, distinct))
    if not groups:
        raise ValueError("the SFT policy produced fewer than 2 distinct responses for every prompt: nothing to rank")
    noise = world.calibrate_noise(groups, target=0.75)
    agreement = world.labeler_agreement(groups, noise, seed=seed)
    rng = random.Random(f"labels:{seed}")
    rows = [{"prompt": p, "completions": c, "ranking": world.gold_rank(p, c, rng, noise)} for p, c in groups]
    return rows, noise, agreement


def _history(metrics_path: Path) -> list[dict]:
    return [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]


def overopt_rows(ppo_dir: Path) -> list[dict]:
    """Per PPO iteration: KL of the rollout policy to π_ref, its raw RM (proxy) score and gold score."""
    rows = []
    for r in _history(ppo_dir / "metrics.jsonl"):
        if {"objective/kl", "env/raw_score", "monitor/mean"} <= r.keys():
            rows.append({"step": r["step"], "kl": max(r["objective/kl"], 0.0), "proxy": r["env/raw_score"],
                         "gold": r["monitor/mean"]})
    return rows


SPLIT_ARMS = ("base-plain", "base-engineered", "sft-plain", "aligned-plain")


def phrasing_splits(arms: dict, items, n_boot: int, seed: int) -> tuple[str, dict]:
    """The held-out evaluation cut in two: instructions in a phrasing the training data has (held-out
    arguments only: InstructGPT's held-out customers asked the same kinds of things) and in a phrasing no
    corpus page, demonstration or RL prompt ever used. Per split: mean gold of each arm, and aligned-plain vs
    base-engineered (win rate, mean difference, bootstrap CIs over prompts). Markdown, and the numbers."""
    from align.compare import compare_arms, splits_table
    unseen = torch.tensor([world.last_instruction(it.plain).unseen_phrasing for it in items])
    pair = ("aligned-plain", "base-engineered")
    named = {name: compare_arms({a: arms[a].scores[mask] for a in SPLIT_ARMS}, [pair], success_threshold=1.0,
                                n_boot=n_boot, seed=seed)
             for name, mask in (("all held-out", torch.ones_like(unseen)), ("seen phrasing", ~unseen),
                                ("never-seen phrasing", unseen)) if mask.any()}
    out = {name: {"n_prompts": r["arms"][pair[0]]["n_prompts"], "means": {a: r["arms"][a]["mean"] for a in SPLIT_ARMS},
                  "success": {a: r["arms"][a]["success"] for a in SPLIT_ARMS}, "aligned_vs_base_eng": r["pairs"][0]}
           for name, r in named.items()}
    return ("Mean gold score by split of the held-out instructions (all use held-out arguments; n = prompts × "
            "seeds; ties count half in the win rate).\n\n" + splits_table(named, SPLIT_ARMS, pair)), out


def run(out: Path, *, preset: str = "default", fresh: bool = False, progress: bool = True,
        cfg: TextDemoConfig | None = None) -> WorldResult:
    from align.compare import PromptItem, TextGenParams, compare_arms, default_pairs, evaluate
    from text_rlhf.compare import TextGenerator, samples_markdown
    from text_rlhf.ppo import PPOConfig, run_ppo
    from text_rlhf.rm import RMConfig, run_rm
    from text_rlhf.sft import SFTConfig, run_sft
    from align.rl.config import KLParams, PPOParams

    if cfg is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown text demo preset {preset!r} (choose from {', '.join(PRESETS)})")
        cfg = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer, notes, sections = StageTimer("text"), [], []
    s = cfg.seed
    fam = list(cfg.base.families) or None   # the world's task families: corpus, demos, prompts and eval alike

    with timer("base LM (pretraining)"):
        base_dir, was_cached = base_model(cfg.base, fresh=fresh, show_progress=progress)
    if was_cached:
        timer.seconds["base LM (cached)"] = timer.seconds.pop("base LM (pretraining)")
    with timer("SFT"):
        demos = _write_jsonl(out / "data" / "demos.jsonl", world.make_demos(cfg.n_demos, seed=s, families=fam))
        sft_dir = run_sft(SFTConfig(model=str(base_dir), data=str(demos), out=str(out / "sft"), epochs=cfg.sft_epochs,
                                    batch_size=16, lr=cfg.sft_lr, max_length=128, eval_fraction=0.1, seed=s,
                                    log_every=10))
    with timer("preference labels (gold labeler)"):
        rank_prompts = list(dict.fromkeys(world.make_rl_prompts(cfg.n_rank_prompts, seed=s + 11, families=fam)))  # distinct
        samples = _sample(sft_dir, rank_prompts, cfg.k, cfg.max_new_tokens, s, cfg.rank_temperature)
        rows, noise, agreement = rank_samples(rank_prompts, samples, s)
        prefs = _write_jsonl(out / "data" / "prefs.jsonl", rows)
    with timer("reward model"):
        rm_dir = run_rm(RMConfig(model=str(sft_dir), data=str(prefs), out=str(out / "rm"), epochs=cfg.rm_epochs,
                                 max_pairs_per_batch=64, lr=cfg.rm_lr, max_length=128, eval_fraction=0.15, seed=s,
                                 log_every=10))
        rm_eval = json.loads((rm_dir / "align.json").read_text()).get("held_out", {})
    with timer("PPO"):
        rl_prompts = _write_jsonl(out / "data" / "rl_prompts.jsonl",
                                  [{"prompt": p} for p in world.make_rl_prompts(2000, seed=s + 23, families=fam)])
        ppo = run_ppo(PPOConfig(
            policy=str(sft_dir), reward=str(rm_dir), prompts=str(rl_prompts), out=str(out / "ppo"),
            iterations=cfg.ppo_iterations, batch_size=cfg.ppo_batch, max_prompt_length=64,
            max_new_tokens=cfg.max_new_tokens, lr=cfg.ppo_lr, seed=s, save_every=max(cfg.ppo_iterations // 2, 1),
            monitor=GOLD, log_samples=2,
            ppo=PPOParams(ppo_epochs=4, mini_batch_size=min(64, cfg.ppo_batch), vf_coef=0.1,
                          kl=KLParams(kl_coef=cfg.kl_coef, adaptive=True, target=cfg.kl_target, horizon=10000))))
        aligned_dir = ppo.model_dir
        del ppo
    with timer("evaluation (gold judge)"):
        ev = world.make_eval_prompts(cfg.n_eval, seed=s + 101, k_shot=cfg.k_shot, families=fam)
        items = [PromptItem(f"{e['family']}-{i}", e["plain"], e["engineered"]) for i, e in enumerate(ev)]
        params = TextGenParams(max_new_tokens=cfg.max_new_tokens, sample=False)
        models = {"base": str(base_dir), "sft": str(sft_dir), "aligned": str(aligned_dir)}
        arms = evaluate(models, items, lambda p: TextGenerator(p, params), world.gold_score, seeds=[0],
                        batch_size=64, judge_spec=GOLD)
        results = compare_arms(arms, default_pairs(list(models)), success_threshold=1.0, n_boot=cfg.n_boot, seed=s)
        _write_jsonl(out / "eval_responses.jsonl",
                     [{"id": it.id, "prompt": it.plain, **{a: arms[a].outputs[i][0] for a in arms},
                       **{f"{a}/score": arms[a].scores[i, 0].item() for a in arms}} for i, it in enumerate(items)])

    split_md, splits = phrasing_splits(arms, items, cfg.n_boot, s)
    results["splits"] = splits
    overopt = overopt_rows(out / "ppo")
    acc = rm_eval.get("accuracy", float("nan"))
    if not acc >= 0.65:
        notes.append(f"the reward model orders only {acc:.1%} of held-out labeled pairs correctly (the labels "
                     "themselves agree with each other 75% of the time): at this size the RM barely learns what "
                     "makes an answer right, so RL has little true signal to climb.")
    perfect = arms["base-engineered"].scores >= 1.0 - 1e-9                     # (prompts, seeds) gold = 1
    ceiling = 1.0 - 0.5 * perfect.float().mean().item()   # a perfect model's win rate: ties count half
    if ceiling < 0.71:
        notes.append(f"a model that answered every held-out prompt perfectly would win only {ceiling:.1%} against "
                     f"base-engineered: its {perfect.float().mean().item():.1%} perfect answers are "
                     "ties, counted half, so the 71% bar is out of reach in this world as evaluated.")
    sft_m, rl_m = (results["arms"][f"{a}-plain"]["mean"] for a in ("sft", "aligned"))
    if rl_m < sft_m:
        notes.append(f"RL lowered the held-out plain-prompt gold score from {sft_m:.3f} (SFT) to {rl_m:.3f}: the "
                     "policy climbed the learned reward where it disagrees with the labeler.")
    if len(overopt) >= 4:
        k = max(1, len(overopt) // 5)
        g0 = sum(r["gold"] for r in overopt[:k]) / k
        g1 = sum(r["gold"] for r in overopt[-k:]) / k
        p0 = sum(r["proxy"] for r in overopt[:k]) / k
        p1 = sum(r["proxy"] for r in overopt[-k:]) / k
        seen, unseen = (splits.get(name, {}).get("means", {}).get("aligned-plain")
                        for name in ("seen phrasing", "never-seen phrasing"))
        if g0 >= 0.85 and seen is not None and unseen is not None:
            notes.append(f"the SFT policy's own samples of the RL prompts already scored {g0:.3f} gold when PPO "
                         f"started (training phrasings and arguments): little was left for RL to learn there. "
                         f"On held-out prompts aligned-plain scores {seen:.3f} in seen phrasings and {unseen:.3f} in "
                         "never-seen ones, which no stage trains on.")
        if p1 > p0 and g1 < g0:
            notes.append(f"PPO over-optimised the proxy: RM score {p0:.3f} → {p1:.3f} while the gold score of the "
                         f"same samples went {g0:.3f} → {g1:.3f} (first vs last fifth of the run).")
    sections.append(("Text world: data and labels", (
        f"- base LM: tiny GPT-2, {cfg.base.n_layer} layers × {cfg.base.n_embd}, pretrained on {cfg.base.n_docs} "
        f"corpus documents ({cfg.base.qa_fraction:.0%} Q:/A: pages, the rest exam sheets without answers and "
        f"prose){' — loaded from the cache' if was_cached else ''}: `{base_dir}`\n"
        f"- SFT: {cfg.n_demos} plain demonstrations, {cfg.sft_epochs:g} epochs\n"
        f"- preferences: {len(rows)} prompts × ≤ {cfg.k} distinct SFT samples (temperature "
        f"{cfg.rank_temperature:g}) ranked by the gold labeler "
        f"(Bradley-Terry noise {noise:.3f}, inter-labeler agreement {agreement:.1%}; InstructGPT: 72.6–77.3%)\n"
        f"- reward model (from the SFT model): held-out pairwise accuracy "
        f"{rm_eval.get('accuracy', float('nan')):.3f}, loss {rm_eval.get('loss', float('nan')):.3f}\n"
        f"- PPO: {cfg.ppo_iterations} iterations × {cfg.ppo_batch} prompts against the RM, lr {cfg.ppo_lr:g}, "
        f"adaptive KL (β₀ = {cfg.kl_coef}, target {cfg.kl_target} nats); the gold judge is only logged\n"
        f"- evaluation: {len(items)} held-out instructions (held-out arguments and phrasings), greedy decoding, "
        f"≤ {cfg.max_new_tokens} new tokens; engineered = {cfg.k_shot}-shot Q:/A: prefix")))
    sections.append(("Text world: seen vs never-seen phrasings", split_md))
    sections.append(("Text world: sample responses (greedy, held-out prompts)",
                     samples_markdown(arms, items, out, n=4, width=100)))
    return WorldResult(world="text", compare=results, models=list(models), overopt=overopt,
                       sections=sections, timings=timer.seconds, notes=notes, out_dir=str(out))
