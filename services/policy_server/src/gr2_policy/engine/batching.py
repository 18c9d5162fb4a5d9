"""BatchingEngine: many episodes per model, one KV-cache pool, dynamic batching, any runner.

The engine loop is schedule -> execute -> update (vLLM's shape):

- ``step`` queues the observation with the scheduler and awaits its future. The loop asks
  ``BatchScheduler`` what runs next (a batch of control steps from different episodes, or one
  small unit of video work) and runs it on the single model worker thread, so the event loop
  never blocks and the model never runs concurrently with itself.
- A control batch tokenizes all its images in one VQGAN call, gathers the episodes' rows of
  the ``KVCachePool``, pads to the runner's bucket (scratch row), runs the ``StepRunner``
  (eager, torch.compile, ONNX Runtime or TensorRT) and writes the new keys/values back.
- Each episode holds a pool slot. When the pool is full, opening an episode evicts the least
  recently used idle one; with every slot busy it fails with ResourceExhaustedError. An
  evicted episode's next step raises EpisodeNotResidentError: the caller (the episode
  service) reads the episode's step records from the store and calls ``restore_episode``,
  which replays them (R = L(h-1)+1 records rebuild the cache exactly).
- Each step returns its compact ``StepRecord`` bytes for the store.

Model work runs on one dedicated thread; build the model there (pass a factory) for the
reason given in ``engine/local.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gr2_policy.engine.interface import (
    ActionChunk,
    EngineInfo,
    StepInput,
    VideoRequest,
)
from gr2_policy.engine.kv_pool import (
    CACHE_DTYPES,
    KVCachePool,
    SlotTable,
    bytes_per_episode,
    slots_for_budget,
)
from gr2_policy.engine.model_info import engine_info
from gr2_policy.engine.runners.base import (
    DEFAULT_BUCKETS,
    StepInputs,
    StepRunner,
    autocast_dtype,
    bucket_for,
    make_runner,
)
from gr2_policy.engine.scheduler import BatchScheduler, ControlRequest, VideoJob
from gr2_policy.engine.step_record import StepRecord
from gr2_policy.engine.validation import check_step_input, check_video_request
from gr2_policy.engine.video import start_video
from gr2_policy.errors import (
    EpisodeNotResidentError,
    InvalidInputError,
    ResourceExhaustedError,
    UnavailableError,
)
from gr2_policy.logs import get_logger
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.model.policy import GR2Policy
from gr2_policy.model.sampling import GREEDY
from gr2_policy.model.step_function import StepFunction, step_layout

log = get_logger("gr2_policy.engine")

DEFAULT_CPU_POOL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the batching engine (ServerSettings maps the GR2_* variables onto these).

    kv_pool_bytes: cache budget; 0 = ``kv_pool_gpu_fraction`` of free GPU memory on CUDA,
    256 MiB on CPU. kv_cache_dtype: fp32, bf16, fp16 or fp8 (storage; compute upcasts).
    """

    device: str = "cpu"
    runner: str = "eager"
    precision: str = "fp32"
    kv_pool_bytes: int = 0
    kv_pool_gpu_fraction: float = 0.5
    kv_cache_dtype: str = "fp32"
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    video_tokens_per_unit: int = 16
    engine_cache_dir: str | None = None


@dataclass
class _Episode:
    lang: Tensor  # (d_model,) on the device
    next_step: int = 0


@dataclass
class _Pending:
    """A queued control step and the future its caller awaits."""

    episode_id: str
    slot: int
    step_index: int
    lang: Tensor
    inputs: StepInput
    future: asyncio.Future[ActionChunk]
    submitted: float
    taken: bool = False  # in a batch (set on the event loop thread)


@dataclass
class _VideoState:
    """A video job: the token generator and where its frames go."""

    frames: Iterator[Tensor | None] | None  # GR2Policy.iter_video, after the prefill
    out: asyncio.Queue[object]
    loop: asyncio.AbstractEventLoop
    prefill: Callable[[], Iterator[Tensor | None]]  # the first unit (worker thread)
    tokens: int = 0
    done: bool = False


