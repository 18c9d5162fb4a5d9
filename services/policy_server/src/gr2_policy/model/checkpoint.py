"""Checkpoints: a directory with ``config.json`` (GR2Config) and ``model.safetensors``, plus
``text_tokenizer/`` (vocab.json, merges.txt) when the text encoder is CLIP's.

Loading is strict: a config that names unknown fields, or weights that do not match the
architecture the config describes, raise ``CheckpointError`` naming the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gr2_policy.errors import CheckpointError
from gr2_policy.model.config import GR2Config
from gr2_policy.model.policy import GR2Policy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "text_tokenizer"
_MAX_LISTED = 8  # tensor names listed in one error message


def save_checkpoint(model: GR2Policy, directory: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors into ``directory`` (created if needed)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n"
    (path / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"preset": model.config.preset})
    if model.config.text_encoder == "clip":
        model.text_encoder.save_tokenizer(path / TOKENIZER_DIR)
    return path


def _read_config(path: Path) -> GR2Config:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    try:
        return GR2Config.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc


def _listed(names: list[str]) -> str:
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def load_checkpoint(directory: str | os.PathLike[str], device: str = "cpu") -> GR2Policy:
    """Build the model its config.json describes and load its weights (eval mode).

    Raises CheckpointError for a missing directory or file, malformed JSON, an unknown or
    missing config field, and missing, unexpected or wrongly shaped tensors.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = _read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {exc}") from exc

    model = GR2Policy(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensors: {_listed(missing)}"] if missing else []
        parts += [f"unexpected tensors: {_listed(unexpected)}"] if unexpected else []
        raise CheckpointError(
            f"{weights_path} does not match its config (preset {config.preset!r}): "
            + "; ".join(parts)
        )
    wrong = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs config {tuple(ref.shape)}"
        for name, ref in expected.items()
        if tensors[name].shape != ref.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{weights_path} does not match its config (preset {config.preset!r}): shape "
            f"mismatch for {_listed(wrong)}"
        )
    model.load_state_dict(tensors, strict=True)
    if config.text_encoder == "clip":
        if not (path / TOKENIZER_DIR).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has a CLIP text encoder but no {TOKENIZER_DIR}/ "
                "(vocab.json, merges.txt)"
            )
        model.text_encoder.load_tokenizer(path / TOKENIZER_DIR)
    return model.to(device).eval()


def init_random_policy(preset: str, seed: int, **overrides: Any) -> GR2Policy:
    """A randomly initialised model of ``preset`` with optional GR2Config ``overrides`` (eval
    mode); the same seed gives the same weights. The global RNG state is left untouched."""
    config = GR2Config.from_preset(preset, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GR2Policy(config)
    return model.eval()


def model_hash(model: GR2Policy) -> str:
    """Short stable hex digest (16 chars) of the config and every weight (names, dtypes,
    shapes, bytes); used as the served ``model_version``."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())  # buffer protocol: no copy
    return digest.hexdigest()[:16]


def count_parameters(model: GR2Policy) -> dict[str, int]:
    """Parameter counts: ``total``, ``trainable`` and one entry per top-level component
    (text_encoder, vqgan, gpt, action_head); the components sum to ``total``."""
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    for name, child in model.named_children():
        counts[name] = sum(p.numel() for p in child.parameters())
    return counts
