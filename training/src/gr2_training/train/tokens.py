"""Episodes as the GPT stages see them: image token ids from the frozen VQGAN plus the
low-dimensional arrays, cached per episode so that tokenization runs once per VQGAN.

The cache lives in ``CACHE/<vqgan fingerprint>/<episode stem>.npz`` (by default
``RUN_DIR/token_cache``; ``--token-cache DIR`` shares one between runs). An entry records the
index line of the episode it came from and is redone when that line changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from gr2_policy.model import GR2Policy
from gr2_policy.model.vqgan import VQGAN

from gr2_training.dataset import Episode, EpisodeDataset, EpisodeInfo

ENCODE_CHUNK = 128  # images per VQGAN encoder call


@dataclass
class EpisodeTokens:
    """One episode for the GPT stages.

    tokens (T, V, N) integer ids, views in the model's order; states (T, 8) float32;
    actions (T, k, 8) float32; action_valid (T, k) bool (see gr2_training.dataset).
    """

    info: EpisodeInfo
    tokens: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    action_valid: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.tokens.shape[0])


def vqgan_fingerprint(vqgan: VQGAN) -> str:
    """16 hex digits over the VQGAN's weights: the cache key of its tokens."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vqgan.state_dict().items()):
        flat = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def _token_dtype(codebook_size: int) -> type[np.integer]:
    return np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


@torch.inference_mode()
def tokenize_episode(policy: GR2Policy, episode: Episode, device: torch.device) -> np.ndarray:
    """All frames of ``episode`` -> ids (T, V, N) in the compact integer dtype."""
    cfg = policy.config
    frames = np.stack([episode.images[v] for v in cfg.views], axis=1)  # (T, V, H, W, 3)
    flat = torch.from_numpy(frames.reshape(-1, *frames.shape[2:]))
    ids = [
        policy.vqgan.encode(flat[i : i + ENCODE_CHUNK].to(device)).cpu()
        for i in range(0, flat.shape[0], ENCODE_CHUNK)
    ]
    out = torch.cat(ids).view(episode.steps, len(cfg.views), cfg.tokens_per_view)
    return out.numpy().astype(_token_dtype(cfg.codebook_size))


def _index_key(info: EpisodeInfo) -> str:
    return json.dumps(asdict(info), sort_keys=True)


def _read_entry(path: Path, info: EpisodeInfo) -> EpisodeTokens | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["index"]) != _index_key(info):
                return None
            return EpisodeTokens(
                info, data["tokens"], data["states"], data["actions"], data["action_valid"]
            )
    except (OSError, KeyError, ValueError):
        return None  # a torn or foreign file: redo it


def _write_entry(path: Path, entry: EpisodeTokens) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        tokens=entry.tokens,
        states=entry.states,
        actions=entry.actions,
        action_valid=entry.action_valid,
        index=np.array(_index_key(entry.info)),
    )
    tmp.replace(path)


def cache_episodes(
    dataset: EpisodeDataset,
    indices: Sequence[int],
    policy: GR2Policy,
    cache_root: Path,
    device: torch.device,
    *,
    tokenize: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Make sure the cache holds every episode of ``tokenize`` (default: ``indices``);
    return the cache directory of this VQGAN. ``progress(n)`` is called per episode."""
    directory = cache_root / vqgan_fingerprint(policy.vqgan)
    directory.mkdir(parents=True, exist_ok=True)
    for i in indices if tokenize is None else tokenize:
        info = dataset.index[i]
        path = directory / f"{Path(info.file).stem}.npz"
        if _read_entry(path, info) is None:
            episode = dataset.load(i)
            entry = EpisodeTokens(
                info,
                tokenize_episode(policy, episode, device),
                episode.states.astype(np.float32),
                episode.actions.astype(np.float32),
                episode.action_valid.astype(bool),
            )
            _write_entry(path, entry)
        if progress is not None:
            progress(1)
    return directory


def load_cached(
    dataset: EpisodeDataset, indices: Sequence[int], directory: Path
) -> list[EpisodeTokens]:
    """The cached entries of ``indices`` (all must be there: see ``cache_episodes``)."""
    out = []
    for i in indices:
        info = dataset.index[i]
        entry = _read_entry(directory / f"{Path(info.file).stem}.npz", info)
        if entry is None:
            raise FileNotFoundError(f"token cache {directory} lacks episode {info.file}")
        out.append(entry)
    return out
