"""Training data: which episodes a run uses, and the batch of every step.

Every batch is a pure function of (seed, step, rank, world size): step s draws its global
batch (batch_size x world_size examples) from ``numpy.random.default_rng([seed, s])`` and
each rank takes its shard. So a resumed run sees exactly the batches an uninterrupted one
would, and the data order needs no saved state.

- Tokenizer stage: single frames of every view (``FramePool``, uint8, held in memory).
- Pre-training / fine-tuning: clips of T consecutive steps (``ClipData``), windows drawn
  uniformly over all windows of all episodes, from token ids cached per episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from gr2_policy.model import GR2Config
from torch.utils.data import DataLoader, Dataset

from gr2_training.dataset import DatasetError, DatasetMeta, EpisodeDataset
from gr2_training.train.distributed import shard
from gr2_training.train.errors import TrainingError
from gr2_training.train.tokens import EpisodeTokens

VAL_SALT = 1  # seeds the fixed validation sample, apart from every training step's draw


def check_compatible(meta: DatasetMeta, config: GR2Config, root: str, *, actions: bool) -> None:
    """Raise TrainingError naming the dataset's and the model's value of the first field
    that differs (views, image size; with ``actions`` also k and the waypoint spacing)."""
    model = f"the model (preset {config.preset})"
    if set(meta.views) != set(config.views):
        raise TrainingError(
            f"dataset {root} has views {list(meta.views)} but {model} needs {list(config.views)}"
        )
    if meta.image_size != config.image_size:
        raise TrainingError(
            f"dataset {root} has {meta.image_size}x{meta.image_size} images but {model} needs "
            f"{config.image_size}x{config.image_size}"
        )
    if not actions:
        return
    if meta.action_horizon != config.action_horizon:
        raise TrainingError(
            f"dataset {root} has action horizon k={meta.action_horizon} but {model} needs "
            f"k={config.action_horizon}"
        )
    if abs(meta.waypoint_dt_s - config.waypoint_dt_s) > 1e-9:
        raise TrainingError(
            f"dataset {root} has waypoints {meta.waypoint_dt_s} s apart but {model} needs "
            f"{config.waypoint_dt_s} s"
        )


def open_dataset(root: str) -> EpisodeDataset:
    """The dataset at ``root``, or TrainingError saying what is wrong with it."""
    try:
        dataset = EpisodeDataset(root)
    except DatasetError as err:
        raise TrainingError(f"--data {root}: {err}") from None
    if len(dataset) == 0:
        raise TrainingError(f"--data {root}: the dataset has no episodes")
    return dataset


def select_episodes(
    dataset: EpisodeDataset,
    *,
    tasks: Sequence[str] | None,
    success_only: bool,
    val_episodes: int,
) -> tuple[list[int], list[int]]:
    """(training, validation) episode indices. Validation takes ``val_episodes`` evenly
    spaced episodes of the selection (independent of the seed, so runs compare)."""
    chosen = [
        i
        for i, info in enumerate(dataset.index)
        if (not tasks or info.task in tasks) and (info.success or not success_only)
    ]
    if not chosen:
        what = f"of task(s) {list(tasks)}" if tasks else ""
        ok = " successful" if success_only else ""
        raise TrainingError(f"--data {dataset.root} has no{ok} episodes {what}".rstrip())
    if val_episodes < 0 or val_episodes >= len(chosen):
        raise TrainingError(
            f"--val-episodes {val_episodes} must be >= 0 and leave training episodes "
            f"({len(chosen)} selected)"
        )
    val = [chosen[int(j)] for j in np.linspace(0, len(chosen), val_episodes, endpoint=False)]
    train = [i for i in chosen if i not in set(val)]
    return train, val


def plan_rng(seed: int, step: int, salt: int = 0) -> np.random.Generator:
    """The generator of one step's draw (``salt`` separates other uses of the seed)."""
    return np.random.default_rng([seed, step, salt])


