"""The on-disk episode dataset: one compressed file per episode, streamed by a reader.

Layout of a dataset directory::

    DIR/dataset.json            DatasetMeta: format, version, views, image size, step period,
                                action horizon k and waypoint spacing
    DIR/index.jsonl             one JSON line per episode, in order (EpisodeInfo)
    DIR/episodes/000042.npz     one episode (np.savez_compressed: frames are zlib-compressed)

An episode file holds, for T policy steps (observations ``step_period_s`` apart):

=================== =============== ======= ==================================================
key                 shape           dtype   meaning [unit]
=================== =============== ======= ==================================================
``image_<view>``    (T, H, W, 3)    uint8   RGB frames of each view (H = W = image_size)
``states``          (T, 8)          float32 tool position [m], quaternion (w, x, y, z), gripper
                                            closure 0..1, base frame, at each step
``actions``         (T, k, 8)       float32 the k waypoints after each step, absolute, same
                                            layout as ``states`` (gripper = the command)
``action_valid``    (T, k)          bool    which waypoints exist (False past the episode end)
``times``           (T,)            float64 robot time of each step [s]
``joint_positions`` (T, 7)          float32 measured joint positions [rad]
``info``            ()              str     the EpisodeInfo as JSON (self-contained file)
=================== =============== ======= ==================================================

Writing is crash-safe: the episode file is written under a temporary name and renamed, then
its index line is appended; a reader only sees indexed episodes. A writer opened on an
existing dataset continues it (the metadata must match).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gr2-episodes"
VERSION = 1
STATE_DIM = 8  # position 3, quaternion 4, gripper 1
N_JOINTS = 7


class DatasetError(ValueError):
    """A dataset directory or episode that does not match the format."""


@dataclass(frozen=True)
class DatasetMeta:
    """What every episode of a dataset shares."""

    views: tuple[str, ...]
    image_size: int
    step_period_s: float
    action_horizon: int
    waypoint_dt_s: float
    source: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["views"] = list(self.views)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetMeta:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise DatasetError(
                f"not a {FORMAT} v{VERSION} dataset: format {data.get('format')!r}, "
                f"version {data.get('version')!r}"
            )
        try:
            return cls(**{**data, "views": tuple(data["views"])})
        except (TypeError, KeyError) as err:
            raise DatasetError(f"bad dataset.json: {err}") from None


@dataclass(frozen=True)
class EpisodeInfo:
    """One line of ``index.jsonl``."""

    file: str
    instruction: str
    task: str
    seed: int
    success: bool
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One demonstration (see the module docstring for the arrays)."""

    info: EpisodeInfo
    images: dict[str, np.ndarray]
    states: np.ndarray
    actions: np.ndarray
    action_valid: np.ndarray
    times: np.ndarray
    joint_positions: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.states.shape[0])


def check_episode(meta: DatasetMeta, episode: Episode) -> None:
    """Raise :class:`DatasetError` naming the first array that does not fit ``meta``."""
    t, k, s = episode.steps, meta.action_horizon, meta.image_size
    expected = {
        "states": ((t, STATE_DIM), np.floating),
        "actions": ((t, k, STATE_DIM), np.floating),
        "action_valid": ((t, k), np.bool_),
        "times": ((t,), np.floating),
        "joint_positions": ((t, N_JOINTS), np.floating),
    }
    if t < 1:
        raise DatasetError("an episode needs at least one step")
    if set(episode.images) != set(meta.views):
        raise DatasetError(f"views {sorted(episode.images)} != dataset views {list(meta.views)}")
    for view, frames in episode.images.items():
        if frames.shape != (t, s, s, 3) or frames.dtype != np.uint8:
            raise DatasetError(
                f"image_{view}: {frames.shape} {frames.dtype}, expected ({t}, {s}, {s}, 3) uint8"
            )
    for name, (shape, kind) in expected.items():
        arr = getattr(episode, name)
        if arr.shape != shape or not np.issubdtype(arr.dtype, kind):
            raise DatasetError(f"{name}: {arr.shape} {arr.dtype}, expected {shape} {kind.__name__}")
        if kind is np.floating and not np.all(np.isfinite(arr)):
            raise DatasetError(f"{name} has non-finite values")
    if episode.info.steps != t:
        raise DatasetError(f"info says {episode.info.steps} steps, arrays have {t}")


