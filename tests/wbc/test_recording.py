"""Per-tick recording (``TickRecorder``, ``--record``) on the real MuJoCo Gen3."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gr2_wbc.control import TrajectoryBuffer
from gr2_wbc.control.safety import STATE_NAMES, SafetyState
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.recording import KEYS, TickRecorder
from gr2_wbc.robots.base import ArmState
from gr2_wbc.robots.sim.backend import MujocoGen3

from tests.wbc.test_safety import make_ik

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ


def sideways_chunk(start: ArmState, dy: float = 0.05, k: int = 11) -> tuple[np.ndarray, ...]:
    """Waypoints moving the tool ``dy`` [m] along base y over 1 s, orientation kept."""
    s = np.linspace(0.0, 1.0, k)
    positions = start.ee_position + np.outer(s, [0.0, dy, 0.0])
    return start.time_s + s, positions, np.tile(start.ee_quat_wxyz, (k, 1)), np.zeros(k)


@pytest.fixture
def robot() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def test_ticks_npz_has_every_documented_key_and_consistent_rows(
    robot: MujocoGen3, tmp_path: Path
) -> None:
    imageio = pytest.importorskip("imageio.v3")
    buffer = TrajectoryBuffer()
    recorder = TickRecorder.for_duration(RATE_HZ, 1.0)
    config = LoopConfig(
        rate_hz=RATE_HZ,
        realtime=False,
        observation_period_s=0.0,
        video_fps=10.0,
        video_width=64,
        video_height=48,
    )
    loop = ControlLoop(robot, buffer, make_ik(), config, recorder=recorder)
    loop.run(threading.Event(), max_duration_s=0.25)  # no chunk yet: holding
    buffer.add_chunk(7, *sideways_chunk(robot.read_state()))
    loop.run(threading.Event(), max_duration_s=0.75)
    assert recorder.count == 200 and recorder.capacity == 201 and recorder.dropped == 0

    path = recorder.save(tmp_path / "ticks.npz")
    video = loop.write_video(tmp_path / "cameras.mp4")
    with np.load(path, allow_pickle=False) as data:
        rec = {k: data[k] for k in data.files}
    assert set(rec) == set(KEYS)
    n = 200
    shapes = {
        "t": (n,), "q": (n, 7), "qd": (n, 7), "q_cmd": (n, 7), "qd_cmd": (n, 7),
        "ee_pos": (n, 3), "ee_quat_wxyz": (n, 4), "gripper": (n,), "gripper_cmd": (n,),
        "chunk_seq": (n,), "watchdog_state": (n,), "speed_scale": (n,), "compute_s": (n,),
        "deadline_miss": (n,), "rate_hz": (), "watchdog_state_names": (4,), "dropped": (),
    }  # fmt: skip
    assert {k: v.shape for k, v in rec.items()} == shapes
    assert rec["chunk_seq"].dtype == np.int64 and rec["deadline_miss"].dtype == np.bool_
    np.testing.assert_allclose(np.diff(rec["t"]), DT, atol=1e-9)  # monotonic, one row a tick
    assert rec["t"][0] == 0.0 and float(rec["rate_hz"]) == RATE_HZ
    assert list(rec["watchdog_state_names"]) == list(STATE_NAMES)
    assert int(rec["dropped"]) == 0 and not rec["deadline_miss"].any()  # not realtime

    hold, track = slice(0, 50), slice(50, None)
    assert np.all(rec["watchdog_state"][hold] == SafetyState.HOLDING)
    assert np.all(rec["chunk_seq"][hold] == -1)
    assert np.all(rec["watchdog_state"][track] == SafetyState.TRACKING)
    assert np.all(rec["chunk_seq"][track] == 7)
    np.testing.assert_array_equal(rec["qd_cmd"][hold], 0.0)
    np.testing.assert_allclose(rec["q_cmd"][track], rec["q"][track] + rec["qd_cmd"][track] * DT)
    assert np.all(rec["compute_s"] > 0.0) and np.all(rec["speed_scale"] == 1.0)
    np.testing.assert_allclose(np.linalg.norm(rec["ee_quat_wxyz"], axis=1), 1.0, atol=1e-9)
    assert np.linalg.norm(rec["ee_pos"][-1] - rec["ee_pos"][0]) > 0.02  # it moved

    frames = imageio.imread(video)
    assert frames.shape == (10, 48, 2 * 64, 3) and frames.std() > 0


def test_recorder_grows_by_doubling_and_a_fixed_one_counts_drops(robot: MujocoGen3) -> None:
    growing = TickRecorder(RATE_HZ, initial_capacity=16)
    fixed = TickRecorder(RATE_HZ, capacity=40)
    for recorder in (growing, fixed):
        backend = MujocoGen3(seed=0)
        try:
            config = LoopConfig(rate_hz=RATE_HZ, realtime=False, observation_period_s=0.0)
            loop = ControlLoop(backend, TrajectoryBuffer(), make_ik(), config, recorder=recorder)
            loop.run(threading.Event(), max_duration_s=0.5)
        finally:
            backend.close()
    assert growing.count == 100 and growing.capacity == 128 and growing.dropped == 0
    assert fixed.count == 40 and fixed.capacity == 40 and fixed.dropped == 60
    a, b = growing.arrays(), fixed.arrays()
    np.testing.assert_allclose(a["t"], np.arange(100) * DT, atol=1e-9)
    for key in ("t", "q", "q_cmd", "ee_pos"):
        np.testing.assert_array_equal(a[key][:40], b[key])
    with pytest.raises(ValueError, match="capacity"):
        TickRecorder(RATE_HZ, capacity=0)


class SlowBackend:
    """A sim whose physics step takes 8 ms every 10th tick (longer than the 5 ms period)."""

    def __init__(self, inner: MujocoGen3) -> None:
        self.inner = inner
        self.name = inner.name
        self.camera_names = inner.camera_names
        self.read_state = inner.read_state
        self.send_command = inner.send_command
        self.render_view = inner.render_view
        self.capture_scene = inner.capture_scene
        self.render_cameras = inner.render_cameras
        self.close = inner.close
        self.ticks = 0

    def advance(self, dt: float) -> None:
        self.ticks += 1
        if self.ticks % 10 == 0:
            time.sleep(0.008)
        self.inner.advance(dt)


def test_deadline_misses_are_flagged_on_their_ticks(robot: MujocoGen3) -> None:
    recorder = TickRecorder(RATE_HZ)
    config = LoopConfig(rate_hz=RATE_HZ, realtime=True, observation_period_s=0.0)
    loop = ControlLoop(SlowBackend(robot), TrajectoryBuffer(), make_ik(), config, recorder=recorder)
    loop.run(threading.Event(), max_duration_s=0.3)
    rec = recorder.arrays()
    assert loop.deadline_misses >= 5
    assert int(rec["deadline_miss"].sum()) == loop.deadline_misses
    # The slow ticks (every 10th) are among the flagged ones.
    assert rec["deadline_miss"][9::10].all()
