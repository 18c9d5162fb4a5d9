"""Safety layer on the real MuJoCo Gen3: watchdog stop and hold, e-stop, speed clamps.

The loop runs with realtime=False; chunks are fed between short ``run`` calls, the way the
link feeds them between ticks. All times are sim (robot) times."""

from __future__ import annotations

import threading
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
from gr2_wbc.control.ik_qp import AccelerationLimit
from gr2_wbc.control.safety import (
    Brake,
    EStop,
    SafetyConfig,
    SafetyLayer,
    SafetyState,
    Watchdog,
)
from gr2_wbc.control.trajectory import TrajectorySample
from gr2_wbc.kinematics import gen3
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.metrics import WBCMetrics
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.sim.backend import MujocoGen3
from prometheus_client import generate_latest

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ
POLICY_PERIOD_S = 0.2
REST_SPEED = 0.01  # [rad/s]
ACCELERATION_LIMIT = 8.0  # the IK's bound on the commanded joint acceleration [rad/s^2]
TRACKING, STOPPING, HOLDING, ESTOP = (int(s) for s in SafetyState)


@pytest.fixture
def robot() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def make_ik() -> IKQP:
    """Like the agent's default controller (velocity and acceleration bounds)."""
    return IKQP(
        [PoseTask(), PostureTask(gen3.HOME_Q), DampingTask()],
        [
            VelocityLimit(gen3.VELOCITY_LIMITS * 0.9),
            AccelerationLimit(np.full(7, ACCELERATION_LIMIT)),
            JointPositionLimit(),
        ],
        DT,
    )


class Streamer:
    """A loop on the sim plus a policy stand-in that sends a chunk every policy period.

    The reference moves the tool along base y at ``speed`` with a vertical wiggle, starting
    at ``origin`` at robot time ``t_origin``; each chunk covers ``horizon_s`` from now."""

    def __init__(
        self, robot: MujocoGen3, safety: SafetyConfig, speed: float = 0.15, **cfg: object
    ) -> None:
        self.robot = robot
        self.buffer = TrajectoryBuffer()
        self.recorder = TickRecorder(RATE_HZ)
        self.metrics = WBCMetrics()
        config = LoopConfig(
            rate_hz=RATE_HZ,
            realtime=False,
            observation_period_s=0.0,
            safety=safety,
            **cfg,  # type: ignore[arg-type]
        )
        self.loop = ControlLoop(robot, self.buffer, make_ik(), config, self.metrics, self.recorder)
        self.seq = 0
        self.speed = speed
        start = robot.read_state()
        self.set_origin(start.ee_position, start.time_s)
        self.quat = start.ee_quat_wxyz.copy()

    def set_origin(self, position: np.ndarray, t: float) -> None:
        self.origin = np.array(position, dtype=float)
        self.t_origin = t

    def reference(self, times: np.ndarray) -> np.ndarray:
        s = times - self.t_origin
        pos = self.origin + np.outer(s, [0.0, self.speed, 0.0])
        pos[:, 2] += 0.04 * np.sin(np.pi * s)
        return pos

    def send_chunk(self, horizon_s: float = 1.0, gripper: float = 0.5) -> None:
        t = self.robot.read_state().time_s
        times = t + np.arange(0.0, horizon_s + 1e-9, 0.1)
        k = times.shape[0]
        quats = np.tile(self.quat, (k, 1))
        self.buffer.add_chunk(self.seq, times, self.reference(times), quats, np.full(k, gripper))
        self.seq += 1

    def stream(self, seconds: float, horizon_s: float = 1.0, gripper: float = 0.5) -> None:
        for _ in range(round(seconds / POLICY_PERIOD_S)):
            self.send_chunk(horizon_s, gripper)
            self.run(POLICY_PERIOD_S)

    def run(self, seconds: float) -> None:
        self.loop.run(threading.Event(), max_duration_s=seconds)

    def record(self) -> dict[str, np.ndarray]:
        return self.recorder.arrays()


