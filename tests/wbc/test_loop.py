"""The control loop on the real MuJoCo Gen3 (realtime=False: sim time, no timed assertions)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gr2_wbc.control import (
    IKQP,
    DampingTask,
    JointPositionLimit,
    PoseTask,
    PostureTask,
    TrajectoryBuffer,
    VelocityLimit,
)
from gr2_wbc.kinematics import gen3
from gr2_wbc.loop import ControlLoop, LoopConfig, ObservationSample
from gr2_wbc.metrics import METRIC_NAMES, WBCMetrics, start_metrics_server
from gr2_wbc.robots.base import ArmState
from gr2_wbc.robots.sim.backend import MujocoGen3
from prometheus_client import generate_latest

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ


class RecordingBackend:
    """Delegates to a real backend and records every state read and command sent."""

    def __init__(self, inner: MujocoGen3) -> None:
        self.inner = inner
        self.name = inner.name
        self.camera_names = inner.camera_names
        self.states: list[ArmState] = []
        self.commands: list[tuple[np.ndarray, np.ndarray, float]] = []

    def read_state(self) -> ArmState:
        state = self.inner.read_state()
        self.states.append(state)
        return state

    def send_command(self, q_cmd: np.ndarray, qd_cmd: np.ndarray, gripper_cmd: float) -> None:
        self.commands.append((np.array(q_cmd), np.array(qd_cmd), float(gripper_cmd)))
        self.inner.send_command(q_cmd, qd_cmd, gripper_cmd)

    def advance(self, dt: float) -> None:
        self.inner.advance(dt)

    def render_cameras(self, width: int, height: int) -> dict[str, np.ndarray]:
        return self.inner.render_cameras(width, height)

    def capture_scene(self) -> object:
        return self.inner.capture_scene()

    def render_view(
        self, name: str, width: int, height: int, scene: object | None = None
    ) -> np.ndarray:
        return self.inner.render_view(name, width, height, scene)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def robot() -> Iterator[RecordingBackend]:
    backend = RecordingBackend(MujocoGen3(seed=0))
    yield backend
    backend.close()


def make_ik() -> IKQP:
    return IKQP(
        [PoseTask(), DampingTask(1e-3), PostureTask(gen3.HOME_Q)],
        [VelocityLimit(), JointPositionLimit()],
        DT,
    )


def make_loop(robot: RecordingBackend, buffer: TrajectoryBuffer, **cfg: object) -> ControlLoop:
    config = LoopConfig(rate_hz=RATE_HZ, realtime=False, **cfg)  # type: ignore[arg-type]
    return ControlLoop(robot, buffer, make_ik(), config, WBCMetrics())


def sideways_chunk(state: ArmState, dy: float = 0.05, k: int = 11):
    """Waypoints moving the tool ``dy`` [m] along base y over 1 s, orientation kept."""
    s = np.linspace(0.0, 1.0, k)
    times = state.time_s + s
    positions = state.ee_position + np.outer(s, [0.0, dy, 0.0])
    quats = np.tile(state.ee_quat_wxyz, (k, 1))
    return times, positions, quats, np.zeros(k)


def test_tracks_a_sideways_chunk_within_limits(robot: RecordingBackend) -> None:
    buffer = TrajectoryBuffer()
    start = robot.inner.read_state()
    times, positions, quats, grippers = sideways_chunk(start)
    buffer.add_chunk(0, times, positions, quats, grippers)
    loop = make_loop(robot, buffer, observation_period_s=0.0)
    loop.run(threading.Event(), max_duration_s=2.0)

    end = robot.inner.read_state()
    assert end.time_s == pytest.approx(start.time_s + 2.0, abs=1e-9)
    assert np.linalg.norm(end.ee_position - positions[-1]) < 0.01
    assert np.linalg.norm(end.ee_position - start.ee_position) > 0.04  # it really moved
    q_meas = np.array([s.q for s in robot.states])
    qd_meas = np.array([s.qd for s in robot.states])
    qd_cmd = np.array([c[1] for c in robot.commands])
    q_cmd = np.array([c[0] for c in robot.commands])
    assert len(robot.commands) == 400
    assert np.all(q_meas >= gen3.JOINT_LOWER) and np.all(q_meas <= gen3.JOINT_UPPER)
    assert np.all(q_cmd >= gen3.JOINT_LOWER) and np.all(q_cmd <= gen3.JOINT_UPPER)
    assert np.all(np.abs(qd_cmd) <= gen3.VELOCITY_LIMITS + 1e-6)
    assert np.all(np.abs(qd_meas) <= gen3.VELOCITY_LIMITS)
    np.testing.assert_allclose(q_cmd, q_meas + qd_cmd * DT, atol=1e-12)

    stats = loop.stats()
    assert stats["ticks"] == 400 and stats["qp_failures"] == 0 and stats["qp_solves"] == 400
    assert stats["max_tracking_error_m"] < 0.005  # feed-forward: no speed/kp lag
    np.testing.assert_allclose(stats["initial_q"], start.q)
    moved = np.subtract(stats["final_tool_position"], stats["initial_tool_position"])
    assert np.linalg.norm(moved) > 0.04
    json.dumps(stats)  # plain numbers and lists: printable by the CLI and benchmarks
    np.testing.assert_allclose(stats["qd_cmd_max_abs"], np.abs(qd_cmd).max(axis=0))
    for key in ("tick_compute_p50_s", "tick_compute_p99_s", "qp_solve_p50_s", "qp_solve_p99_s"):
        assert stats[key] > 0.0


def test_fast_chunk_saturates_but_never_exceeds_the_velocity_limit(
    robot: RecordingBackend,
) -> None:
    """20 cm in 0.2 s with joint speed capped at 0.3 rad/s: the QP's box is what limits."""
    cap = np.full(7, 0.3)
    ik = IKQP(
        [PoseTask(), DampingTask(1e-3), PostureTask(gen3.HOME_Q)],
        [VelocityLimit(cap), JointPositionLimit()],
        DT,
    )
    buffer = TrajectoryBuffer()
    start = robot.inner.read_state()
    times, positions, quats, grippers = sideways_chunk(start, dy=0.2, k=3)
    buffer.add_chunk(0, start.time_s + 0.2 * (times - start.time_s), positions, quats, grippers)
    config = LoopConfig(rate_hz=RATE_HZ, realtime=False, observation_period_s=0.0, v_max=2.0)
    loop = ControlLoop(robot, buffer, ik, config)
    loop.run(threading.Event(), max_duration_s=2.0)
    qd_cmd = np.array([c[1] for c in robot.commands])
    assert np.all(np.abs(qd_cmd) <= cap + 1e-6)
    assert np.abs(qd_cmd).max() > 0.3 - 1e-3  # the cap was reached
    q_meas = np.array([s.q for s in robot.states])
    assert np.all(q_meas >= gen3.JOINT_LOWER) and np.all(q_meas <= gen3.JOINT_UPPER)
    assert loop.stats()["qp_failures"] == 0
    assert np.linalg.norm(robot.inner.read_state().ee_position - positions[-1]) < 0.01


