"""LocalEngine: runs a GR2Policy in-process, one episode at a time, off the event loop.

Each episode owns a preallocated ring buffer of its last h steps (image token ids + raw
states). A step tokenizes the new images, writes the ring slot, and recomputes the window
(GR-1 style, no KV cache yet). All model work runs on one dedicated worker thread, so the
asyncio loop never blocks and the model never runs concurrently with itself.

Torch's CPU kernels use OpenMP, and every thread that runs a parallel kernel gets its own
OpenMP team. If the caller's thread has run parallel kernels (building or loading a model
does), a gr2-tiny step on a 2-core box takes ~27 ms instead of ~17 ms (measured; most likely
libgomp throttles its spin-waiting once it manages more threads than cores). So prefer a
factory, ``LocalEngine(lambda: load_checkpoint(path))``: the model is then built on the
worker thread, and no other thread needs to run torch work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gr2_policy.engine.interface import ActionChunk, EngineInfo, StepInput, ViewInfo
from gr2_policy.errors import EpisodeNotFoundError, InvalidInputError, UnavailableError
from gr2_policy.model.checkpoint import model_hash
from gr2_policy.model.policy import GR2Policy

_WARMUP_EPISODE = "__gr2-engine-warmup__"


@dataclass
class _Episode:
    """Per-episode state. Ring slot ``head`` is written next; ``count`` slots are filled."""

    lang: Tensor  # (1, d_model)
    tokens: Tensor  # (h, V, N) long
    states: Tensor  # (h, 8) float32: position (m), quat wxyz, gripper
    head: int = 0
    count: int = 0


class LocalEngine:
    """The ``Engine`` protocol over one in-process ``GR2Policy``."""

    def __init__(
        self,
        model: GR2Policy | Callable[[], GR2Policy],
        *,
        model_name: str = "gr2",
        device: str = "cpu",
    ) -> None:
        """model: a GR2Policy, or a zero-argument factory (e.g. ``lambda: load_checkpoint(p)``)
        that is then called on the worker thread (see the module docstring for why)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr2-model")
        self._device = torch.device(device)
        try:
            self._model = self._executor.submit(self._prepare_model, model).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._cfg = cfg = self._model.config
        h, n_views = cfg.history, len(cfg.views)
        self._info = EngineInfo(
            model_name=model_name,
            model_version=model_hash(self._model),
            preset=cfg.preset,
            views=tuple(ViewInfo(v, cfg.image_size, cfg.image_size) for v in cfg.views),
            action_horizon=cfg.action_horizon,
            waypoint_dt_s=cfg.waypoint_dt_s,
            history=h,
        )
        self._episodes: dict[str, _Episode] = {}
        self._stopped = False
        # Ring read order (oldest first) for each write position, and the left-padding mask
        # for each fill count: with fixed shapes (T = h) the window needs no reallocation.
        arange = torch.arange(h, device=self._device)
        self._orders = [(head + arange) % h for head in range(h)]
        self._valid = [(arange >= h - count)[None] for count in range(h + 1)]
        # CPU staging buffers, shared as numpy views; touched only by the worker thread.
        size = cfg.image_size
        self._images_np = np.zeros((1, n_views, size, size, 3), dtype=np.uint8)
        self._images = torch.from_numpy(self._images_np)
        self._state_np = np.zeros(cfg.state_dim, dtype=np.float32)
        self._state = torch.from_numpy(self._state_np)
        self._offsets_s = (np.arange(cfg.action_horizon) + 1) * cfg.waypoint_dt_s

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def active_episodes(self) -> int:
        return len(self._episodes)

    async def start(self) -> None:
        """Warm up with one step of a dummy episode (first-call allocations, kernel choice)."""
        size = self._cfg.image_size
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        dummy = StepInput(
            images={view: blank for view in self._cfg.views},
            ee_position=np.zeros(3),
            ee_quat_wxyz=np.array([1.0, 0.0, 0.0, 0.0]),
            gripper=0.0,
        )
        await self.open_episode(_WARMUP_EPISODE, "warm up")
        try:
            await self.step(_WARMUP_EPISODE, dummy)
        finally:
            await self.close_episode(_WARMUP_EPISODE)

    async def stop(self) -> None:
        """Refuse new work, let the running job finish, and shut the worker down."""
        self._stopped = True
        self._episodes.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def open_episode(self, episode_id: str, instruction: str) -> None:
        """Embed the instruction (once) and allocate the ring; reopening an id resets it."""
        self._check_running()
        loop = asyncio.get_running_loop()
        episode = await loop.run_in_executor(self._executor, self._new_episode, instruction)
        self._episodes[episode_id] = episode

    async def close_episode(self, episode_id: str) -> None:
        """Forget the episode; unknown ids are ignored."""
        self._episodes.pop(episode_id, None)

    async def step(self, episode_id: str, step: StepInput) -> ActionChunk:
        """Append one observation and return the k-waypoint chunk answering it."""
        self._check_running()
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise EpisodeNotFoundError(f"episode {episode_id!r} is not open")
        self._check_input(step)
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        return await loop.run_in_executor(self._executor, self._run_step, episode, step, submitted)

    # -- worker thread ---------------------------------------------------------------------

    def _prepare_model(self, model: GR2Policy | Callable[[], GR2Policy]) -> GR2Policy:
        if not isinstance(model, GR2Policy):
            model = model()
        return model.to(self._device).eval()

    def _new_episode(self, instruction: str) -> _Episode:
        cfg = self._cfg
        shape = (cfg.history, len(cfg.views), cfg.tokens_per_view)
        with torch.inference_mode():
            return _Episode(
                lang=self._model.encode_instruction([instruction]),
                tokens=torch.zeros(shape, dtype=torch.long, device=self._device),
                states=torch.zeros(
                    (cfg.history, cfg.state_dim), dtype=torch.float32, device=self._device
                ),
            )

    def _run_step(self, episode: _Episode, step: StepInput, submitted: float) -> ActionChunk:
        started = time.perf_counter()
        cfg = self._cfg
        for index, view in enumerate(cfg.views):
            self._images_np[0, index] = step.images[view]
        self._state_np[0:3] = step.ee_position
        self._state_np[3:7] = step.ee_quat_wxyz
        self._state_np[7] = step.gripper
        with torch.inference_mode():
            slot = episode.head
            images = self._images.to(self._device)
            episode.tokens[slot] = self._model.tokenize_images(images)[0]
            episode.states[slot] = self._state.to(self._device)
            episode.head = (slot + 1) % cfg.history
            episode.count = min(episode.count + 1, cfg.history)
            order = self._orders[episode.head]
            prediction = self._model.predict_actions(
                episode.lang,
                episode.tokens.index_select(0, order)[None],
                episode.states.index_select(0, order)[None],
                self._valid[episode.count],
            )
            positions = prediction.positions[0].to("cpu", torch.float64).numpy()
            quats = prediction.quats_wxyz[0].to("cpu", torch.float64).numpy()
            grippers = prediction.grippers[0].to("cpu", torch.float64).numpy()
        return ActionChunk(
            time_offsets_s=self._offsets_s.copy(),
            positions=positions,
            quats_wxyz=quats,
            grippers=grippers,
            queue_time_s=started - submitted,
            compute_time_s=time.perf_counter() - started,
        )

    # -- checks ----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopped:
            raise UnavailableError("the engine is stopped")

    def _check_input(self, step: StepInput) -> None:
        """Defensive re-check of what the API layer validates (shapes, dtypes, finiteness)."""
        size = self._cfg.image_size
        extra = sorted(set(step.images) - set(self._cfg.views))
        if extra:
            raise InvalidInputError(f"unknown view(s) {extra}; expected {list(self._cfg.views)}")
        for view in self._cfg.views:
            image = step.images.get(view)
            if image is None:
                raise InvalidInputError(f"missing image for view {view!r}")
            if image.shape != (size, size, 3) or image.dtype != np.uint8:
                raise InvalidInputError(
                    f"image for view {view!r} has shape {image.shape} dtype {image.dtype}, "
                    f"expected ({size}, {size}, 3) uint8"
                )
        for name, value, length in (
            ("ee_position", step.ee_position, 3),
            ("ee_quat_wxyz", step.ee_quat_wxyz, 4),
        ):
            if np.shape(value) != (length,) or not np.all(np.isfinite(value)):
                raise InvalidInputError(f"{name} must be {length} finite numbers, got {value!r}")
        if not np.linalg.norm(step.ee_quat_wxyz) > 1e-6:
            raise InvalidInputError("ee_quat_wxyz must not be zero")
        if not np.isfinite(step.gripper):
            raise InvalidInputError(f"gripper must be finite, got {step.gripper!r}")
