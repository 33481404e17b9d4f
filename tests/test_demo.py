"""align.demo: the Gao et al. fit, the base-model cache, the verdict and the report (no models needed)."""
import math

import numpy as np
import pytest
import torch

from align.compare import Arm, compare_arms, default_pairs
from align.demo import WorldResult, cached, fit_gao, gao_curve, headline, summary, write_demo_report


def test_fit_gao_recovers_known_coefficients():
    alpha, beta = 0.8, 0.3
    d = np.linspace(0.0, 6.0, 25)
    kl = d ** 2
    gold = 0.25 + np.array([0.0 if x == 0 else x * (alpha - beta * math.log(x)) for x in d])  # offset: initial gold
    fit = fit_gao(kl, gold)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["d_peak"] == pytest.approx(math.exp(alpha / beta - 1.0))
    # the peak of R(d) = d(α − β log d): dR/dd = α − β − β log d = 0
    grid = np.linspace(0.01, 20, 200001)
    assert grid[np.argmax(gao_curve(alpha, beta, grid))] == pytest.approx(fit["d_peak"], rel=1e-3)


def test_fit_gao_by_hand_two_points():
    # two points with d = 1 and d = e: R(1) = α, R(e) = e(α − β) -> α = 0.5, β = 0.5 − 0.2/e
    e = math.e
    fit = fit_gao([0.0, 1.0, e ** 2], [1.0, 1.5, 1.2])
    assert fit["alpha"] == pytest.approx(0.5)
    assert fit["beta"] == pytest.approx(0.5 - 0.2 / e)


def test_fit_gao_needs_points():
    with pytest.raises(ValueError, match="≥ 3"):
        fit_gao([0.0, 1.0], [0.0, 1.0])


def test_cache_builds_once_and_fresh_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(d):
        calls.append(d)
        (d / "weights.txt").write_text(str(len(calls)))

    a, was = cached("thing", {"steps": 3}, build)
    assert not was and (a / "weights.txt").read_text() == "1"
    b, was = cached("thing", {"steps": 3}, build)
    assert was and b == a and len(calls) == 1
    c, was = cached("thing", {"steps": 4}, build)          # another config: another entry
    assert not was and c != a and len(calls) == 2
    d, was = cached("thing", {"steps": 3}, build, fresh=True)
    assert not was and d == a and (d / "weights.txt").read_text() == "3"


def test_cache_crash_mid_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))

    def crash(d):
        (d / "half.bin").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached("thing", {"k": 1}, crash)
    assert list((tmp_path / "cache").iterdir()) == []
    path, was = cached("thing", {"k": 1}, lambda d: (d / "ok").write_text("y"))
    assert not was and (path / "ok").exists() and not (path / "half.bin").exists()


def _result(scores: dict, tmp_path) -> WorldResult:
    arms = {name: Arm(name, name.split("-")[0], name.split("-")[1], [str(i) for i in range(len(v))], [0],
                      torch.tensor(v, dtype=torch.float64)[:, None]) for name, v in scores.items()}
    models = ["base", "aligned"]
    res = compare_arms(arms, default_pairs(models), success_threshold=1.0, n_boot=200)
    rows = [{"step": i, "kl": 0.5 * i, "proxy": 0.1 * i, "gold": 0.05 * i - 0.004 * i * i} for i in range(10)]
    return WorldResult("text", res, models, overopt=rows, sections=[("Samples", "![g](grid.png)")],
                       timings={"sft": 1.0}, out_dir=str(tmp_path / "text"))


def test_headline_and_report(tmp_path):
    n = 20
    good = _result({"base-plain": [0.0] * n, "base-engineered": [0.5] * n,
                    "aligned-plain": [1.0] * 15 + [0.0] * 5, "aligned-engineered": [1.0] * n}, tmp_path)
    h = headline(good)
    assert h["win_rate"] == pytest.approx(0.75)        # 15 wins, 5 losses
    assert h["gap_base"] == pytest.approx(0.5) and h["gap_aligned"] == pytest.approx(0.25)
    assert all(h["checks"].values())
    bad = _result({"base-plain": [0.0] * n, "base-engineered": [0.5] * n,
                   "aligned-plain": [1.0] * 10 + [0.0] * 10, "aligned-engineered": [1.0] * n}, tmp_path)
    checks = headline(bad)["checks"]
    assert list(checks.values()) == [True, False, False]   # mean 0.5 ≥ 0.5, 50% < 71%, gap 0.5 → 0.5
    path = write_demo_report([good, bad], tmp_path, 12.0)
    text = path.read_text()
    assert "FAIL" in text and "![g](text/grid.png)" in text and "overopt_text.png" in text
    assert (tmp_path / "overopt_text.png").stat().st_size > 1000
    assert "75.0%" in summary([good], 1.0)