def test_without_a_chunk_the_arm_holds_still(robot: RecordingBackend) -> None:
    start = robot.inner.read_state()
    loop = make_loop(robot, TrajectoryBuffer(), observation_period_s=0.0)
    loop.run(threading.Event(), max_duration_s=1.0)
    end = robot.inner.read_state()
    assert np.linalg.norm(end.ee_position - start.ee_position) < 1e-3
    assert np.abs(end.q - start.q).max() < 2e-3
    for q_cmd, qd_cmd, _ in robot.commands:
        np.testing.assert_array_equal(qd_cmd, np.zeros(7))
        np.testing.assert_array_equal(q_cmd, start.q)  # latched, not re-read each tick
    assert loop.stats()["qp_solves"] == 0


def test_observations_are_produced_on_robot_time_newest_first(robot: RecordingBackend) -> None:
    loop = make_loop(
        robot, TrajectoryBuffer(), observation_period_s=0.2, camera_width=64, camera_height=48
    )
    loop.run(threading.Event(), max_duration_s=0.5)  # ticks at t = 0 .. 0.495
    assert loop.stats()["observations_produced"] == 3  # t = 0, 0.2, 0.4
    obs = loop.observations.get_nowait()
    assert isinstance(obs, ObservationSample)
    assert loop.observations.empty()  # single slot: the older ones were replaced
    assert obs.capture_time_s == pytest.approx(0.4, abs=1e-9)
    assert obs.state.time_s == obs.capture_time_s
    assert set(obs.images) == set(robot.camera_names) == {"head", "wrist"}
    for image in obs.images.values():
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert image.std() > 0  # a rendered scene, not a blank buffer


