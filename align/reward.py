"""Pairwise (Bradley-Terry) reward-model training, generic over the scorer.

A scorer is any callable `score(prompts, candidates) -> Tensor[N]`: a causal-LM trunk with a scalar
head, a CLIP model, a test function. The data are `PreferenceGroup`s (one prompt, K candidates,
all the pairs among them); each candidate is scored once per batch however many pairs it is in
(InstructGPT §3.5: the K(K−1)/2 comparisons of a prompt cost K forward passes, not K(K−1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from align.data import batch_groups

Scorer = Callable[[list, list], torch.Tensor]


def pairwise_loss(r_winner: torch.Tensor, r_loser: torch.Tensor, labels: torch.Tensor | None = None,
                  margins: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss with soft labels and an optional margin, averaged over pairs:

        d = r_w − r_l − m
        L = −[ y·log σ(d) + (1 − y)·log σ(−d) ]

    y = 1 is the InstructGPT loss −log σ(r_w − r_l); y = 0.5 is a tie (the loss is minimised at
    d = 0); m > 0 asks the winner to lead by m (Llama 2 §3.2.2). Equal scores give log 2.
    """
    d = r_winner - r_loser
    if margins is not None:
        d = d - margins
    if labels is None:
        return -F.logsigmoid(d).mean()
    return -(labels * F.logsigmoid(d) + (1.0 - labels) * F.logsigmoid(-d)).mean()


