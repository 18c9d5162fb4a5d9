"""LocalEngine: runs a GR2Policy in-process, one episode at a time, off the event loop.

Each episode owns preallocated state. With the KV cache (the default) that is a rolling
cache of its last h steps per layer: a step tokenizes the new images and runs only the new
step's tokens. Without it (``kv_cache=False``, GR2_KV_CACHE=off, for debugging and
benchmarks) it is a ring of the last R = L(h-1)+1 steps' token ids and states, and every step
recomputes that window: the same result (to float rounding), R times the work.
All model work runs on one dedicated worker thread, so the asyncio loop never blocks and
the model never runs concurrently with itself.

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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gr2_policy.engine.interface import (
    ActionChunk,
    EngineInfo,
    StepInput,
    VideoRequest,
)
from gr2_policy.engine.model_info import engine_info
from gr2_policy.engine.step_record import StepRecord
from gr2_policy.engine.validation import check_step_input, check_video_request
from gr2_policy.engine.video import start_video
from gr2_policy.errors import EpisodeNotFoundError, InvalidInputError, UnavailableError
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.model.kv_cache import RollingKVCache
from gr2_policy.model.policy import ActionPrediction, GR2Policy
from gr2_policy.model.sampling import GREEDY

_WARMUP_EPISODE = "__gr2-engine-warmup__"


@dataclass
class _Episode:
    """Per-episode state: the LANG embedding and either a KV cache, or (no cache) a ring of
    the last R steps whose slot ``count % R`` is written next."""

    lang: Tensor  # (1, d_model)
    cache: RollingKVCache | None
    tokens: Tensor | None  # (R, V, N) long
    states: Tensor | None  # (R, 8) float32: position (m), quat wxyz, gripper
    count: int = 0  # steps taken


class LocalEngine:
    """The ``Engine`` protocol over one in-process ``GR2Policy``."""

    def __init__(
        self,
        model: GR2Policy | Callable[[], GR2Policy],
        *,
        model_name: str = "gr2",
        device: str = "cpu",
        kv_cache: bool = True,
        metrics: PolicyMetrics | None = None,
    ) -> None:
        """model: a GR2Policy, or a zero-argument factory (e.g. ``lambda: load_checkpoint(p)``)
        that is then called on the worker thread (see the module docstring for why);
        kv_cache: False recomputes the last R steps every step (same results, slower)."""
        self.kv_cache = kv_cache
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr2-model")
        self._device = torch.device(device)
        try:
            self._model = self._executor.submit(self._prepare_model, model).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._cfg = cfg = self._model.config
        n_views = len(cfg.views)
        self._window = cfg.receptive_field
        self._info = engine_info(self._model, model_name)
        self._episodes: dict[str, _Episode] = {}
        self._stopped = False
        # No-cache ring read order (oldest first) for each next write position.
        arange = torch.arange(self._window, device=self._device)
        self._orders = [(head + arange) % self._window for head in range(self._window)]
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

    async def restore_episode(
        self, episode_id: str, instruction: str, records: Sequence[bytes]
    ) -> None:
        """Open the episode and replay its stored step records (oldest first)."""
        parsed = [StepRecord.from_bytes(r) for r in records][-self._window :]
        await self.open_episode(episode_id, instruction)
        episode = self._episodes[episode_id]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._replay, episode, parsed)

    async def predict_video(self, request: VideoRequest) -> AsyncIterator[np.ndarray]:
        """Imagine the next frames (see ``Engine.predict_video``); one frame per job on the
        model thread (this engine has no scheduler to interleave it with steps)."""
        self._check_running()
        check_video_request(self._cfg, request)
        loop = asyncio.get_running_loop()

        def start() -> Iterator[Tensor | None]:
            with torch.inference_mode():
                return start_video(self._model, self._cfg.views, request)

        def next_frame(tokens: Iterator[Tensor | None]) -> np.ndarray:
            with torch.inference_mode():
                for ids in tokens:
                    if ids is not None:
                        return self._model.decode_frames(ids)[0].cpu().numpy()
            raise RuntimeError("video generation ended early")

        tokens = await loop.run_in_executor(self._executor, start)
        for _ in range(request.num_frames):
            yield await loop.run_in_executor(self._executor, next_frame, tokens)

    async def predict_next_frame(self, episode_id: str) -> np.ndarray:
        """The episode's next frame (greedy), from its cache or its ring of inputs."""
        self._check_running()
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise EpisodeNotFoundError(f"episode {episode_id!r} is not open")
        if episode.count == 0:
            raise InvalidInputError("an episode's next frame needs one step first")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._next_frame, episode)

    def _next_frame(self, episode: _Episode) -> np.ndarray:
        cfg = self._cfg
        with torch.inference_mode():
            if episode.cache is not None:
                ids = self._model.generate_frames(episode.cache, episode.lang, 1, GREEDY)
            else:
                assert episode.tokens is not None and episode.states is not None
                r, t = self._window, episode.count
                order = torch.arange(t - min(t, r), t, device=self._device) % r
                tokens = episode.tokens.index_select(0, order)[None]
                states = episode.states.index_select(0, order)[None]
                ids = self._model.generate_frames_uncached(
                    episode.lang, tokens, states, None, t - order.numel(), 1, GREEDY
                )
            return self._model.decode_frames(ids.view(1, len(cfg.views), -1))[0].cpu().numpy()

    async def close_episode(self, episode_id: str) -> None:
        """Forget the episode; unknown ids are ignored."""
        self._episodes.pop(episode_id, None)

    async def step(self, episode_id: str, step: StepInput) -> ActionChunk:
        """Append one observation and return the k-waypoint chunk answering it."""
        self._check_running()
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise EpisodeNotFoundError(f"episode {episode_id!r} is not open")
        check_step_input(self._cfg.views, self._cfg.image_size, step)
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
        with torch.inference_mode():
            lang = self._model.encode_instruction([instruction])
            if self.kv_cache:
                return _Episode(lang=lang, cache=self._model.new_cache(), tokens=None, states=None)
            shape = (self._window, len(cfg.views), cfg.tokens_per_view)
            return _Episode(
                lang=lang,
                cache=None,
                tokens=torch.zeros(shape, dtype=torch.long, device=self._device),
                states=torch.zeros(
                    (self._window, cfg.state_dim), dtype=torch.float32, device=self._device
                ),
            )

    def _replay(self, episode: _Episode, records: list[StepRecord]) -> None:
        cfg = self._cfg
        with torch.inference_mode():
            for record in records:
                tokens = torch.as_tensor(record.tokens, device=self._device)
                tokens = tokens.view(1, len(cfg.views), cfg.tokens_per_view)
                state = torch.as_tensor(record.state, device=self._device)[None]
                episode.count = record.step
                if episode.cache is not None:
                    episode.cache.next_step.fill_(record.step)
                    self._model.step(episode.cache, episode.lang, tokens, state, want_actions=False)
                else:
                    assert episode.tokens is not None and episode.states is not None
                    episode.tokens[record.step % self._window] = tokens[0]
                    episode.states[record.step % self._window] = state[0]
                episode.count = record.step + 1

    def _run_step(self, episode: _Episode, step: StepInput, submitted: float) -> ActionChunk:
        started = time.perf_counter()
        cfg = self._cfg
        for index, view in enumerate(cfg.views):
            self._images_np[0, index] = step.images[view]
        self._state_np[0:3] = step.ee_position
        self._state_np[3:7] = step.ee_quat_wxyz
        self._state_np[7] = step.gripper
        with torch.inference_mode():
            tokens = self._model.tokenize_images(self._images.to(self._device))
            state = self._state.to(self._device)[None]
            if episode.cache is not None:
                prediction = self._model.step(episode.cache, episode.lang, tokens, state).actions
                assert prediction is not None
            else:
                prediction = self._recompute(episode, tokens[0], state[0])
            record = StepRecord(
                episode.count, tokens.reshape(-1).cpu().numpy(), self._state_np.copy()
            ).to_bytes()
            episode.count += 1
            positions = prediction.positions[0].to("cpu", torch.float64).numpy()
            quats = prediction.quats_wxyz[0].to("cpu", torch.float64).numpy()
            grippers = prediction.grippers[0].to("cpu", torch.float64).numpy()
        if self.metrics is not None:
            self.metrics.batch_size.observe(1)
        return ActionChunk(
            time_offsets_s=self._offsets_s.copy(),
            positions=positions,
            quats_wxyz=quats,
            grippers=grippers,
            queue_time_s=started - submitted,
            compute_time_s=time.perf_counter() - started,
            record=record,
        )

    def _recompute(self, episode: _Episode, tokens: Tensor, state: Tensor) -> ActionPrediction:
        """No-cache step: write the ring, run the model over the last min(count+1, R) steps."""
        assert episode.tokens is not None and episode.states is not None
        r, t = self._window, episode.count
        episode.tokens[t % r] = tokens
        episode.states[t % r] = state
        if t + 1 < r:  # the episode so far: slots 0..t in order
            window_tokens, window_states = episode.tokens[: t + 1], episode.states[: t + 1]
        else:
            order = self._orders[(t + 1) % r]
            window_tokens = episode.tokens.index_select(0, order)
            window_states = episode.states.index_select(0, order)
        first = t + 1 - window_tokens.shape[0]
        return self._model.predict_actions(
            episode.lang, window_tokens[None], window_states[None], first_step=first
        )

    # -- checks ----------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopped:
            raise UnavailableError("the engine is stopped")
