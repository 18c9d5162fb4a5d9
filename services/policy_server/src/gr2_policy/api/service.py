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
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from gr2_policy.api.step_reply import decode_reply, encode_reply
from gr2_policy.engine.interface import (
    ActionChunk,
    Engine,
    EngineInfo,
    StepInput,
    VideoRequest,
)
from gr2_policy.errors import (
    DrainingError,
    EpisodeEndedError,
    EpisodeNotFoundError,
    EpisodeNotResidentError,
    SeqConflictError,
    StoreError,
)
from gr2_policy.logs import get_logger
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.state import (
    EpisodeOutcome,
    EpisodeRecord,
    EpisodeStatus,
    EpisodeStore,
    StepSeqConflictError,
)

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
    records: deque[bytes]  # this replica's last R step inputs, to resync a store that missed some
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_result: StepResult | None = None
    store_behind: bool = False  # steps were served while the store was unreachable
    dropped: bool = False  # stale (another replica moved the episode on): adopt it afresh


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
        self.draining = asyncio.Event()

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    def start_draining(self) -> None:
        """Refuse new episodes and steps from now on (UNAVAILABLE): the process is stopping and
        its episodes continue on another replica, rebuilt from the store."""
        self.draining.set()
        self.metrics.draining.set(1)

    def check_accepting(self, what: str) -> None:
        """DrainingError (UNAVAILABLE) once the server drains; ``what`` says what to redo."""
        if self.draining.is_set():
            raise DrainingError(
                f"this replica ({self.replica}) is shutting down: {what} on another replica "
                "(episodes keep their id and seq there)"
            )

    async def start_episode(
        self, instruction: str, robot_id: str, idempotency_key: str | None
    ) -> EpisodeRecord:
        self.check_accepting("start the episode")
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
            records: deque[bytes] = deque(maxlen=self.info.rebuild_steps)
            if record.last_seq >= 0:  # started elsewhere: rebuild from its step records
                records.extend(await self._restore(episode_id, record.instruction))
            else:
                await self.engine.open_episode(episode_id, record.instruction)
            session = _Session(episode_id, record.instruction, record.last_seq, records)
            self._sessions[episode_id] = session
            self.metrics.active_episodes.set(len(self._sessions))
            if record.last_seq >= 0:
                self.metrics.episode_adoptions.inc()
                log.warning("episode_adopted", episode_id=episode_id, last_seq=record.last_seq)
            return session

    async def _drop(self, session: _Session) -> None:
        """Forget a session this replica can no longer trust (the store moved past it)."""
        session.dropped = True
        async with self._sessions_lock:
            if self._sessions.get(session.episode_id) is session:
                del self._sessions[session.episode_id]
                await self.engine.close_episode(session.episode_id)
            self.metrics.active_episodes.set(len(self._sessions))

    async def step(
        self, episode_id: str, seq: int, step: StepInput, predict_video: bool = False
    ) -> StepResult:
        """Run one observation; with ``predict_video`` the result also carries the model's
        prediction of the next frame of each view.

        A retry of the last seq gets the same answer again (from this replica's memory, or
        from the store when the step was answered elsewhere). When the store shows that the
        episode moved on without this replica (the robot failed over and came back), the
        stale session is dropped and the episode adopted afresh, once.
        """
        self.check_accepting(f"send seq {seq} of episode {episode_id}")
        t_start = time.perf_counter()
        for attempt in range(2):
            session = await self._session(episode_id)
            async with session.lock:
                if session.dropped:
                    continue
                if seq == session.last_seq:
                    replay = session.last_result or await self._stored_reply(episode_id, seq)
                    if replay is not None:
                        self.metrics.replayed_steps.inc()
                        return dataclasses.replace(replay, replayed=True)
                if seq != session.last_seq + 1:
                    if attempt == 0 and await self._store_moved_on(session):
                        await self._drop(session)
                        continue
                    raise SeqConflictError(
                        f"episode {episode_id}: expected seq {session.last_seq + 1}, got {seq}"
                    )
                result = await self._run(session, seq, step, predict_video, t_start)
                if result is None:  # another replica recorded this seq first
                    await self._drop(session)
                    continue
            latency = time.perf_counter() - t_start
            self.metrics.step_latency.observe(latency)
            self.metrics.queue_time.observe(result.chunk.queue_time_s)
            if seq == 0:
                self.metrics.first_chunk_latency.observe(latency)
            return result
        raise SeqConflictError(
            f"episode {episode_id}: seq {seq} conflicts with another replica's steps; "
            "resend it (the episode is being moved)"
        )

    async def _run(
        self,
        session: _Session,
        seq: int,
        step: StepInput,
        predict_video: bool,
        t_start: float,
    ) -> StepResult | None:
        """The engine step of ``seq`` and its record in the store; None when the store's
        compare-and-set shows another replica got there first."""
        episode_id = session.episode_id
        try:
            chunk = await self.engine.step(episode_id, step)
        except EpisodeNotResidentError:  # evicted from the cache pool: rebuild, retry
            await self._restore(episode_id, session.instruction)
            chunk = await self.engine.step(episode_id, step)
        frame = None
        if predict_video:
            frame = await self.engine.predict_next_frame(episode_id)
        result = StepResult(
            episode_id, seq, chunk, server_time_s=time.time(), predicted_frame=frame
        )
        if chunk.record:
            session.records.append(chunk.record)
        reply = encode_reply(chunk, result.server_time_s)
        latency = time.perf_counter() - t_start
        try:
            if session.store_behind:
                await self.store.resync(episode_id, seq, latency, list(session.records), reply)
                log.info("store_resynced", episode_id=episode_id, seq=seq)
            else:
                await self.store.record_step(episode_id, seq, latency, chunk.record or None, reply)
            session.store_behind = False
        except StepSeqConflictError:
            log.warning("episode_moved_on", episode_id=episode_id, seq=seq)
            return None
        except EpisodeEndedError:
            await self._drop(session)
            raise
        except (StoreError, EpisodeNotFoundError) as err:  # fail open: the episode goes on here
            session.store_behind = True
            self.metrics.store_errors.labels("record_step").inc()
            log.warning("store_record_step_failed", episode_id=episode_id, error=str(err))
        session.last_seq = seq
        session.last_result = result
        return result

    async def _stored_reply(self, episode_id: str, seq: int) -> StepResult | None:
        """The store's answer to ``seq`` (recorded by another replica), or None."""
        try:
            stored = await self.store.last_reply(episode_id)
            if stored is None or stored[0] != seq:
                return None
            chunk, server_time_s = decode_reply(stored[1])
        except StoreError as err:
            self.metrics.store_errors.labels("last_reply").inc()
            log.warning("store_last_reply_failed", episode_id=episode_id, error=str(err))
            return None
        return StepResult(episode_id, seq, chunk, server_time_s=server_time_s, replayed=True)

    async def _store_moved_on(self, session: _Session) -> bool:
        """Whether the store's seq of this episode differs from this replica's."""
        try:
            record = await self.store.get(session.episode_id)
        except StoreError:
            return False
        return record.last_seq != session.last_seq

    async def _restore(self, episode_id: str, instruction: str) -> list[bytes]:
        """Rebuild the engine's state of a live episode from the store's step records (which
        it returns). With the store unreachable the episode restarts from an empty history
        (fail open)."""
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
        return records

    def predict_video(self, request: VideoRequest) -> AsyncIterator[np.ndarray]:
        """Predicted frames, uint8 (V, H, W, 3) each, as they are decoded (no episode)."""
        self.check_accepting("ask for the video")
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
