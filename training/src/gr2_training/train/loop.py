"""The training loop shared by all stages: AdamW with warm-up + cosine decay, gradient
clipping, DistributedDataParallel, periodic checkpoints, exact resume, JSON-lines metrics
and a progress bar.

Exact resume: the batch of step s depends only on (seed, step, rank, world size), stage
randomness is seeded per step, and a periodic checkpoint holds the weights, the optimizer
state, the step and the stage's own state. A run resumed from step s therefore continues as
an uninterrupted one would (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from gr2_policy.model import GR2Policy, count_parameters
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gr2_training.dataset import EpisodeDataset
from gr2_training.train import checkpointing as ckpt
from gr2_training.train.data import check_compatible, open_dataset, step_loader
from gr2_training.train.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    mean_over_ranks,
    shutdown,
)
from gr2_training.train.errors import TrainingError
from gr2_training.train.metrics_log import MetricsLog
from gr2_training.train.settings import Settings
from gr2_training.train.stages import Stage, build_stage

TRAINER_FORMAT = 1
AUX_OUTPUTS = ("ids",)  # loss-module outputs that are not loss terms


def lr_at(step: int, settings: Settings) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up over ``warmup`` steps to ``lr``,
    then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    warmup = min(settings.warmup, settings.steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, settings.steps - 1 - warmup))
    ratio = settings.min_lr_ratio
    return settings.lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; norms, biases, embedding vectors and
    the VQ codebook (compared by cosine) are not decayed."""

    def decays(name: str, p: nn.Parameter) -> bool:
        return p.ndim >= 2 and "codebook" not in name

    return [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]


def check_settings(s: Settings) -> None:
    """TrainingError listing every flag out of range."""
    problems = []
    for name in ("steps", "batch_size", "log_every", "keep"):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("save_every", "eval_every", "warmup", "val_episodes", "num_workers"):
        if getattr(s, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    if not s.lr > 0 or not 0 <= s.min_lr_ratio <= 1:
        problems.append("--lr must be > 0 and --min-lr-ratio within 0..1")
    if not s.local_weight >= 0:
        problems.append("--local-weight must be >= 0")
    for name in ("state_dropout", "start_fraction"):
        if not 0 <= getattr(s, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} must be within 0..1")
    if s.threads is not None and s.threads < 1:
        problems.append("--threads must be >= 1")
    if s.precision not in ("fp32", "bf16"):
        problems.append(f"--precision must be fp32 or bf16, got {s.precision!r}")
    if s.save_dtype not in ckpt.SAVE_DTYPES:
        problems.append(f"--save-dtype must be one of {sorted(ckpt.SAVE_DTYPES)}")
    if problems:
        raise TrainingError("; ".join(problems))


def _progress_factory(enabled: bool) -> Callable[[str, int], Callable[[int], None]]:
    def make(desc: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=desc, unit="ep", disable=not enabled or total == 0)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    return make


def _check_run_dir(run_dir: Path, stage: Stage, settings: Settings) -> Path | None:
    """The periodic checkpoint to resume from (None: start fresh); refuses to overwrite."""
    if settings.resume:
        ckpt.check_resumable(run_dir, stage.name, settings.to_json())
        return ckpt.latest_periodic(run_dir)
    record = ckpt.read_run(run_dir) if run_dir.is_dir() else None
    if record is not None:
        raise TrainingError(
            f"--out {run_dir} already holds a {record.get('stage')} run; pass --resume to "
            "continue it, or choose another --out"
        )
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} exists and is not a directory")
    # A start interrupted while tokenizing leaves only RUN_DIR/token_cache (its entries are
    # written atomically and checked against their episode), so a fresh start reuses it.
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.name != ckpt.TOKEN_CACHE_DIR)
    if leftovers:
        raise TrainingError(
            f"--out {run_dir} exists and holds {', '.join(leftovers)}, not a gr2-train run; "
            "choose another --out"
        )
    return None


def run(settings: Settings) -> dict[str, Any]:
    """Run one stage (joining the torchrun group if there is one); returns the summary
    (empty on ranks other than 0)."""
    check_settings(settings)
    info = init_distributed(settings.device)
    try:
        summary = _run(settings, info)
        barrier(info)  # no rank tears the group down while another still uses it
        return summary
    finally:
        shutdown(info)


