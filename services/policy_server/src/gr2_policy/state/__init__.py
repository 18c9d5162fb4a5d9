"""Episode state: one store interface, an in-process and a Redis backend (DESIGN.md section 6)."""

from gr2_policy.state.memory import MemoryEpisodeStore
from gr2_policy.state.redis_store import RedisEpisodeStore
from gr2_policy.state.store import (
    LATENCY_WINDOW,
    EpisodeOutcome,
    EpisodeRecord,
    EpisodeStatus,
    EpisodeStore,
    LatencySummary,
    StepSeqConflictError,
    make_store,
    summarize_latencies,
)

__all__ = [
    "LATENCY_WINDOW",
    "EpisodeOutcome",
    "EpisodeRecord",
    "EpisodeStatus",
    "EpisodeStore",
    "LatencySummary",
    "MemoryEpisodeStore",
    "RedisEpisodeStore",
    "StepSeqConflictError",
    "make_store",
    "summarize_latencies",
]