def test_observation_images_show_the_capture_instant(robot: RecordingBackend) -> None:
    """The first observation is captured at tick 0 and rendered in the camera thread from
    that tick's scene: while the arm moves on, its images still show the start."""
    buffer = TrajectoryBuffer()
    start = robot.inner.read_state()
    buffer.add_chunk(0, *sideways_chunk(start, dy=0.15))
    at_start = robot.inner.render_cameras(64, 64)
    loop = make_loop(robot, buffer, observation_period_s=0.2)
    loop.run(threading.Event(), max_duration_s=39 * DT)  # the next observation is tick 40
    assert loop.stats()["observations_produced"] == 1
    obs = loop.observations.get_nowait()
    assert obs.capture_time_s == robot.states[0].time_s == obs.state.time_s
    now = robot.inner.render_cameras(64, 64)
    assert np.linalg.norm(robot.inner.read_state().ee_position - start.ee_position) > 0.01
    for name in robot.camera_names:
        np.testing.assert_array_equal(obs.images[name], at_start[name])
    assert not np.array_equal(obs.images["wrist"], now["wrist"])  # the arm did move


def test_metrics_expose_all_names_over_http(robot: RecordingBackend) -> None:
    buffer = TrajectoryBuffer()
    buffer.add_chunk(0, *sideways_chunk(robot.inner.read_state()))
    loop = make_loop(robot, buffer, observation_period_s=0.0)
    loop.run(threading.Event(), max_duration_s=0.25)
    assert loop.metrics is not None
    text = generate_latest(loop.metrics.registry).decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert "gr2_wbc_tick_compute_seconds_count 50.0" in text
    assert "gr2_wbc_qp_solve_seconds_count 50.0" in text
    assert "gr2_wbc_loop_period_seconds_count 49.0" in text
    server, thread = start_metrics_server(loop.metrics.registry, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        assert all(name in body for name in METRIC_NAMES)
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_realtime_run_stops_on_the_event(robot: RecordingBackend) -> None:
    loop = make_loop(robot, TrajectoryBuffer(), observation_period_s=0.0)
    loop.config.realtime = True
    stop = threading.Event()

    def stop_after_some_ticks() -> None:  # by tick count, not by a timer: no race
        while loop.ticks < 5:
            time.sleep(0.001)
        stop.set()

    stopper = threading.Thread(target=stop_after_some_ticks)
    stopper.start()
    loop.run(stop)  # no duration: only the event ends it
    stopper.join()
    stats = loop.stats()
    assert 5 <= stats["ticks"] < 1000
    assert stats["loop_period_p50_s"] > 0.0
    assert robot.inner.read_state().time_s == pytest.approx(stats["ticks"] * DT, abs=1e-9)


def test_video_recording_writes_an_mp4(robot: RecordingBackend, tmp_path: Path) -> None:
    imageio = pytest.importorskip("imageio.v3")
    loop = make_loop(
        robot,
        TrajectoryBuffer(),
        observation_period_s=0.0,
        video_fps=10.0,
        video_width=96,
        video_height=64,
    )
    loop.run(threading.Event(), max_duration_s=0.5)
    assert loop.stats()["video_frames"] == 5
    path = loop.write_video(tmp_path / "run.mp4")
    frames = imageio.imread(path)  # all frames, decoded by ffmpeg
    assert frames.shape == (5, 64, 2 * 96, 3)


def test_lockstep_waits_for_each_observations_chunk(robot: RecordingBackend) -> None:
    """Unpaced with lockstep: a policy slower than the sim (0.15 s of wall time per chunk,
    while 0.2 s of sim time takes a few ms) still has its chunk in use by robot time capture +
    delay, for every observation; nothing times out."""
    from gr2_wbc.recording import TickRecorder

    buffer = TrajectoryBuffer()
    recorder = TickRecorder(RATE_HZ)
    config = LoopConfig(
        rate_hz=RATE_HZ, realtime=False, observation_period_s=0.2, lockstep_delay_s=0.1
    )
    loop = ControlLoop(robot, buffer, make_ik(), config, recorder=recorder)
    loop.lockstep_last_seq = 4
    stop = threading.Event()
    captures: list[float] = []

    def slow_policy() -> None:
        for seq in range(5):
            obs = loop.observations.get(timeout=30)
            captures.append(obs.capture_time_s)
            time.sleep(0.15)
            times, positions, quats, grippers = sideways_chunk(obs.state)
            buffer.add_chunk(seq, times, positions, quats, grippers)

    policy = threading.Thread(target=slow_policy)
    policy.start()
    loop.run(stop, max_duration_s=1.2)
    policy.join()
    assert loop.lockstep_timeouts == 0 and len(captures) == 5
    rec = recorder.arrays()
    for seq, capture in enumerate(captures):
        first_use = rec["t"][np.flatnonzero(rec["chunk_seq"] >= seq)[0]]
        assert first_use <= capture + 0.1 + 1e-9, (seq, first_use, capture)
    assert loop.stats()["observations_produced"] == 6  # t = 0 .. 1.0
