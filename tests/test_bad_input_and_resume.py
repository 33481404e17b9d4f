"""What a demanding new user tries: inputs that look almost right, odd settings, and resuming in the wrong
place or after a crash. Each must stop with one clear line (file:line: field where there is one) or carry on
with nothing lost or duplicated."""
import json

import pytest
import torch

from align.cli import main as cli
from align.config import ConfigError, load_config
from align.data import DataError, load_prompts
from align.runner import RunDirError, prepare_out_dir
from align.session import check_resume_batch, check_resume_config
from text_rlhf.ppo import RewardFn
from text_rlhf.rm import RMConfig
from text_rlhf.sft import SFTConfig


def run_cli(args, caplog):
    caplog.clear()
    return cli(args), caplog.text


@pytest.fixture
def demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {a} and 1:", "response": f" {a + 1}"}) + "\n"
                            for a in range(8)))
    return path


def test_prompts_files_name_the_line_of_an_empty_prompt_or_of_bad_bytes(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt': empty"):
        load_prompts(path)
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a cat\r\n\xff\xfe a dog\n")
    with pytest.raises(DataError, match=r"p.txt:2: not UTF-8"):
        load_prompts(txt)
    txt.write_bytes(b"\xef\xbb\xbfa cat\r\n\r\na dog\n")  # BOM, CRLF, a blank line
    assert load_prompts(txt) == ["a cat", "a dog"]


def test_a_stage_block_that_is_empty_or_not_a_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  sft:\n    # epochs: 3\n")
    assert load_config(SFTConfig, f, section="sft") == SFTConfig()
    f.write_text("stages:\n  sft: [1]\n")
    with pytest.raises(ConfigError, match=r"c.yaml \(stages.sft\): expected a mapping"):
        load_config(SFTConfig, f, section="sft")
    for text in ("stages:\n", "stages: [sft]\n"):  # every block commented out; a list
        f.write_text(text)
        with pytest.raises(ConfigError, match=r"c.yaml: 'stages:' must map each command to its block"):
            load_config(SFTConfig, f, section="sft")
    f.write_text("stages:\n  sft: {epochs: 1}\n")  # a preset given to a command without stages (align compare)
    with pytest.raises(ConfigError, match=r"c.yaml: a preset with one block per training command \(stages: sft\)"):
        load_config(SFTConfig, f)


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_out_dir(tmp_path / "f", resume=False)


def test_resume_into_another_commands_folder_is_refused_before_anything_is_written(tmp_path, caplog):
    from align.config import save_config
    out = tmp_path / "run"
    sft = SFTConfig(model="m", data="d", out=str(out))
    save_config(sft, out / "config.yaml")
    before = (out / "config.yaml").read_text()
    with pytest.raises(RunDirError, match="another command"):
        check_resume_config(RMConfig(model="m", data="d", out=str(out)), out)
    assert (out / "config.yaml").read_text() == before
    with caplog.at_level("WARNING"):
        check_resume_config(SFTConfig(model="m", data="d", out=str(out), lr=1e-3), out)
    assert "lr: 0.0001 -> 0.001" in caplog.text


def test_sft_names_the_line_of_a_too_long_prompt_and_refuses_bad_sizes(tiny_gpt2, demos, tmp_path, caplog):
    long = json.dumps({"prompt": "the quick brown fox " * 60, "response": " x"})
    lines = demos.read_text().splitlines()
    demos.write_text("\n".join(lines[:5] + [long] + lines[5:]) + "\n")
    base = ["text", "sft", "--model", tiny_gpt2, "--data", str(demos), "max_length=32"]
    code, text = run_cli(base + ["--out", str(tmp_path / "a")], caplog)
    assert code == 2 and "demos.jsonl:6: field 'prompt'" in text and "max_length=32" in text
    assert not (tmp_path / "a").exists()  # before the run folder exists
    for bad in ("batch_size=-1", "batch_size=0", "log_every=0", "eval_fraction=1.5", "epochs=0"):
        code, text = run_cli(base + ["max_length=512", bad, "--out", str(tmp_path / "b")], caplog)
        assert code == 2 and bad.split("=")[0] in text, (bad, text)  # (batch_size=-1 looped forever)



def test_rm_refuses_bad_sizes_before_the_run_folder(tiny_gpt2, tmp_path, caplog):
    """eval_fraction=-0.5 silently held out half the prompts; epochs=0 stopped with "no training pairs (is the data
    file empty ...?)" and max_pairs_per_batch=0 with "max_pairs must be a positive int", both after the run folder."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"add {i} and 1:", "chosen": f" {i + 1}", "rejected": " 0"}) + "\n"
                             for i in range(1, 9)))
    base = ["text", "rm", "--model", tiny_gpt2, "--data", str(prefs), "--out", str(tmp_path / "rm")]
    for bad in ("eval_fraction=-0.5", "eval_fraction=1", "epochs=0", "max_pairs_per_batch=0"):
        code, text = run_cli(base + [bad], caplog)
        assert code == 2 and f"rm: {bad.split('=')[0]} must be" in text, (bad, text)
        assert not (tmp_path / "rm").exists()

def test_sft_resume_falls_back_from_a_damaged_checkpoint_and_refuses_another_global_batch(tiny_gpt2, demos, tmp_path,
                                                                                            caplog):
    """A checkpoint cut short after a crash was loaded (a torch.load traceback); a resume with another global batch
    (batch_size, or the processes of accelerate launch) read step N as another place in the data and the schedule."""
    out = tmp_path / "sft"
    base = ["text", "sft", "--model", tiny_gpt2, "--data", str(demos), "--out", str(out), "batch_size=2",
            "save_every=1", "log_every=1", "eval_fraction=0", "epochs=1"]
    assert cli(base) == 0
    ckpts = out / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-00000003", "step-00000004"]
    (ckpts / "step-00000004" / "optimizer.pt").write_bytes(b"")
    code, text = run_cli(base + ["--resume"], caplog)
    assert code == 0 and "step-00000004 is damaged (optimizer.pt: 0 bytes" in text and "resuming from step-00000003" in text, text
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    code, text = run_cli(base + ["batch_size=4", "--resume"], caplog)
    assert code == 2 and "global batches of 2, this run's would be 4" in text and "batch_size=2 on 1 processes" in text
    check_resume_batch({"step": 3, "global_batch": 8}, ("batch_size", 4), 2)  # 1 process × 8 = 2 × 4: the same run
    with pytest.raises(RunDirError, match="resume with batch_size=4 on 2 processes"):
        check_resume_batch({"step": 3, "global_batch": 8}, ("batch_size", 8), 2)


def test_ppo_reward_function_of_the_wrong_type_is_named(tiny_gpt2):
    from text_rlhf.models import load_tokenizer
    tok = load_tokenizer(tiny_gpt2)
    for name, needle in (("returns_none", "NoneType"), ("returns_strings", "list")):
        with pytest.raises(ValueError, match=rf"reward rewards:{name}: expected a list of 2 numbers.*{needle}"):
            RewardFn(f"rewards:{name}", tok, "cpu", 4)(["a", "b"], ["x", "y"], None, None)
    out = RewardFn("rewards:returns_leaf_with_grad", tok, "cpu", 4)(["a", "b"], ["x", "y"], None, None)
    assert not out.requires_grad  # it would make the update backward through it twice


def test_ppo_save_every_0_checkpoints_at_the_end_and_resume_keeps_samples_once(tiny_gpt2, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add 2 and 3:\nthe quick brown\na red\n")
    out = tmp_path / "ppo"
    base = ["text", "ppo", "--policy", tiny_gpt2, "--reward", "rewards:short", "--prompts", str(prompts),
            "--out", str(out), "batch_size=4", "ppo.mini_batch_size=4", "max_new_tokens=4", "log_samples=2"]
    code, text = run_cli(base + ["iterations=2", "save_every=0"], caplog)  # was a ZeroDivisionError
    assert code == 0, text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    # a crash after iteration 3's samples were appended, before its checkpoint: resume redoes iteration 3
    with open(out / "samples.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "prompt": "p", "response": "lost", "score": 0.0}) + "\n")
    assert cli(base + ["iterations=3", "save_every=0", "--resume"]) == 0
    its = [json.loads(l)["iteration"] for l in (out / "samples.jsonl").read_text().splitlines()]
    assert its == [1, 1, 2, 2, 3, 3]
    # resumed with fewer iterations than its checkpoint: nothing would train and the report would say 2 (refused)
    report = (out / "report.md").read_text()
    code, text = run_cli(base + ["iterations=2", "save_every=0", "--resume"], caplog)
    assert code == 2 and "at iteration 3, past this config's last iteration 2 (iterations)" in text, text
    assert (out / "report.md").read_text() == report


def test_resume_with_other_lora_or_model_stops_with_one_line_and_keeps_the_runs_config(tiny_gpt2, tiny_llama,
                                                                                        tmp_path, caplog):
    """`--resume iterations=4` without the run's --config rebuilt the model with the defaults (lora.r 4 -> 0): torch's
    "loaded state dict contains a parameter group that doesn't match..." (another rank: a size-mismatch traceback),
    and config.yaml was already overwritten with the wrong settings, so not even `--config OUT/config.yaml` helped."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add 2 and 3:\nthe quick brown\n")
    out = tmp_path / "ppo"
    base = ["text", "ppo", "--reward", "rewards:short", "--prompts", str(prompts), "--out", str(out),
            "batch_size=4", "ppo.mini_batch_size=4", "max_new_tokens=4"]
    assert cli(base + ["--policy", tiny_gpt2, "lora.r=4", "iterations=1"]) == 0
    saved = (out / "config.yaml").read_text()
    code, text = run_cli(base + ["--policy", tiny_gpt2, "iterations=2", "--resume"], caplog)
    assert code == 2 and "lora.r: 4 -> 0" in text and f"--config {out / 'config.yaml'}" in text, text
    code, text = run_cli(base + ["--policy", tiny_llama, "lora.r=4", "iterations=2", "--resume"], caplog)
    assert code == 2 and "does not fit the model" in text and "Traceback" not in text, text
    assert (out / "config.yaml").read_text() == saved  # a resume that did not load leaves the run's settings
    code, text = run_cli(["text", "ppo", "--out", str(out), "--config", str(out / "config.yaml"), "iterations=2",
                          "--resume"], caplog)
    assert code == 0, text
    assert "iterations: 2" in (out / "config.yaml").read_text()


