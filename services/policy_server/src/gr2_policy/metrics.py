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
        self.episode_adoptions = Counter(
            "gr2_policy_episode_adoptions_total",
            "Episodes taken over from the store after another replica served them",
            registry=r,
        )
        self.replayed_steps = Counter(
            "gr2_policy_replayed_steps_total",
            "Retried seqs answered with the stored chunk instead of running again",
            registry=r,
        )
        self.draining = Gauge(
            "gr2_policy_draining", "1 while the server shuts down and refuses new work", registry=r
        )
        self.store_errors = Counter(
            "gr2_policy_store_errors_total",
            "Episode-store operations that failed (steps fail open)",
            ["operation"],
            registry=r,
        )
        # Access control (api.auth): reasons are missing / malformed / invalid; the rate
        # limit is labelled by API key *name* (bounded by GR2_API_KEYS), or "anonymous".
        self.auth_failures = Counter(
            "gr2_policy_auth_failures_total",
            "Calls refused for a missing, malformed or unknown API key",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "gr2_policy_rate_limited_total",
            "Calls and stream observations refused by the per-key rate limit",
            ["key"],
            registry=r,
        )
