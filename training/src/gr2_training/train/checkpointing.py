"""The run directory: what a stage writes, how --init and --resume find their weights.

::

    RUN_DIR/run.json                     stage, model config, settings, init, data, world size
    RUN_DIR/metrics.jsonl                one JSON object per logged step (and evaluations)
    RUN_DIR/checkpoints/step-00000500/   periodic: config.json + model.safetensors (a servable
                                         checkpoint) + trainer.pt (optimizer state, step, ...)
    RUN_DIR/checkpoint/                  the final model, in the policy server's format
    RUN_DIR/summary.json                 final figures of the stage
    RUN_DIR/token_cache/                 image token ids per episode (GPT stages)

Checkpoint directories are written under a temporary name and renamed, so a crash never
leaves a half-written one where --resume would pick it up.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gr2_policy.errors import CheckpointError
from gr2_policy.model import GR2Policy, load_checkpoint, save_checkpoint
from gr2_policy.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from gr2_training.train.errors import TrainingError
from gr2_training.train.settings import Settings

RUN_FORMAT = "gr2-train-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "checkpoint"
PERIODIC_DIR = "checkpoints"
TRAINER_FILE = "trainer.pt"
TOKEN_CACHE_DIR = "token_cache"  # the default --token-cache
STAGES = ("tokenizer", "pretrain", "finetune")
# Settings that fix the data order and the optimisation: a resume must not change them.
RESUME_FIXED = ("seed", "batch_size", "clip_length", "world_size", "lr", "steps", "local_weight")
DEFAULT_SETTINGS = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def resolve_init(path: str | Path) -> Path:
    """--init: a checkpoint directory, or a run directory (its final checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise TrainingError(f"--init {p} does not exist")
    if is_checkpoint(p):
        return p
    if is_checkpoint(p / FINAL_DIR):
        return p / FINAL_DIR
    if (p / RUN_FILE).is_file():
        latest = latest_periodic(p)
        hint = f"; its latest periodic checkpoint is {latest}" if latest else ""
        raise TrainingError(f"--init {p} is a run that has not finished (no {FINAL_DIR}/){hint}")
    raise TrainingError(
        f"--init {p} is neither a checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a run "
        f"directory with {FINAL_DIR}/"
    )


def load_policy(path: Path, device: torch.device) -> GR2Policy:
    """load_checkpoint with its error turned into a TrainingError."""
    try:
        return load_checkpoint(path, device=str(device))
    except CheckpointError as err:
        raise TrainingError(str(err)) from None


# Fields a GPT stage may not --override: they fix the image tokens (and the token caches).
TOKENIZER_FIELDS = (
    "views",
    "image_size",
    "vq_downsample",
    "codebook_size",
    "codebook_dim",
    "vq_channels",
    "vq_channel_mult",
    "vq_res_blocks",
    "vq_attention",
)


def reconfigure(policy: GR2Policy, overrides: dict[str, Any], seed: int) -> GR2Policy:
    """``policy`` with some GR2Config fields changed (e.g. ``lang_to_tokens``, or another
    ``text_encoder``): every tensor whose name and shape still exist is copied, the others
    are freshly initialised (with ``seed``). A tokenizer field cannot change."""
    fixed = sorted(set(overrides) & set(TOKENIZER_FIELDS))
    if fixed:
        raise TrainingError(
            f"--override {', '.join(fixed)}: tokenizer fields are fixed by --init (train a "
            "new tokenizer to change them)"
        )
    try:
        config = dataclasses.replace(policy.config, **overrides)
    except (TypeError, ValueError) as err:
        raise TrainingError(f"--override {overrides}: {err}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = GR2Policy(config)
    old = policy.state_dict()
    state = new.state_dict()
    for name, tensor in state.items():
        if name in old and old[name].shape == tensor.shape:
            state[name] = old[name]
    new.load_state_dict(state, strict=True)
    if config.text_encoder == policy.config.text_encoder:  # e.g. CLIP's BPE tables
        new.text_encoder = policy.text_encoder
    return new.to(next(policy.parameters()).device)


def reconfigure_report(before: GR2Policy, after: GR2Policy) -> dict[str, list[str]]:
    """Tensor names initialised afresh and dropped by ``reconfigure``."""
    old, new = before.state_dict(), after.state_dict()
    fresh = [n for n, t in new.items() if n not in old or old[n].shape != t.shape]
    return {"initialised": sorted(fresh), "dropped": sorted(set(old) - set(new))}


def init_stage(path: Path) -> str | None:
    """The stage that produced the checkpoint at ``path`` (from its run.json), if known."""
    for run_dir in (path.parent, path.parent.parent):
        record = read_run(run_dir)
        if record is not None:
            return record.get("stage")
    return None


def read_run(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"{path} is unreadable: {err}") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise TrainingError(f"{path} is not a gr2-train run record")
    return record


def write_run(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    full = {"format": RUN_FORMAT, "version": RUN_VERSION, **record}
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    tmp.replace(run_dir / RUN_FILE)


def check_resumable(run_dir: Path, stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The run record of ``run_dir`` if it is a run of ``stage`` with the same fixed
    settings; otherwise a TrainingError naming the difference."""
    record = read_run(run_dir)
    if record is None:
        raise TrainingError(f"--resume: {run_dir} holds no run ({RUN_FILE} missing)")
    if record.get("stage") != stage:
        raise TrainingError(
            f"--resume: {run_dir} is a {record.get('stage')} run, not a {stage} run; "
            f"resume it with `gr2-train {record.get('stage')} ... --resume`"
        )
    # a run recorded before a setting existed ran with its default
    saved = {**DEFAULT_SETTINGS, **record.get("settings", {})}
    changed = [
        f"{key} {saved.get(key)!r} -> {settings.get(key)!r}"
        for key in RESUME_FIXED
        if saved.get(key) != settings.get(key)
    ]
    if changed:
        raise TrainingError(
            f"--resume: {run_dir} was started with other settings ({', '.join(changed)}); "
            "a resumed run must keep them to continue exactly"
        )
    return record


def periodic_dirs(run_dir: Path) -> list[Path]:
    """Complete periodic checkpoints, oldest first."""
    root = run_dir / PERIODIC_DIR
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("step-")
        and p.name[5:].isdigit()
        and (p / TRAINER_FILE).is_file()
        and is_checkpoint(p)
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_periodic(run_dir: Path) -> Path | None:
    found = periodic_dirs(run_dir)
    return found[-1] if found else None


def _write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fill(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def save_periodic(
    run_dir: Path, policy: GR2Policy, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoints/step-N (servable weights + trainer.pt); keep the newest ``keep``."""
    step = int(trainer_state["step"])
    final = run_dir / PERIODIC_DIR / f"step-{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        save_checkpoint(policy, tmp)
        torch.save(trainer_state, tmp / TRAINER_FILE)

    _write_dir_atomically(final, fill)
    for old in periodic_dirs(run_dir)[: -max(keep, 1)]:
        shutil.rmtree(old)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    """trainer.pt of a periodic checkpoint (tensors and plain Python values only)."""
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise TrainingError(f"{path / TRAINER_FILE} is unreadable: {err}") from None


def save_final(run_dir: Path, policy: GR2Policy, dtype: str = "float32") -> Path:
    """RUN_DIR/checkpoint in the policy server's format. ``dtype`` float16/bfloat16 stores
    the weights at half size; loading casts them back to float32."""
    if dtype not in SAVE_DTYPES:
        raise TrainingError(f"--save-dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    model = policy
    if SAVE_DTYPES[dtype] != torch.float32:
        model = copy.deepcopy(policy).to(SAVE_DTYPES[dtype])
    return _write_dir_atomically(run_dir / FINAL_DIR, lambda tmp: save_checkpoint(model, tmp))