def first_index(mask: np.ndarray, start: int = 0) -> int:
    hits = np.flatnonzero(mask[start:])
    assert hits.size, "condition never met"
    return int(start + hits[0])


def assert_stops_and_holds(rec: dict[str, np.ndarray], fire: int, within_s: float) -> float:
    """Measured joint speeds below REST_SPEED within ``within_s`` of tick ``fire`` and for
    the next second, with < 1 mm tool drift; returns the time to rest [s]."""
    t, speed = rec["t"], np.abs(rec["qd"]).max(axis=1)
    rest = first_index((speed < REST_SPEED) & (t > t[fire]), fire)
    stop_time = float(t[rest] - t[fire])
    assert stop_time <= within_s, stop_time
    window = (t >= t[rest]) & (t <= t[rest] + 1.0)
    assert t[window][-1] >= t[rest] + 1.0 - 1e-9  # the record covers the whole second
    assert speed[window].max() < REST_SPEED
    drift = np.linalg.norm(rec["ee_pos"][window] - rec["ee_pos"][rest], axis=1).max()
    assert drift < 1e-3, drift
    return stop_time


@pytest.mark.parametrize(
    ("horizon_s", "cause"),
    [(1.0, Watchdog.NOTHING_NEW), (0.3, Watchdog.PAST_HORIZON)],
    ids=["nothing-new", "past-horizon"],
)
def test_when_the_stream_stops_the_arm_is_at_rest_within_half_a_second_and_holds(
    robot: MujocoGen3, horizon_s: float, cause: str
) -> None:
    stale_after = 3 * POLICY_PERIOD_S
    s = Streamer(robot, SafetyConfig(watchdog=True, stale_after_s=stale_after))
    s.stream(1.0, horizon_s=horizon_s)  # chunks at t = 0, 0.2, .., 0.8
    last_chunk_t = 0.8
    s.run(2.5)  # nothing new
    rec = s.record()
    t, state = rec["t"], rec["watchdog_state"]

    # It was really moving when the stream stopped.
    assert np.all(state[t < last_chunk_t + min(horizon_s, stale_after) - 1e-9] == TRACKING)
    fire = first_index(state != TRACKING)
    expected = last_chunk_t + min(horizon_s, stale_after)  # horizon end or 3 periods
    assert t[fire] == pytest.approx(expected, abs=2 * DT)
    assert np.abs(rec["qd"][fire]).max() > 0.15
    assert s.loop.safety.trip_reason == cause
    horizon_end = last_chunk_t + horizon_s

    stop_time = assert_stops_and_holds(rec, fire, within_s=0.5)
    # Also measured from the end of the last chunk's horizon, when that comes first.
    rest = first_index((np.abs(rec["qd"]).max(axis=1) < REST_SPEED) & (t > t[fire]), fire)
    assert t[rest] - min(horizon_end, t[fire]) <= 0.5
    print(f"{cause}: at rest {stop_time:.3f} s after the watchdog fired")

    # STOPPING then HOLDING, never back to tracking; the hold target is fixed, qd_cmd = 0.
    after = state[fire:]
    assert set(np.unique(after)) == {STOPPING, HOLDING}
    hold = first_index(after == HOLDING) + fire
    assert np.all(state[hold:] == HOLDING)
    np.testing.assert_array_equal(rec["qd_cmd"][hold:], 0.0)
    assert np.all(rec["q_cmd"][hold:] == rec["q_cmd"][hold])
    assert np.all(rec["chunk_seq"][fire:] == -1) and rec["chunk_seq"][fire - 1] == s.seq - 1

    # The braking command is smooth: |accel| within the stop deceleration, continuous start.
    qd_cmd = rec["qd_cmd"][fire - 1 : hold + 1]
    accel = np.abs(np.diff(qd_cmd, axis=0)).max(axis=1) / DT
    assert accel.max() <= SafetyConfig.stop_decel + 1e-6
    assert np.all(np.abs(rec["qd_cmd"][: fire + 1]).max(axis=0) <= gen3.VELOCITY_LIMITS)

    assert s.loop.stats()["watchdog_trips"] == 1
    text = generate_latest(s.metrics.registry).decode()
    assert "gr2_wbc_watchdog_trips_total 1.0" in text
    assert f"gr2_wbc_watchdog_state {float(HOLDING)}" in text


