"""In-process episode store: the embedded default when no Redis URL is configured.

Bounded in two ways: an episode expires ``ttl_s`` after it was last touched (created, stepped or
ended), checked lazily on every call, and at most ``max_ended`` ended episodes are kept (the
oldest ended are dropped first). Nothing survives a restart; use Redis for that.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gr2_policy.errors import EpisodeEndedError
from gr2_policy.state.store import (
    DEFAULT_REPLICA,
    LATENCY_WINDOW,
    EpisodeOutcome,
    EpisodeRecord,
    EpisodeStatus,
    StepSeqConflictError,
    check_create,
    check_end,
    check_limit,
    check_step,
    not_found,
    summarize_latencies,
)


@dataclass
class _Episode:
    """Mutable state of one episode (the record is built from it on demand)."""

    episode_id: str
    instruction: str
    robot_id: str
    replica: str
    created_s: float
    updated_s: float
    history_cap: int
    idempotency_key: str | None = None
    status: EpisodeStatus = EpisodeStatus.ACTIVE
    outcome: EpisodeOutcome = EpisodeOutcome.UNSPECIFIED
    note: str = ""
    last_seq: int = -1
    steps: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    inputs: deque[bytes] = field(init=False)
    reply: bytes | None = None  # the answer to step last_seq

    def __post_init__(self) -> None:
        self.inputs = deque(maxlen=self.history_cap)

    def record(self) -> EpisodeRecord:
        return EpisodeRecord(
            episode_id=self.episode_id,
            instruction=self.instruction,
            robot_id=self.robot_id,
            replica=self.replica,
            status=self.status,
            outcome=self.outcome,
            note=self.note,
            created_s=self.created_s,
            updated_s=self.updated_s,
            last_seq=self.last_seq,
            steps=self.steps,
            chunk_latency=summarize_latencies(self.latencies),
        )


class MemoryEpisodeStore:
    """The EpisodeStore contract in one process, guarded by an asyncio.Lock."""

    def __init__(
        self,
        *,
        replica: str = DEFAULT_REPLICA,
        ttl_s: float = 86400.0,
        history_cap: int = 16,
        max_ended: int = 10_000,
    ) -> None:
        if history_cap < 1:
            raise ValueError("history_cap must be >= 1")
        if ttl_s <= 0 or max_ended < 0:
            raise ValueError("ttl_s must be > 0 and max_ended >= 0")
        self.replica = replica
        self.history_cap = history_cap
        self.ttl_s = float(ttl_s)
        self.max_ended = max_ended
        self._lock = asyncio.Lock()
        self._episodes: dict[str, _Episode] = {}  # insertion order = creation order
        self._deadlines: OrderedDict[str, float] = OrderedDict()  # monotonic, least recent first
        self._ended: OrderedDict[str, None] = OrderedDict()  # in the order they ended
        self._idempotency: dict[str, str] = {}

    async def create(
        self,
        instruction: str,
        robot_id: str,
        replica: str,
        idempotency_key: str | None = None,
    ) -> EpisodeRecord:
        """Start an episode; a repeated non-empty idempotency key returns the same one."""
        check_create(instruction, robot_id, idempotency_key)
        async with self._lock:
            self._expire()
            if idempotency_key:
                existing = self._idempotency.get(idempotency_key)
                if existing is not None and existing in self._episodes:
                    return self._episodes[existing].record()
            now = time.time()
            ep = _Episode(
                episode_id=uuid.uuid4().hex,
                instruction=instruction,
                robot_id=robot_id,
                replica=replica or self.replica,
                created_s=now,
                updated_s=now,
                history_cap=self.history_cap,
                idempotency_key=idempotency_key or None,
            )
            self._episodes[ep.episode_id] = ep
            if idempotency_key:
                self._idempotency[idempotency_key] = ep.episode_id
            self._touch(ep.episode_id)
            return ep.record()

    async def get(self, episode_id: str) -> EpisodeRecord:
        """The episode's record; EpisodeNotFoundError if unknown."""
        async with self._lock:
            return self._find(episode_id).record()

    async def list(
        self, limit: int = 100, status: EpisodeStatus | None = None
    ) -> list[EpisodeRecord]:
        """Up to ``limit`` episodes, newest first, optionally filtered by status."""
        check_limit(limit)
        async with self._lock:
            self._expire()
            out: list[EpisodeRecord] = []
            for ep in reversed(self._episodes.values()):
                if status is None or ep.status == status:
                    out.append(ep.record())
                    if len(out) >= limit:
                        break
            return out

    async def record_step(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: bytes | None = None,
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Compare-and-set the episode's seq, then record the step (see EpisodeStore)."""
        latency = check_step(seq, latency_s)
        async with self._lock:
            ep = self._active(episode_id)
            if seq != ep.last_seq + 1:
                raise StepSeqConflictError(episode_id, ep.last_seq + 1, seq)
            ep.last_seq = seq
            ep.steps += 1
            self._stepped(ep, latency, reply)
            if inputs is not None:
                ep.inputs.append(bytes(inputs))
            return ep.record()

    async def resync(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: Sequence[bytes],
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Move a store that missed steps forward to ``seq`` (see EpisodeStore)."""
        latency = check_step(seq, latency_s)
        async with self._lock:
            ep = self._active(episode_id)
            if seq <= ep.last_seq:
                raise StepSeqConflictError(episode_id, ep.last_seq + 1, seq)
            ep.last_seq = seq
            ep.steps = seq + 1
            self._stepped(ep, latency, reply)
            ep.inputs.clear()
            ep.inputs.extend(bytes(x) for x in inputs)
            return ep.record()

    async def last_reply(self, episode_id: str) -> tuple[int, bytes] | None:
        """(seq, reply) of the last recorded step, or None."""
        async with self._lock:
            ep = self._find(episode_id)
            return None if ep.reply is None else (ep.last_seq, ep.reply)

    def _active(self, episode_id: str) -> _Episode:
        ep = self._find(episode_id)
        if ep.status is EpisodeStatus.ENDED:
            raise EpisodeEndedError(f"episode {episode_id} has ended; start a new one")
        return ep

    def _stepped(self, ep: _Episode, latency: float, reply: bytes | None) -> None:
        ep.updated_s = time.time()
        ep.latencies.append(latency)
        ep.reply = None if reply is None else bytes(reply)
        self._touch(ep.episode_id)

    async def recent_inputs(self, episode_id: str) -> list[bytes]:
        """The last (at most history_cap) step inputs, oldest first."""
        async with self._lock:
            return list(self._find(episode_id).inputs)

    async def end(self, episode_id: str, outcome: EpisodeOutcome, note: str = "") -> EpisodeRecord:
        """Mark the episode ended; EpisodeEndedError if it already was."""
        parsed = check_end(outcome, note)
        async with self._lock:
            ep = self._find(episode_id)
            if ep.status is EpisodeStatus.ENDED:
                raise EpisodeEndedError(f"episode {episode_id} has already ended")
            ep.status = EpisodeStatus.ENDED
            ep.outcome = parsed
            ep.note = note
            ep.updated_s = time.time()
            self._touch(episode_id)
            self._ended[episode_id] = None
            while len(self._ended) > self.max_ended:
                oldest, _ = self._ended.popitem(last=False)
                self._drop(oldest)
            return ep.record()

    async def ping(self) -> bool:
        """Always True: the store is this process."""
        return True

    async def close(self) -> None:
        """Nothing to release."""

    def _find(self, episode_id: str) -> _Episode:
        self._expire()
        ep = self._episodes.get(episode_id)
        if ep is None:
            raise not_found(episode_id)
        return ep

    def _touch(self, episode_id: str) -> None:
        self._deadlines[episode_id] = time.monotonic() + self.ttl_s
        self._deadlines.move_to_end(episode_id)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines:
            episode_id, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                break
            self._drop(episode_id)

    def _drop(self, episode_id: str) -> None:
        ep = self._episodes.pop(episode_id, None)
        self._deadlines.pop(episode_id, None)
        self._ended.pop(episode_id, None)
        key = ep.idempotency_key if ep is not None else None
        if key and self._idempotency.get(key) == episode_id:
            del self._idempotency[key]