def test_ddpo_grid_before_training_survives_a_crash_before_the_first_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from align.rl.config import LoraParams
    from image_rlhf.ddpo import DDPOConfig, run_ddpo
    from image_rlhf.tiny import tiny_sd_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "ddpo"
    cfg = DDPOConfig(pipeline=str(tiny_sd_pipeline(tmp_path / "sd", sample_size=16)),
                     reward="image_rewards:nan_when_flagged", prompts=str(prompts), out=str(out), epochs=1,
                     sample_batch_size=4, num_batches_per_epoch=1, train_batch_size=4, num_steps=3,
                     lora=LoraParams(r=0), grid_seeds=[0], grid_every=1, save_every=1, buffer_size=0)
    monkeypatch.setenv("ALIGN_TEST_NAN_REWARD", "1")
    with pytest.raises(FloatingPointError):
        run_ddpo(cfg)  # the grid of the base model is logged at step 0, then epoch 1 stops
    assert (out / "grids" / "epoch-000.png").exists() and not (out / "checkpoints").exists()
    monkeypatch.delenv("ALIGN_TEST_NAN_REWARD")
    (out / "grids" / "epoch-007.png").write_bytes(b"")  # a grid of the crashed run's lost part
    run_ddpo(cfg, resume=True)  # no checkpoint: starts over, metrics.jsonl afresh
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["epoch-000.png", "epoch-001.png"]
    assert rows[0]["grid/reward"] is not None and torch.isfinite(torch.tensor(rows[0]["grid/reward"]))