def test_tracking_resumes_smoothly_from_the_held_pose(robot: MujocoGen3) -> None:
    s = Streamer(robot, SafetyConfig(watchdog=True, stale_after_s=0.6))
    s.stream(1.0)
    s.run(1.5)  # stale -> stop -> hold
    rec0 = s.record()
    assert rec0["watchdog_state"][-1] == HOLDING
    held = robot.read_state()
    # The new stream starts 3 cm away from where the arm stopped.
    s.set_origin(held.ee_position + np.array([0.0, 0.03, 0.0]), held.time_s)
    resumed_at = s.recorder.count
    s.stream(1.6)
    s.run(0.2)
    rec = s.record()
    state = rec["watchdog_state"][resumed_at:]
    assert state[0] == TRACKING and np.all(state[: 8 * 40] == TRACKING)
    # No jump: the commanded velocity ramps within the QP's acceleration bound, and the tool
    # starts from where it was held (no step of the measured tool position).
    qd_cmd = rec["qd_cmd"][resumed_at - 1 :]
    accel = np.abs(np.diff(qd_cmd, axis=0)).max(axis=1) / DT
    assert accel.max() <= ACCELERATION_LIMIT + 1e-6
    step = np.linalg.norm(np.diff(rec["ee_pos"][resumed_at - 1 :], axis=0), axis=1)
    assert step.max() <= 0.3 * DT  # below 0.3 m/s at every tick
    # ...and it converges onto the new reference.
    end = robot.read_state()
    target = s.reference(np.array([end.time_s]))[0]
    assert np.linalg.norm(end.ee_position - target) < 0.01


def test_estop_latches_stops_faster_and_reset_resumes(robot: MujocoGen3) -> None:
    s = Streamer(robot, SafetyConfig(watchdog=True, stale_after_s=0.6))
    s.stream(0.6)
    s.loop.safety.estop.trigger("test e-stop")
    fire = s.recorder.count
    s.stream(1.2)  # fresh chunks keep coming: the e-stop stays latched
    rec = s.record()
    assert np.all(rec["watchdog_state"][fire:] == ESTOP)
    assert np.abs(rec["qd"][fire]).max() > 0.15
    stop_time = assert_stops_and_holds(rec, fire, within_s=0.3)
    print(f"e-stop: at rest {stop_time:.3f} s after the trigger")
    np.testing.assert_array_equal(rec["qd_cmd"][-50:], 0.0)
    assert np.all(rec["chunk_seq"][fire:] == -1)
    accel = np.abs(np.diff(rec["qd_cmd"][fire - 1 :], axis=0)).max(axis=1) / DT
    assert accel.max() <= SafetyConfig.estop_decel + 1e-6
    stats = s.loop.stats()
    assert stats["estop_latched"] and stats["estop_reason"] == "test e-stop"

    held = robot.read_state()
    s.buffer.clear()  # a policy that saw the arm stop plans from where it is
    s.set_origin(held.ee_position, held.time_s)
    s.loop.safety.estop.reset()
    resumed_at = s.recorder.count
    s.stream(0.6)
    rec = s.record()
    state = rec["watchdog_state"][resumed_at:]
    assert np.all(state == TRACKING)
    assert np.all(rec["chunk_seq"][resumed_at:] >= 0)
    moved = np.linalg.norm(robot.read_state().ee_position - held.ee_position)
    assert moved > 0.05
    text = generate_latest(s.metrics.registry).decode()
    assert "gr2_wbc_estops_total 1.0" in text
    assert "gr2_wbc_watchdog_trips_total 0.0" in text


