"""Each equation against a value computed independently: by hand, or a float64 naive loop."""
import math

import numpy as np
import pytest
import torch

from align.rl import (AdaptiveKLController, FixedKLController, PerPromptStatTracker, RunningMoments,
                      clipped_surrogate, clipped_value_loss, gae, group_advantages, kl_k1, kl_k2, kl_k3,
                      masked_mean, masked_var, masked_whiten)


def naive_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one episode at a time in float64, episodes of the given lengths."""
    B, T = len(rewards), len(rewards[0])
    adv = np.zeros((B, T))
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            total = 0.0
            for l in range(n - t):
                k = t + l
                v_next = values[b][k + 1] if k + 1 < n else 0.0
                delta = rewards[b][k] + gamma * v_next - values[b][k]
                total += (gamma * lam) ** l * delta
            adv[b, t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [7, 5, 1, 3]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
    expected = naive_gae(rewards.numpy(), values.numpy(), lengths, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), (expected + (values * mask).numpy()) * mask.numpy(), atol=1e-12)
    assert (adv[mask == 0] == 0).all()


def test_gae_by_hand():
    # one episode r = (0, 0, 1), V = (0.5, 0.5, 0.5), γ = 1, λ = 1  =>  Â_t = Σ r − V_t = 0.5
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))


def test_masked_stats_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(x, mask).item() == pytest.approx(vals.mean())
    assert masked_var(x, mask).item() == pytest.approx(vals.var(ddof=1))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(vals.var())
    w = masked_whiten(x, mask)
    expected = (vals - vals.mean()) / math.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask.bool()].numpy(), expected, atol=1e-12)
    assert (w[~mask.bool()] == 0).all()
    w2 = masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(w2[mask.bool()].numpy(), expected + vals.mean(), atol=1e-12)


def test_clipped_surrogate_ratio_one_is_minus_advantage():
    lp = torch.randn(5, 3)
    adv = torch.randn(5, 3)
    loss, stats = clipped_surrogate(lp, lp.clone(), adv, 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_clipped_surrogate_by_hand():
    # ratio 1.5 with A = +1 is clipped to 1.2 -> loss −1.2; ratio 0.5 with A = +1: min(0.5, 0.8)=0.5 -> −0.5
    # ratio 0.5 with A = −1: max(0.5, 0.8) -> loss +0.8;  ratio 1.5 with A = −1: loss +1.5 (unclipped is worse)
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.zeros(4, dtype=torch.float64)
    loss, stats = clipped_surrogate(ratios.log(), old, adv, 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    mask = torch.tensor([1, 0, 0, 1])
    loss_m, _ = clipped_surrogate(ratios.log(), old, adv, 0.2, mask)
    assert loss_m.item() == pytest.approx((-1.2 + 1.5) / 2)


def test_approx_kl_is_nonnegative_and_exact_for_tiny_ratios():
    """k3 = (r − 1) − log r ≥ 0: at DDPO's clip ranges (|log r| ~ 1e-4) float32 must not round it to noise or below 0."""
    torch.manual_seed(0)
    old = torch.randn(4096) * 3
    for scale in (1e-6, 1e-4, 1e-2, 0.3):
        new = old + torch.randn(4096) * scale                                      # float32, as DDPO's log-probs
        _, stats = clipped_surrogate(new, old, torch.ones(4096), 1e-4)
        lr = (new - old).double()
        exact = (torch.expm1(lr) - lr).mean().item()
        assert stats["approx_kl"].item() >= 0
        assert stats["approx_kl"].item() == pytest.approx(exact, rel=1e-4), scale


