"""The engine interface: what the API layer may use, and nothing of the model's internals.

The API layer decodes and validates wire messages into plain numpy arrays (``StepInput``)
and receives plain numpy arrays back (``ActionChunk``). It never imports torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ViewInfo:
    """One camera view the model expects: name and image size in pixels."""

    name: str
    width: int
    height: int


@dataclass(frozen=True)
class EngineInfo:
    """What a client needs to know about the served model."""

    model_name: str
    model_version: str
    preset: str
    views: tuple[ViewInfo, ...]
    action_horizon: int  # k waypoints per chunk
    waypoint_dt_s: float  # seconds between waypoints
    history: int  # h steps attended to
    rebuild_steps: int = 1  # step records that rebuild an episode's cache: R = L(h-1)+1


@dataclass(frozen=True)
class StepInput:
    """One validated observation.

    images: view name -> uint8 array, shape (H, W, 3), RGB, sizes as in ``EngineInfo.views``.
    ee_position: shape (3,), metres, robot base frame.
    ee_quat_wxyz: shape (4,), unit quaternion.
    gripper: 0 (open) .. 1 (closed).
    """

    images: dict[str, np.ndarray]
    ee_position: np.ndarray
    ee_quat_wxyz: np.ndarray
    gripper: float


@dataclass(frozen=True)
class ActionChunk:
    """k waypoints answering one step.

    time_offsets_s: shape (k,), seconds after the observation's capture time.
    positions: shape (k, 3), metres, base frame.  quats_wxyz: shape (k, 4), unit.
    grippers: shape (k,), 0 (open) .. 1 (closed).
    queue_time_s / compute_time_s: time waiting for and running the model (the batch's).
    """

    time_offsets_s: np.ndarray
    positions: np.ndarray
    quats_wxyz: np.ndarray
    grippers: np.ndarray
    queue_time_s: float
    compute_time_s: float
    record: bytes = b""  # the step's compact inputs for the episode store (StepRecord)


MAX_VIDEO_FRAMES = 16
"""The most frames one video prediction may ask for."""


@dataclass(frozen=True)
class VideoSampling:
    """How video tokens are chosen: greedy (deterministic), or top-k (0 = all) from the
    logits divided by ``temperature``, with a generator seeded by ``seed``."""

    greedy: bool = True
    top_k: int = 0
    temperature: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class VideoState:
    """The robot state a video prediction starts from (shapes as in ``StepInput``)."""

    ee_position: np.ndarray
    ee_quat_wxyz: np.ndarray
    gripper: float


@dataclass(frozen=True)
class VideoRequest:
    """Imagine the next ``num_frames`` frames from one observation. images: view name ->
    (H, W, 3) uint8; state None: the model's "no state" token."""

    instruction: str
    images: dict[str, np.ndarray]
    state: VideoState | None
    num_frames: int
    sampling: VideoSampling = VideoSampling()


class Engine(Protocol):
    """Runs the policy for many episodes. Implementations must be safe to call from one
    asyncio event loop; model work runs off the loop."""

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None:
        """Load weights and warm up; readiness follows completion."""

    async def stop(self) -> None: ...

    async def open_episode(self, episode_id: str, instruction: str) -> None:
        """Prepare per-episode state (the instruction embedding is computed here, once)."""

    async def restore_episode(
        self, episode_id: str, instruction: str, records: Sequence[bytes]
    ) -> None:
        """Open the episode and rebuild its state from the step records of its last
        ``info.rebuild_steps`` steps (``ActionChunk.record``, oldest first)."""

    async def step(self, episode_id: str, step: StepInput) -> ActionChunk:
        """Append one observation to the episode's history and return its action chunk.

        Raises EpisodeNotFoundError when the episode was never opened (or was closed);
        EpisodeNotResidentError (a subclass) when its state was evicted: restore it."""

    async def close_episode(self, episode_id: str) -> None:
        """Free the episode's state; unknown ids are ignored."""

    async def predict_next_frame(self, episode_id: str) -> np.ndarray:
        """The greedy prediction of the episode's next frame, uint8 (V, H, W, 3), after its
        last step; the episode's state is unchanged."""
        ...

    def predict_video(self, request: VideoRequest) -> AsyncIterator[np.ndarray]:
        """The predicted frames, each uint8 (V, H, W, 3) with views in ``info.views``
        order, as soon as it is decoded. Lower priority than control steps."""
        ...

    @property
    def active_episodes(self) -> int: ...