class FramePool:
    """Every ``stride``-th frame of every view of some episodes, uint8 (N, H, W, 3)."""

    def __init__(
        self,
        dataset: EpisodeDataset,
        indices: Sequence[int],
        stride: int = 1,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if stride < 1:
            raise TrainingError(f"--frame-stride must be >= 1, got {stride}")
        meta = dataset.meta
        total = sum(len(range(0, dataset.index[i].steps, stride)) for i in indices)
        s = meta.image_size
        self.frames = np.empty((total * len(meta.views), s, s, 3), np.uint8)
        at = 0
        for i in indices:
            episode = dataset.load(i)
            for view in meta.views:
                frames = episode.images[view][::stride]
                self.frames[at : at + len(frames)] = frames
                at += len(frames)
            if progress is not None:
                progress(1)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n frame indices, uniformly with replacement."""
        return rng.integers(0, len(self), size=n)


class ClipData:
    """Windows of ``clip_length`` consecutive steps over episodes (shorter ones are left out).

    ``instruction_ids[e]`` is episode e's row in the table of distinct instructions.
    ``start_fraction`` of the sampled clips begin at an episode's first step (episodes drawn
    uniformly), the rest are uniform over all windows.
    """

    def __init__(
        self,
        episodes: Sequence[EpisodeTokens],
        instruction_ids: Sequence[int],
        clip_length: int,
        start_fraction: float = 0.0,
    ) -> None:
        keep = [e for e, ep in enumerate(episodes) if ep.steps >= clip_length]
        if not keep:
            longest = max((ep.steps for ep in episodes), default=0)
            raise TrainingError(
                f"no episode has {clip_length} steps (the longest has {longest}); "
                "lower --clip-length"
            )
        self.clip_length = clip_length
        self.start_fraction = start_fraction
        self.episodes = [episodes[e] for e in keep]
        self.instruction_ids = np.asarray([instruction_ids[e] for e in keep], np.int64)
        self.skipped = len(episodes) - len(keep)
        windows = np.asarray([ep.steps - clip_length + 1 for ep in self.episodes], np.int64)
        self.first_window = np.concatenate(([0], np.cumsum(windows)))
        self.total_windows = int(self.first_window[-1])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n window ids with replacement: uniformly over all windows, except that a
        ``start_fraction`` of them are the first window of a uniformly drawn episode."""
        windows = rng.integers(0, self.total_windows, size=n)
        if self.start_fraction > 0.0:  # (no extra draws otherwise: old seeds stay exact)
            at_start = rng.random(n) < self.start_fraction
            first = self.first_window[rng.integers(0, len(self.episodes), size=n)]
            windows = np.where(at_start, first, windows)
        return windows

    def gather(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """The clips of ``windows``: tokens (B, T, V, N) long, states (B, T, 8), actions
        (B, T, k, 8), action_valid (B, T, k) bool, instruction (B,) long (table rows)."""
        episode = np.searchsorted(self.first_window, windows, side="right") - 1
        start = windows - self.first_window[episode]
        t = self.clip_length
        parts: dict[str, list[np.ndarray]] = {
            "tokens": [],
            "states": [],
            "actions": [],
            "action_valid": [],
        }
        for e, s in zip(episode.tolist(), start.tolist(), strict=True):
            ep = self.episodes[e]
            parts["tokens"].append(ep.tokens[s : s + t])
            parts["states"].append(ep.states[s : s + t])
            parts["actions"].append(ep.actions[s : s + t])
            parts["action_valid"].append(ep.action_valid[s : s + t])
        out = {
            "tokens": torch.from_numpy(np.stack(parts["tokens"]).astype(np.int64)),
            "states": torch.from_numpy(np.stack(parts["states"])),
            "actions": torch.from_numpy(np.stack(parts["actions"])),
            "action_valid": torch.from_numpy(np.stack(parts["action_valid"])),
            "instruction": torch.from_numpy(self.instruction_ids[episode]),
        }
        return out


class StepBatches(Dataset):
    """Map-style dataset over steps: item s is this rank's batch of step s."""

    def __init__(
        self,
        source: FramePool | ClipData,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source = source
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return 2**62  # indexed by step; any step has a batch

    def indices(self, step: int) -> np.ndarray:
        """This rank's example ids (frames or windows) of ``step``."""
        drawn = self.source.sample(plan_rng(self.seed, step), self.batch_size * self.world_size)
        return np.asarray(shard(drawn, self.rank, self.world_size))

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        ids = self.indices(step)
        if isinstance(self.source, FramePool):
            return {"frames": torch.from_numpy(self.source.frames[ids])}
        return self.source.gather(ids)


def fixed_sample(source: FramePool | ClipData, seed: int, n: int) -> np.ndarray:
    """A fixed set of ``n`` example ids (validation / final evaluation)."""
    return source.sample(plan_rng(seed, 0, VAL_SALT), n)


def step_loader(
    batches: StepBatches, start: int, stop: int, num_workers: int, pin_memory: bool
) -> DataLoader[Any]:
    """The batches of steps start..stop-1 in order, prepared by ``num_workers`` processes."""
    if num_workers < 0:
        raise TrainingError(f"--num-workers must be >= 0, got {num_workers}")
    return DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
