"""align.demo: the Gao et al. fit, the base-model cache, the verdict and the report (no models needed)."""
import math

import numpy as np
import pytest
import torch

from align.compare import Arm, compare_arms, default_pairs
from align.demo import WorldResult, cached, config_key, fit_gao, gao_curve, headline, summary, write_demo_report


def test_fit_gao_recovers_known_coefficients():
    alpha, beta = 0.8, 0.3
    d = np.linspace(0.0, 6.0, 25)
    kl = d ** 2
    gold = 0.25 + np.array([0.0 if x == 0 else x * (alpha - beta * math.log(x)) for x in d])  # offset: initial gold
    fit = fit_gao(kl, gold)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r0"] == pytest.approx(0.25, abs=1e-9)
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


def test_fit_gao_estimates_the_initial_gold_instead_of_trusting_the_first_batch():
    """The first point is one noisy batch: before, every gain was measured from it, and a batch 0.15 high bent
    the whole curve (α 0.80 → 0.68, β 0.30 → 0.24 here). The intercept is now fitted with α and β: 0.76, 0.28, and
    the first point, the only one at d = 0, still pulls the intercept a third of its error (0.25 → 0.30)."""
    alpha, beta, g0 = 0.8, 0.3, 0.25
    d = np.linspace(0.0, 6.0, 41)
    gold = g0 + np.array([0.0 if x == 0 else x * (alpha - beta * math.log(x)) for x in d])
    gold[0] += 0.15
    fit = fit_gao(d ** 2, gold)
    assert fit["r0"] == pytest.approx(g0, abs=0.06)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.05) and fit["beta"] == pytest.approx(beta, abs=0.025)
    r = gold[1:] - gold[0]  # the old estimate, from the first point: farther off
    old_alpha, old_beta = np.linalg.lstsq(np.stack([d[1:], -d[1:] * np.log(d[1:])], 1), r, rcond=None)[0]
    assert abs(old_alpha - alpha) > 0.1 and abs(old_beta - beta) > 0.05
    # KL estimates ≤ 0 (k1 noise of a policy at the reference) count at d = 0
    fit = fit_gao(np.concatenate([[0.0, -0.01], d[1:] ** 2]), np.concatenate([[g0, g0], gold[1:]]))
    assert fit["n_at_zero"] == 2 and fit["r0"] == pytest.approx(g0, abs=1e-9)


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
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == []   # the build lock stays
    path, was = cached("thing", {"k": 1}, lambda d: (d / "ok").write_text("y"))
    assert not was and (path / "ok").exists() and not (path / "half.bin").exists()



