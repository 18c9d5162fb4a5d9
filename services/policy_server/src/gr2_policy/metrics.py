"""Prometheus metrics of the policy server (DESIGN.md section 8): base units, no
per-episode labels. One registry per server instance so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
)


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step_latency = Histogram(
            "gr2_policy_step_latency_seconds",
            "Server time of one control step, receipt to reply",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "gr2_policy_queue_time_seconds",
            "Time a step waited before the model ran",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_chunk_latency = Histogram(
            "gr2_policy_first_chunk_latency_seconds",
            "Server time of an episode's first step",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gr2_policy_batch_size",
            "Episodes per model forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.active_episodes = Gauge(
            "gr2_policy_active_episodes", "Episodes with state in this replica", registry=r
        )
        self.kv_cache_usage = Gauge(
            "gr2_policy_kv_cache_usage_ratio", "Fraction of KV-cache slots in use", registry=r
        )
        self.evictions = Counter(
            "gr2_policy_episode_evictions_total", "Idle episodes evicted from memory", registry=r
        )
        self.video_tokens = Counter(
            "gr2_policy_video_tokens_total", "Image tokens generated for video", registry=r
        )
        self.requests = Counter(
            "gr2_policy_requests_total",
            "RPCs and REST calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.store_errors = Counter(
            "gr2_policy_store_errors_total",
            "Episode-store operations that failed (steps fail open)",
            ["operation"],
            registry=r,
        )
