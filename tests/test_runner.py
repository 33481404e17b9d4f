"""Run infrastructure: config merging and errors, atomic checkpoints, run folders, metrics, reports."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from align.config import ConfigError, config_dict, import_function, load_config, save_config
from align.rl.config import LoraParams, PPOParams
from align.report import markdown_table, write_report
from align.runner import (CheckpointManager, RunDirError, RunLogger, WindowMean, atomic_write_json,
                          atomic_write_text, peak_rss_mb, plot_curves, prepare_out_dir,
                          progress, seed_everything)


@dataclass
class PPOCfg:
    clip_range: float = 0.2
    epochs: int = 4
    gamma: float = 1.0


@dataclass
class TrainCfg:
    model: str = "tiny"
    lr: float = 1e-3
    out: Optional[Path] = None
    ppo: PPOCfg = field(default_factory=PPOCfg)


def _yaml(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- config

def test_config_merge_order(tmp_path):
    path = _yaml(tmp_path, "model: from_yaml\nlr: 0.5\nppo:\n  clip_range: 0.1\n  epochs: 2\n")
    cfg = load_config(TrainCfg, path, overrides=["ppo.epochs=7", "lr=0.25"],
                      model="from_field", lr=0.75, out=None, **{"ppo.clip_range": 0.3})
    assert isinstance(cfg, TrainCfg) and isinstance(cfg.ppo, PPOCfg)
    assert cfg.model == "from_field"      # field beats yaml
    assert cfg.lr == 0.25                 # override beats field beats yaml
    assert cfg.ppo.clip_range == 0.3      # dotted field beats yaml
    assert cfg.ppo.epochs == 7            # override beats yaml
    assert cfg.ppo.gamma == 1.0           # default survives
    assert cfg.out is None                # None field = not given
    assert load_config(TrainCfg) == TrainCfg()


def test_config_unknown_key_names_key_and_file(tmp_path):
    path = _yaml(tmp_path, "ppo:\n  cliprange: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainCfg, path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and "unknown key 'ppo.cliprange'" in msg
    assert "did you mean 'ppo.clip_range'" in msg


def test_config_bad_type_and_bad_override(tmp_path):
    path = _yaml(tmp_path, "ppo:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: .*'ppo\.epochs'"):
        load_config(TrainCfg, path)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainCfg, overrides=["ppo.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        load_config(TrainCfg, overrides=["lrr=1"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(TrainCfg, tmp_path / "missing.yaml")
    assert issubclass(ConfigError, ValueError)


def test_config_yaml_bools_in_string_fields(tmp_path):
    """mixed_precision=no must stay 'no' (YAML 1.1 reads a bare no as False, a str field would get 'False')."""
    cfg = load_config(TrainCfg, overrides=["model=no", "ppo.epochs=3"])
    assert cfg.model == "no" and cfg.ppo.epochs == 3
    path = _yaml(tmp_path, "model: no\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: 'model' is a string.*boolean False: quote it"):
        load_config(TrainCfg, path)
    assert load_config(TrainCfg, _yaml(tmp_path, "model: 'no'\n", "y.yaml")).model == "no"


def test_config_yaml_syntax_error_names_line_and_problem(tmp_path):
    """PyYAML's first line ("while constructing a mapping") says neither where nor what: a line pasted twice, a tab."""
    with pytest.raises(ConfigError, match=r"x\.yaml: cannot parse YAML: line 3, column 1: found duplicate key lr$"):
        load_config(TrainCfg, _yaml(tmp_path, "lr: 0.1\nmodel: m\nlr: 0.2\n"))
    with pytest.raises(ConfigError, match=r"line 2, column 1: found character .* \(a tab: YAML indents with spaces\)"):
        load_config(TrainCfg, _yaml(tmp_path, "ppo:\n\tepochs: 2\n"))