def pairwise_accuracy(r_winner: torch.Tensor, r_loser: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Share of pairs ordered as the labellers did. A tie (label 0.5) gets half credit whatever the
    scores (it cannot be ordered right or wrong), as does a strict pair the model scores equal."""
    d = r_winner - r_loser
    credit = (d > 0).float() + 0.5 * (d == 0).float()
    if labels is not None:
        credit = torch.where(labels == 0.5, torch.full_like(credit, 0.5), credit)
    return credit.mean()


def expected_calibration_error(r_winner: torch.Tensor, r_loser: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability σ(r_w − r_l) against the labels, over `n_bins` equal-width
    bins of confidence. Pairs are put in the symmetric form p ≥ 0.5 so both orientations agree."""
    p = torch.sigmoid((r_winner - r_loser).double())
    y = labels.double()
    flip = p < 0.5
    p, y = torch.where(flip, 1 - p, p), torch.where(flip, 1 - y, y)
    bins = torch.clamp(((p - 0.5) * 2 * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in bins.unique().tolist():
        sel = bins == b
        ece += sel.double().mean().item() * abs(p[sel].mean().item() - y[sel].mean().item())
    return ece


@dataclass
class PairBatch:
    """A batch of whole preference groups, flattened: each candidate once, pairs as indices."""
    prompts: list          # (N,) the prompt of each candidate
    candidates: list       # (N,)
    winners: torch.Tensor  # (P,) index into candidates
    losers: torch.Tensor   # (P,)
    labels: torch.Tensor   # (P,) 1.0 strict, 0.5 tie
    margins: torch.Tensor  # (P,)

    @classmethod
    def from_groups(cls, groups: Sequence) -> "PairBatch":
        prompts, candidates, w, l, y, m = [], [], [], [], [], []
        for g in groups:
            base = len(candidates)
            prompts += [g.prompt] * len(g.candidates)
            candidates += list(g.candidates)
            for p in g.pairs:
                w.append(base + p.winner), l.append(base + p.loser), y.append(p.label), m.append(p.margin)
        return cls(prompts, candidates, torch.tensor(w, dtype=torch.long), torch.tensor(l, dtype=torch.long),
                   torch.tensor(y, dtype=torch.float32), torch.tensor(m, dtype=torch.float32))


def shard_groups(groups: Sequence, rank: int, world: int) -> tuple[list, float]:
    """This process's share of a global batch of whole groups, and the weight of its mean loss: n_mine / n_all ·
    world, so that DDP's average of the processes' gradients is the gradient of the mean over *all* the batch's
    pairs, as one process would take it (groups differ in size, so equal weights per process would not be). A
    process left without a group runs the first one at weight 0 (DDP needs its backward; it adds nothing)."""
    mine = list(groups[rank::world])
    n_all = sum(len(g.pairs) for g in groups)
    if not mine or not n_all:
        return list(groups[:1]), 0.0
    return mine, sum(len(g.pairs) for g in mine) / n_all * world


def batch_loss(scores: torch.Tensor, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics from the (N,) scores of a batch's candidates."""
    if not torch.isfinite(scores).all():
        raise FloatingPointError("the reward model produced non-finite scores (NaN/inf); "
                                 "lower the learning rate or check the inputs")
    dev = scores.device
    r_w, r_l = scores[batch.winners.to(dev)], scores[batch.losers.to(dev)]
    labels, margins = batch.labels.to(dev, scores.dtype), batch.margins.to(dev, scores.dtype)
    loss = pairwise_loss(r_w, r_l, labels, margins)
    with torch.no_grad():
        acc = pairwise_accuracy(r_w, r_l, labels)
    return loss, {"loss": loss.item(), "accuracy": acc.item(), "n_pairs": float(len(labels))}


@torch.no_grad()
def evaluate_pairs(score_fn: Scorer, batches) -> dict[str, float]:
    """Held-out loss, pairwise accuracy (ties half credit), ECE and mean |margin| over batches of
    groups. `score_fn(prompts, candidates)` is called once per batch."""
    r_w, r_l, ys, ms = [], [], [], []
    for groups in batches:
        b = PairBatch.from_groups(groups)
        s = score_fn(b.prompts, b.candidates).float().cpu()
        r_w.append(s[b.winners]), r_l.append(s[b.losers]), ys.append(b.labels), ms.append(b.margins)
    if not r_w:
        return {}
    r_w, r_l, y, m = torch.cat(r_w), torch.cat(r_l), torch.cat(ys), torch.cat(ms)
    return {
        "loss": pairwise_loss(r_w, r_l, y, m).item(),
        "accuracy": pairwise_accuracy(r_w, r_l, y).item(),
        "ece": expected_calibration_error(r_w, r_l, y),
        "mean_abs_margin": (r_w - r_l).abs().mean().item(),
        "n_pairs": float(len(y)),
    }


def as_scores(out, n: int, spec: str, unit: str = "samples", dtype: torch.dtype = torch.float32,
              role: str = "reward") -> torch.Tensor:
    """What a user's `module:function` reward (or judge) returned — a tensor, a list of numbers, a numpy array — as
    a (n,) tensor of `dtype` on the CPU, detached; anything else, or another count, is a ValueError naming it.
    (A list of floats converted straight to float64 keeps its precision.)"""
    try:
        scores = (out.detach().to("cpu", dtype) if torch.is_tensor(out) else torch.as_tensor(out, dtype=dtype)).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{role} {spec}: expected a list of {n} numbers (or a tensor), got {type(out).__name__} "
                         f"({e})") from None
    if scores.numel() != n:
        raise ValueError(f"{role} {spec}: returned {scores.numel()} scores for {n} {unit}")
    return scores


def normalizer_from_scores(scores: torch.Tensor) -> tuple[float, float]:
    """(shift, scale) such that (score − shift) has mean 0 on these scores, taken from samples of the
    reference policy (InstructGPT §3.5 and Ziegler et al. 2019 §2.2: normalise the RM so the reference
    policy's mean reward is 0; the scale is reported, applying it is the caller's choice)."""
    scores = scores.double().flatten()
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        raise ValueError("reward normalisation needs at least one finite score")
    std = scores.std(unbiased=False).item() if scores.numel() > 1 else 1.0
    return scores.mean().item(), std if std > 0 and math.isfinite(std) else 1.0


def pair_schedule(groups, max_pairs: int, epochs: float, seed: int) -> list[tuple[int, list]]:
    """(epoch, groups) for every optimiser step of a reward-model run: each epoch packs whole prompts into batches in
    a fresh seeded order. Next-fit packing of groups of different sizes gives a batch count that depends on the order,
    so it can differ between epochs: steps are listed, never derived as step // batches_per_epoch. A fractional last
    epoch trains that share of its batches (at least one)."""
    per_epoch = []
    n_full = math.ceil(epochs)
    for e in range(n_full):
        per_epoch.append([(e, b) for b in batch_groups(groups, max_pairs, shuffle=True, seed=seed * 1000 + e)])
    schedule = [s for ep in per_epoch[:int(epochs)] for s in ep]
    if epochs != int(epochs):
        schedule += per_epoch[-1][:max(1, int(len(per_epoch[-1]) * (epochs - int(epochs))))]
    if not schedule:
        raise ValueError("no training pairs (is the data file empty after the held-out split?)")
    return schedule


HELD_OUT_LABELS = {"loss": "loss (Bradley-Terry, nats per pair)", "accuracy": "pairwise accuracy (ties half)",
                   "ece": "ECE of σ(r_w − r_l) (10 bins)",
                   "mean_abs_margin": "mean absolute margin r_w − r_l (reward units)", "n_pairs": "pairs"}


def split_summary(train, held) -> str:
    """"11 prompts (88 ranked groups, 528 pairs) for training, 1 prompt (8 groups, 48 pairs) held out": a record
    (a pair or a ranking) is a group, and several groups may share a prompt, so both counts are given."""
    def part(groups) -> str:
        n_prompts = len({g.prompt for g in groups})
        return (f"{n_prompts} prompt{'s' * (n_prompts != 1)} ({len(groups)} ranked group{'s' * (len(groups) != 1)}, "
                f"{sum(len(g.pairs) for g in groups)} pairs)")
    return f"{part(train)} for training, {part(held)} held out"


def held_out_table(final: dict, history: dict | None = None, eval_fraction: float | None = None) -> str:
    """The RM report's table of held-out metrics (`evaluate_pairs`), labelled; without a held-out set (eval_fraction
    0, or too few prompts to split one off), a sentence saying so and the training loss and accuracy of the last
    logging window instead of an empty table."""
    if final:
        rows = "\n".join(f"| {HELD_OUT_LABELS.get(k, k)} | {int(v) if k == 'n_pairs' else f'{v:.4f}'} |"
                         for k, v in final.items())
        return f"| held-out metric | value |\n|---|---:|\n{rows}"
    why = f"eval_fraction={eval_fraction:g}" if eval_fraction is not None else "no held-out data"
    text = f"No held-out pairs ({why}): the reward model was not evaluated on unseen prompts."
    history = history or {}
    rows = [(name, history[key][-1][1]) for name, key in (("loss (Bradley-Terry, nats per pair)", "rm/loss"),
                                                           ("pairwise accuracy (ties half)", "rm/accuracy"))
            if history.get(key)]
    if rows:
        text += (" Training batches of the last logging window, which say little about generalisation:\n\n"
                 "| training metric (last log_every steps) | value |\n|---|---:|\n"
                 + "\n".join(f"| {name} | {v:.4f} |" for name, v in rows))
    return text
