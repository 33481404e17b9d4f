#!/usr/bin/env python
"""DDPO throughput: align (`image_rlhf.ddpo.run_ddpo`) vs the TRL peer, at the peer's settings.

Settings (those of /work/shared/peers/ddpo_peer.py): a tiny Stable Diffusion pipeline from random
components, built by the peer's own `build_tiny_sd` (UNet 32×32 latents, channels (32, 64), one
cross-attention block, cross_attention_dim 32; AutoencoderKL (32, 64) -> 64×64 images; 2-layer CLIP
text encoder, hidden 32; DDIM with SD 1.x betas), `save_pretrained` into the setup folder (align loads
it by path; the peer gets its own copy, built in its own venv, via --model-dir). 20 DDIM steps, η = 1,
CFG 5.0 (trained CFG-guided, as TRL's train_cfg=True), sample batch 16 × 1 batch per epoch, train batch
4, all 20 timesteps trained (timestep_fraction 1), 1 inner epoch, one optimiser step per train batch,
LoRA r=4 α=4 on to_q/to_k/to_v/to_out.0 (gaussian init), AdamW lr 3e-4, grad-norm clip 1.0, clip
range 1e-4, advantages clipped to ±5 and normalised over the batch (TRL's default: no per-prompt
tracking; align buffer_size=0), reward = mean brightness (align: the `brightness` built-in), prompts
"a photo of a <animal>" over the peer's 20 animals, fp32, `--threads` torch threads,
OMP_WAIT_POLICY=PASSIVE.

Every measurement is a fresh child process (peer, align [, align with --also-python], alternating in
that order for `--rounds` rounds), so peak RSS is per run: ru_maxrss of the child, read with os.wait4
by this driver (which never imports torch).

Measured per run
  sampled img/s   images / sampling-phase seconds. Peer: TRL's `_generate_samples` (prompt encoding,
                  DDIM with CFG, VAE decode). align: run_ddpo's `time/sample_s` (the same, plus the
                  batched brightness reward and the gather, both ~0).
  train ts/s      trained (sample, timestep) pairs / training-phase seconds. Peer: `_train_batched_samples`;
                  align: run_ddpo's `time/update_s`.
  e2e img/s       images / wall time of the whole epoch loop. Peer: `trainer.train()` (what its 0.65 img/s
                  in the README is). align: progress-bar creation to its close, minus `run.checkpoint`
                  (the final save run_ddpo does even with save_every huge). This includes align's
                  per-epoch sample grid (`_grid`: 4 prompts × 2 seeds, a 20-step CFG rollout + decode,
                  the peer has nothing like it), its time is the `grid s` column; `e2e-grid` leaves it out.
  peak RSS        ru_maxrss of the whole child (align's includes its end-of-run report/curve plotting);
                  `RSS@loop` is align's own high-water mark when the loop ended.
align's breakdown (wall-clock hooks, always on, a few µs per event): UNet forward time in sampling /
training, VAE decode, backward, optimiser step + grad clipping; `py/other` = phase time minus those
(DDIM step arithmetic, log-prob, indexing, the surrogate, .item() syncs, hooks).

Noise: before each run the driver waits (up to `--wait-idle` s) for the rest of the machine to use
< `--idle-cores` cores; `others' cores` is how many cores everything else used during the run.

    python scripts/bench_ddpo.py --rounds 3 --epochs 4 --threads 1 \
        --align-python ~/.cache/align/bench-venv-cpu/bin/python --json /tmp/bench_ddpo.json
    python scripts/bench_ddpo.py --profile       # UNet fwd/bwd op time vs wall, in both venvs (no ratios)
    # A/B of align's own settings in the same rounds (e.g. the defaults before the speed work):
    python scripts/bench_ddpo.py ... --also-set channels_last=false timesteps_per_forward=1 grid_every=1

The last line printed is `ratio images/s align/peer: X.XX` (end-to-end images/s, median of the
per-round ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SETTINGS = dict(sample_size=32, cross_dim=32, steps=20, guidance=5.0, eta=1.0, sample_batch=16, sample_batches=1,
                train_batch=4, inner_epochs=1, timestep_fraction=1.0, lr=3e-4, lora_r=4, lora_alpha=4.0,
                clip_range=1e-4, adv_clip=5.0, max_grad_norm=1.0, seed=0)
# the peer's prompt_fn: f"a photo of a {prompts[i]}", i uniform over these 20
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
           "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle"]


def _peer_module(path: str):
    """The peer script as a module (its build_tiny_sd is the spec of the pipeline)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ddpo_peer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ setup (children)

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable-unicode table (transformers 4.x `tokenization_clip.bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def setup_build(out: str, peer_script: str, text_encoder_from: str | None = None) -> None:
    """Build the tiny SD pipeline with the peer's own build_tiny_sd into `out` (any venv with diffusers).

    text_encoder_from: a peer-built pipeline folder whose text encoder weights replace the ones built
    here. The UNet and VAE come out bit-identical across the two venvs (same torch), the random CLIP
    text encoder does not (transformers 5 initialises CLIPTextModel differently from 4.57): loading the
    peer's and save_pretrained-ing it here makes every weight the same as the peer's."""
    import torch
    import transformers.models.clip.tokenization_clip as tc
    if not hasattr(tc, "bytes_to_unicode"):  # gone in transformers 5; the peer's builder imports it from here
        tc.bytes_to_unicode = _bytes_to_unicode
    s = SETTINGS
    built = _peer_module(peer_script).build_tiny_sd(out, s["sample_size"], s["cross_dim"], s["seed"])
    if text_encoder_from:
        from transformers import CLIPTextModel
        te = CLIPTextModel.from_pretrained(os.path.join(text_encoder_from, "text_encoder"))
        shutil.rmtree(os.path.join(out, "text_encoder"))
        te.save_pretrained(os.path.join(out, "text_encoder"))
        built["text_encoder_from"] = text_encoder_from
    print(json.dumps({"built": built, "torch": torch.__version__}), flush=True)


def setup_check(align_dir: str, peer_dir_: str) -> None:
    """Max |Δ| between the align copy and the peer copy of every saved tensor (same names)."""
    import torch
    from safetensors.torch import load_file
    res = {}
    for sub in ("unet", "vae", "text_encoder"):
        fa = sorted((Path(align_dir) / sub).glob("*.safetensors"))
        fp = sorted((Path(peer_dir_) / sub).glob("*.safetensors"))
        if not fa or not fp:
            res[sub] = "missing"
            continue
        def load(f):  # transformers 5 saves CLIPTextModel without the "text_model." prefix of 4.x
            return {k.removeprefix("text_model."): v for k, v in load_file(str(f)).items()}
        a, p = load(fa[0]), load(fp[0])
        common = sorted(set(a) & set(p))
        diff = max((float((a[k].float() - p[k].float()).abs().max()) if a[k].shape == p[k].shape else float("inf"))
                   for k in common) if common else None
        res[sub] = {"tensors": len(common), "only_align": len(set(a) - set(p)), "only_peer": len(set(p) - set(a)),
                    "max_abs_diff": diff}
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        for name in ("config.json", "scheduler_config.json"):
            fa, fp = Path(align_dir) / sub / name, Path(peer_dir_) / sub / name
            if fa.exists() and fp.exists():
                ja, jp = json.loads(fa.read_text()), json.loads(fp.read_text())
                skip = {"_diffusers_version", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
                d = sorted(k for k in set(ja) | set(jp) if k not in skip and ja.get(k) != jp.get(k))
                res[f"{sub}/{name}"] = d or "same"
    print(json.dumps({"check": res, "torch": torch.__version__}), flush=True)


def ensure_setup(a, workdir: Path) -> tuple[Path, dict]:
    d = workdir / "setup"
    stamp = d / "stamp.json"
    want = {**SETTINGS, "align_python": a.align_python, "peer_python": a.peer_python, "peer_script": a.peer_script,
            "peer_script_mtime": os.path.getmtime(a.peer_script), "with_peer": not a.no_peer}
    if stamp.exists():
        got = json.loads(stamp.read_text())
        if {k: got.get(k) for k in want} == want:
            return d, got
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "prompts.txt").write_text("".join(f"a photo of a {x}\n" for x in ANIMALS))
    info = dict(want)
    peer_copy = d / "peer" / "tiny-sd"
    jobs = [] if a.no_peer else [("peer", a.peer_python, ["--_build", str(peer_copy)], {})]
    jobs.append(("align", a.align_python, ["--_build", str(d / "align" / "pipeline")]
                 + ([] if a.no_peer else ["--_text-encoder-from", str(peer_copy)]), {"PYTHONPATH": str(REPO)}))
    if not a.no_peer:
        jobs.append(("check", a.align_python, ["--_check", str(d / "align" / "pipeline"), str(peer_copy)],
                     {"PYTHONPATH": str(REPO)}))
    for name, py, args, extra in jobs:
        r = bc.run_child([py, __file__, *args, "--peer-script", a.peer_script], bc.child_env(a.threads, extra),
                         timeout=600, log_path=workdir / f"setup_{name}.log")
        j = bc.parse_json_line(r["stdout"])
        if r["rc"] != 0 or j is None:
            sys.exit(f"setup ({name}) failed (rc {r['rc']}):\n{r['stderr'][-3000:]}")
        info[name] = j
    stamp.write_text(json.dumps(info, indent=1))
    return d, info


# ------------------------------------------------------------------------------------------ driver

SYSTEMS = {"peer": "peer (TRL)", "align": "align", "align2": "align (also)"}


def _row(system, rnd, r, busy0):
    return {"system": system, "round": rnd, "rc": r["rc"], "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
            "busy_before": busy0, "other_cores": r["other_cores"], "cpu_s": r["cpu_s"]}


def run_peer(a, workdir: Path, setup: Path, rnd: int) -> dict:
    cmd = [a.peer_python, a.peer_script, "--epochs", str(a.epochs), "--threads", str(a.threads),
           "--steps", str(a.steps), "--sample-batch", str(a.sample_batch), "--train-batch", str(a.train_batch),
           "--model-dir", str(setup / "peer" / "tiny-sd"), "--workdir", str(workdir / "peer_run")]
    busy0 = bc.wait_idle(a.idle_cores, a.wait_idle)
    r = bc.run_child(cmd, bc.child_env(a.threads, {"PEER_DIR": bc.peer_dir()}), a.timeout,
                     log_path=workdir / f"peer_r{rnd}.log")
    j = bc.parse_json_line(r["stdout"], "images_per_s")
    row = _row("peer", rnd, r, busy0)
    if r["rc"] != 0 or j is None:
        row["error"] = (r["stderr"] or r["stdout"])[-2000:]
        return row
    if j.get("built"):
        row["note"] = "peer built its pipeline in this run"
    row.update({"images_per_s": j["images_per_s"], "train_timesteps_per_s": j["train_timesteps_per_s"],
                "e2e_images_per_s": round(j["images_sampled"] / j["total_wall_s"], 3),
                "e2e_nogrid_images_per_s": round(j["images_sampled"] / j["total_wall_s"], 3),
                "loop_s": j["total_wall_s"], "sample_s": j["sample_s"], "update_s": j["train_s"], "grid_s": None,
                "other_s": round(j["total_wall_s"] - j["sample_s"] - j["train_s"], 3),
                "load_s": j.get("load_and_init_s"), "rss_loop_mb": j.get("peak_rss_mb"),
                "images": j["images_sampled"], "train_timesteps": j["train_timesteps"], "raw": j})
    return row


def run_align(a, workdir: Path, setup: Path, system: str, python: str, rnd: int) -> dict:
    out = workdir / f"{system}_run"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"pipeline": str(setup / "align" / "pipeline"), "prompts": str(setup / "prompts.txt"), "out": str(out),
            "epochs": a.epochs, "threads": a.threads, "steps": a.steps, "sample_batch": a.sample_batch,
            "train_batch": a.train_batch, "set": a.also_set if system == "align2" else []}
    busy0 = bc.wait_idle(a.idle_cores, a.wait_idle)
    r = bc.run_child([python, __file__, "--_child", json.dumps(spec)],
                     bc.child_env(a.threads, {"PYTHONPATH": str(REPO)}), a.timeout,
                     log_path=workdir / f"{system}_r{rnd}.log")
    j = bc.parse_json_line(r["stdout"], "images_per_s")
    row = _row(system, rnd, r, busy0)
    if r["rc"] != 0 or j is None:
        row["error"] = (r["stderr"] or r["stdout"])[-2000:]
        return row
    row.update({k: j.get(k) for k in ("images_per_s", "train_timesteps_per_s", "e2e_images_per_s",
                                      "e2e_nogrid_images_per_s", "loop_s", "sample_s", "update_s", "grid_s",
                                      "other_s", "load_s", "rss_loop_mb")})
    row.update(images=j["images_sampled"], train_timesteps=j["train_timesteps"], raw=j)
    return row


def rss_baseline(python: str, threads: int) -> float | None:
    """Peak RSS of `import torch, diffusers, transformers` alone in that interpreter."""
    r = bc.run_child([python, "-c", "import torch, diffusers, transformers; torch.zeros(1)"], bc.child_env(threads), 300)
    return round(r["peak_rss_mb"], 1) if r["rc"] == 0 else None


def breakdown(rows: list[dict]) -> str:
    """align's time split (medians over its runs): sampling and training, UNet vs the rest."""
    out = []
    for system in ("align", "align2"):
        ok = [r["raw"] for r in rows if r["system"] == system and "error" not in r]
        if not ok:
            continue
        m = {k: bc.median(j.get(k) for j in ok) for k in ok[0] if isinstance(ok[0][k], (int, float))}
        fs, ft = m.get("fwd_sample_n") or 1, m.get("fwd_train_n") or 1
        bn = m.get("bwd_n") or 1
        out.append(
            f"# {SYSTEMS[system]} ({ok[0]['torch_version']}) time split, median of {len(ok)} run(s): loop "
            f"{bc.fmt(m.get('loop_s'))} s = sampling {bc.fmt(m.get('sample_s'))} + training {bc.fmt(m.get('update_s'))}"
            f" + grid {bc.fmt(m.get('grid_s'))} + other {bc.fmt(m.get('other_s'))}\n"
            f"#   sampling: UNet fwd {bc.fmt(m.get('fwd_sample_s'))} s ({int(fs)} calls, "
            f"{1e3 * (m.get('fwd_sample_s') or 0) / fs:.0f} ms each), VAE decode {bc.fmt(m.get('decode_s'))}, "
            f"text enc {bc.fmt(m.get('encode_s'))}, DDIM/log-prob/python {bc.fmt(m.get('sample_py_s'))}\n"
            f"#   training: UNet fwd {bc.fmt(m.get('fwd_train_s'))} s ({int(ft)} calls, "
            f"{1e3 * (m.get('fwd_train_s') or 0) / ft:.0f} ms each), backward {bc.fmt(m.get('bwd_s'))} "
            f"({1e3 * (m.get('bwd_s') or 0) / bn:.0f} ms each), AdamW {bc.fmt(m.get('opt_s'))}, clip "
            f"{bc.fmt(m.get('clip_s'))}, DDIM log-prob/surrogate/python {bc.fmt(m.get('update_py_s'))}")
    return "\n".join(out)


def run_profile(a, workdir: Path, setup: Path) -> None:
    spec = {"pipeline": str(setup / "align" / "pipeline"), "threads": a.threads, "sample_batch": a.sample_batch,
            "train_batch": a.train_batch, "n": a.profile_n, "k_steps": a.profile_k,
            "only": [x for x in (a.profile_only or "").split(",") if x]}
    pys = [("align", a.align_python)] + ([("also", a.also_python)] if a.also_python else []) + \
        ([] if a.no_peer else [("peer", a.peer_python)])
    allres = {}
    for name, py in pys:
        bc.wait_idle(a.idle_cores, a.wait_idle)
        r = bc.run_child([py, __file__, "--_profile", json.dumps(spec)], bc.child_env(a.threads, {"PYTHONPATH": str(REPO)}),
                         a.timeout, log_path=workdir / f"profile_{name}.log")
        j = bc.parse_json_line(r["stdout"], "bench")
        if r["rc"] != 0 or j is None:
            print(f"# profile {name} FAILED (rc {r['rc']}):\n{r['stderr'][-2000:]}")
            continue
        allres[name] = j
        print(f"# profile {name}: torch {j['torch_version']}, diffusers {j['diffusers_version']}, "
              f"{j['threads']} thread(s); UNet batch {j['sample_batch_unet']} (sampling) / {j['train_batch_unet']} "
              f"(training)")
        for k, v in j["cases"].items():
            print(f"#   {k:36s} batch {v['unet_batch']:3d}: {1e3 * v['wall_s']:7.1f} ms/call, "
                  f"{v['per_image_step_ms']:6.1f} ms per image-step (profiled {1e3 * v['prof_wall_s']:.1f}: aten "
                  f"self {1e3 * v['aten_self_s']:.1f} ms in {v['aten_calls']} calls, python/dispatch "
                  f"{100 * v['overhead_share']:.0f}%)")
            print("#       top: " + ", ".join(f"{n_.removeprefix('aten::')} {1e3 * t:.1f}" for n_, t in v["top"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": SETTINGS, "profile": allres}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=SETTINGS["steps"], help="DDIM steps (smoke tests only; 20 = peer)")
    p.add_argument("--sample-batch", type=int, default=SETTINGS["sample_batch"], help="(smoke tests only; 16 = peer)")
    p.add_argument("--train-batch", type=int, default=SETTINGS["train_batch"], help="(smoke tests only; 4 = peer)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--no-peer", action="store_true", help="align only (no ratios)")
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "align-bench-ddpo"))
    p.add_argument("--align-python", default=sys.executable)
    p.add_argument("--also-python", default=None,
                   help="a second align interpreter (e.g. the main venv), run each round after the first")
    p.add_argument("--also-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="DDPOConfig overrides for a second align run each round ('align (also)'; with the "
                        "--also-python interpreter if given, else --align-python), e.g. the settings before "
                        "issue 3's speed work: channels_last=false timesteps_per_forward=1 grid_every=1")
    p.add_argument("--peer-python", default=bc.peer_python())
    p.add_argument("--peer-script", default=bc.peer_script("ddpo_peer.py"))
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark: UNet fwd/bwd op time vs wall at these shapes, in each venv")
    p.add_argument("--profile-n", type=int, default=5, help="timed calls per profiled case (median)")
    p.add_argument("--profile-k", type=int, default=4, help="timesteps per sample in the batched-training what-if")
    p.add_argument("--profile-only", default=None, help="comma list of substrings: profile only those cases")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    p.add_argument("--wait-idle", type=float, default=60,
                   help="before each run, wait up to this many seconds for the rest of the machine to go idle")
    p.add_argument("--idle-cores", type=float, default=0.3, help="'idle' = other processes use fewer cores than this")
    p.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_text-encoder-from", dest="te_from", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_check", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_profile", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._build:
        return setup_build(a._build, a.peer_script, a.te_from)
    if a._check:
        return setup_check(*a._check)
    if a._child:
        from bench_ddpo_child import align_child_main
        return align_child_main(json.loads(a._child))
    if a._profile:
        from bench_ddpo_child import profile_child_main
        return profile_child_main(json.loads(a._profile))

    if not os.path.exists(a.peer_script):
        sys.exit(f"peer script {a.peer_script} missing (it defines the pipeline); set PEERS_DIR or --peer-script")
    if not a.no_peer and not os.path.exists(a.peer_python):
        sys.exit(f"peer interpreter {a.peer_python} missing: run `bash /work/shared/peers/setup.sh` "
                 f"(PEER_DIR={bc.peer_dir()}) or pass --no-peer")
    if (a.sample_batch * SETTINGS["sample_batches"]) % a.train_batch:
        sys.exit("--train-batch must divide --sample-batch")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup, info = ensure_setup(a, workdir)
    if "check" in info:
        print(f"# pipeline check (align copy vs peer copy): {json.dumps(info['check'].get('check'))}", flush=True)
    if a.profile:
        return run_profile(a, workdir, setup)

    s = SETTINGS
    off = [f"{k}={getattr(a, k)}" for k in ("steps", "sample_batch", "train_batch") if getattr(a, k) != s[k]]
    print(f"# DDPO bench: tiny SD (UNet (32,64) 32x32 latents, VAE (32,64) -> 64 px, CLIP 2x32), {a.steps} DDIM "
          f"steps, eta {s['eta']}, CFG {s['guidance']}, sample batch {a.sample_batch}, train batch {a.train_batch}, "
          f"all timesteps, LoRA r={s['lora_r']}, reward brightness, fp32; {a.epochs} epochs, {a.threads} thread(s), "
          f"OMP_WAIT_POLICY=PASSIVE; {a.rounds} rounds; cpus={os.cpu_count()}"
          + (f"; NOT THE PEER'S SETTINGS: {', '.join(off)}" if off else ""), flush=True)
    pythons = {"align": a.align_python}
    if a.also_python or a.also_set:
        pythons["align2"] = a.also_python or a.align_python
    base = {k: rss_baseline(v, a.threads) for k, v in pythons.items()}
    if not a.no_peer:
        base["peer"] = rss_baseline(a.peer_python, a.threads)
    print("# RSS of `import torch, diffusers, transformers` alone: "
          + ", ".join(f"{SYSTEMS[k]} {v} MB" for k, v in base.items()), flush=True)
    print(f"# align python: {a.align_python}" + (f"; also: {pythons['align2']}" if "align2" in pythons else "")
          + (f" with {' '.join(a.also_set)}" if a.also_set else ""), flush=True)

    order = ([] if a.no_peer else ["peer"]) + list(pythons)
    rows = []
    for rnd in range(1, a.rounds + 1):
        for system in order:
            row = (run_peer(a, workdir, setup, rnd) if system == "peer"
                   else run_align(a, workdir, setup, system, pythons[system], rnd))
            rows.append(row)
            if "error" in row:
                print(f"# {SYSTEMS[system]} round {rnd} FAILED (rc {row['rc']}):\n{row['error']}", flush=True)
            else:
                print(f"# round {rnd} {SYSTEMS[system]}: {row['images_per_s']:.2f} sampled img/s, "
                      f"{row['train_timesteps_per_s']:.2f} trained ts/s, {row['e2e_images_per_s']:.3f} e2e img/s, "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB, others' cores {bc.fmt(row['other_cores'])}", flush=True)

    cols = [("name", "run", 0), ("round", "round", 0), ("images_per_s", "sampled img/s", 2),
            ("train_timesteps_per_s", "train ts/s", 2), ("e2e_images_per_s", "e2e img/s", 3),
            ("e2e_nogrid_images_per_s", "e2e-grid img/s", 3), ("loop_s", "loop s", 1), ("sample_s", "sample s", 1),
            ("update_s", "train s", 1), ("grid_s", "grid s", 1), ("other_s", "other s", 2), ("load_s", "init s", 1),
            ("peak_rss_mb", "peak RSS MB", 0), ("rss_loop_mb", "RSS@loop MB", 0), ("other_cores", "others' cores", 2)]
    for r in rows:
        r["name"] = SYSTEMS[r["system"]]
    print()
    print(bc.table([r for r in rows if "error" not in r], cols))

    metric_keys = ("images_per_s", "train_timesteps_per_s", "e2e_images_per_s", "e2e_nogrid_images_per_s", "loop_s",
                   "sample_s", "update_s", "grid_s", "other_s", "load_s", "peak_rss_mb", "rss_loop_mb", "other_cores")
    med = {}
    for system in order:
        ok = [r for r in rows if r["system"] == system and "error" not in r]
        med[system] = {k: bc.median(r.get(k) for r in ok) for k in metric_keys}
        med[system].update(name=f"median {SYSTEMS[system]}", round=len(ok))
    print()
    mcols = list(cols)
    mcols[1] = ("round", "n", 0)
    print(bc.table([med[s_] for s_ in order], mcols))
    print()
    print(breakdown(rows))

    ratios = {}
    ratio_keys = {"images_per_s": "sampled img/s", "train_timesteps_per_s": "trained ts/s",
                  "e2e_images_per_s": "e2e img/s", "e2e_nogrid_images_per_s": "e2e img/s w/o grid",
                  "peak_rss_mb": "peak RSS"}
    if not a.no_peer:
        print()
        for system in pythons:
            rr = {}
            for k in ratio_keys:
                paired = []
                for rnd in range(1, a.rounds + 1):
                    pr = [r for r in rows if r["system"] == "peer" and r["round"] == rnd and "error" not in r]
                    ar = [r for r in rows if r["system"] == system and r["round"] == rnd and "error" not in r]
                    if pr and ar and pr[0].get(k) and ar[0].get(k) is not None:
                        paired.append(ar[0][k] / pr[0][k])
                rr[k] = {"paired_median": bc.median(paired), "paired": paired}
            ratios[system] = rr
            print(f"{SYSTEMS[system]} / peer (median of per-round ratios): "
                  + "; ".join(f"{h} x{bc.fmt(rr[k]['paired_median'])} ({', '.join(f'{x:.2f}' for x in rr[k]['paired'])})"
                              for k, h in ratio_keys.items()))

    if a.json:
        Path(a.json).write_text(json.dumps({"settings": {**SETTINGS, "epochs": a.epochs, "threads": a.threads,
                                                         "rounds": a.rounds, "steps": a.steps,
                                                         "sample_batch": a.sample_batch, "train_batch": a.train_batch,
                                                         "align_python": a.align_python, "also_python": a.also_python,
                                                         "also_set": a.also_set},
                                            "setup": info, "rss_import_baseline_mb": base, "runs": rows,
                                            "medians": med, "ratios": ratios}, indent=1, default=str))
    if not a.no_peer and "align" in ratios:
        print(f"ratio images/s align/peer: {bc.fmt(ratios['align']['e2e_images_per_s']['paired_median'])}")


if __name__ == "__main__":
    main()
