"""The episode store interface: record types, the ``EpisodeStore`` protocol, and a factory.

Two backends implement the same contract (``tests/policy/test_episode_store.py`` runs against
both): :class:`~gr2_policy.state.memory.MemoryEpisodeStore`, the embedded default, and
:class:`~gr2_policy.state.redis_store.RedisEpisodeStore`, shared by all replicas so that any of
them can rebuild a lost episode's KV cache from the last ``history_cap`` step inputs.

Timestamps in records (``created_s``, ``updated_s``) are wall-clock epoch seconds, for display
only; nothing measures intervals with them.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from gr2_policy.errors import EpisodeNotFoundError, InvalidInputError, SeqConflictError

LATENCY_WINDOW = 1000
"""How many of the most recent chunk latencies an episode keeps for its summary."""

MAX_IDEMPOTENCY_KEY_LEN = 256
MAX_NOTE_LEN = 4096
MAX_INSTRUCTION_LEN = 4096
MAX_ROBOT_ID_LEN = 256
DEFAULT_REPLICA = socket.gethostname() or "local"


class EpisodeStatus(StrEnum):
    """Lifecycle of an episode."""

    ACTIVE = "active"
    ENDED = "ended"


class EpisodeOutcome(StrEnum):
    """How an episode ended, as reported by the client."""

    UNSPECIFIED = "unspecified"
    SUCCESS = "success"
    FAILURE = "failure"
    ABORTED = "aborted"


class LatencySummary(BaseModel):
    """Chunk latencies [s] over the most recent (up to 1000) steps; all zero when count == 0."""

    model_config = ConfigDict(frozen=True)

    count: int = 0
    mean_s: float = 0.0
    p50_s: float = 0.0
    p90_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0


class EpisodeRecord(BaseModel):
    """A snapshot of one episode, as served by ``GET /v1/episodes/{id}``."""

    model_config = ConfigDict(frozen=True)

    episode_id: str
    instruction: str
    robot_id: str
    replica: str
    status: EpisodeStatus
    outcome: EpisodeOutcome = EpisodeOutcome.UNSPECIFIED
    note: str = ""
    created_s: float
    updated_s: float
    last_seq: int = -1
    steps: int = 0
    chunk_latency: LatencySummary = LatencySummary()


class StepSeqConflictError(SeqConflictError):
    """A step's seq is not ``last_seq + 1``; ``expected`` and ``got`` say which was which.

    ``got == expected - 1`` is a client retry of the step just recorded (the caller may answer
    it from its cache of the last chunk); anything else is a gap or a stale writer.
    """

    def __init__(self, episode_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"episode {episode_id}: expected seq {expected}, got {got}"
            " (seq must be last_seq + 1; start at 0)"
        )
        self.episode_id = episode_id
        self.expected = expected
        self.got = got


@runtime_checkable
class EpisodeStore(Protocol):
    """Where episodes live between steps; every method is safe under concurrent calls."""

    replica: str
    history_cap: int

    async def create(
        self,
        instruction: str,
        robot_id: str,
        replica: str,
        idempotency_key: str | None = None,
    ) -> EpisodeRecord:
        """Start an episode (id = uuid4 hex); a repeated non-empty key returns the same one."""
        ...

    async def get(self, episode_id: str) -> EpisodeRecord:
        """The episode's record; EpisodeNotFoundError if unknown (or expired)."""
        ...

    async def list(
        self, limit: int = 100, status: EpisodeStatus | None = None
    ) -> list[EpisodeRecord]:
        """Up to ``limit`` episodes, newest first, optionally only those with ``status``."""
        ...

    async def record_step(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: bytes | None = None,
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Advance the episode to ``seq`` iff ``seq == last_seq + 1`` (atomic compare-and-set).

        ``latency_s`` [s] is the chunk latency of this step; ``inputs`` the compact step inputs
        kept (last ``history_cap``) to rebuild the KV cache; None records nothing. ``reply``:
        the encoded answer to this step, kept until the next step so that a retry of the same
        seq on any replica gets it again (``last_reply``). Raises SeqConflictError,
        EpisodeEndedError or EpisodeNotFoundError.
        """
        ...

    async def resync(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: Sequence[bytes],
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Bring a store that missed steps (it was unreachable) up to ``seq``, forward only.

        The replica that kept serving the episode meanwhile calls this with its own last
        ``history_cap`` step inputs (oldest first), which replace the stored ones; ``steps``
        becomes ``seq + 1`` (seqs are consecutive from 0). Raises StepSeqConflictError when
        the stored ``last_seq >= seq`` (another replica is at least as far), EpisodeEndedError
        or EpisodeNotFoundError.
        """
        ...

    async def last_reply(self, episode_id: str) -> tuple[int, bytes] | None:
        """(seq, reply) of the last recorded step, or None when it was recorded without one."""
        ...

    async def recent_inputs(self, episode_id: str) -> list[bytes]:
        """The last (at most ``history_cap``) step inputs, oldest first."""
        ...

    async def end(self, episode_id: str, outcome: EpisodeOutcome, note: str = "") -> EpisodeRecord:
        """Mark the episode ended; EpisodeEndedError if it already was."""
        ...

    async def ping(self) -> bool:
        """True when the backing store answers."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linear interpolation (numpy default)."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize_latencies(values: Sequence[float]) -> LatencySummary:
    """Summarise chunk latencies [s] (the caller passes at most LATENCY_WINDOW of them)."""
    if not values:
        return LatencySummary()
    ordered = sorted(values)
    return LatencySummary(
        count=len(ordered),
        mean_s=math.fsum(ordered) / len(ordered),
        p50_s=percentile(ordered, 50),
        p90_s=percentile(ordered, 90),
        p99_s=percentile(ordered, 99),
        max_s=ordered[-1],
    )


def not_found(episode_id: str) -> EpisodeNotFoundError:
    """The error for an unknown (never started, expired or evicted) episode id."""
    return EpisodeNotFoundError(f"unknown episode {episode_id!r} (never started or expired)")


def check_create(instruction: str, robot_id: str, idempotency_key: str | None) -> None:
    """Validate create() arguments the same way in every backend."""
    if len(instruction) > MAX_INSTRUCTION_LEN:
        raise InvalidInputError(f"instruction longer than {MAX_INSTRUCTION_LEN} characters")
    if len(robot_id) > MAX_ROBOT_ID_LEN:
        raise InvalidInputError(f"robot_id longer than {MAX_ROBOT_ID_LEN} characters")
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LEN:
        raise InvalidInputError(f"idempotency_key longer than {MAX_IDEMPOTENCY_KEY_LEN} chars")


def check_step(seq: int, latency_s: float) -> float:
    """Validate record_step() arguments; returns the latency as a float [s]."""
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise InvalidInputError(f"seq must be an integer, got {type(seq).__name__}")
    latency = float(latency_s)
    if not math.isfinite(latency) or latency < 0.0:
        raise InvalidInputError(f"latency_s must be finite and >= 0, got {latency_s!r}")
    return latency


def check_end(outcome: EpisodeOutcome | str, note: str) -> EpisodeOutcome:
    """Validate end() arguments; returns the outcome as an EpisodeOutcome."""
    try:
        parsed = EpisodeOutcome(outcome)
    except ValueError:
        allowed = ", ".join(o.value for o in EpisodeOutcome)
        raise InvalidInputError(f"unknown outcome {outcome!r} (one of: {allowed})") from None
    if len(note) > MAX_NOTE_LEN:
        raise InvalidInputError(f"note longer than {MAX_NOTE_LEN} characters")
    return parsed


def check_limit(limit: int) -> None:
    """list() takes a positive limit."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")


def make_store(
    redis_url: str | None,
    *,
    replica: str = DEFAULT_REPLICA,
    ttl_s: float = 86400.0,
    history_cap: int = 16,
    key_prefix: str = "gr2:",
) -> EpisodeStore:
    """The Redis store for a URL, else (None or "") the in-process store.

    ``ttl_s`` [s] is how long an episode outlives its last step (or its end).
    """
    if redis_url:
        from gr2_policy.state.redis_store import RedisEpisodeStore

        return RedisEpisodeStore(
            redis_url, replica=replica, ttl_s=ttl_s, history_cap=history_cap, key_prefix=key_prefix
        )
    from gr2_policy.state.memory import MemoryEpisodeStore

    return MemoryEpisodeStore(replica=replica, ttl_s=ttl_s, history_cap=history_cap)
