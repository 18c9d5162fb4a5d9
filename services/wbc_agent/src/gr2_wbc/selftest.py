"""Self-test without a policy server: a scripted figure-eight streamed as chunks.

A commissioning check for a new arm or a new machine (``gr2-wbc-agent selftest``) and the
body of ``bench/wbc_loop.py``: :class:`ScriptedPolicy` stands in for the policy server and
answers every observation the loop publishes with a chunk of a :class:`FigureEight` that
starts at the observation's capture time (robot clock, as the link converts a real chunk),
after a simulated inference delay. Everything else is the agent as deployed: the loop with
absolute deadlines, camera rendering for observations, the IK QP, the safety layer.

The figure-eight lies in the base y-z plane through the tool's start position; its amplitude
ramps in with a min-jerk profile, so the reference starts at rest where the tool is.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import default_ik
from gr2_wbc.loop import ControlLoop, LoopConfig, ObservationSample
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.base import RobotBackend


@dataclass(frozen=True)
class FigureEight:
    """``p(t) = centre + r(t) [0, a sin(w s), b sin(2 w s)]``, ``s = t - t0``, ``w = 2 pi /
    period_s``, ``r`` the min-jerk ramp 0 -> 1 over ``ramp_s`` (position, velocity and
    acceleration continuous from rest). Peak speed ~0.2 m/s with the defaults.

    Attributes:
        centre: start position of the tool [m], base frame, shape (3,).
        t0: robot time the reference starts [s].
        half_width_m, half_height_m: half-extents a (base y) and b (base z) [m].
        period_s: duration of one figure-eight [s].
        ramp_s: amplitude ramp-in time [s].
    """

    centre: np.ndarray
    t0: float
    half_width_m: float = 0.10
    half_height_m: float = 0.05
    period_s: float = 4.0
    ramp_s: float = 1.0

    def __call__(self, times: np.ndarray) -> np.ndarray:
        """Positions at robot times ``times`` (k,) -> (k, 3) [m]."""
        s = np.asarray(times, dtype=float) - self.t0
        tau = np.clip(s / self.ramp_s, 0.0, 1.0)
        ramp = tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)
        omega = 2.0 * math.pi / self.period_s
        out = np.tile(np.asarray(self.centre, dtype=float), (s.shape[0], 1))
        out[:, 1] += ramp * self.half_width_m * np.sin(omega * s)
        out[:, 2] += ramp * self.half_height_m * np.sin(2.0 * omega * s)
        return out


@dataclass(frozen=True)
class ChunkShape:
    """Waypoints per chunk and their spacing [s] (the policy's action horizon)."""

    waypoints: int = 16
    waypoint_dt_s: float = 0.05

    def times(self, capture_time_s: float) -> np.ndarray:
        """Waypoint robot times of the chunk answering an observation captured then."""
        return capture_time_s + self.waypoint_dt_s * np.arange(self.waypoints)


class ScriptedPolicy(threading.Thread):
    """Answers each observation with a chunk of ``reference`` after ``delay_s`` of wall time.

    Runs beside a real-time loop (wall time ~ robot time). The chunk holds the tool's
    orientation at the first observation and the gripper open.

    Attributes:
        chunks: chunks delivered so far.
    """

    def __init__(
        self,
        loop: ControlLoop,
        buffer: TrajectoryBuffer,
        reference: FigureEight,
        quat_wxyz: np.ndarray,
        stop: threading.Event,
        delay_s: float = 0.1,
        shape: ChunkShape | None = None,
    ) -> None:
        super().__init__(name="gr2-scripted-policy", daemon=True)
        self.observations: queue.Queue[ObservationSample] = loop.observations
        self.buffer = buffer
        self.reference = reference
        self.quat = np.asarray(quat_wxyz, dtype=float)
        self.stop_event = stop
        self.delay_s = delay_s
        self.shape = shape or ChunkShape()
        self.chunks = 0

    def run(self) -> None:
        k = self.shape.waypoints
        quats = np.tile(self.quat, (k, 1))
        grippers = np.zeros(k)
        while not self.stop_event.is_set():
            try:
                obs = self.observations.get(timeout=0.1)
            except queue.Empty:
                continue
            times = self.shape.times(obs.capture_time_s)
            positions = self.reference(times)
            time.sleep(self.delay_s)  # inference
            self.buffer.add_chunk(self.chunks, times, positions, quats, grippers)
            self.chunks += 1


def tracking_error(record: dict[str, np.ndarray], reference: FigureEight) -> dict[str, float]:
    """RMS and max tool error [m] against the exact reference over the ticks that tracked
    a chunk (``chunk_seq >= 0``) in a :class:`~gr2_wbc.recording.TickRecorder` record."""
    tracking = record["chunk_seq"] >= 0
    if not tracking.any():
        return {"tracked_ticks": 0, "rms_error_m": math.nan, "max_error_m": math.nan}
    t = record["t"][tracking]
    error = np.linalg.norm(record["ee_pos"][tracking] - reference(t), axis=1)
    return {
        "tracked_ticks": int(tracking.sum()),
        "rms_error_m": float(np.sqrt(np.mean(error**2))),
        "max_error_m": float(error.max()),
    }


def timing_summary(stats: dict[str, Any], rate_hz: float) -> dict[str, Any]:
    """The loop's timing figures in ms, plus the tick compute p99 as a share of the period."""
    period = 1.0 / rate_hz

    def ms(key: str) -> float:
        return round(float(stats[key]) * 1e3, 4)

    return {
        "ticks": stats["ticks"],
        "deadline_misses": stats["deadline_misses"],
        "tick_compute_p50_ms": ms("tick_compute_p50_s"),
        "tick_compute_p99_ms": ms("tick_compute_p99_s"),
        "tick_compute_max_ms": ms("tick_compute_max_s"),
        "loop_period_p50_ms": ms("loop_period_p50_s"),
        "loop_period_p99_ms": ms("loop_period_p99_s"),
        "loop_period_max_ms": ms("loop_period_max_s"),
        "qp_solve_p50_ms": ms("qp_solve_p50_s"),
        "qp_solve_p99_ms": ms("qp_solve_p99_s"),
        "render_p50_ms": ms("render_p50_s"),
        "tick_compute_p99_over_period": round(float(stats["tick_compute_p99_s"]) / period, 4),
        "qp_failures": stats["qp_failures"],
    }


@dataclass
class SelftestResult:
    """What :func:`run_selftest` measured: ``figures`` (JSON-ready) and the tick record."""

    figures: dict[str, Any]
    record: dict[str, np.ndarray]
    loop: ControlLoop


def run_selftest(
    robot: RobotBackend,
    seconds: float,
    config: LoopConfig,
    *,
    delay_s: float = 0.1,
    buffer: TrajectoryBuffer | None = None,
    reference_kwargs: dict[str, float] | None = None,
    recorder: TickRecorder | None = None,
) -> SelftestResult:
    """Track a streamed figure-eight on ``robot`` for ``seconds`` of loop time.

    ``config`` must publish observations (``observation_period_s > 0``): each one is answered
    by :class:`ScriptedPolicy`. With ``config.realtime`` the run takes ``seconds`` of wall
    time and the timing figures are meaningful; the tracking figures hold either way.
    """
    if config.observation_period_s <= 0.0:
        raise ValueError("the self-test needs observations (observation_period_s > 0)")
    buffer = buffer or TrajectoryBuffer()
    recorder = recorder or TickRecorder.for_duration(config.rate_hz, seconds)
    loop = ControlLoop(robot, buffer, default_ik(config.rate_hz), config, recorder=recorder)
    start = robot.read_state()
    reference = FigureEight(start.ee_position, start.time_s, **(reference_kwargs or {}))
    stop = threading.Event()
    policy = ScriptedPolicy(loop, buffer, reference, start.ee_quat_wxyz, stop, delay_s)
    policy.start()
    try:
        loop.run(stop, max_duration_s=seconds)
    finally:
        stop.set()
        policy.join(timeout=5.0)
    record = recorder.arrays()
    stats = loop.stats()
    figures: dict[str, Any] = {
        "seconds": seconds,
        "rate_hz": config.rate_hz,
        "realtime": config.realtime,
        "inference_delay_s": delay_s,
        "chunks": policy.chunks,
        "observations": stats["observations_produced"],
        "timing": timing_summary(stats, config.rate_hz),
        "tracking": tracking_error(record, reference),
        "watchdog_trips": stats["watchdog_trips"],
    }
    return SelftestResult(figures, record, loop)