def test_config_interpolation_escape_saves_and_reloads_literally(tmp_path):
    """${...} is OmegaConf's interpolation (${lr}; ${oc.env:HOME}); a missing key says how to write a literal ${.
    A literal one (\\${) is saved so that config.yaml loads back to the same text, where saving used to fail."""
    cfg = load_config(TrainCfg, overrides=["model=runs/${lr}"])
    assert cfg.model == "runs/0.001"
    with pytest.raises(ConfigError, match=r"'model': Interpolation key 'HOME' not found .*oc\.env:HOME.*is a literal"):
        load_config(TrainCfg, overrides=["model=$HOME ${HOME}"])
    assert load_config(TrainCfg, overrides=["model=cost \\${x}"]).model == "cost ${x}"
    for text in ("cost ${x}", "a \\${y} b \\\\${z}", "plain"):
        cfg = TrainCfg(model=text)
        save_config(cfg, tmp_path / "c.yaml")
        assert load_config(TrainCfg, tmp_path / "c.yaml").model == text
        assert config_dict(cfg)["model"] == text

@dataclass
class PeerCfg:
    """Nested like text PPO's config: ppo.kl.kl_coef beside ppo.vf_coef, a LoRA group with a list field."""
    lr: float = 1e-5
    pretrained: str | None = "laion2b"
    ppo: PPOParams = field(default_factory=PPOParams)
    lora: LoraParams = field(default_factory=LoraParams)


@pytest.mark.parametrize("key,meant", [
    ("ppo.kl_coef", "ppo.kl.kl_coef"),  # not ppo.vf_coef, the closest spelling among ppo's own keys
    ("mini_batch_size", "ppo.mini_batch_size"), ("learning_rate", "lr"), ("train_learning_rate", "lr"),
    ("init_kl_coef", "ppo.kl.kl_coef"), ("lora_r", "lora.r"), ("lora.rank", "lora.r"), ("cliprange", "ppo.clip_range"),
    ("train.learning_rate", "lr"), ("sample.mini_batch_size", "ppo.mini_batch_size")])  # ddpo-pytorch's nesting
def test_config_unknown_key_suggests_the_same_name_elsewhere_or_a_peer_librarys(key, meant):
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' \(did you mean '{meant}'\?\)"):
        load_config(PeerCfg, overrides=[f"{key}=1"])


def test_config_list_field_given_a_scalar_and_a_group_given_a_value(tmp_path):
    """Each names the key and what it expects, in one line (OmegaConf's own messages name no key for the second)."""
    for source in ({"config_path": _yaml(tmp_path, "lora: {target_modules: all-linear}\n")},
                   {"overrides": ["lora.target_modules=all-linear"]}):
        with pytest.raises(ConfigError, match=r"'lora.target_modules': expected a list such as \[a, b\], got 'all-linear'"):
            load_config(PeerCfg, **source)
    for source in ({"config_path": _yaml(tmp_path, "lora: 16\n", "y.yaml")}, {"overrides": ["lora=16"]}):
        with pytest.raises(ConfigError, match=r"'lora' is a group of settings \(lora.r, .*\), not a value: set them by name") as err:
            load_config(PeerCfg, **source)
        assert "\n" not in str(err.value)
    assert load_config(PeerCfg, overrides=["lora.target_modules=[c_attn]"]).lora.target_modules == ["c_attn"]


