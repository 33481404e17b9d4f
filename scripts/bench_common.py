"""Shared helpers for the align-vs-peer benchmarks (scripts/bench_*.py).

The benchmark *driver* must stay light: it never imports torch, so that every measurement runs in
a fresh child process whose peak RSS (ru_maxrss, read with os.wait4) belongs to that run alone.
(On Linux a child's ru_maxrss starts from the parent's RSS at fork, so a heavy driver would inflate
every child's figure.)
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PEER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "align-peer")
PEERS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "peers"


def peer_dir() -> str:
    return os.environ.get("PEER_DIR") or DEFAULT_PEER_DIR


def peer_python() -> str:
    return os.path.join(peer_dir(), "venv", "bin", "python")


def peer_script(name: str) -> str:
    """Path of a peer script (…/shared/peers/NAME); PEERS_DIR overrides the location."""
    base = os.environ.get("PEERS_DIR") or (str(PEERS_DIR) if PEERS_DIR.is_dir() else "/work/shared/peers")
    return os.path.join(base, name)


def child_env(threads: int, extra: dict | None = None) -> dict:
    """Environment for a measured child: passive OpenMP waiting (a spinning idle thread on the
    shared 2-core box slows everything else down), offline hub, no GPU, quiet tokenizers."""
    env = dict(os.environ)
    env.update({
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def run_child(cmd: list[str], env: dict, timeout: float, log_path: str | Path | None = None) -> dict:
    """Run `cmd` (stdout/stderr to temporary files), reap it with os.wait4 and return rc, stdout,
    stderr, wall_s and the child's own peak RSS in MB (ru_maxrss of that child alone)."""
    import tempfile
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe, text=True)
        ru, status, killed = None, 0, False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - t0 > timeout and not killed:
                proc.kill()
                killed = True
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        busy1 = cpu_busy_s()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    if killed:
        err += f"\n[bench] killed after {timeout:.0f} s"
    if log_path is not None:
        Path(log_path).write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    rss_mb = ru.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    cpu_s = ru.ru_utime + ru.ru_stime
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
        others = max(0.0, (busy1 - busy0 - cpu_s) / wall)  # CPU cores used by everything else meanwhile
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "wall_s": wall, "peak_rss_mb": rss_mb,
            "cpu_s": cpu_s, "other_cores": others, "killed": killed}


def cpu_busy_s() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores; /proc/stat), None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def wait_idle(max_cores: float = 0.3, timeout: float = 0.0, sample_s: float = 2.0) -> float | None:
    """Wait (up to `timeout` s) until the rest of the machine uses < max_cores cores; returns the last
    sample (cores busy), None if /proc/stat is unreadable. timeout=0: one sample, no waiting."""
    t0 = time.perf_counter()
    while True:
        b0 = cpu_busy_s()
        if b0 is None:
            return None
        time.sleep(sample_s)
        busy = (cpu_busy_s() - b0) / sample_s
        if busy < max_cores or time.perf_counter() - t0 >= timeout:
            return round(busy, 2)


def parse_json_line(text: str, must_have: str | None = None) -> dict | None:
    """The last line of `text` that parses as a JSON object (containing `must_have`, if given)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and (must_have is None or must_have in obj):
            return obj
    return None


def median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    """Plain-text table; cols = (key, header, decimals)."""
    cells = [[h for _, h, _ in cols]] + [[fmt(r.get(k), nd) for k, _, nd in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(cols)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def self_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ---------------------------------------------------------------- hooks of the align child runs

class _LoopBar:
    """The trainer's progress bar, passed through; closing it marks the end of the training loop."""

    def __init__(self, bar, marks: dict):
        self._bar, self._marks = bar, marks

    def close(self):
        self._marks["loop1"] = time.perf_counter()
        self._marks["rss_loop_mb"] = self_rss_mb()
        return self._bar.close()

    def __getattr__(self, name):
        return getattr(self._bar, name)


def hook_loop(module, marks: dict) -> bool:
    """Wrap `module.progress` (align's trainers open their bar right before the loop and close it right
    after): marks gets loop0 / rss_loop0_mb at the opening, loop1 / rss_loop_mb at the closing. False
    when the module has no `progress` (then the caller falls back to the logged phase times)."""
    orig = getattr(module, "progress", None)
    if orig is None:
        return False

    def progress(*a, **kw):
        marks["loop0"] = time.perf_counter()
        marks["rss_loop0_mb"] = self_rss_mb()
        return _LoopBar(orig(*a, **kw), marks)
    module.progress = progress
    return True


def time_run(run, marks: dict):
    """Wrap an `align.runner` run in place: `checkpoint` calls timed into marks["ckpt_s"] / ["ckpt_n"]
    (subtracted from the loop time: the peer never saves), `log` calls after loop0 stamped in
    marks["log_t"] (the first one ends the first iteration). Returns the run."""
    marks.setdefault("ckpt_s", 0.0), marks.setdefault("ckpt_n", 0), marks.setdefault("log_t", [])
    ck, lg = run.checkpoint, run.log

    def checkpoint(*a, **kw):
        t = time.perf_counter()
        try:
            return ck(*a, **kw)
        finally:
            marks["ckpt_s"] += time.perf_counter() - t
            marks["ckpt_n"] += 1

    def log(step, metrics):
        if "loop0" in marks:  # not a log before the loop (e.g. DDPO's epoch-0 grid)
            marks["log_t"].append(time.perf_counter())
        return lg(step, metrics)
    run.checkpoint, run.log = checkpoint, log
    return run