def _run(settings: Settings, info: DistInfo) -> dict[str, Any]:
    settings.world_size = info.world_size
    threads = settings.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    run_dir = Path(settings.out)
    stage = build_stage(settings, info)
    resume_from = _check_run_dir(run_dir, stage, settings)
    barrier(info)  # every rank has looked at RUN_DIR before rank 0 writes to it

    dataset = open_dataset(settings.data)
    if resume_from is not None:
        policy = ckpt.load_policy(resume_from, info.device)
    else:
        policy = stage.new_policy()
    check_compatible(dataset.meta, policy.config, settings.data, actions=stage.uses_actions)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage.prepare(policy, dataset, run_dir, _progress_factory(info.is_main and settings.progress))

    named = stage.named_trainable()
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(
        param_groups(named, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95)
    )
    start, wall_before = 0, 0.0
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        if state.get("stage") != stage.name:
            raise TrainingError(f"{resume_from} is a {state.get('stage')} checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        stage.load_extra_state(state.get("extra", {}))
        start, wall_before = int(state["step"]), float(state["wall_s"])

    log = MetricsLog(run_dir / ckpt.METRICS_FILE, info.is_main)
    if info.is_main:
        _write_record(run_dir, stage, settings, policy, dataset, start)
        log.truncate_after(start)
        if stage.name != "tokenizer" and resume_from is None and settings.init:
            init = ckpt.resolve_init(settings.init)
            if ckpt.init_stage(init) is None:
                print(
                    f"gr2-train {stage.name}: note: --init {init} is not the output of a "
                    "gr2-train run; its VQGAN and text encoder are used as they are",
                    file=sys.stderr,
                )

    module: nn.Module = stage.module
    if info.distributed:
        module = DistributedDataParallel(
            stage.module,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=stage.find_unused_parameters,
            broadcast_buffers=False,
        )
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16)
        if settings.precision == "bf16"
        else nullcontext()
    )
    loader = step_loader(
        stage.batches, start, settings.steps, settings.num_workers, info.device.type == "cuda"
    )
    bar = tqdm(
        total=settings.steps,
        initial=start,
        desc=stage.name,
        unit="step",
        disable=not (info.is_main and settings.progress),
        dynamic_ncols=True,
        mininterval=0.5,
    )
    t0 = perf_counter()

    def trainer_state(done: int) -> dict[str, Any]:
        return {
            "format": TRAINER_FORMAT,
            "stage": stage.name,
            "step": done,
            "optimizer": optimizer.state_dict(),
            "wall_s": wall_before + perf_counter() - t0,
            "settings": settings.to_json(),
            "extra": stage.extra_state(),
        }

    window_t, window_steps, window_examples = perf_counter(), 0, 0
    sums: dict[str, torch.Tensor] = {}
    last: dict[str, float] = {}
    for step, batch in zip(range(start, settings.steps), loader, strict=False):
        lr = lr_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = stage.to_device(batch)
        with autocast:
            out = module(batch, step)
        total = out["total"]
        if not torch.isfinite(total):
            raise TrainingError(
                f"the loss became {float(total)} at step {step + 1}; lower --lr "
                f"(now {settings.lr}) or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm.detach()
        optimizer.step()
        stage.after_step(out, batch, step, optimizer)
        for key, value in out.items():
            if key not in AUX_OUTPUTS:
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        window_steps += 1
        window_examples += next(iter(batch.values())).shape[0]
        done = step + 1
        bar.update(1)

        if done % settings.log_every == 0 or done == settings.steps:
            elapsed = perf_counter() - window_t
            values = mean_over_ranks({k: float(v) / window_steps for k, v in sums.items()}, info)
            values.update(stage.window_metrics())
            last = values
            log.write(
                {
                    "stage": stage.name,
                    "step": done,
                    **values,
                    "lr": lr,
                    "examples_per_s": window_examples * info.world_size / elapsed,
                    "steps_per_s": window_steps / elapsed,
                    "wall_s": wall_before + perf_counter() - t0,
                }
            )
            bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{lr:.2e}", refresh=False)
            sums, window_steps, window_examples = {}, 0, 0
            window_t = perf_counter()
        paused = perf_counter()
        evaluate = settings.eval_every and done % settings.eval_every == 0
        if info.is_main and evaluate and done != settings.steps:  # the final one is below
            figures = stage.evaluate(final=False)
            if figures:
                log.write({"stage": stage.name, "step": done, "split": "val", **figures})
        if info.is_main and (
            (settings.save_every and done % settings.save_every == 0) or done == settings.steps
        ):
            ckpt.save_periodic(run_dir, policy, trainer_state(done), settings.keep)
        window_t += perf_counter() - paused  # evaluating and saving is not training speed
    bar.close()
    trained_s = perf_counter() - t0
    steps_run = settings.steps - start

    summary: dict[str, Any] = {}
    if info.is_main:
        figures = stage.evaluate(final=True)
        if figures:
            split = "val" if any(k.startswith("val_") for k in figures) else "eval"
            log.write({"stage": stage.name, "step": settings.steps, "split": split, **figures})
        final = ckpt.save_final(run_dir, policy, settings.save_dtype)
        summary = {
            "stage": stage.name,
            "run_dir": str(run_dir),
            "checkpoint": str(final),
            "steps": settings.steps,
            "resumed_from_step": start if resume_from is not None else None,
            "last": last,
            **figures,
            "steps_per_s": steps_run / trained_s if steps_run else None,
            "wall_s": wall_before + trained_s,
            "threads": threads,
            "world_size": info.world_size,
            "device": str(info.device),
            "parameters": count_parameters(policy),
        }
        (run_dir / ckpt.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    barrier(info)
    return summary


def _write_record(
    run_dir: Path,
    stage: Stage,
    settings: Settings,
    policy: GR2Policy,
    dataset: EpisodeDataset,
    start: int,
) -> None:
    """run.json: written when a run starts; a resume appends to its "resumed" list."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if settings.resume:
        record = ckpt.read_run(run_dir) or {}
        record.setdefault("resumed", []).append({"step": start, "at": now})
    else:
        init = ckpt.resolve_init(settings.init) if settings.init else None
        record = {
            "stage": stage.name,
            "created": now,
            "settings": settings.to_json(),
            "config": policy.config.to_dict(),
            "init": str(init) if init else None,
            "init_stage": ckpt.init_stage(init) if init else None,
            "data": {
                "root": str(dataset.root),
                "meta": dataset.meta.to_json(),
                "episodes": len(dataset),
            },
            "torch": torch.__version__,
        }
    record["stage_data"] = stage.record
    ckpt.write_run(run_dir, record)
