"""One run's plumbing, the same for every trainer: out dir, accelerator, seed, checkpoints, metrics.

    run = start_run(cfg, out=cfg.out, resume=resume, mixed_precision=cfg.mixed_precision, seed=cfg.seed)
    ... run.state (dict or None), run.resume_dir (the checkpoint to load), run.log(step, metrics) ...
    run.checkpoint(step, write_fn, state)   # every rank calls it; rank 0 writes, the others wait
    run.finish(title, sections, plots)      # curves PNG + report.md
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.config import save_config
from align.report import write_report
from align.runner import (CheckpointManager, RunDirError, RunLogger, make_accelerator, peak_rss_mb, plot_curves,
                          prepare_out_dir, seed_everything)

log = logging.getLogger(__name__)


@dataclass
class Run:
    out: Path
    accelerator: object
    ckpt: CheckpointManager
    logger: RunLogger
    state: dict | None
    resume_dir: Path | None
    global_batch: int | None = None  # what one step consumes over all processes (start_run's step_batch)
    pending_config: object = None  # a resumed run's config: written to config.yaml with its first checkpoint
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def start_step(self) -> int:
        return int(self.state["step"]) if self.state else 0

    def check_end(self, total: int, setting: str, unit: str = "step") -> None:
        """A resumed run whose checkpoint lies past this config's end (epochs=3 on a run checkpointed at epoch 6)
        would train nothing, keep the longer run's weights and report the shorter one: refused."""
        if self.start_step > total:
            raise ValueError(f"--resume: the checkpoint in {self.out} is at {unit} {self.start_step}, past this "
                             f"config's last {unit} {total} ({setting}): nothing would train, and the report would "
                             f"describe a shorter run than its weights had; give {setting} for at least "
                             f"{self.start_step} {unit}s, or choose another --out")

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, metrics)

    def checkpoint(self, step: int, write_fn, state: dict) -> None:
        """Collective: all ranks call it; rank 0 writes atomically, then everyone continues."""
        self.accelerator.wait_for_everyone()
        self.ckpt.save(step, write_fn, {**state, **({"global_batch": self.global_batch} if self.global_batch else {})})
        self._write_pending_config()
        self.accelerator.wait_for_everyone()

    def _write_pending_config(self) -> None:
        """config.yaml describes the newest checkpoint: a resumed run's settings replace the old ones only once
        it has written one (or its report), so a resume that fails to load (another lora.r, say) leaves them."""
        if self.pending_config is not None and self.is_main:
            save_config(self.pending_config, self.out / "config.yaml")
        self.pending_config = None

    def finish(self, title: str, sections: list[tuple[str, str]], plot_keys: list[str] = (),
               xlabel: str = "step") -> Path | None:
        """Curves PNG + report.md (main process). Adds wall time and peak RSS; says where the report is."""
        self.accelerator.wait_for_everyone()
        self._write_pending_config()
        if not self.is_main:
            return None
        images = []
        if plot_keys:
            png = plot_curves(self.logger.history, list(plot_keys), self.out / "curves.png", title=title, xlabel=xlabel)
            if png:
                images.append(png)
        wall = time.perf_counter() - self.started
        sections = list(sections) + [("Run", f"- wall time: {wall:.1f} s\n- peak RSS (rank 0): {peak_rss_mb():.0f} MiB\n"
                                             f"- processes: {self.accelerator.num_processes}\n"
                                             f"- config: `config.yaml`; metrics: `metrics.jsonl`, TensorBoard: `tb/`")]
        self.logger.close()
        report = write_report(self.out, title, sections, images)
        log.info("%s: %s (%.1f s)", title, report, wall)  # the last line a run prints: where to look
        return report