def test_estop_file_latches_until_reset(robot: MujocoGen3, tmp_path: Path) -> None:
    flag = tmp_path / "estop"
    s = Streamer(robot, SafetyConfig(watchdog=True, estop_file=flag))
    s.stream(0.4)
    flag.touch()
    s.stream(0.4)
    assert s.loop.safety.state == SafetyState.ESTOP
    assert s.loop.safety.estop.reason == f"file {flag} exists"
    flag.unlink()
    s.stream(0.4)
    assert s.loop.safety.state == SafetyState.ESTOP  # latched: removing the file is not enough
    s.loop.safety.estop.reset()
    s.stream(0.4)
    assert s.loop.safety.state == SafetyState.TRACKING


def test_speed_clamps_hold_on_every_tick_for_an_aggressive_trajectory(
    robot: MujocoGen3,
) -> None:
    joint_cap = np.full(7, 0.4)
    tool_cap, tool_w_cap, grip_rate = 0.08, 0.3, 1.5
    safety = SafetyConfig(
        watchdog=True,
        joint_speed_limits=joint_cap,
        tool_speed_max=tool_cap,
        tool_angular_speed_max=tool_w_cap,
        gripper_rate_max=grip_rate,
    )
    # The tracker asks for up to 2 m/s and 4 rad/s; the reference moves at 0.6 m/s.
    s = Streamer(robot, safety, speed=0.6, v_max=2.0, w_max=4.0)
    for i in range(8):
        s.send_chunk(horizon_s=1.0, gripper=1.5 if i < 4 else -0.5)  # out of range
        s.run(POLICY_PERIOD_S)
    rec = s.record()
    qd_cmd, q = rec["qd_cmd"], rec["q"]
    assert np.all(np.abs(qd_cmd) <= joint_cap + 1e-9)
    for qi, qdi in zip(q, qd_cmd, strict=True):
        twist = gen3.tool_jacobian(qi) @ qdi
        assert np.linalg.norm(twist[:3]) <= tool_cap + 1e-9
        assert np.linalg.norm(twist[3:]) <= tool_w_cap + 1e-9
    assert rec["speed_scale"].min() < 0.8  # the clamps were doing the limiting
    assert np.linalg.norm(np.diff(rec["ee_pos"], axis=0), axis=1).max() / DT < tool_cap * 1.2
    grip = rec["gripper_cmd"]
    assert grip.min() >= 0.0 and grip.max() == 1.0 and grip[-1] == 0.0  # clamped
    assert np.abs(np.diff(grip)).max() <= grip_rate * DT + 1e-12
    assert s.loop.stats()["speed_clamps"] > 100
    assert "gr2_wbc_speed_clamps_total" in generate_latest(s.metrics.registry).decode()


def test_brake_profile_is_smooth_and_bounded() -> None:
    brake = Brake(7, DT)
    qd0 = np.array([1.2, -0.6, 0.3, 0.0, 0.1, -1.1, 0.5])
    brake.start(qd0, decel=5.0, jerk=50.0)
    assert brake.duration_s == pytest.approx(max(1.875 * 1.2 / 5.0, np.sqrt(5.7735 * 1.2 / 50)))
    out, profile = np.zeros(7), [qd0.copy()]
    while brake.step(out):
        profile.append(out.copy())
        np.testing.assert_allclose(np.cross(out[:3], qd0[:3]), 0.0, atol=1e-12)  # same direction
    profile.append(out.copy())
    v = np.array(profile)
    np.testing.assert_array_equal(v[-1], 0.0)
    a = np.diff(v, axis=0) / DT
    j = np.diff(a, axis=0) / DT
    assert np.abs(a).max() <= 5.0 + 1e-6
    assert np.abs(j).max() <= 50.0 * 1.05  # the discrete profile, within 5 %
    brake.start(np.zeros(7), 5.0, 50.0)
    assert not brake.active and not brake.step(out) and not out.any()