def test_ppo_stops_before_a_non_finite_loss_reaches_the_weights_or_a_checkpoint(tiny_gpt2, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add 2 and 3:\nthe quick brown\na red\n")
    out = tmp_path / "ppo"
    args = ["text", "ppo", "--policy", tiny_gpt2, "--reward", "rewards:vowels", "--prompts", str(prompts),
            "--out", str(out), "batch_size=4", "ppo.mini_batch_size=2", "max_new_tokens=4", "iterations=3",
            "save_every=1", "lr=1e9"]
    code, text = run_cli(args, caplog)  # was: NaN weights checkpointed, then a traceback in generate
    assert code == 2 and "loss is not finite" in text, text
    for ckpt in (out / "checkpoints").glob("step-*"):
        state = torch.load(ckpt / "policy.pt")
        assert all(torch.isfinite(v.float()).all() for v in state.values()), ckpt


def test_a_folder_given_as_a_data_file_and_bad_threads_are_one_line(tiny_gpt2, tmp_path, caplog):
    code, text = run_cli(["text", "sft", "--model", tiny_gpt2, "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                         caplog)
    assert code == 2 and "Is a directory" in text  # was an IsADirectoryError traceback
    with pytest.raises(SystemExit):
        cli(["text", "sft", "--model", tiny_gpt2, "--data", str(tmp_path), "--threads", "-1"])



def test_a_safetensors_error_is_one_line(tiny_gpt2, demos, tmp_path, caplog):
    """safetensors raises its own SafetensorError, not OSError, for "No space left on device" while saving and for
    a truncated file: both were tracebacks."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(100)
    code, text = run_cli(["text", "sft", "--model", str(model), "--data", str(demos), "--out", str(tmp_path / "o")],
                         caplog)
    assert code == 2 and "deserializing header" in text

def test_rm_eval_data_is_checked_before_the_run_folder_exists(tiny_gpt2, tmp_path, caplog):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "a good", "rejected": "a bad"}) + "\n")
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}) + "\n")
    code, text = run_cli(["text", "rm", "--model", tiny_gpt2, "--data", str(prefs), "--out", str(tmp_path / "o"),
                          f"eval_data={bad}"], caplog)
    assert code == 2 and "eval.jsonl:1: field 'completions[2]'" in text
    assert not (tmp_path / "o").exists()


def test_image_candidates_a_folder_and_a_float_image(tmp_path):
    import numpy as np
    from PIL import Image

    from align.data import load_preferences
    from image_rlhf.rm import decode_image
    grey = (np.arange(256, dtype=np.float32).reshape(16, 16) / 255)  # a 32-bit float TIFF in [0, 1]
    Image.fromarray(grey).save(tmp_path / "f.tiff")
    Image.fromarray((grey * 255).round().astype(np.uint8)).save(tmp_path / "g.png")
    assert torch.equal(decode_image(tmp_path / "f.tiff", (16, 16)), decode_image(tmp_path / "g.png", (16, 16)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "g.png", "rejected": "imgs"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'rejected': a folder, not a file"):
        load_preferences(tmp_path / "p.jsonl", candidates="path")


def test_hub_ids_without_the_hub_fail_in_seconds(tmp_path, monkeypatch, caplog, demos):
    """Offline without HF_HUB_OFFLINE, a hub id (a typo of a folder, or a model not cached) failed after
    huggingface_hub's retries: 52 s for `align text sft --model gpt2-typo`. The hub is probed once, and the
    miss fails at once, as the text commands and DDPO's --pipeline see it."""
    import time

    import huggingface_hub.constants as hub

    import align.runner
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(align.runner, "_HUB_OFFLINE", None)
    (tmp_path / "p.txt").write_text("a red circle\n")
    start = time.perf_counter()
    code, text = run_cli(["text", "sft", "--model", "gpt2-not-cached", "--data", str(demos), "--out",
                          str(tmp_path / "sft")], caplog)
    assert code == 2 and "unreachable" in text and "gpt2-not-cached" in text
    code, text = run_cli(["image", "ddpo", "--pipeline", "org/sd-not-cached", "--reward", "jpeg", "--prompts",
                          str(tmp_path / "p.txt"), "--out", str(tmp_path / "ddpo")], caplog)
    assert code == 2 and "org/sd-not-cached" in text
    assert hub.HF_HUB_OFFLINE and time.perf_counter() - start < 15
    assert not (tmp_path / "sft").exists() and not (tmp_path / "ddpo").exists()
