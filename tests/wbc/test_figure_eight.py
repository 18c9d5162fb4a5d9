"""Tracking a figure-eight streamed as chunks with 100 ms of simulated inference delay.

A stand-in policy answers each observation (every 0.2 s of robot time) with a chunk of the
reference starting at the observation's capture time, 16 waypoints 50 ms apart (as the
link converts a real chunk: ``capture_time + time_offsets``); the chunk reaches the buffer
100 ms of robot time after the capture, so its first two waypoints are already in the past.
Like a real policy's, successive chunks disagree: each is offset by its own random 1 mm
(per axis), so every chunk boundary is a real take-over the blending has to smooth.
The whole agent stack runs on the real MuJoCo Gen3 (``default_ik``, safety layer,
``realtime=False``). The tool error is measured against the exact reference at the tick's
robot time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from gr2_wbc.control.safety import SafetyConfig
from gr2_wbc.control.smoothing import ChunkSmoother
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import ACCELERATION_LIMIT, default_ik
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.selftest import ChunkShape, FigureEight, tracking_error

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ
POLICY_PERIOD_S = 0.2
INFERENCE_DELAY_S = 0.1
CHUNK_DISAGREEMENT_M = 1e-3
WAYPOINT_DT_S = 0.05
WAYPOINTS = 16
LOOP_PERIOD_S = 4.0  # one figure-eight (0.10 m half-width in y, 0.05 m half-height in z)
LOOPS = 2


@pytest.fixture
def robot() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def track(robot: MujocoGen3, buffer: TrajectoryBuffer, smoother: ChunkSmoother | None):
    """Stream the figure-eight for LOOPS loops; return (record, reference, loop)."""
    recorder = TickRecorder(RATE_HZ)
    config = LoopConfig(
        rate_hz=RATE_HZ,
        realtime=False,
        observation_period_s=0.0,
        safety=SafetyConfig(watchdog=True),
    )
    loop = ControlLoop(robot, buffer, default_ik(RATE_HZ), config, recorder=recorder)
    start = robot.read_state()
    reference = FigureEight(start.ee_position, start.time_s, period_s=LOOP_PERIOD_S)
    shape = ChunkShape(WAYPOINTS, WAYPOINT_DT_S)
    quats = np.tile(start.ee_quat_wxyz, (WAYPOINTS, 1))
    stop = threading.Event()
    rng = np.random.default_rng(0)
    for seq in range(round(LOOPS * LOOP_PERIOD_S / POLICY_PERIOD_S)):
        capture = robot.read_state().time_s  # the observation this chunk answers
        times = shape.times(capture)
        positions = reference(times) + rng.normal(0.0, CHUNK_DISAGREEMENT_M, 3)
        loop.run(stop, max_duration_s=INFERENCE_DELAY_S)  # the policy is thinking
        if smoother is not None:
            positions = smoother.smooth(times, positions)
        assert buffer.add_chunk(seq, times, positions, quats, np.zeros(WAYPOINTS))
        loop.run(stop, max_duration_s=POLICY_PERIOD_S - INFERENCE_DELAY_S)
    return recorder.arrays(), reference, loop


def velocity_steps(rec: dict[str, np.ndarray], first: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tick from ``first``: max |qd_cmd change| over joints [rad/s], and the indices of
    the steps where the chunk in use changed."""
    step = np.abs(np.diff(rec["qd_cmd"][first:], axis=0)).max(axis=1)
    boundary = np.flatnonzero(np.diff(rec["chunk_seq"][first:]) != 0)
    return step, boundary


@pytest.mark.parametrize(
    ("blend", "smooth"),
    [("min_jerk", False), ("ensemble", False), ("min_jerk", True)],
    ids=["min-jerk", "ensemble", "min-jerk+smoothing-qp"],
)
def test_figure_eight_is_tracked_within_5_mm_rms_without_jumps(
    robot: MujocoGen3, blend: str, smooth: bool
) -> None:
    buffer = TrajectoryBuffer(blend=blend, ensemble_decay=2.0 if blend == "ensemble" else 0.0)
    smoother = ChunkSmoother() if smooth else None
    rec, reference, loop = track(robot, buffer, smoother)
    t = rec["t"]
    tracking = rec["chunk_seq"] >= 0
    # Tracking from the first chunk's arrival to the end, without a single stop.
    first = int(np.flatnonzero(tracking)[0])
    assert t[first] == pytest.approx(t[0] + INFERENCE_DELAY_S, abs=DT + 1e-9)
    assert np.all(tracking[first:])
    assert loop.stats()["watchdog_trips"] == 0 and loop.stats()["qp_failures"] == 0

    error = tracking_error(rec, reference)
    assert error["tracked_ticks"] == t.shape[0] - first
    rms, worst = error["rms_error_m"], error["max_error_m"]
    span = np.ptp(rec["ee_pos"][first:], axis=0)  # the tool really drew the whole figure
    assert span[1] > 0.95 * 2 * reference.half_width_m, span
    assert span[2] > 0.95 * 2 * reference.half_height_m, span
    assert rms < 5e-3, f"RMS tool error {rms * 1e3:.2f} mm"

    # No velocity jump at chunk boundaries: consecutive commanded joint velocities differ by
    # well under what the IK's acceleration bound allows per tick (the blend and the cubic
    # interpolation make them smooth; the bound is a backstop, never reached here), and by
    # no more than the bound anywhere.
    step, boundary = velocity_steps(rec, first)
    assert boundary.size == round(LOOPS * LOOP_PERIOD_S / POLICY_PERIOD_S) - 1
    assert step[boundary].max() <= 0.5 * ACCELERATION_LIMIT * DT, step[boundary].max() / DT
    assert step.max() <= ACCELERATION_LIMIT * DT + 1e-6, step.max() / DT
    print(
        f"{blend}{' + smoothing QP' if smooth else ''}: RMS {rms * 1e3:.2f} mm, "
        f"max {worst * 1e3:.2f} mm, max |dqd|/dt at boundaries "
        f"{step[boundary].max() / DT:.2f} rad/s^2 (bound {ACCELERATION_LIMIT:g})"
    )


def test_switching_chunks_without_a_blend_hits_the_acceleration_bound(robot: MujocoGen3) -> None:
    """The check above has teeth: an instant take-over with linear interpolation makes the
    command jump at boundaries until the IK's acceleration bound clips it."""
    buffer = TrajectoryBuffer(blend_s=0.0, interpolation="linear")
    rec, _, _ = track(robot, buffer, None)
    first = int(np.flatnonzero(rec["chunk_seq"] >= 0)[0])
    step, boundary = velocity_steps(rec, first)
    assert step[boundary].max() > 0.9 * ACCELERATION_LIMIT * DT