_END = object()


class BatchingEngine:
    """The ``Engine`` protocol with a KV-cache pool and dynamic batching."""

    def __init__(
        self,
        model: GR2Policy | Callable[[], GR2Policy],
        config: EngineConfig | None = None,
        *,
        model_name: str = "gr2",
        metrics: PolicyMetrics | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.metrics = metrics
        self._device = torch.device(config.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr2-model")
        try:
            self._model = self._executor.submit(self._prepare_model, model).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        cfg = self._cfg = self._model.config
        self._info = engine_info(self._model, model_name)
        if config.kv_cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, "
                f"got {config.kv_cache_dtype!r}"
            )
        cache_dtype = CACHE_DTYPES[config.kv_cache_dtype]
        half = autocast_dtype(config.precision)
        self._compute_dtype = (
            half if (half is not None and self._device.type == "cuda") else torch.float32
        )
        slots = slots_for_budget(cfg, self._pool_budget(), cache_dtype)
        if slots < 1:
            raise ResourceExhaustedError(
                f"a KV-cache budget of {self._pool_budget()} bytes holds no episode "
                f"({bytes_per_episode(cfg, cache_dtype)} bytes each); raise GR2_KV_POOL_BYTES"
            )
        # Built on the worker: a parallel kernel (filling 100s of MB) on this thread would
        # give it its own OpenMP team and slow every step (see engine/local.py).
        self.pool = self._executor.submit(
            KVCachePool, cfg, slots, device=self._device, dtype=cache_dtype
        ).result()
        self.table = SlotTable(slots)
        self.max_batch_size = min(config.max_batch_size, slots)
        # What a batch's cache rows are gathered into: one buffer for the largest bucket,
        # viewed as (L, n, H, S, Dh) for a batch of n (a prefix of it is contiguous).
        self._gather_flat = self._executor.submit(
            self.pool.gather_buffers, self.max_batch_size, self._compute_dtype
        ).result()
        buckets = sorted(
            {b for b in DEFAULT_BUCKETS if b < self.max_batch_size} | {self.max_batch_size}
        )
        self.runner: StepRunner = make_runner(
            config.runner,
            StepFunction(self._model),
            device=self._device,
            precision=config.precision,
            buckets=buckets,
            cache_dir=None if config.engine_cache_dir is None else Path(config.engine_cache_dir),
            model_hash=self._info.model_version,
        )
        self.scheduler: BatchScheduler[_Pending, _VideoState] = BatchScheduler(
            self.max_batch_size, config.max_batch_delay_ms / 1000.0
        )
        self._episodes: dict[str, _Episode] = {}
        self._stopped = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._video_ids = itertools.count()
        self.evictions = 0
        # Staging buffers for one batch, numpy views of CPU tensors (worker thread only).
        n, size, views = self.max_batch_size, cfg.image_size, len(cfg.views)
        self._images_np = np.zeros((n, views, size, size, 3), dtype=np.uint8)
        self._images = torch.from_numpy(self._images_np)
        self._states_np = np.zeros((n, cfg.state_dim), dtype=np.float32)
        self._states = torch.from_numpy(self._states_np)
        self._offsets_s = (np.arange(cfg.action_horizon) + 1) * cfg.waypoint_dt_s
        self._set_usage()

    # -- properties ----------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def active_episodes(self) -> int:
        return len(self._episodes)

    @property
    def capacity(self) -> int:
        """Episodes the pool holds at once."""
        return self.table.capacity

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the runner for every bucket (compile/build), warm up, start the loop."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self._warm_up)
        self._loop_task = asyncio.create_task(self._run_loop(), name="gr2-engine-loop")
        log.info(
            "engine_ready",
            runner=self.runner.name,
            buckets=list(self.runner.buckets or []),
            pool_slots=self.capacity,
            pool_bytes=self.pool.nbytes,
            bytes_per_episode=bytes_per_episode(self._cfg, self.pool.dtype),
            warmup_s=round(time.perf_counter() - started, 3),
        )

    async def stop(self) -> None:
        """Refuse new work, fail what is queued, finish the running batch, shut down."""
        self._stopped = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for request in self.scheduler.drain_control():
            if not request.payload.future.done():
                request.payload.future.set_exception(UnavailableError("the engine stopped"))
        self._episodes.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # -- episodes ------------------------------------------------------------------------

    async def open_episode(self, episode_id: str, instruction: str) -> None:
        """Embed the instruction (once) and give the episode an empty pool slot; reopening
        an id resets it. ResourceExhaustedError when every slot is busy."""
        self._check_running()
        loop = asyncio.get_running_loop()
        lang = await loop.run_in_executor(self._executor, self._embed, instruction)
        self._assign_slot(episode_id)
        self._episodes[episode_id] = _Episode(lang=lang)

    async def restore_episode(
        self, episode_id: str, instruction: str, records: Sequence[bytes]
    ) -> None:
        """Rebuild an episode's cache from its stored step records (oldest first, the last
        ``info.rebuild_steps`` are used): after an eviction, or on another replica."""
        self._check_running()
        parsed = [StepRecord.from_bytes(r) for r in records][-self._info.rebuild_steps :]
        for before, after in itertools.pairwise(parsed):
            if after.step != before.step + 1:
                raise InvalidInputError(
                    f"episode {episode_id}: stored steps are not consecutive "
                    f"({before.step} then {after.step})"
                )
        loop = asyncio.get_running_loop()
        lang = await loop.run_in_executor(self._executor, self._embed, instruction)
        slot = self._assign_slot(episode_id)
        self.table.pin(episode_id)
        try:
            await loop.run_in_executor(self._executor, self._replay, slot, lang, parsed)
        except BaseException:
            self.table.free(episode_id)
            raise
        finally:
            self.table.unpin(episode_id)
        next_step = parsed[-1].step + 1 if parsed else 0
        self._episodes[episode_id] = _Episode(lang=lang, next_step=next_step)
        log.info("episode_restored", episode_id=episode_id, steps=len(parsed), next_step=next_step)

    async def close_episode(self, episode_id: str) -> None:
        """Free the episode's slot; unknown ids are ignored."""
        self._episodes.pop(episode_id, None)
        self.table.free(episode_id)
        self._set_usage()

    def is_resident(self, episode_id: str) -> bool:
        return episode_id in self._episodes

    # -- steps ---------------------------------------------------------------------------

    async def step(self, episode_id: str, step: StepInput) -> ActionChunk:
        """Queue one observation for the next batch and return its chunk (with the step's
        record for the store). EpisodeNotResidentError when the episode holds no slot."""
        self._check_running()
        episode = self._episodes.get(episode_id)
        slot = self.table.slot_of(episode_id)
        if episode is None or slot is None:
            raise EpisodeNotResidentError(
                f"episode {episode_id!r} holds no cache on this replica (evicted or not opened)"
            )
        check_step_input(self._cfg.views, self._cfg.image_size, step)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ActionChunk] = loop.create_future()
        now = time.perf_counter()
        pending = _Pending(episode_id, slot, episode.next_step, episode.lang, step, future, now)
        episode.next_step += 1  # one step in flight per episode (the service serialises)
        self.table.pin(episode_id)
        self.table.touch(episode_id)
        self.scheduler.add_control(ControlRequest(episode_id, now, pending))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if not pending.taken:  # never ran: the episode did not advance
                self.scheduler.remove_control(pending)
                if self._episodes.get(episode_id) is episode:
                    episode.next_step -= 1
            raise
        finally:
            self.table.unpin(episode_id)

    # -- video ---------------------------------------------------------------------------

    async def predict_video(self, request: VideoRequest) -> AsyncIterator[np.ndarray]:
        """Imagine ``num_frames`` next frames from one observation; yields each frame as
        uint8 (V, H, W, 3) as soon as it is decoded. Runs at lower priority than control
        steps: the prefill, then ``video_tokens_per_unit`` tokens at a time."""
        self._check_running()
        check_video_request(self._cfg, request)
        async for frame in self._video_job(
            lambda: start_video(self._model, self._cfg.views, request)
        ):
            yield frame

    async def predict_next_frame(self, episode_id: str) -> np.ndarray:
        """The model's greedy prediction of the episode's next frame, uint8 (V, H, W, 3),
        continuing its cache as it is after its last step (which stays untouched). Runs as
        low-priority video work; call it between steps of the episode."""
        self._check_running()
        episode = self._episodes.get(episode_id)
        slot = self.table.slot_of(episode_id)
        if episode is None or slot is None:
            raise EpisodeNotResidentError(
                f"episode {episode_id!r} holds no cache on this replica (evicted or not opened)"
            )
        if episode.next_step == 0:
            raise InvalidInputError("an episode's next frame needs one step first")
        lang, next_step = episode.lang, episode.next_step
        self.table.pin(episode_id)  # the copy reads the slot: it must not be evicted
        try:
            frames = self._video_job(lambda: self._continue_episode(slot, lang, next_step))
            (frame,) = [frame async for frame in frames]
            return frame
        finally:
            self.table.unpin(episode_id)

    async def _video_job(
        self, prefill: Callable[[], Iterator[Tensor | None]]
    ) -> AsyncIterator[np.ndarray]:
        """Queue video work (``prefill`` first, then tokens) and yield its decoded frames."""
        loop = asyncio.get_running_loop()
        video = _VideoState(frames=None, out=asyncio.Queue(), loop=loop, prefill=prefill)
        job = VideoJob(next(self._video_ids), video)
        self.scheduler.add_video(job)
        self._wake.set()
        try:
            while True:
                item = await video.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, np.ndarray)
                yield item
        finally:
            video.done = True
            self.scheduler.remove_video(job.job_id)

    # -- the loop ------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:
            now = time.perf_counter()
            decision = self.scheduler.next(now, live_episodes=self._live_episodes())
            if decision is None:
                wait = self.scheduler.wait_s(now)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            if decision.batch:
                requests = [r.payload for r in decision.batch if not r.payload.future.done()]
                for request in requests:
                    request.taken = True
                if not requests:
                    continue
                try:
                    chunks = await loop.run_in_executor(self._executor, self._run_batch, requests)
                except asyncio.CancelledError:  # stop(): nobody will set these futures
                    for request in requests:
                        if not request.future.done():
                            request.future.set_exception(UnavailableError("the engine stopped"))
                    raise
                except Exception as err:  # one bad batch must not kill the loop
                    log.exception("batch_failed", size=len(requests))
                    for request in requests:
                        if not request.future.done():
                            request.future.set_exception(err)
                    continue
                for request, chunk in zip(requests, chunks, strict=True):
                    if not request.future.done():
                        request.future.set_result(chunk)
            elif decision.video is not None:
                job = decision.video
                await loop.run_in_executor(self._executor, self._run_video_unit, job.payload)
                if not job.payload.done:
                    self.scheduler.requeue_video(job)

    def _live_episodes(self) -> int:
        return max(1, len(self._episodes))

    # -- worker thread -------------------------------------------------------------------

    def _prepare_model(self, model: GR2Policy | Callable[[], GR2Policy]) -> GR2Policy:
        if not isinstance(model, GR2Policy):
            model = model()
        return model.to(self._device).eval()

    def _embed(self, instruction: str) -> Tensor:
        with torch.inference_mode():
            return self._model.encode_instruction([instruction])[0]

    def _warm_up(self) -> None:
        """Runner preparation (compile / engine build) and one step per bucket."""
        cfg = self._cfg
        with torch.inference_mode():
            lang = self._embed("warm up")
            tokens = torch.zeros(
                (1, cfg.image_tokens_per_step), dtype=torch.long, device=self._device
            )
            rows = torch.tensor([self.pool.scratch], device=self._device)
            step = torch.zeros(1, dtype=torch.long, device=self._device)
            past_k, past_v, key_step, key_pos = self.pool.gather(rows, self._compute_dtype)
            mask, rope = step_layout(cfg, step, key_step, key_pos)
            state = torch.zeros((1, cfg.state_dim), device=self._device)
            state[:, 3] = 1.0
            example = StepInputs(
                past_k, past_v, mask, rope, lang[None].to(self._compute_dtype), tokens, state
            )
            self.runner.prepare(example)
            for size in self.runner.buckets or sorted({1, self.max_batch_size}):
                self._execute(
                    rows.expand(size),
                    step.expand(size),
                    lang[None].expand(size, -1),
                    tokens.expand(size, -1),
                    state.expand(size, -1),
                    write=False,
                )
            blank = torch.zeros(
                (1, len(cfg.views), cfg.image_size, cfg.image_size, 3), dtype=torch.uint8
            )
            self._model.tokenize_images(blank.to(self._device))

    def _run_batch(self, requests: list[_Pending]) -> list[ActionChunk]:
        started = time.perf_counter()
        cfg, n = self._cfg, len(requests)
        for i, request in enumerate(requests):
            for v, view in enumerate(cfg.views):
                self._images_np[i, v] = request.inputs.images[view]
            self._states_np[i, 0:3] = request.inputs.ee_position
            self._states_np[i, 3:7] = request.inputs.ee_quat_wxyz
            self._states_np[i, 7] = request.inputs.gripper
        with torch.inference_mode():
            tokens = self._model.tokenize_images(self._images[:n].to(self._device)).view(n, -1)
            states = self._states[:n].to(self._device)
            rows = torch.tensor([r.slot for r in requests], device=self._device)
            steps = torch.tensor([r.step_index for r in requests], device=self._device)
            lang = torch.stack([r.lang for r in requests])
            raw = self._execute(rows, steps, lang, tokens, states, write=True)
            actions = self._model.decode_actions(raw, states)
            positions = actions.positions.to("cpu", torch.float64).numpy()
            quats = actions.quats_wxyz.to("cpu", torch.float64).numpy()
            grippers = actions.grippers.to("cpu", torch.float64).numpy()
            tokens_cpu = tokens.cpu().numpy()
        compute = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
        return [
            ActionChunk(
                time_offsets_s=self._offsets_s.copy(),
                positions=positions[i],
                quats_wxyz=quats[i],
                grippers=grippers[i],
                queue_time_s=started - r.submitted,
                compute_time_s=compute,
                record=StepRecord(
                    r.step_index, tokens_cpu[i], self._states_np[i].copy()
                ).to_bytes(),
            )
            for i, r in enumerate(requests)
        ]

    def _execute(
        self,
        rows: Tensor,
        steps: Tensor,
        lang: Tensor,
        tokens: Tensor,
        states: Tensor,
        *,
        write: bool,
    ) -> Tensor:
        """One runner call for n items (padded to the bucket); returns raw actions (n, k, 10)."""
        n = rows.shape[0]
        size = bucket_for(n, self.runner.buckets)
        if size > n:
            pad = size - n
            rows = torch.cat((rows, rows.new_full((pad,), self.pool.scratch)))
            steps = torch.cat((steps, steps.new_zeros(pad)))
            lang = torch.cat((lang, lang[:1].expand(pad, -1)))
            tokens = torch.cat((tokens, tokens[:1].expand(pad, -1)))
            states = torch.cat((states, states[:1].expand(pad, -1)))
        past_k, past_v, key_step, key_pos = self.pool.gather(
            rows, self._compute_dtype, self._gather_into(size)
        )
        mask, rope = step_layout(self._cfg, steps, key_step, key_pos)
        out = self.runner.run(
            StepInputs(
                past_k,
                past_v,
                mask,
                rope,
                lang.to(self._compute_dtype).contiguous(),
                tokens.contiguous(),
                states.contiguous(),
            )
        )
        if write:
            self.pool.write(rows[:n], steps[:n], out.new_k[:, :n], out.new_v[:, :n])
        return out.raw[:n].float()

    def _continue_episode(self, slot: int, lang: Tensor, next_step: int) -> Iterator[Tensor | None]:
        """One greedy frame after the episode's last step, on a copy of its pool row in a
        one-episode rolling cache (same key layout, plus the [ACT] scratch slot)."""
        cache = self._model.new_cache(1)
        keys = self.pool.k.shape[3]
        cache.k[:, 0, :, :keys] = self.pool.k[:, slot]
        cache.v[:, 0, :, :keys] = self.pool.v[:, slot]
        cache.key_step[0, :keys] = self.pool.key_step[slot]
        cache.key_pos[0, :keys] = self.pool.key_pos[slot]
        cache.next_step.fill_(next_step)
        return self._model.iter_video(cache, lang[None], 1, GREEDY)

    def _gather_into(self, size: int) -> tuple[Tensor, Tensor]:
        k, v = self._gather_flat
        shape = (k.shape[0], size, *k.shape[2:])
        count = shape[0] * size * k[0, 0].numel()
        return k.view(-1)[:count].view(shape), v.view(-1)[:count].view(shape)

    def _replay(self, slot: int, lang: Tensor, records: list[StepRecord]) -> None:
        with torch.inference_mode():
            rows = torch.tensor([slot], device=self._device)
            for record in records:
                tokens = torch.as_tensor(record.tokens, device=self._device)[None]
                state = torch.as_tensor(record.state, device=self._device)[None]
                step = torch.tensor([record.step], device=self._device)
                self._execute(rows, step, lang[None], tokens, state, write=True)

    def _run_video_unit(self, state: _VideoState) -> None:
        """Up to ``video_tokens_per_unit`` tokens; frames are decoded and handed over."""
        if state.done:
            return
        loop = state.loop
        try:
            with torch.inference_mode():
                if state.frames is None:  # the first unit: tokenize and prefill
                    state.frames = state.prefill()
                    return
                for _ in range(self.config.video_tokens_per_unit):
                    ids = next(state.frames)
                    state.tokens += 1
                    if self.metrics is not None:
                        self.metrics.video_tokens.inc()
                    if ids is not None:
                        pixels = self._model.decode_frames(ids)[0].cpu().numpy()
                        loop.call_soon_threadsafe(state.out.put_nowait, pixels)
                        break
        except StopIteration:
            state.done = True
            loop.call_soon_threadsafe(state.out.put_nowait, _END)
        except Exception as err:
            state.done = True
            log.exception("video_failed")
            loop.call_soon_threadsafe(state.out.put_nowait, err)

    # -- helpers -------------------------------------------------------------------------

    def _assign_slot(self, episode_id: str) -> int:
        allocation = self.table.allocate(episode_id)
        if allocation is None:
            raise ResourceExhaustedError(
                f"the KV-cache pool is full: all {self.capacity} episodes are busy; retry "
                "shortly, or raise GR2_KV_POOL_BYTES"
            )
        if allocation.evicted is not None:
            self._episodes.pop(allocation.evicted, None)
            self.evictions += 1
            if self.metrics is not None:
                self.metrics.evictions.inc()
            log.info("episode_evicted", episode_id=allocation.evicted, for_episode=episode_id)
        self.pool.reset(allocation.slot)
        self._set_usage()
        return allocation.slot

    def _pool_budget(self) -> int:
        config = self.config
        if config.kv_pool_bytes > 0:
            return config.kv_pool_bytes
        if self._device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self._device)
            return int(free * config.kv_pool_gpu_fraction)
        return DEFAULT_CPU_POOL_BYTES

    def _set_usage(self) -> None:
        if self.metrics is not None:
            self.metrics.kv_cache_usage.set(self.table.usage)

    def _check_running(self) -> None:
        if self._stopped:
            raise UnavailableError("the engine is stopped")
