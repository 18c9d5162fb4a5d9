"""Episode service: the transport-neutral core behind the gRPC and REST APIs.

It owns the per-episode bookkeeping that the wire contract promises (seq order, duplicate
replay, status transitions) and delegates model work to the engine and persistence to the
episode store. It never touches model internals.

Failure policy (DESIGN.md section 6): the store is the authority on which seq comes next
across replicas, but a store that is *unreachable* does not stop live episodes: steps fail
open (the error is counted in gr2_policy_store_errors_total), while StartEpisode fails with
UNAVAILABLE, since an episode that was never recorded could not be recovered elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from gr2_policy.engine.interface import (
    ActionChunk,
    Engine,
    EngineInfo,
    StepInput,
    VideoRequest,
)
from gr2_policy.errors import (
    EpisodeEndedError,
    EpisodeNotResidentError,
    SeqConflictError,
    StoreError,
)
from gr2_policy.logs import get_logger
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.state import EpisodeOutcome, EpisodeRecord, EpisodeStatus, EpisodeStore

log = get_logger("gr2_policy.service")


@dataclass(frozen=True)
class StepResult:
    episode_id: str
    seq: int
    chunk: ActionChunk
    server_time_s: float  # wall clock, for the client's clock-offset estimate only
    replayed: bool = False
    predicted_frame: np.ndarray | None = None  # (V, H, W, 3) uint8 when asked for


@dataclass
class _Session:
    """What this replica holds for one live episode."""

    episode_id: str
    instruction: str
    last_seq: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_result: StepResult | None = None


class EpisodeService:
    def __init__(
        self, engine: Engine, store: EpisodeStore, metrics: PolicyMetrics, *, replica: str
    ) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.replica = replica
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = asyncio.Lock()

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    async def start_episode(
        self, instruction: str, robot_id: str, idempotency_key: str | None
    ) -> EpisodeRecord:
        record = await self.store.create(
            instruction=instruction,
            robot_id=robot_id,
            replica=self.replica,
            idempotency_key=idempotency_key or None,
        )
        await self._session(record.episode_id)
        log.info("episode_started", episode_id=record.episode_id, robot_id=robot_id)
        return record

    async def _session(self, episode_id: str) -> _Session:
        """This replica's session for an episode, adopting it from the store when another
        replica (or an earlier process) started it."""
        session = self._sessions.get(episode_id)
        if session is not None:
            return session
        async with self._sessions_lock:
            session = self._sessions.get(episode_id)
            if session is not None:
                return session
            record = await self.store.get(episode_id)  # EpisodeNotFoundError if unknown
            if record.status == EpisodeStatus.ENDED:
                raise EpisodeEndedError(f"episode {episode_id} has ended")
            if record.last_seq >= 0:  # started elsewhere: rebuild from its step records
                await self._restore(episode_id, record.instruction)
            else:
                await self.engine.open_episode(episode_id, record.instruction)
            session = _Session(episode_id, record.instruction, last_seq=record.last_seq)
            self._sessions[episode_id] = session
            self.metrics.active_episodes.set(len(self._sessions))
            if record.last_seq >= 0:
                log.warning("episode_adopted", episode_id=episode_id, last_seq=record.last_seq)
            return session

    async def step(
        self, episode_id: str, seq: int, step: StepInput, predict_video: bool = False
    ) -> StepResult:
        """Run one observation; with ``predict_video`` the result also carries the model's
        prediction of the next frame of each view."""
        t_start = time.perf_counter()
        session = await self._session(episode_id)
        async with session.lock:
            if session.last_result is not None and seq == session.last_seq:
                return dataclasses.replace(session.last_result, replayed=True)
            if seq != session.last_seq + 1:
                raise SeqConflictError(
                    f"episode {episode_id}: expected seq {session.last_seq + 1}, got {seq}"
                )
            try:
                chunk = await self.engine.step(episode_id, step)
            except EpisodeNotResidentError:  # evicted from the cache pool: rebuild, retry
                await self._restore(episode_id, session.instruction)
                chunk = await self.engine.step(episode_id, step)
            try:
                await self.store.record_step(
                    episode_id, seq, time.perf_counter() - t_start, chunk.record or None
                )
            except StoreError as err:
                self.metrics.store_errors.labels("record_step").inc()
                log.warning("store_record_step_failed", episode_id=episode_id, error=str(err))
            frame = None
            if predict_video:
                frame = await self.engine.predict_next_frame(episode_id)
            result = StepResult(
                episode_id, seq, chunk, server_time_s=time.time(), predicted_frame=frame
            )
            session.last_seq = seq
            session.last_result = result
        latency = time.perf_counter() - t_start
        self.metrics.step_latency.observe(latency)
        self.metrics.queue_time.observe(chunk.queue_time_s)
        if seq == 0:
            self.metrics.first_chunk_latency.observe(latency)
        return result

    async def _restore(self, episode_id: str, instruction: str) -> None:
        """Rebuild the engine's state of a live episode from the store's step records. With
        the store unreachable the episode restarts from an empty history (fail open)."""
        try:
            records = await self.store.recent_inputs(episode_id)
        except StoreError as err:
            self.metrics.store_errors.labels("recent_inputs").inc()
            log.warning("store_recent_inputs_failed", episode_id=episode_id, error=str(err))
            records = []
        try:
            await self.engine.restore_episode(episode_id, instruction, records)
        except StoreError as err:  # records the engine cannot read: start from none
            self.metrics.store_errors.labels("step_records").inc()
            log.warning("store_step_records_unreadable", episode_id=episode_id, error=str(err))
            records = []
            await self.engine.restore_episode(episode_id, instruction, records)
        log.info("episode_rebuilt", episode_id=episode_id, steps=len(records))

    def predict_video(self, request: VideoRequest) -> AsyncIterator[np.ndarray]:
        """Predicted frames, uint8 (V, H, W, 3) each, as they are decoded (no episode)."""
        return self.engine.predict_video(request)

    async def end_episode(
        self, episode_id: str, outcome: EpisodeOutcome, note: str
    ) -> EpisodeRecord:
        record = await self.store.end(episode_id, outcome, note)
        async with self._sessions_lock:
            if self._sessions.pop(episode_id, None) is not None:
                await self.engine.close_episode(episode_id)
            self.metrics.active_episodes.set(len(self._sessions))
        log.info("episode_ended", episode_id=episode_id, outcome=outcome.value, steps=record.steps)
        return record

    async def get_episode(self, episode_id: str) -> EpisodeRecord:
        return await self.store.get(episode_id)

    async def list_episodes(
        self, limit: int, status: EpisodeStatus | None = None
    ) -> list[EpisodeRecord]:
        return await self.store.list(limit=limit, status=status)