def test_watchdog_and_estop_logic_without_a_robot() -> None:
    wd = Watchdog(stale_after_s=0.6)
    sample = TrajectorySample(seq=0)
    assert not wd.update(0.0, None) and wd.reason == Watchdog.NO_TRAJECTORY
    assert wd.update(0.0, sample)
    assert wd.update(0.6, sample)
    assert not wd.update(0.61, sample) and wd.reason == Watchdog.NOTHING_NEW
    sample.seq = 1
    assert wd.update(0.7, sample)
    sample.expired = True
    assert not wd.update(0.71, sample) and wd.reason == Watchdog.PAST_HORIZON
    assert Watchdog(0.6, enabled=False).update(100.0, sample)  # only "no chunk" counts

    estop = EStop()
    estop.trigger("first")
    estop.trigger("second")
    assert estop.latched and estop.reason == "first" and estop.triggers == 1
    estop.reset()
    assert not estop.latched

    layer = SafetyLayer(SafetyConfig().resolved(0.2), DT)
    assert layer.watchdog.enabled and layer.watchdog.stale_after_s == pytest.approx(0.6)
    assert not SafetyLayer(SafetyConfig().resolved(0.0), DT).watchdog.enabled
    assert layer.gripper_command(None, 1.7) == 1.0  # starts from the measured, clamped
    with pytest.raises(ValueError, match="positive"):
        SafetyConfig(tool_speed_max=0.0).resolved(0.2)


def test_clamps_hold_for_random_commands_and_poses() -> None:
    """The cheap reach bound and the Jacobian path together never let a command through."""
    cfg = SafetyConfig(tool_speed_max=0.3, tool_angular_speed_max=1.0).resolved(0.2)
    layer = SafetyLayer(cfg, DT)
    layer.update(0.0, TrajectorySample(seq=0))
    assert layer.state == SafetyState.TRACKING
    rng = np.random.default_rng(7)
    for _ in range(500):
        q = rng.uniform(-2.0, 2.0, 7)
        qd_in = rng.normal(0.0, rng.choice([0.02, 0.2, 2.0]), 7)
        q_cmd, qd = layer.command(q, qd_in)
        assert np.all(np.abs(qd) <= cfg.joint_speed_limits + 1e-12)
        twist = gen3.tool_jacobian(q) @ qd
        assert np.linalg.norm(twist[:3]) <= 0.3 + 1e-9
        assert np.linalg.norm(twist[3:]) <= 1.0 + 1e-9
        np.testing.assert_allclose(qd, qd_in * layer.last_scale)  # direction kept
        np.testing.assert_allclose(q_cmd, q + qd * DT)


def test_joint_range_guard_never_commands_past_a_limit() -> None:
    """At or beyond a limit the command never moves further out (and never yanks back);
    inside, q_cmd = q + qd dt is untouched."""
    layer = SafetyLayer(SafetyConfig().resolved(0.2), DT)
    layer.update(0.0, TrajectorySample(seq=0))
    limited = np.isfinite(gen3.JOINT_UPPER)
    rng = np.random.default_rng(3)
    for _ in range(300):
        q = rng.uniform(-1.0, 1.0, 7)
        near = rng.uniform(-2e-3, 1e-3, 7)  # inside by up to 2 mrad, or past by up to 1 mrad
        q[limited] = np.where(rng.random(limited.sum()) < 0.5, 1.0, -1.0) * (
            gen3.JOINT_UPPER[limited] + near[limited]
        )
        qd_in = rng.normal(0.0, 0.5, 7)
        q_cmd, qd = layer.command(q, qd_in)
        assert np.all(q_cmd <= gen3.JOINT_UPPER) and np.all(q_cmd >= gen3.JOINT_LOWER)
        assert np.all(np.abs(qd) <= np.abs(qd_in) + 1e-12)  # only ever shrinks
        assert np.all(np.sign(qd) * np.sign(qd_in) >= 0.0)  # never reverses
        over = (q >= gen3.JOINT_UPPER) | (q <= gen3.JOINT_LOWER)
        outward = np.where(q >= gen3.JOINT_UPPER, qd > 0.0, qd < 0.0)
        assert not np.any(over & outward)
    inside = gen3.HOME_Q.copy()
    q_cmd, qd = layer.command(inside, np.full(7, 0.1))
    np.testing.assert_allclose(q_cmd, inside + qd * DT)