def check_resume_config(cfg, out) -> None:
    """--resume into `out`: its config.yaml must be of the same command (the same keys) — a folder of another
    command would have its config.yaml overwritten and its checkpoint misread. Changed values are logged."""
    from omegaconf import OmegaConf

    from align.config import config_dict
    path = Path(out) / "config.yaml"
    if not path.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # unreadable: nothing to compare with
        return
    new = config_dict(cfg)
    if not isinstance(old, dict):
        return
    extra, missing = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if extra and missing:  # (only one of them: a field added or removed by an upgrade of align; compared below)
        raise RunDirError(f"{out} holds a run of another command: its config.yaml has {', '.join(extra[:4])} and "
                          f"lacks {', '.join(missing[:4])} of {type(cfg).__name__}; --resume continues a run of the "
                          "same command: choose another --out")
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k != "out"}
    shaping = [f"{name}: {a!r} -> {b!r}" for name, a, b in _shaping_settings(old, new) if a != b]
    if shaping and any((Path(out) / "checkpoints").glob("step-*")):  # its tensors would not fit: refuse before loading
        raise RunDirError(f"--resume: {'; '.join(shaping)} would build another model than the one {out}'s checkpoint "
                          f"holds; resume with the run's own settings (--config {Path(out) / 'config.yaml'}, then any "
                          "key=value to change), or choose another --out for a new run")
    if changed:
        log.warning("--resume: the config differs from the run's: %s",
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def _shaping_settings(old: dict, new: dict):
    """(name, old value, new value) of the settings that decide which tensors a run trains (LoRA's rank and
    modules, PPO's value model), where both configs have them."""
    for name in ("value_model",):
        if name in old and name in new:
            yield name, old[name], new[name]
    old_lora, new_lora = old.get("lora"), new.get("lora")
    if isinstance(old_lora, dict) and isinstance(new_lora, dict):
        for key in ("r", "target_modules"):
            if key in old_lora and key in new_lora:
                yield f"lora.{key}", old_lora[key], new_lora[key]


def check_resume_batch(state: dict | None, step_batch: tuple[str, int], num_processes: int) -> None:
    """A run whose steps count global batches (SFT, reward models: step -> epoch, offset in the data, learning-rate
    schedule) resumes only with the global batch its checkpoint was made with (`step_batch`: the config key and its
    value per process; × processes). 1 process × batch 8 and 2 × 4 are the same run; 2 × 8 would misread the step."""
    saved = (state or {}).get("global_batch")
    key, per_process = step_batch
    if saved is None or saved == per_process * num_processes:
        return
    how = (f"{key}={saved // num_processes} on {num_processes} processes" if saved % num_processes == 0 else
           "the same processes and batch size as before")
    raise RunDirError(f"--resume: the checkpoint's steps are global batches of {saved}, this run's would be "
                      f"{per_process * num_processes} ({key}={per_process} × {num_processes} processes), so step "
                      f"{state['step']} would mean other data and another point of the schedule: resume with {how}, "
                      "or choose another --out for a new run")


def start_run(cfg, out, resume: bool, mixed_precision: str = "no", seed: int = 0, keep_checkpoints: int = 2,
              step_batch: tuple[str, int] | None = None) -> Run:
    """`step_batch`: (config key, value) of what one step consumes per process, for runs counted in global batches:
    saved with each checkpoint and checked on --resume (check_resume_batch)."""
    keep_checkpoints = getattr(cfg, "keep_checkpoints", keep_checkpoints)
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 0:
        raise ValueError(f"keep_checkpoints must be >= 0 (0 = keep all), got {keep_checkpoints!r}")
    if resume:
        check_resume_config(cfg, out)  # every rank: all raise, none waits for rank 0
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    out = prepare_out_dir(out, resume, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    ckpt = CheckpointManager(out, keep=keep_checkpoints, is_main=accelerator.is_main_process)
    resume_dir = ckpt.resumable() if resume else None  # every rank checks: all raise alike
    state = CheckpointManager.load_state(resume_dir) if resume_dir else None
    if step_batch is not None:
        check_resume_batch(state, step_batch, accelerator.num_processes)  # every rank: all raise alike
    if resume_dir is not None and accelerator.is_main_process:
        log.info("resuming from %s (step %d)", resume_dir, state["step"])
    if accelerator.is_main_process and resume_dir is None:
        save_config(cfg, out / "config.yaml")
    seed_everything(seed)
    logger = RunLogger(out, is_main=accelerator.is_main_process, resume_step=state["step"] if state else None)
    return Run(out, accelerator, ckpt, logger, state, resume_dir,
               step_batch[1] * accelerator.num_processes if step_batch else None,
               pending_config=cfg if resume_dir is not None else None)


def rng_state() -> dict:
    """Python, numpy and torch RNG states (restored on resume so a resumed run samples as the original)."""
    import random

    import numpy as np
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_optimizer_state(optimizer, path) -> None:
    """The optimiser's state (moments, step counts) from a checkpoint, keeping this run's hyperparameters (lr,
    weight decay, betas, ...): torch's load_state_dict would restore the checkpoint's, so a run resumed with
    another lr in its config (and config.yaml saying so) would silently go on at the old one."""
    import torch
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(torch.load(path, weights_only=False))
    except ValueError as e:  # torch: "... parameter group that doesn't match the size of optimizer's group"
        raise ValueError(resume_mismatch(path, f"its optimiser state holds other parameters ({e})")) from None
    for g, hyper in zip(optimizer.param_groups, wanted):
        g.update(hyper)


def load_resumed_weights(module, path) -> None:
    """A checkpoint's whole state_dict into the module this run built: every key must fit, names and shapes."""
    import torch
    try:
        loaded = module.load_state_dict(torch.load(path, weights_only=False), strict=False)
    except RuntimeError as e:  # shapes differ (e.g. another lora.r): torch lists every tensor; the first says enough
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(resume_mismatch(path, (lines or str(e).splitlines())[0].rstrip("."))) from None
    if loaded.missing_keys or loaded.unexpected_keys:
        raise ValueError(resume_mismatch(path, f"{len(loaded.unexpected_keys)} of its tensors have no place in this "
                                               f"model {loaded.unexpected_keys[:2]}, {len(loaded.missing_keys)} of "
                                               f"the model's are not in it {loaded.missing_keys[:2]}"))


def resume_mismatch(path, what: str) -> str:
    """The message for a checkpoint that does not fit the model this run built: --resume given another
    model than the run's (the policy, lora.*, value_model), e.g. without the --config it was started with."""
    out = Path(path).parent.parent.parent  # OUT/checkpoints/step-N/FILE
    return (f"--resume: the checkpoint {Path(path).parent} does not fit the model built from this command's settings: "
            f"{what}; another model, lora.* or value_model than the run's? Resume with the run's own settings "
            f"(--config {out / 'config.yaml'}), or choose another --out for a new run")


def stop_if_not_finite(acc, losses: dict[str, float], what: str) -> None:
    """Before an optimiser step: raise FloatingPointError on every process if any process's loss is NaN/inf (all
    agree, so none hangs at the next collective). Stepping would write NaN into the weights, and the next
    checkpoint would keep them; raised here, the last checkpoint is intact."""
    import math

    import torch
    finite = all(math.isfinite(v) for v in losses.values())
    if getattr(acc, "num_processes", 1) > 1:
        finite = bool(acc.gather(torch.tensor([float(finite)], device=acc.device)).min() > 0)
    if not finite:
        shown = ", ".join(f"{k} {v}" for k, v in losses.items())
        raise FloatingPointError(f"{what}: the loss is not finite ({shown}); lower lr; nothing of this step was "
                                 "saved, the last checkpoint is intact")


def float32_trainable(module) -> None:
    """Every parameter that trains (requires_grad) in float32, whatever the frozen rest is in (bf16/fp16 under
    mixed precision with LoRA): the optimiser's updates and state need float32. Text and image LoRA use it."""
    import torch
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def adamw(params, lr: float, **kwargs):
    """torch AdamW with the fused kernel where the device and dtypes allow it (CPU and CUDA, fp32/bf16/
    fp16): one kernel for all parameters instead of a Python loop over them (measured 4.2 -> 0.9 ms
    per step for 31 small tensors on one CPU core). Falls back to the default implementation."""
    import torch
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups (e.g. no weight decay on biases/norms)
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, **kwargs)


def warmup_cosine(warmup: int, steps: int, min_ratio: float = 0.1):
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`: linear warm-up to 1 over `warmup` steps,
    then cosine decay to `min_ratio` at step `steps` (nanoGPT's schedule; the worlds' base models)."""
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def reduce_pair_stats(stats: dict, weight: float, acc) -> dict:
    """A reward model's batch loss and accuracy over every process's pairs (each process's mean weighted by its
    pair count; `weight` 0 = a process that only ran a stand-in group), for the log. One process: unchanged."""
    if getattr(acc, "num_processes", 1) == 1:
        return {"loss": stats["loss"], "accuracy": stats["accuracy"]}
    import torch
    n = stats["n_pairs"] if weight > 0 else 0.0
    t = acc.reduce(torch.tensor([stats["loss"] * n, stats["accuracy"] * n, n], dtype=torch.float64,
                                device=acc.device), reduction="sum")
    return {"loss": float(t[0] / t[2]), "accuracy": float(t[1] / t[2])}


def gather_strings(items: list[str], acc) -> list[str]:
    """Every process's strings, in rank order (acc.gather's order for tensors)."""
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object
    return list(gather_object(list(items)))


def train_reward_model(run, schedule, score_fn, model, optimizer, cfg, write, held_out, desc: str = "rm",
                       after_step=None, extra_log=None) -> None:
    """The pairwise loop both reward models run (text_rlhf.rm, image_rlhf.rm): from the run's step to the end of
    `schedule` (align.reward.pair_schedule), each step one global batch of whole groups, this process's share
    weighted by its pairs (shard_groups), Bradley-Terry loss, grad-norm clip 1, an optimiser step; logs every
    cfg.log_every steps; at every epoch's end (and every cfg.save_every steps) the held-out metrics
    (`held_out(step) -> dict`, None without held-out data) and a checkpoint (`write`).
    after_step(): e.g. the CLIP temperature's clamp; extra_log() -> dict: metrics logged with the loss."""
    from align.reward import PairBatch, batch_loss, shard_groups
    from align.runner import WindowMean, progress
    acc, total = run.accelerator, len(schedule)
    run.check_end(total, "epochs")
    window = WindowMean()
    bar = progress(total=total, desc=desc, is_main=run.is_main)
    bar.update(run.start_step)
    for step in range(run.start_step, total):
        epoch, groups = schedule[step]
        mine, weight = shard_groups(groups, acc.process_index, acc.num_processes)
        pb = PairBatch.from_groups(mine)
        loss, stats = batch_loss(score_fn(pb.prompts, pb.candidates), pb)
        acc.backward(loss * weight)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        bar.update(1)
        done = step + 1
        window.add({f"rm/{k}": v for k, v in reduce_pair_stats(stats, weight, acc).items()})
        if done % cfg.log_every == 0 or done == total:
            run.log(done, {**window.pop(), **(extra_log() if extra_log else {})})
        if (cfg.save_every and done % cfg.save_every == 0) or done == total or schedule[done][0] != epoch:
            if held_out is not None:
                run.log(done, held_out(done))
            run.checkpoint(done, write, {"epoch": epoch})
    bar.close()
