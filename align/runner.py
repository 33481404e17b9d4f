"""The pieces every trainer's loop stands on: seeding, atomic files, checkpoints, metrics, progress.

Text SFT/RM/PPO and image DDPO share them so that every run directory looks the same:

    out/config.yaml        resolved config (align.config.save_config)
    out/checkpoints/       step-00000123/ folders + `latest` (the newest complete one)
    out/metrics.jsonl      one JSON object per log call; survives a crash
    out/tb/                TensorBoard events
    out/report.md          tables and PNG plots (align.report)

Rule of the house: a file or a checkpoint is either complete or absent. Everything is written
to a temporary name in the same folder, fsynced, then renamed into place (rename is atomic on
POSIX within one file system), so a crash or a full disk never leaves a half-written one that a
resume would trust. torch, accelerate and tensorboard are imported lazily: `import align` stays fast.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = [
    "seed_everything", "atomic_write_text", "atomic_write_bytes", "atomic_write_json",
    "CheckpointManager", "RunDirError", "prepare_out_dir", "RunLogger", "WindowMean", "truncate_jsonl", "plot_curves",
    "progress", "make_accelerator", "peak_rss_mb", "offline_unless_hub_reachable",
]


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy and torch (all devices), via accelerate's set_seed."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


# ---------------------------------------------------------------------------- atomic files

def _fsync(path) -> None:
    """Flush a file, or a folder's entries (making a rename durable), to disk. Best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` via a same-folder temp file + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") rather than mkstemp: the file gets the umask's mode, not 0600.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------- checkpoints

