#!/usr/bin/env python
"""PPO iteration throughput: align (`text_rlhf.ppo.run_ppo`) vs the TRL peer, at the peer's settings.

Settings (those of /work/shared/peers/ppo_peer.py): tiny random GPT-2 (n_layer=2, n_head=4,
n_embd=128, vocab 512, WordLevel tokenizer), random reward model (GPT2ForSequenceClassification,
num_labels=1, its own seed), 64 prompts × 16 tokens per iteration, 32 sampled tokens, no stop token,
4 PPO epochs of 1 mini-batch (64), fp32, lr 1e-5, `--threads` torch threads, OMP_WAIT_POLICY=PASSIVE.

Every measurement is a fresh child process (peer, align value_model=head, align value_model=separate,
alternating in that order for `--rounds` rounds), so peak RSS is per run: ru_maxrss of the child,
read with os.wait4 by this driver (which never imports torch, so it adds nothing to the children).

Timing. The peer reports samples/s = samples / train_wall_s (all of PPOTrainer.train(): every
iteration with its logging and bookkeeping, no model building). align is timed the same way: wall
time from the creation of run_ppo's progress bar (models, reward model, optimizer already built) to
its close after the last iteration, minus the time spent in run.checkpoint (the final save, which
run_ppo does on the last iteration even with save_every huge). That includes per-iteration logging
(metrics.jsonl, TensorBoard, samples.jsonl). The per-phase times (generate / score / update) are the
sums of run_ppo's own `time/*_s` fields from metrics.jsonl; `other` = loop − their sum. If the hooks
cannot be installed (run_ppo changed shape), the sum of the `time/*` fields is used instead and the
`timing` column says so.

Noise. The box is shared: before each run the driver waits (up to `--wait-idle` s) for the other
processes to use < `--idle-cores` cores, and the `others' cores` column is how many cores everything
else used *during* that run (machine-wide busy time from /proc/stat minus the child's own CPU time).
Runs with others' cores well above 0 were contended; compare paired rounds, and prefer an idle box.
`init s` is not comparable across systems: the peer's is PPOTrainer.__init__ only, align's is
everything in run_ppo before the loop (loading the policy, reference, reward model, optimizer).

    python scripts/bench_text_ppo.py --rounds 3 --iters 10 --threads 1 --json /tmp/bench_ppo.json

The last line printed is `ratio samples/s align/peer: X.XX` (value_model=head vs the peer, median of
the per-round ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SETTINGS = dict(vocab=512, n_layer=2, n_head=4, n_embd=128, n_positions=128, batch=64, prompt_len=16,
                new_tokens=32, ppo_epochs=4, mini_batch=64, lr=1e-5, seed=0)


# ------------------------------------------------------------------------------------------ setup (child)

def setup_main(out: str, n_prompts: int) -> None:
    """Build the policy folder, reward-model folder and prompts.jsonl (runs in a child: imports torch)."""
    import copy

    import numpy as np
    import torch
    from transformers import GPT2ForSequenceClassification

    from text_rlhf.tiny import build_wordlevel_tokenizer, tiny_causal_lm

    s = SETTINGS
    out = Path(out)
    tok = build_wordlevel_tokenizer(s["vocab"])
    assert len(tok) == s["vocab"], len(tok)
    policy = tiny_causal_lm("gpt2", tok, n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                            n_positions=s["n_positions"], seed=s["seed"])
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    rcfg = copy.deepcopy(policy.config)
    rcfg.num_labels = 1
    rcfg.architectures = None
    torch.manual_seed(s["seed"] + 1)  # as the peer: the RM has its own seed
    rm = GPT2ForSequenceClassification(rcfg)
    rm.save_pretrained(out / "reward")
    tok.save_pretrained(out / "reward")
    rng = np.random.default_rng(s["seed"])
    ids = rng.integers(3, s["vocab"], size=(n_prompts, s["prompt_len"])).tolist()  # as the peer: no specials
    inv = {i: t for t, i in tok.get_vocab().items()}
    with open(out / "prompts.jsonl", "w") as f:
        for row in ids:
            text = " ".join(inv[i] for i in row)
            enc = tok(text)["input_ids"]
            assert enc == row, (text, enc, row)  # exactly prompt_len tokens, no BOS/EOS added
            f.write(json.dumps({"prompt": text}) + "\n")
    (out / "stamp.json").write_text(json.dumps({**s, "n_prompts": n_prompts}))


def ensure_setup(workdir: Path, n_prompts: int, python: str, threads: int) -> Path:
    d = workdir / "setup"
    stamp = d / "stamp.json"
    want = {**SETTINGS, "n_prompts": n_prompts}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    r = bc.run_child([python, __file__, "--_setup", str(d), "--_n-prompts", str(n_prompts)],
                     bc.child_env(threads, {"PYTHONPATH": str(REPO)}), timeout=600, log_path=workdir / "setup.log")
    if r["rc"] != 0:
        sys.exit(f"setup failed (rc {r['rc']}):\n{r['stderr'][-3000:]}")
    return d


# ------------------------------------------------------------------------------------------ align run (child)

def align_child_main(spec: dict) -> None:
    t_script0 = time.perf_counter()
    import dataclasses
    import logging

    import torch

    threads = spec["threads"]
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    import text_rlhf.ppo as ppo_mod
    from align.rl.config import PPOParams
    from text_rlhf.ppo import PPOConfig, run_ppo

    s = SETTINGS
    marks = {"ckpt_s": 0.0, "ckpt_n": 0, "log_t": []}
    hooks = {"progress": bc.hook_loop(ppo_mod, marks), "start_run": False}
    orig_start_run = getattr(ppo_mod, "start_run", None)
    if orig_start_run is not None:
        ppo_mod.start_run = lambda *a, **kw: bc.time_run(orig_start_run(*a, **kw), marks)
        hooks["start_run"] = True

    want = dict(policy=spec["policy"], reward=spec["reward"], prompts=spec["prompts"], out=spec["out"],
                iterations=spec["iters"], batch_size=s["batch"], max_prompt_length=128,
                max_new_tokens=s["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, stop_at_eos=False,
                lr=s["lr"], value_model=spec["value_model"], seed=s["seed"], mixed_precision="no",
                gradient_checkpointing=False, save_every=10 ** 9, reward_batch_size=s["batch"],
                ppo=PPOParams(ppo_epochs=s["ppo_epochs"], mini_batch_size=s["mini_batch"]))
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    dropped = sorted(k for k in want if k not in names)
    cfg = PPOConfig(**{k: v for k, v in want.items() if k in names})

    t_call0 = time.perf_counter()
    run_ppo(cfg)
    t_call1 = time.perf_counter()

    rows = []
    mpath = Path(spec["out"]) / "metrics.jsonl"
    if mpath.exists():
        rows = [json.loads(l) for l in mpath.read_text().splitlines() if l.strip()]

    def tsum(key):
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        return sum(vals) if vals else None

    gen, score, upd = tsum("time/generate_s"), tsum("time/score_s"), tsum("time/update_s")
    phases = sum(v for v in (gen, score, upd) if v is not None)
    if "loop0" in marks and "loop1" in marks:
        loop_s = marks["loop1"] - marks["loop0"] - marks["ckpt_s"]
        timing = "loop"
    else:
        loop_s = phases
        timing = "time/* sum"
    samples = spec["iters"] * s["batch"]
    last = rows[-1] if rows else {}
    res = {
        "bench": "align_ppo",
        "value_model": spec["value_model"],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "iterations": spec["iters"],
        "iterations_logged": len(rows),
        "timing": timing,
        "hooks": hooks,
        "config_fields_dropped": dropped,
        "load_s": round((marks.get("loop0", t_call0) - t_call0), 3),
        "loop_s": round(loop_s, 3),
        "phase_sum_s": round(phases, 3),
        "generate_s": None if gen is None else round(gen, 3),
        "score_s": None if score is None else round(score, 3),
        "update_s": None if upd is None else round(upd, 3),
        "other_s": round(loop_s - phases, 3),
        "checkpoint_s": round(marks["ckpt_s"], 3),
        "checkpoints": marks["ckpt_n"],
        "finish_s": round(t_call1 - marks.get("loop1", t_call1), 3),
        "samples_per_s": round(samples / loop_s, 3) if loop_s else None,
        "first_iter_s": round(marks["log_t"][0] - marks["loop0"], 3) if marks["log_t"] and "loop0" in marks else None,
        "rss_loop_mb": round(marks["rss_loop_mb"], 1) if "rss_loop_mb" in marks else None,
        "peak_rss_self_mb": round(bc.self_rss_mb(), 1),
        "final_raw_score": last.get("env/raw_score"),
        "final_kl": last.get("objective/kl"),
        "response_length": last.get("env/response_length"),
        "script_wall_s": round(time.perf_counter() - t_script0, 3),
    }
    print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------ driver

SYSTEMS = {"peer": "peer (TRL)", "head": "align head", "separate": "align separate"}


def run_peer(a, workdir: Path, rnd: int) -> dict:
    cmd = [a.peer_python, a.peer_script, "--iters", str(a.iters), "--threads", str(a.threads),
           "--workdir", str(workdir / "peer_run")]
    busy0 = bc.wait_idle(a.idle_cores, a.wait_idle)
    r = bc.run_child(cmd, bc.child_env(a.threads, {"PEER_DIR": bc.peer_dir()}), a.timeout,
                     log_path=workdir / f"peer_r{rnd}.log")
    j = bc.parse_json_line(r["stdout"], "samples_per_s")
    row = {"system": "peer", "round": rnd, "rc": r["rc"], "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
           "busy_before": busy0, "other_cores": r["other_cores"], "cpu_s": r["cpu_s"]}
    if r["rc"] != 0 or j is None:
        row["error"] = (r["stderr"] or r["stdout"])[-2000:]
        return row
    row.update({"samples_per_s": j["samples_per_s"], "loop_s": j["train_wall_s"], "generate_s": j["generate_s"],
                "score_s": round(j["rollout_s"] - j["generate_s"], 3), "update_s": j["update_and_other_s"],
                "other_s": None, "load_s": j.get("trainer_init_s"), "rss_loop_mb": j.get("peak_rss_mb"),
                "timing": "train_wall", "raw": j})
    return row


def run_align(a, workdir: Path, setup: Path, value_model: str, rnd: int) -> dict:
    out = workdir / f"align_{value_model}_run"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"policy": str(setup / "policy"), "reward": str(setup / "reward"), "prompts": str(setup / "prompts.jsonl"),
            "out": str(out), "iters": a.iters, "threads": a.threads, "value_model": value_model}
    busy0 = bc.wait_idle(a.idle_cores, a.wait_idle)
    r = bc.run_child([a.align_python, __file__, "--_child", json.dumps(spec)],
                     bc.child_env(a.threads, {"PYTHONPATH": str(REPO)}), a.timeout,
                     log_path=workdir / f"align_{value_model}_r{rnd}.log")
    j = bc.parse_json_line(r["stdout"], "samples_per_s")
    row = {"system": value_model, "round": rnd, "rc": r["rc"], "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
           "busy_before": busy0, "other_cores": r["other_cores"], "cpu_s": r["cpu_s"]}
    if r["rc"] != 0 or j is None:
        row["error"] = (r["stderr"] or r["stdout"])[-2000:]
        return row
    row.update({k: j.get(k) for k in ("samples_per_s", "loop_s", "generate_s", "score_s", "update_s", "other_s",
                                      "load_s", "rss_loop_mb", "timing")})
    row["raw"] = j
    return row


def rss_baseline(python: str, threads: int) -> float | None:
    """Peak RSS of `import torch, transformers` alone in that interpreter (context for the RSS column)."""
    r = bc.run_child([python, "-c", "import torch, transformers; torch.zeros(1)"], bc.child_env(threads), 300)
    return round(r["peak_rss_mb"], 1) if r["rc"] == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--configs", default="head,separate", help="align value_model settings to run (comma list)")
    p.add_argument("--no-peer", action="store_true", help="align only (no ratios)")
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "align-bench-ppo"))
    p.add_argument("--align-python", default=sys.executable)
    p.add_argument("--peer-python", default=bc.peer_python())
    p.add_argument("--peer-script", default=bc.peer_script("ppo_peer.py"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    p.add_argument("--wait-idle", type=float, default=60,
                   help="before each run, wait up to this many seconds for the rest of the machine to go idle")
    p.add_argument("--idle-cores", type=float, default=0.3, help="'idle' = other processes use fewer cores than this")
    p.add_argument("--_setup", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_n-prompts", dest="n_prompts", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._setup:
        return setup_main(a._setup, a.n_prompts)
    if a._child:
        return align_child_main(json.loads(a._child))

    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in configs:
        if c not in ("head", "separate"):
            sys.exit(f"--configs: unknown value_model {c!r}")
    if not a.no_peer and not os.path.exists(a.peer_python):
        sys.exit(f"peer interpreter {a.peer_python} missing: run `bash /work/shared/peers/setup.sh` "
                 f"(PEER_DIR={bc.peer_dir()}) or pass --no-peer")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # as many distinct prompts as the peer uses (iters × batch); each iteration takes 64 of them
    setup = ensure_setup(workdir, a.iters * SETTINGS["batch"], a.align_python, a.threads)

    s = SETTINGS
    print(f"# PPO bench: gpt2 n_layer={s['n_layer']} n_head={s['n_head']} n_embd={s['n_embd']} vocab={s['vocab']}; "
          f"{s['batch']} prompts x {s['prompt_len']} tok, {s['new_tokens']} new tok, no stop token, "
          f"{s['ppo_epochs']} epochs x 1 mini-batch of {s['mini_batch']}, fp32, lr {s['lr']}; "
          f"{a.iters} iterations, {a.threads} thread(s), OMP_WAIT_POLICY=PASSIVE; {a.rounds} rounds; "
          f"cpus={os.cpu_count()}", flush=True)
    base = {"align": rss_baseline(a.align_python, a.threads)}
    if not a.no_peer:
        base["peer"] = rss_baseline(a.peer_python, a.threads)
    print(f"# RSS of `import torch, transformers` alone: " + ", ".join(f"{k} {v} MB" for k, v in base.items()),
          flush=True)

    order = ([] if a.no_peer else ["peer"]) + configs
    rows = []
    for rnd in range(1, a.rounds + 1):
        for system in order:
            row = run_peer(a, workdir, rnd) if system == "peer" else run_align(a, workdir, setup, system, rnd)
            rows.append(row)
            if "error" in row:
                print(f"# {SYSTEMS[system]} round {rnd} FAILED (rc {row['rc']}):\n{row['error']}", flush=True)
            else:
                print(f"# round {rnd} {SYSTEMS[system]}: {row['samples_per_s']:.2f} samples/s, "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)

    cols = [("name", "run", 0), ("round", "round", 0), ("samples_per_s", "samples/s", 2), ("loop_s", "loop s", 2),
            ("generate_s", "generate s", 2), ("score_s", "score s", 2), ("update_s", "update s", 2),
            ("other_s", "other s", 2), ("load_s", "init s", 2), ("peak_rss_mb", "peak RSS MB", 0),
            ("rss_loop_mb", "RSS@loop end MB", 0), ("other_cores", "others' cores", 2), ("timing", "timing", 0)]
    for r in rows:
        r["name"] = SYSTEMS[r["system"]]
    print()
    print(bc.table([r for r in rows if "error" not in r], cols))

    med = {}
    for system in order:
        ok = [r for r in rows if r["system"] == system and "error" not in r]
        med[system] = {k: bc.median(r.get(k) for r in ok) for k in
                       ("samples_per_s", "loop_s", "generate_s", "score_s", "update_s", "other_s", "load_s",
                        "peak_rss_mb", "rss_loop_mb", "other_cores")}
        med[system].update(name=f"median {SYSTEMS[system]}", round=len(ok))
    print()
    mcols = [(k, h, d) for k, h, d in cols if k not in ("timing",)]
    mcols[1] = ("round", "n", 0)
    print(bc.table([med[s_] for s_ in order], mcols))

    ratios = {}
    if not a.no_peer:
        print()
        for system in configs:
            paired = []
            for rnd in range(1, a.rounds + 1):
                pr = [r for r in rows if r["system"] == "peer" and r["round"] == rnd and "error" not in r]
                ar = [r for r in rows if r["system"] == system and r["round"] == rnd and "error" not in r]
                if pr and ar:
                    paired.append(ar[0]["samples_per_s"] / pr[0]["samples_per_s"])
            m_a, m_p = med[system], med["peer"]
            ratios[system] = {
                "samples_per_s_paired_median": bc.median(paired),
                "samples_per_s_paired": paired,
                "samples_per_s_of_medians": (m_a["samples_per_s"] / m_p["samples_per_s"])
                if m_a["samples_per_s"] and m_p["samples_per_s"] else None,
                "peak_rss": (m_a["peak_rss_mb"] / m_p["peak_rss_mb"]) if m_a["peak_rss_mb"] and m_p["peak_rss_mb"] else None,
            }
            rr = ratios[system]
            print(f"{SYSTEMS[system]} / peer: samples/s x{bc.fmt(rr['samples_per_s_paired_median'])} (median of "
                  f"per-round ratios {', '.join(f'{x:.2f}' for x in paired)}; ratio of medians "
                  f"x{bc.fmt(rr['samples_per_s_of_medians'])}), peak RSS x{bc.fmt(rr['peak_rss'])} "
                  f"({bc.fmt(m_a['peak_rss_mb'], 0)} vs {bc.fmt(m_p['peak_rss_mb'], 0)} MB)")

    if a.json:
        Path(a.json).write_text(json.dumps({"settings": {**SETTINGS, "iters": a.iters, "threads": a.threads,
                                                         "rounds": a.rounds},
                                            "rss_import_baseline_mb": base, "runs": rows, "medians": med,
                                            "ratios": ratios}, indent=1, default=str))
    if not a.no_peer and "head" in ratios:
        print(f"ratio samples/s align/peer: {bc.fmt(ratios['head']['samples_per_s_paired_median'])}")


if __name__ == "__main__":
    main()