def test_clipped_value_loss_by_hand():
    old = torch.tensor([0.0, 0.0])
    values = torch.tensor([1.0, 0.1])
    returns = torch.tensor([1.0, 1.0])
    # first: unclipped (1−1)²=0, clipped (0.2−1)²=0.64 -> 0.64 ; second: (0.1−1)²=0.81 both -> 0.81
    loss, stats = clipped_value_loss(values, old, returns, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_kl_estimators_on_known_distributions():
    # q = N(0,1) (the sampler), p = N(0.5, 1): KL[q‖p] = 0.125.  All must be ~0 when p = q.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    logq = -0.5 * x ** 2
    logp = -0.5 * (x - 0.5) ** 2
    assert kl_k1(logq, logp).mean().item() == pytest.approx(0.125, abs=3e-3)
    assert kl_k3(logq, logp).mean().item() == pytest.approx(0.125, abs=3e-3)
    # k2 is biased: E[½ (log r)²] = ½·E[(0.5x − 0.125)²] = ½(0.25 + 0.015625)
    assert kl_k2(logq, logp).mean().item() == pytest.approx(0.5 * (0.25 + 0.125 ** 2), abs=3e-3)
    assert (kl_k2(logq, logp) >= 0).all() and (kl_k3(logq, logp) >= 0).all()
    for k in (kl_k1, kl_k2, kl_k3):
        assert k(logq, logq).abs().max().item() == 0.0


def test_kl_k3_by_hand():
    # log π = log 0.5, log π_ref = log 0.25  ->  r = 0.5, k3 = (0.5 − 1) − log 0.5
    lp, lr = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert kl_k3(lp, lr).item() == pytest.approx(-0.5 + math.log(2))
    assert kl_k1(lp, lr).item() == pytest.approx(math.log(2))
    assert kl_k2(lp, lr).item() == pytest.approx(0.5 * math.log(2) ** 2)


def test_adaptive_kl_controller_update():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 − 1) = 0.2 (clipped from 0.5); 256 episodes -> β = 0.2·(1 + 0.2·256/10000)
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = c.value
    # KL 5.4: e = −0.1 -> β·(1 − 0.1·100/10000)
    assert c.update(5.4, 100) == pytest.approx(before * (1 - 0.1 * 100 / 10000))
    before = c.value
    assert c.update(6.0, 1000) == pytest.approx(before)
    f = FixedKLController(0.05)
    assert f.update(100.0, 10) == 0.05
    with pytest.raises(ValueError, match="KL is nan"):
        c.update(float("nan"), 1)
    c2 = AdaptiveKLController(1.0, 6.0, 10000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value
    from align.rl.kl import make_kl_controller
    for bad in [(-0.1, True), (-0.1, False), (0.1, True, 0.0), (0.1, True, 6.0, 0.0)]:
        with pytest.raises(ValueError, match="kl_coef must be >= 0"):
            make_kl_controller(*bad)
    assert make_kl_controller(0.0, False).value == 0.0  # no leash at all is allowed


def test_running_moments_match_concatenation():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 17, 1, 40)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks).double()
    assert rm.mean == pytest.approx(allx.mean().item())
    assert rm.std == pytest.approx(allx.std(unbiased=False).item())
    assert rm.count == 63


def test_per_prompt_stat_tracker():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b"]
    r = torch.tensor([1.0, 3.0, 10.0])
    adv = t.update(prompts, r)
    # fewer than min_count per prompt -> batch statistics (population std)
    m, s = np.mean([1, 3, 10]), np.std([1, 3, 10])
    np.testing.assert_allclose(adv.numpy(), (np.array([1, 3, 10]) - m) / (s + 1e-6), rtol=1e-6)
    adv2 = t.update(["a", "b"], torch.tensor([5.0, 0.0]))
    # 'a' now has [1, 3, 5] buffered -> its own statistics; 'b' has 2 < 3 -> batch fallback
    a_m, a_s = 3.0, np.std([1, 3, 5])
    assert adv2[0].item() == pytest.approx((5 - a_m) / (a_s + 1e-6), rel=1e-6)
    assert adv2[1].item() == pytest.approx((0 - 2.5) / (2.5 + 1e-6), rel=1e-6)
    t.update(["a", "a"], torch.tensor([7.0, 9.0]))
    assert list(t.stats["a"]) == [3.0, 5.0, 7.0, 9.0]  # buffer keeps the last 4
    with pytest.raises(ValueError, match="non-finite"):
        t.update(["a"], torch.tensor([float("nan")]))


def test_group_advantages_by_hand():
    """Two groups of 3: centred by their own mean, scaled by the population std of all centred values."""
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0]), 3)
    # centred: [-1, 0, 1, -1, -1, 2]; population std = sqrt(8/6)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0], dtype=torch.float64) / ((8 / 6) ** 0.5 + 1e-6)
    torch.testing.assert_close(adv, expected.float())
    assert adv.reshape(2, 3).sum(1).abs().max() < 1e-6          # zero mean in every group
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.ones(6), 1)
    with pytest.raises(ValueError, match="non-finite rewards at batch positions \\[4\\]"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 6.0]), 2)


def test_check_finite_rewards_names_the_reward_prompt_and_where():
    """One check for text PPO and image DDPO: silent on finite rewards; else the spec, the first bad value and its
    prompt, how many, and where the run stopped; a reward's own ValueError is re-raised with that place."""
    from align.rl import check_finite_rewards
    check_finite_rewards(torch.tensor([0.0, -1e30, 2.0]), ["a", "b", "c"], "r", "never shown")
    where = "iteration 3: nothing was updated, the last checkpoint is intact"
    with pytest.raises(FloatingPointError, match=r"^reward 'mod:fn' returned inf for prompt 'b' \(2 non-finite of 3\); "
                                                 r"iteration 3: nothing was updated"):
        check_finite_rewards(torch.tensor([0.0, float("inf"), float("nan")]), ["a", "b", "c"], "mod:fn", where)
    with pytest.raises(FloatingPointError, match=r"^NaN score for 'c' \(iteration 3: ") as info:
        check_finite_rewards(torch.tensor([float("nan")]), ["c"], "mod:fn", where, ValueError("NaN score for 'c'"))
    assert isinstance(info.value.__cause__, ValueError)
