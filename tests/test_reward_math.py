import math

import pytest
import torch

from align.reward import (PairBatch, batch_loss, evaluate_pairs, expected_calibration_error,
                          normalizer_from_scores, pairwise_accuracy, pairwise_loss, shard_groups)


def test_equal_scores_give_log2():
    r = torch.tensor([0.3, -1.0, 2.0])
    assert pairwise_loss(r, r.clone()).item() == pytest.approx(math.log(2))
    assert pairwise_loss(r, r.clone(), labels=torch.full((3,), 0.5)).item() == pytest.approx(math.log(2))


def test_bt_loss_by_hand():
    rw, rl = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    assert pairwise_loss(rw, rl).item() == pytest.approx(math.log1p(math.exp(-1.5)))
    # margin 1: d = 0.5
    assert pairwise_loss(rw, rl, margins=torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(
        math.log1p(math.exp(-0.5)))
    # tie: −½ log σ(1.5) − ½ log σ(−1.5)
    sig = lambda z: 1 / (1 + math.exp(-z))
    tie = pairwise_loss(rw, rl, labels=torch.tensor([0.5], dtype=torch.float64)).item()
    assert tie == pytest.approx(-0.5 * math.log(sig(1.5)) - 0.5 * math.log(sig(-1.5)))


def test_tie_loss_minimised_at_equal_scores():
    d = torch.tensor([0.0], requires_grad=True)
    pairwise_loss(d, torch.zeros(1), labels=torch.tensor([0.5])).backward()
    assert d.grad.item() == pytest.approx(0.0)


def test_accuracy_ties_half_credit():
    rw = torch.tensor([1.0, 0.0, 0.0, 5.0])
    rl = torch.tensor([0.0, 1.0, 0.0, -5.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.5])
    # right, wrong, equal (half), tie (half)
    assert pairwise_accuracy(rw, rl, labels).item() == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_ece_perfectly_calibrated_is_small():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200_000, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(d.shape, generator=g, dtype=torch.float64) < torch.sigmoid(d)).double()
    assert expected_calibration_error(d, torch.zeros_like(d), y) < 0.01
    assert expected_calibration_error(d * 5, torch.zeros_like(d), y) > 0.05


class _G:
    def __init__(self, prompt, candidates, pairs):
        self.prompt, self.candidates, self.pairs = prompt, candidates, pairs


class _P:
    def __init__(self, winner, loser, label=1.0, margin=0.0):
        self.winner, self.loser, self.label, self.margin = winner, loser, label, margin


def test_pair_batch_scores_each_candidate_once():
    groups = [_G("p1", ["a", "b", "c"], [_P(0, 1), _P(0, 2), _P(1, 2)]), _G("p2", ["d", "e"], [_P(1, 0, 0.5)])]
    b = PairBatch.from_groups(groups)
    assert b.candidates == ["a", "b", "c", "d", "e"] and b.prompts == ["p1"] * 3 + ["p2"] * 2
    assert b.winners.tolist() == [0, 0, 1, 4] and b.losers.tolist() == [1, 2, 2, 3]
    calls = []

    def score(prompts, cands):
        calls.append(len(cands))
        return torch.tensor([{"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0, "e": 0.0}[c] for c in cands])

    m = evaluate_pairs(score, [groups])
    assert calls == [5]
    assert m["accuracy"] == pytest.approx((3 + 0.5) / 4)
    loss, stats = batch_loss(score(b.prompts, b.candidates), b)
    assert stats["n_pairs"] == 4
    with pytest.raises(FloatingPointError, match="non-finite"):
        batch_loss(torch.tensor([float("nan")] * 5), b)


def test_sharded_groups_weigh_every_pair_as_one_process_would():
    """DDP averages the processes' gradients: with each process's mean loss weighted n_mine / n_all · world, the
    average is the mean over all pairs. Before, each process's mean counted equally (groups of 3 + 1 pairs on one
    process and 1 on the other weighted that 1 pair like 4), and a process without a group re-ran the first one."""
    sizes = [3, 1, 1, 2, 6]
    groups = [_G(f"p{i}", ["a"] * (n + 1), [_P(0, 1)] * n) for i, n in enumerate(sizes)]
    per_pair = torch.arange(sum(sizes), dtype=torch.float64) ** 1.5     # any per-pair losses
    start = {id(g): sum(sizes[:i]) for i, g in enumerate(groups)}
    for world in (1, 2, 3, 4, 7):
        total = 0.0
        for rank in range(world):
            mine, w = shard_groups(groups, rank, world)
            mean = torch.cat([per_pair[start[id(g)]:start[id(g)] + len(g.pairs)] for g in mine]).mean()
            total += w * mean / world                                       # DDP: the average over processes
        assert float(total) == pytest.approx(float(per_pair.mean()), rel=1e-12), world
    mine, w = shard_groups(groups[:1], 1, 2)                                # no group for rank 1: a stand-in at 0
    assert mine == groups[:1] and w == 0.0


def test_normalizer():
    shift, scale = normalizer_from_scores(torch.tensor([1.0, 3.0]))
    assert shift == 2.0 and scale == 1.0
    with pytest.raises(ValueError):
        normalizer_from_scores(torch.tensor([float("inf")]))