class DatasetWriter:
    """Appends episodes to a dataset directory (created, or continued if it exists)."""

    def __init__(self, root: str | Path, meta: DatasetMeta) -> None:
        self.root = Path(root)
        self.meta = meta
        (self.root / "episodes").mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "dataset.json"
        if meta_path.exists():
            existing = DatasetMeta.from_json(json.loads(meta_path.read_text()))
            if existing != meta:
                raise DatasetError(f"{meta_path} holds {existing}, not {meta}")
        else:
            meta_path.write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        self.count = len(_read_index(self.root))

    def add(
        self,
        *,
        instruction: str,
        task: str,
        seed: int,
        success: bool,
        images: dict[str, np.ndarray],
        states: np.ndarray,
        actions: np.ndarray,
        action_valid: np.ndarray,
        times: np.ndarray,
        joint_positions: np.ndarray,
        extra: dict[str, Any] | None = None,
    ) -> EpisodeInfo:
        """Validate and write one episode; return its index entry."""
        name = f"episodes/{self.count:06d}.npz"
        info = EpisodeInfo(
            name, instruction, task, int(seed), bool(success), int(states.shape[0]), extra or {}
        )
        episode = Episode(
            info,
            {v: np.asarray(a) for v, a in images.items()},
            np.asarray(states, np.float32),
            np.asarray(actions, np.float32),
            np.asarray(action_valid, bool),
            np.asarray(times, np.float64),
            np.asarray(joint_positions, np.float32),
        )
        check_episode(self.meta, episode)
        path = self.root / name
        tmp = path.with_name(path.stem + ".tmp.npz")
        arrays = {f"image_{v}": a for v, a in episode.images.items()}
        np.savez_compressed(
            tmp,
            **arrays,
            states=episode.states,
            actions=episode.actions,
            action_valid=episode.action_valid,
            times=episode.times,
            joint_positions=episode.joint_positions,
            info=np.array(json.dumps(asdict(info))),
        )
        tmp.replace(path)
        with (self.root / "index.jsonl").open("a") as index:
            index.write(json.dumps(asdict(info)) + "\n")
        self.count += 1
        return info


class EpisodeDataset:
    """Reads a dataset directory; episodes are loaded one at a time (streamed).

    Raises:
        DatasetError: no ``dataset.json``, another format, or a broken index.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root} is not a dataset (no dataset.json)")
        self.meta = DatasetMeta.from_json(json.loads(meta_path.read_text()))
        self.index = _read_index(self.root)

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> Episode:
        """Episode ``i`` (index order), checked against the metadata."""
        info = self.index[i]
        try:
            with np.load(self.root / info.file, allow_pickle=False) as data:
                episode = Episode(
                    info,
                    {v: data[f"image_{v}"] for v in self.meta.views},
                    data["states"],
                    data["actions"],
                    data["action_valid"],
                    data["times"],
                    data["joint_positions"],
                )
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(f"{info.file}: {err}") from None
        check_episode(self.meta, episode)
        return episode

    def __iter__(self) -> Iterator[Episode]:
        for i in range(len(self.index)):
            yield self.load(i)

    def select(self, *, task: str | None = None, success: bool | None = None) -> list[int]:
        """Indices of the episodes of ``task`` and/or with that ``success``."""
        return [
            i
            for i, info in enumerate(self.index)
            if (task is None or info.task == task) and (success is None or info.success == success)
        ]


def _read_index(root: Path) -> list[EpisodeInfo]:
    path = root / "index.jsonl"
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(EpisodeInfo(**json.loads(line)))
        except (TypeError, json.JSONDecodeError) as err:
            raise DatasetError(f"{path}:{n}: {err}") from None
    return out
