"""Prometheus metrics of the WBC agent (DESIGN.md section 8: base units, no per-episode labels).

All metrics live in a dedicated :class:`~prometheus_client.CollectorRegistry` held by
:class:`WBCMetrics`, so tests and several agents in one process never collide on the global
registry. Updating a metric is a lock + float add (a few microseconds), cheap enough for the
200 Hz loop.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# 50 us .. 20 ms, roughly 1-2-5 per decade, plus the 5 ms loop budget and its double.
COMPUTE_BUCKETS_S: tuple[float, ...] = (
    5e-5,
    1e-4,
    2e-4,
    3e-4,
    5e-4,
    7.5e-4,
    1e-3,
    2e-3,
    3e-3,
    5e-3,
    1e-2,
    2e-2,
)
"""Histogram buckets [s] for per-tick compute and QP solve times."""

PERIOD_BUCKETS_S: tuple[float, ...] = (
    1e-3,
    2.5e-3,
    4e-3,
    4.5e-3,
    4.9e-3,
    5.1e-3,
    5.5e-3,
    6e-3,
    7.5e-3,
    1e-2,
    2e-2,
    5e-2,
)
"""Histogram buckets [s] for the loop period, dense around the 5 ms (200 Hz) period."""

METRIC_NAMES: tuple[str, ...] = (
    "gr2_wbc_loop_period_seconds",
    "gr2_wbc_tick_compute_seconds",
    "gr2_wbc_qp_solve_seconds",
    "gr2_wbc_deadline_misses_total",
    "gr2_wbc_tracking_error_meters",
    "gr2_wbc_chunk_age_seconds",
    "gr2_wbc_watchdog_trips_total",
    "gr2_wbc_watchdog_state",
    "gr2_wbc_estops_total",
    "gr2_wbc_speed_clamps_total",
)
"""Every metric the agent exports (dashboards and alerts may rely on each)."""


class WBCMetrics:
    """The WBC agent's metrics in their own registry.

    Attributes:
        registry: the registry to serve (``start_metrics_server(metrics.registry)``).
        loop_period: histogram of the time between tick starts [s].
        tick_compute: histogram of one tick's compute time (read state .. send command) [s].
        qp_solve: histogram of the IK QP update + solve time [s].
        deadline_misses: counter of ticks that started after their deadline.
        tracking_error: gauge of ``||p_target - p_tool||`` [m].
        chunk_age: gauge of the robot time since the current chunk's origin [s].
        watchdog_trips: counter of stale-trajectory stops (incremented by the safety layer).
        watchdog_state: gauge of the safety state (0 TRACKING, 1 STOPPING, 2 HOLDING, 3 ESTOP;
            :class:`~gr2_wbc.control.safety.SafetyState`).
        estops: counter of e-stops latched.
        speed_clamps: counter of ticks whose command a joint or tool speed clamp scaled down.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.loop_period = Histogram(
            "gr2_wbc_loop_period_seconds",
            "Time between the starts of consecutive control ticks.",
            buckets=PERIOD_BUCKETS_S,
            registry=r,
        )
        self.tick_compute = Histogram(
            "gr2_wbc_tick_compute_seconds",
            "Compute time of one control tick (state read to command sent).",
            buckets=COMPUTE_BUCKETS_S,
            registry=r,
        )
        self.qp_solve = Histogram(
            "gr2_wbc_qp_solve_seconds",
            "IK QP update and OSQP solve time per tick.",
            buckets=COMPUTE_BUCKETS_S,
            registry=r,
        )
        self.deadline_misses = Counter(
            "gr2_wbc_deadline_misses",
            "Control ticks that started after their deadline.",
            registry=r,
        )
        self.tracking_error = Gauge(
            "gr2_wbc_tracking_error_meters",
            "Distance between the reference and the measured tool position.",
            registry=r,
        )
        self.chunk_age = Gauge(
            "gr2_wbc_chunk_age_seconds",
            "Robot time since the origin of the trajectory chunk being tracked.",
            registry=r,
        )
        self.watchdog_trips = Counter(
            "gr2_wbc_watchdog_trips",
            "Times the watchdog stopped the arm because the trajectory was stale.",
            registry=r,
        )
        self.watchdog_state = Gauge(
            "gr2_wbc_watchdog_state",
            "Safety state: 0 tracking, 1 stopping, 2 holding, 3 e-stop.",
            registry=r,
        )
        self.estops = Counter(
            "gr2_wbc_estops",
            "Emergency stops latched (API, signal or e-stop file).",
            registry=r,
        )
        self.speed_clamps = Counter(
            "gr2_wbc_speed_clamps",
            "Control ticks whose command was scaled down by a joint or tool speed clamp.",
            registry=r,
        )


def start_metrics_server(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9102
) -> Any:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    Port 9102 is the agent's default (``GR2_WBC_METRICS_PORT``); pass 0 to pick a free port
    (read it back from the returned server's ``server_port``).

    Returns:
        Whatever ``prometheus_client.start_http_server`` returns: in prometheus-client >= 0.20
        a ``(server, thread)`` tuple; call ``server.shutdown()`` to stop it.
    """
    return start_http_server(port, addr=host, registry=registry)