_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    """Numbered checkpoints under out_dir/checkpoints/, complete only once renamed into place.

    save(step, write_fn, state): write_fn(tmp_dir) writes the model files (save_pretrained,
    safetensors, optimizer) into out_dir/checkpoints/.tmp-step-XXXXXXXX-<pid>/; state.json
    (`state` + "step") is added, everything is fsynced, and the folder is renamed to
    step-XXXXXXXX. Only then is `latest` rewritten (atomically) and are older checkpoints beyond
    `keep` and stale .tmp-* folders removed. If write_fn raises, the temp folder is removed and
    the previous checkpoint stays the latest. state.json also lists every file's size, so that
    `resumable` can tell a checkpoint that a file system lost data of (after fsync) from a whole one.

    Only the main process writes (is_main=False makes save a no-op that may still be called
    from every rank). Under FSDP/ZeRO gather the full state on all ranks *before* calling save.
    """

    def __init__(self, out_dir, keep: int | None = 2, is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "checkpoints"
        self.keep = keep
        self.is_main = is_main

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step-{int(step):08d}"

    def _complete(self) -> list[tuple[int, Path]]:
        """(step, path) of complete checkpoints (renamed into place, state.json inside), by step."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if its folder exists, else the highest step."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            if _STEP_RE.match(name) and (self.dir / name).is_dir():
                return self.dir / name
        complete = self._complete()
        return complete[-1][1] if complete else None

    def resumable(self) -> Path | None:
        """The newest checkpoint that reads back whole (see `damage`), or None when there is none. A damaged newer
        one is named in a warning and moved aside to checkpoints/damaged-step-XXXXXXXX (main process), so that the
        resumed run neither trusts it nor prunes the good ones in its favour; when every checkpoint is damaged,
        RunDirError (starting from scratch would train over the run)."""
        pointer = self.dir / "latest"
        name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
        first = [self.dir / name] if _STEP_RE.match(name) and (self.dir / name).is_dir() else []
        candidates = first + [p for _, p in reversed(self._complete()) if p not in first]
        damaged = []
        for path in candidates:
            why = self.damage(path)
            if why is None:
                for bad, reason in damaged if self.is_main else ():
                    aside = self.dir / f"damaged-{bad.name}"
                    if aside.exists():  # damaged at this step before
                        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:8]}")
                    os.replace(bad, aside)
                    logger.warning("--resume: checkpoint %s is damaged (%s), as after a full disk or a crash of the "
                                   "file system; moved aside to %s, resuming from %s", bad.name, reason, aside.name,
                                   path.name)
                return path
            damaged.append((path, why))
        if damaged:
            raise RunDirError(f"--resume: every checkpoint in {self.dir} is damaged ("
                              + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                              + "): nothing to resume from; choose another --out to start over")
        return None

    @staticmethod
    def damage(path) -> str | None:
        """What is wrong with checkpoint folder `path`, or None: state.json unreadable, a file it lists missing or of
        another size, or a .json, .safetensors or .pt file cut short or zero-filled (read from headers only)."""
        path = Path(path)
        try:
            files = json.loads((path / "state.json").read_text()).get("files", {})
        except (OSError, ValueError, AttributeError) as e:
            return f"state.json: {e}"
        for rel, size in files.items():
            if not (path / rel).is_file():
                return f"{rel}: missing"
            if (path / rel).stat().st_size != size:
                return f"{rel}: {(path / rel).stat().st_size} bytes, {size} when saved"
        for file in sorted(path.rglob("*")):
            why = _file_damage(file) if file.is_file() else None
            if why:
                return f"{file.relative_to(path)}: {why}"
        return None

    @staticmethod
    def load_state(path) -> dict:
        """The state dict saved with a checkpoint (accepts the folder or its state.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "state.json"
        state = json.loads(path.read_text())
        state.pop("files", None)  # save's list of file sizes, for `damage`
        return state

    def save(self, step: int, write_fn: Callable[[Path], Any] | None = None,
             state: dict | None = None) -> Path | None:
        """Write a checkpoint for `step`; returns its folder (None on non-main processes)."""
        if not self.is_main:
            return None
        step = int(step)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            if write_fn is not None:
                write_fn(tmp)
            sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / "state.json", {**(state or {}), "step": step, "files": sizes})
            for root, _, files in os.walk(tmp):  # write_fn's files may still sit in page cache
                for name in [*files, "."]:
                    _fsync(os.path.join(root, name))
            if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside
                old = self.dir / f".tmp-old-{final.name}-{os.getpid()}"
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_write_error(e):
                last = self.latest()
                raise OSError(f"writing checkpoint {final.name} failed ({e}): is the disk full? Nothing of it was kept; "
                              + (f"{last.name} is intact and --resume continues from it" if last else
                                 "no earlier checkpoint")) from e
            raise
        _fsync(self.dir)
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune(keep_path=final)
        return final

    def _prune(self, keep_path: Path) -> None:
        """Remove stale temp folders and all but the `keep` newest checkpoints (never keep_path)."""
        for p in self.dir.glob(".tmp-*"):  # ours is renamed by now: these are from crashes
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if not self.keep or self.keep <= 0:
            return
        others = [p for _, p in self._complete() if p != keep_path]
        for p in others[: max(0, len(others) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)


def _file_damage(path: Path) -> str | None:
    """Why a checkpoint file would not load, from what its header promises: JSON that does not parse, a safetensors
    file shorter than its header's tensors, a .pt (a zip, as torch.save writes) without its central directory."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    return f"cut short or zero-filled ({size} bytes)"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                return f"{size} bytes, its header says {8 + n + end}"
        elif path.suffix in (".pt", ".pth"):
            zipfile.ZipFile(path).close()
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, zipfile.BadZipFile) as e:
        return f"unreadable ({e})"
    return None


def _is_write_error(e: BaseException) -> bool:
    """An error of the file system while writing, as the libraries raise it: OSError (ENOSPC, EDQUOT, EIO, ...),
    safetensors' SafetensorError, and torch.save's RuntimeError from its zip writer ("[enforce fail at
    inline_container.cc] . unexpected pos" or "PytorchStreamWriter failed writing file" on a full disk)."""
    return (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"
            or isinstance(e, RuntimeError) and any(s in str(e) for s in ("inline_container", "PytorchStreamWriter")))


class RunDirError(ValueError):
    """The output folder already holds a run and --resume was not given."""


def prepare_out_dir(out_dir, resume: bool, is_main: bool = True) -> Path:
    """Create `out_dir`; refuse to silently mix a new run into an old one (nothing is deleted). A folder
    whose run stopped before logging anything (no metrics, no checkpoint) is started over without --resume.

    Non-main processes only create the folder: by the time they look, rank 0 may already have
    started writing metrics there.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return out
    has_ckpt = CheckpointManager(out).latest() is not None
    metrics = out / "metrics.jsonl"
    logged = metrics.exists() and metrics.read_text(encoding="utf-8", errors="replace").strip() != ""
    if not resume and (has_ckpt or logged):
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it "
                          f"or choose another --out")
    if not resume and metrics.exists():  # e.g. stopped by a typo in an input: nothing logged, nothing to keep
        logger.info("%s: the run there stopped before its first step; starting over in it", out)
    if resume and not has_ckpt:
        logger.warning("--resume: no checkpoint in %s; starting from scratch", out)
    return out


# ---------------------------------------------------------------------------- metrics

def _to_float(key: str, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__}") from err


class WindowMean:
    """Means of per-step metrics over the logging window (the steps since the last `pop`), as transformers'
    Trainer logs `loss`: a curve of the last batch alone shows the batch's noise, not the training."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + _to_float(k, v)
        self.n += 1

    def pop(self) -> dict[str, float]:
        out = {k: v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def truncate_jsonl(path: Path, key: str, last) -> list[dict]:
    """Rewrite a run's JSONL log (metrics.jsonl, samples.jsonl), if there is one, with only the rows whose `key` is <= last, and
    return them: on --resume the rows after the checkpoint belong to the lost part of the crashed run, which is
    run again and logs them anew. Lines cut short by a crash are skipped (with a warning)."""
    if not Path(path).exists():
        return []
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping unreadable line", path, i)
            continue
        if isinstance(row, dict) and key in row and row[key] <= last:
            rows.append(row)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


class RunLogger:
    """Metrics sink for the main process: TensorBoard, metrics.jsonl and in-memory history.

    metrics.jsonl gets one object per log call ({"step": s, ...}), appended and flushed at once,
    so a crash loses nothing already logged. Non-finite values are kept (NaN is worth seeing) but
    written as JSON null, since NaN is not valid JSON. On resume, rows with step > resume_step
    are dropped (they belong to the lost part of the crashed run) and TensorBoard purges them
    too. resume_step=None starts a fresh metrics.jsonl. is_main=False makes every method a no-op.
    """

    def __init__(self, out_dir, is_main: bool = True, resume_step: int | None = None):
        self.is_main = is_main
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.tb = None
        self._file = None
        if not is_main:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        rows = truncate_jsonl(self.path, "step", resume_step if resume_step is not None else -math.inf)
        for row in rows:
            self._remember(row["step"], {k: v for k, v in row.items() if k != "step"})
        self._file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else int(resume_step) + 1
        self.tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=purge)

    def _remember(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, math.nan if v is None else float(v)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        step = int(step)
        values = {k: _to_float(k, v) for k, v in metrics.items()}
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self._remember(step, values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_curves(history, keys, path, title=None, xlabel: str = "step"):
    """See align.report.plot_curves (kept there with the other report writers)."""
    from align.report import plot_curves as _plot

    return _plot(history, keys, path, title, xlabel)


# ---------------------------------------------------------------------------- misc

def progress(iterable=None, total=None, desc=None, disable=False, is_main: bool | None = None):
    """A tqdm bar shown on the main process only (is_main=None reads RANK, set by launchers)."""
    from tqdm.auto import tqdm

    if is_main is None:
        is_main = int(os.environ.get("RANK", "0")) == 0
    # ALIGN_PROGRESS_POSITION: the screen line of this process's bars when several processes draw
    # bars at once (align demo trains the worlds' base models side by side)
    position = int(os.environ.get("ALIGN_PROGRESS_POSITION", "0"))
    return tqdm(iterable, total=total, desc=desc, disable=disable or not is_main,
                leave=False, dynamic_ncols=True, position=position or None)


def make_accelerator(mixed_precision="no", cpu=None, gradient_accumulation_steps=1,
                     log_with=None, **kwargs):
    """An accelerate.Accelerator; cpu=None picks the CPU when no CUDA device is visible."""
    import torch
    from accelerate import Accelerator

    if mixed_precision not in ("no", "fp16", "bf16"):  # before accelerate's state is touched: a refused value
        # left it half-made, and every later Accelerator of the process failed
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    from accelerate.state import AcceleratorState
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != mixed_precision:
        # accelerate's state is a process-wide singleton that refuses a new precision; stages run one after
        # another in one process (align demo, a notebook) may differ: start its precision state afresh (the
        # distributed PartialState, the process group, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with,
                       gradient_accumulation_steps=gradient_accumulation_steps, **kwargs)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


_HUB_OFFLINE: bool | None = None  # the probe's answer, once per process


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """Call before fetching from the Hugging Face hub. When its host does not answer a TCP connect within `timeout`
    s, turn huggingface_hub's offline mode on for this process (transformers and open_clip ask it), so that a
    file missing from the local cache fails at once instead of after huggingface_hub's retries: 5 per request
    with 1-8 s back-off, ~24 s a file and about a minute for a model that tries .safetensors, then .bin. Cached
    files still load. Not probed under HF_HUB_OFFLINE or with an HTTP(S) proxy set. Returns: offline."""
    global _HUB_OFFLINE
    import socket
    import urllib.parse
    import urllib.request

    import huggingface_hub.constants as hub
    if hub.HF_HUB_OFFLINE or _HUB_OFFLINE is not None:
        return bool(hub.HF_HUB_OFFLINE)
    url, proxies = urllib.parse.urlparse(hub.ENDPOINT), urllib.request.getproxies()
    _HUB_OFFLINE = False
    if url.hostname and not (proxies.get(url.scheme) or proxies.get("all")):  # a proxy: the direct probe says nothing
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        except OSError as e:
            logger.warning("the hub (%s) is unreachable (%s): only locally cached files can load", hub.ENDPOINT, e)
            hub.HF_HUB_OFFLINE = _HUB_OFFLINE = True
    return bool(hub.HF_HUB_OFFLINE)