def test_cache_rebuilds_a_damaged_entry(tmp_path, monkeypatch, caplog):
    """A truncated model file in a cached entry crashed the next stage deep inside safetensors
    ("invalid header length"); the marker now lists the files' sizes and hashes, and a damaged entry is rebuilt."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(d):
        calls.append(d)
        (d / "model.safetensors").write_bytes(b"w" * 100)

    path, _ = cached("thing", {"k": 1}, build)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with caplog.at_level("WARNING", logger="align.demo"):
        again, was = cached("thing", {"k": 1}, build)
    assert not was and again == path and len(calls) == 2
    assert (path / "model.safetensors").read_bytes() == b"w" * 100
    assert "model.safetensors changed since it was built" in caplog.text
    assert cached("thing", {"k": 1}, build)[1] and len(calls) == 2   # intact again: used as is
    (path / "align-cache.json").write_text('{"k": 1}')   # an entry from before markers listed files: trusted
    assert cached("thing", {"k": 1}, build)[1] and len(calls) == 2


def test_cache_two_builders_build_once(tmp_path, monkeypatch):
    """Two demos sharing a cache both trained the base model, and the second to finish deleted the first's
    entry (rmtree, then rename) while the first was loading it. Now the second waits for the first's build
    and uses it; a temp folder left by a killed build is cleared."""
    import threading
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / f".thing-{config_key({'k': 1})}.tmp-999999"
    stale.mkdir(parents=True)
    started, release, calls = threading.Event(), threading.Event(), []

    def slow_build(d):
        calls.append(d)
        started.set()
        release.wait(10)
        (d / "w").write_text("first")

    got = {}
    first = threading.Thread(target=lambda: got.update(first=cached("thing", {"k": 1}, slow_build)))
    second = threading.Thread(target=lambda: got.update(second=cached("thing", {"k": 1}, slow_build)))
    first.start()
    assert started.wait(10)
    second.start()
    second.join(0.3)
    assert second.is_alive()   # waiting on the first's lock, not building a copy
    release.set()
    first.join(10), second.join(10)
    assert len(calls) == 1 and got["first"] == (got["second"][0], False) and got["second"][1]
    assert (got["first"][0] / "w").read_text() == "first" and not stale.exists()


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


def _drawn_figures(monkeypatch):
    """The matplotlib Figures saved while the test runs (the plot writers return only a path)."""
    from matplotlib.figure import Figure
    seen, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (seen.append(self), save(self, *a, **k))[1])
    return seen


def test_overopt_legend_and_title_leave_the_data_alone(tmp_path, monkeypatch):
    """The legend covered the proxy points (loc="best" sees only the gold axis); now it is under the axes."""
    from align.demo import plot_overopt
    figs = _drawn_figures(monkeypatch)
    kl = np.concatenate([[0.0], np.linspace(0.02, 9, 40)])
    d = np.sqrt(kl)
    rows = [{"kl": float(k), "gold": float(0.5 + x * (0.08 - 0.05 * np.log(max(x, 1e-9)))), "proxy": float(0.1 + 0.3 * x)}
            for k, x in zip(kl, d)]
    fit = fit_gao(kl, [r["gold"] for r in rows])
    assert plot_overopt(rows, fit, tmp_path / "o.png", "text: proxy RM vs gold").read_bytes()[:4] == b"\x89PNG"
    fig = figs[-1]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = (fig.legends or [a.get_legend() for a in fig.axes if a.get_legend()])[0].get_window_extent(r)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(r))


def test_curves_title_clears_the_first_panel(tmp_path, monkeypatch):
    from align.report import plot_curves
    figs = _drawn_figures(monkeypatch)
    history = {"a": [(1, 1e-9), (2, -5e-9), (3, 2e-9)], "b": [(0, 1.0), (2, 2.0), (4, 3.0)]}
    plot_curves(history, ["a", "b"], tmp_path / "c.png", title="PPO report", xlabel="iteration")
    fig = figs[-1]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    top = fig.axes[0].get_tightbbox(r)  # the panel with its tick labels and its offset text (1e−9)
    assert fig._suptitle.get_window_extent(r).y0 >= top.y1
    assert fig.axes[0].get_window_extent(r).y0 > fig.axes[1].get_tightbbox(r).y1  # panels do not overlap
    assert all(float(t).is_integer() for t in fig.axes[1].get_xticks())
    assert fig.axes[-1].get_xlabel() == "iteration"


def test_report_reads_no_peak_off_a_poor_gao_fit(tmp_path):
    """A fit with R² ≈ 0 (per-batch gold noise) named a peak "at KL 0.0 nats"; now it says the fit explains little,
    and steps whose batch KL estimate is ≤ 0 are counted as left out."""
    n = 8
    r = _result({"base-plain": [0.0] * n, "base-engineered": [0.5] * n, "aligned-plain": [1.0] * n,
                 "aligned-engineered": [1.0] * n}, tmp_path)
    gold = [0.15, 0.24, 0.17, 0.19, 0.30, 0.16, 0.23, 0.18, 0.29, 0.17]
    r.overopt = [{"step": i, "kl": [0, -0.01, 0.02, 0.0, 0.03, 0.05, 0.04, 0.06, 0.08, 0.09][i], "proxy": 0.0,
                  "gold": g} for i, g in enumerate(gold)]
    text = write_demo_report([r], tmp_path, 1.0).read_text()
    assert "explains little" in text and "peaks at" not in text
    assert "2 later step(s) had a batch KL estimate ≤ 0" in text
    good = _result({"base-plain": [0.0] * n, "base-engineered": [0.5] * n, "aligned-plain": [1.0] * n,
                    "aligned-engineered": [1.0] * n}, tmp_path)
    d = np.linspace(0, 3, 12)
    good.overopt = [{"step": i, "kl": float(x * x), "proxy": 0.0, "gold": float(x * (0.3 - 0.2 * math.log(max(x, 1e-9))))}
                    for i, x in enumerate(d)]
    text = write_demo_report([good], tmp_path, 1.0).read_text()
    assert f"peaks at d = {math.exp(0.3 / 0.2 - 1):.3g}" in text


def test_run_demo_replaces_only_its_own_world_folders(tmp_path, monkeypatch):
    """`--preset smal` deleted out/text (the previous run) before the world rejected the preset, and `--out DIR`
    deleted any DIR/text or DIR/image, demo run or not. Now presets are checked first, and only folders a demo
    wrote (its marker, or an older run's outputs) are replaced; with them goes the old report, which a run
    stopped early left behind, describing folders that no longer existed."""
    import sys
    import types

    from align import demo
    world = types.ModuleType("fake_world")
    world.PRESETS = {"small": None}
    world.run = lambda out, **kw: _result({"base-plain": [0.0] * 4, "base-engineered": [0.5] * 4,
                                           "aligned-plain": [1.0] * 4, "aligned-engineered": [1.0] * 4}, out.parent)
    monkeypatch.setitem(sys.modules, "fake_world", world)
    monkeypatch.setattr(demo, "WORLDS", {"text": "fake_world"})
    out = tmp_path / "runs"
    (out / "text").mkdir(parents=True)
    (out / "text" / "photo.jpg").write_text("mine")
    with pytest.raises(ValueError, match="not an `align demo` world run"):
        demo.run_demo(["text"], out, preset="small", progress=False)
    assert (out / "text" / "photo.jpg").read_text() == "mine"
    (out / "text" / "eval_responses.jsonl").write_text("")   # what a run from before the marker wrote
    with pytest.raises(ValueError, match="unknown preset 'smal' for the text world"):
        demo.run_demo(["text"], out, preset="smal", progress=False)
    assert (out / "text" / "photo.jpg").exists()
    demo.run_demo(["text"], out, preset="small", progress=False)
    assert not (out / "text" / "photo.jpg").exists() and (out / "text" / demo.WORLD_MARKER).is_file()
    assert (out / "report.md").is_file() and (out / "overopt_text.png").is_file()
    def interrupted(out, **kw):
        raise KeyboardInterrupt

    world.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(["text"], out, preset="small", progress=False)   # its own folder: replaced ...
    assert not (out / "report.md").exists() and not (out / "overopt_text.png").exists()   # ... with its old report