def test_config_null_override_unsets_an_optional_string():
    """pretrained=null is None, as `pretrained: null` in a YAML file (an image RM preset's tag, unset for a model
    without one); a plain str field keeps the text."""
    assert load_config(PeerCfg, overrides=["pretrained=null"]).pretrained is None
    assert load_config(PeerCfg, overrides=["pretrained=~"]).pretrained is None
    assert load_config(PeerCfg, overrides=["pretrained=no"]).pretrained == "no"
    assert load_config(TrainCfg, overrides=["model=null"]).model == "null"


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(TrainCfg, out=tmp_path / "run", overrides=["ppo.gamma=0.9"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "!!python" not in (tmp_path / "config.yaml").read_text()
    assert load_config(TrainCfg, tmp_path / "config.yaml") == cfg
    d = config_dict(cfg)
    assert d["ppo"]["gamma"] == 0.9 and d["out"] == str(tmp_path / "run")
    json.dumps(d)


# ---------------------------------------------------------------------------- atomic files

def test_import_function_from_working_directory_and_file(tmp_path, monkeypatch):
    """module:function finds a module in the working directory (as `python -m` does, also from the `align`
    script, whose sys.path does not hold it), and file.py:function loads a file anywhere."""
    import sys
    (tmp_path / "align_test_cwd_rewards.py").write_text("def score(p, x):\n    return [1.0] * len(p)\nNOT_FN = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_function("align_test_cwd_rewards:score", "reward")(["a", "b"], None) == [1.0, 1.0]
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    (sub / "judge.py").write_text("def gold(p, x):\n    return [2.0] * len(p)\n")
    monkeypatch.chdir(sub.parent.parent)
    assert import_function(f"{sub / 'judge.py'}:gold", "judge")(["a"], None) == [2.0]
    for spec, msg in [("no_such_module_xyz:f", "reward 'no_such_module_xyz:f': cannot import 'f'"),
                      ("align_test_cwd_rewards:missing", "cannot import 'missing'"),
                      ("align_test_cwd_rewards:NOT_FN", "is not callable"),
                      (f"{tmp_path / 'nope.py'}:f", "no such file"), ("score", "expected module:function")]:
        with pytest.raises(ValueError, match=msg):
            import_function(spec, "reward")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "two"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.json"]
    with pytest.raises(TypeError):  # a failed serialisation keeps the old file, adds nothing
        atomic_write_json(tmp_path / "sub" / "b.json", {"x": object()})
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.json"]


# ---------------------------------------------------------------------------- checkpoints

def _writer(text):
    return lambda d: (d / "model.bin").write_text(text)


def test_checkpoint_save_latest_prune(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        path = ckpt.save(step, _writer(f"w{step}"), {"epoch": step // 10})
        assert path.name == f"step-{step:08d}"
    assert ckpt.latest() == tmp_path / "checkpoints" / "step-00000030"
    assert (ckpt.latest() / "model.bin").read_text() == "w30"
    assert ckpt.load_state(ckpt.latest()) == {"epoch": 3, "step": 30}
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000020", "step-00000030"]
    # re-saving an existing step replaces it in place
    ckpt.save(30, _writer("again"), {})
    assert (ckpt.latest() / "model.bin").read_text() == "again"
    # keep=1 keeps only the newest
    CheckpointManager(tmp_path, keep=1).save(40, _writer("w40"), {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000040"]


def test_checkpoint_crash_keeps_previous(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, _writer("good"), {})

    def crash(d):
        (d / "model.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(2, crash, {})
    assert ckpt.latest().name == "step-00000001"
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_checkpoint_latest_survives_stale_tmp(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(5, _writer("w5"), {})
    # a killed process left a half-written folder (with no rename) and the pointer is gone
    stale = tmp_path / "checkpoints" / ".tmp-step-00000009-99999"
    stale.mkdir()
    (stale / "state.json").write_text('{"step": 9}')
    assert ckpt.latest().name == "step-00000005"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt.latest().name == "step-00000005"
    # a pointer to a folder that is gone falls back to the highest complete step
    (tmp_path / "checkpoints" / "latest").write_text("step-00000007\n")
    assert ckpt.latest().name == "step-00000005"
    ckpt.save(6, _writer("w6"), {})
    assert not stale.exists()


def _real_writer(step):
    """The files a trainer's checkpoint holds: a torch.save zip, safetensors, JSON."""
    import torch
    from safetensors.torch import save_file

    def write(d):
        (d / "model").mkdir()
        save_file({"w": torch.full((64,), float(step))}, str(d / "model" / "model.safetensors"))
        (d / "model" / "config.json").write_text('{"model_type": "gpt2"}')
        torch.save({"m": torch.zeros(64)}, d / "optimizer.pt")
    return write


def test_resume_skips_a_damaged_newest_checkpoint_and_names_what_is_wrong(tmp_path, caplog):
    """A file system that lost data after the rename (a node crash on NFS, a full disk under a lying fsync) left a
    checkpoint cut short or emptied: --resume loaded it and died in a torch.load traceback, or named no file."""
    import shutil
    damages = {"optimizer.pt": lambda f: f.write_bytes(f.read_bytes()[:100]),
               "model/model.safetensors": lambda f: f.write_bytes(b""),
               "model/config.json": lambda f: f.unlink(),
               "state.json": lambda f: f.write_text('{"st')}
    for rel, damage in damages.items():
        out = tmp_path / rel.replace("/", "_")
        ckpt = CheckpointManager(out, keep=3)
        for step in (1, 2, 3):
            ckpt.save(step, _real_writer(step), {"epoch": 0})
        damage(out / "checkpoints" / "step-00000003" / rel)
        caplog.clear()
        assert ckpt.resumable().name == "step-00000002", rel
        assert f"step-00000003 is damaged ({rel}" in caplog.text
        assert (out / "checkpoints" / "damaged-step-00000003").is_dir()  # kept to look at, out of the way
        assert ckpt.latest().name == "step-00000002"
        ckpt.save(3, _real_writer(3), {})  # the resumed run saves step 3 anew; damaged-* is never pruned
        assert ckpt.resumable().name == "step-00000003" and (out / "checkpoints" / "damaged-step-00000003").is_dir()
        shutil.rmtree(out)
    # without save's list of sizes (an older checkpoint) the files' own headers still tell a cut one
    ckpt = CheckpointManager(tmp_path / "old")
    ckpt.save(1, _real_writer(1), {})
    state = ckpt.step_dir(1) / "state.json"
    state.write_text(json.dumps({"step": 1}))
    assert CheckpointManager.damage(ckpt.step_dir(1)) is None
    f = ckpt.step_dir(1) / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert "model/model.safetensors" in CheckpointManager.damage(ckpt.step_dir(1))
    # nothing whole left: a clear error, not a run from scratch over the old one
    with pytest.raises(RunDirError, match=r"every checkpoint .* is damaged \(step-00000001: model/model.safetensors"):
        ckpt.resumable()
    assert CheckpointManager(tmp_path / "none").resumable() is None


def test_checkpoint_write_error_of_a_full_disk_is_one_clear_oserror(tmp_path):
    """On a full disk torch.save raises RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos
    144384 vs 144276") (measured on a 1.4 MB tmpfs): the CLI showed a traceback and no word of the disk."""
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, _writer("good"), {})

    def full(d):
        (d / "model.bin").write_text("half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 144384 vs 144276")

    with pytest.raises(OSError, match=r"writing checkpoint step-00000002 failed .*disk full.*step-00000001 is intact"):
        ckpt.save(2, full, {})
    assert ckpt.resumable().name == "step-00000001" and not list((tmp_path / "checkpoints").glob(".tmp-*"))

    def bug(d):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes"):  # not a file system error: as it was
        ckpt.save(2, bug, {})


def test_checkpoint_non_main_does_nothing(tmp_path):
    assert CheckpointManager(tmp_path, is_main=False).save(1, _writer("x"), {}) is None
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------- run folder

def test_prepare_out_dir(tmp_path, caplog):
    out = tmp_path / "run"
    assert prepare_out_dir(out, resume=False) == out and out.is_dir()
    assert prepare_out_dir(out, resume=False) == out  # empty folder: fine
    (out / "metrics.jsonl").write_text("")  # a run stopped before its first step (e.g. a bad input)
    (out / "config.yaml").write_text("lr: 1\n")
    assert prepare_out_dir(out, resume=False) == out
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        prepare_out_dir(out, resume=False)
    assert (out / "metrics.jsonl").exists()  # nothing deleted
    with caplog.at_level("WARNING"):
        prepare_out_dir(out, resume=True)
    assert "starting from scratch" in caplog.text
    out2 = tmp_path / "run2"
    CheckpointManager(out2).save(3, None, {})
    with pytest.raises(RunDirError):
        prepare_out_dir(out2, resume=False)
    assert prepare_out_dir(out2, resume=True) == out2


# ---------------------------------------------------------------------------- metrics

def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logger_writes_and_resumes(tmp_path):
    log = RunLogger(tmp_path)
    for step in (1, 2, 3, 4):
        log.log(step, {"loss": 1.0 / step, "reward": float(step)})
    log.log(5, {"loss": float("nan")})  # never crashes; NaN is null in JSON
    # flushed on each call: readable before close
    rows = _rows(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "loss": 1.0, "reward": 1.0} and rows[-1] == {"step": 5, "loss": None}
    assert math.isnan(log.history["loss"][-1][1])
    log.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    log = RunLogger(tmp_path, resume_step=2)
    assert log.history["reward"] == [(1, 1.0), (2, 2.0)]
    log.log(3, {"reward": 30.0})
    log.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert _rows(tmp_path / "metrics.jsonl")[-1]["reward"] == 30.0


def test_run_logger_non_main_is_noop(tmp_path):
    log = RunLogger(tmp_path / "r", is_main=False)
    log.log(1, {"x": 1.0})
    log.close()
    assert log.history == {} and not (tmp_path / "r").exists()


def test_window_mean_is_the_mean_since_the_last_pop():
    import torch
    w = WindowMean()
    for loss, acc in ((0.9, 0.25), (0.5, 1.0), (torch.tensor(0.1), 0.5)):
        w.add({"loss": loss, "acc": acc})
    assert w.pop() == pytest.approx({"loss": 0.5, "acc": 1.75 / 3})
    w.add({"loss": 2.0})
    assert w.pop() == {"loss": 2.0}  # a fresh window
    with pytest.raises(TypeError, match="metric 'loss' must be a number"):
        w.add({"loss": "high"})


def test_plot_curves_png(tmp_path):
    history = {"loss": [(1, 2.0), (2, 1.0), (3, float("nan"))], "kl": [(1, 0.1), (2, 0.2)]}
    path = plot_curves(history, ["loss", "kl", "absent"], tmp_path / "curves.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(history, ["absent"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------- report & misc

def test_markdown_table():
    rows = [{"model": "base", "score": 0.12345, "n": 3}, {"model": "a|b", "score": float("nan")}]
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | score | n |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| base | 0.123 | 3 |"
    assert lines[3] == r"| a\|b | nan |  |"
    assert markdown_table(rows, columns=["score"], floatfmt=".1f").splitlines()[2] == "| 0.1 |"


def test_write_report(tmp_path):
    (tmp_path / "curves.png").write_bytes(b"png")
    path = write_report(tmp_path, "PPO run", [("Results", "| a |\n|---|\n| 1 |"), ("Notes", "ok")],
                        images=[tmp_path / "curves.png"])
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert text.startswith("# PPO run\n")
    assert "## Results\n\n| a |" in text and "## Notes\n\nok" in text
    assert "![curves](curves.png)" in text
    assert text.index("## Results") < text.index("## Notes")


def test_misc_helpers():
    import torch

    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert peak_rss_mb() > 10
    assert list(progress(range(3), disable=True)) == [0, 1, 2]
    assert list(progress(range(2), is_main=False)) == [0, 1]


def test_make_accelerator_refuses_an_unknown_precision_and_the_process_goes_on():
    from align.runner import make_accelerator
    with pytest.raises(ValueError, match="mixed_precision must be no, fp16 or bf16, got 'fp8'"):
        make_accelerator("fp8")
    assert make_accelerator("no").mixed_precision == "no"  # accelerate's process-wide state was not left half-made
