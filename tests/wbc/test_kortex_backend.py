"""The Kortex backend against FakeKortex (a simulated Gen3 that enforces the cyclic protocol).

No arm is here: these tests check the protocol the backend speaks (sessions, servoing modes,
frame/command ids, degrees, the following-error clamp, faults), not the real hardware.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat
from gr2_wbc.robots.base import RobotBackend, RobotError
from gr2_wbc.robots.kortex.backend import (
    DEFAULT_MAX_STEP_DEG,
    KortexBackend,
    KortexUnavailableError,
    load_kortex_api,
)
from gr2_wbc.robots.kortex.fake import (
    ARMSTATE_IN_FAULT,
    LOW_LEVEL_SERVOING,
    SINGLE_LEVEL_SERVOING,
    FakeKortex,
)

ZEROS = np.zeros(7)


@pytest.fixture
def fake() -> FakeKortex:
    return FakeKortex()


@pytest.fixture
def robot(fake: FakeKortex) -> Iterator[KortexBackend]:
    backend = KortexBackend("192.168.1.10", kortex=fake.api)
    yield backend
    backend.close()


def drive(robot: KortexBackend, q_target: np.ndarray, ticks: int, gripper: float = 0.0) -> None:
    """The control loop's order: read, (compute), send, advance."""
    for _ in range(ticks):
        robot.read_state()
        robot.send_command(q_target, ZEROS, gripper)
        robot.advance(0.005)


def test_connect_sequence_and_servoing_mode(fake: FakeKortex, robot: KortexBackend) -> None:
    assert isinstance(robot, RobotBackend)
    assert robot.name == "kortex"
    calls = fake.calls
    # Transports on the documented ports, one session each, BEFORE any Base/BaseCyclic call.
    assert calls[:4] == [
        "tcp.connect 10000",
        "udp.connect 10001",
        "tcp.CreateSession admin",
        "udp.CreateSession admin",
    ]
    # Read the arm, then low-level servoing, then the first frame (seeded at the measured pose).
    rest = calls[4:]
    assert rest == [
        "BaseCyclic.RefreshFeedback",
        f"Base.SetServoingMode {LOW_LEVEL_SERVOING}",
        "BaseCyclic.Refresh",
    ]
    assert fake.servoing_mode == LOW_LEVEL_SERVOING
    first = fake.commands[0]
    assert first.accepted and first.frame_id == 0 and first.command_ids == (0,) * 7
    assert first.flags == (1,) * 7
    np.testing.assert_allclose(first.positions_deg, first.measured_deg)
    assert fake.fault_reason is None


def test_commands_move_the_arm_and_state_is_in_radians(
    fake: FakeKortex, robot: KortexBackend
) -> None:
    target = gen3.HOME_Q + np.array([0.3, -0.2, 0.25, 0.2, -0.3, 0.2, 0.4])
    drive(robot, target, 300)
    assert fake.fault_reason is None
    state = robot.read_state()
    np.testing.assert_allclose(state.q, target, atol=1e-3)
    np.testing.assert_allclose(fake.joint_positions_rad(), target, atol=1e-3)
    # Radians in (-pi, pi] (no full turn here) and inside the limits; the gripper in 0..1.
    assert np.all(state.q > -np.pi) and np.all(state.q <= np.pi)
    assert np.all(state.q >= gen3.JOINT_LOWER) and np.all(state.q <= gen3.JOINT_UPPER)
    assert 0.0 <= state.gripper <= 1.0
    assert state.qd.shape == (7,) and np.all(np.abs(state.qd) < 0.05)  # settled
    # The pose is our own FK of the measured q.
    tool = gen3.tool_pose(state.q)
    np.testing.assert_allclose(state.ee_position, tool[:3, 3])
    np.testing.assert_allclose(state.ee_quat_wxyz, matrix_to_quat(tool[:3, :3]))
    # Every frame: degrees in [0, 360), within the clamp of the measured position.
    for cmd in fake.commands:
        assert cmd.accepted
        assert all(0.0 <= p < 360.0 for p in cmd.positions_deg)
        err = np.abs((np.subtract(cmd.positions_deg, cmd.measured_deg) + 180.0) % 360.0 - 180.0)
        assert err.max() <= DEFAULT_MAX_STEP_DEG + 1e-6
    assert robot.clamp_count > 0  # 0.4 rad = 23 deg: the first ticks were clamped
    assert robot.clamp_counts[6] >= robot.clamp_counts[1]


def test_one_round_trip_per_tick(fake: FakeKortex, robot: KortexBackend) -> None:
    """read_state returns the feedback of the previous Refresh instead of asking again."""
    robot.read_state()  # the connect frame's feedback
    robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    n_before = len(fake.calls)
    drive(robot, gen3.HOME_Q, 10)
    new_calls = fake.calls[n_before:]
    assert new_calls.count("BaseCyclic.Refresh") == 10
    assert new_calls.count("BaseCyclic.RefreshFeedback") == 0
    # The first read after a send uses its feedback; a second read asks the arm again.
    robot.read_state()
    assert fake.calls[-1] == "BaseCyclic.Refresh"
    robot.read_state()
    assert fake.calls[-1] == "BaseCyclic.RefreshFeedback"


def test_time_is_monotonic(robot: KortexBackend) -> None:
    times = []
    for _ in range(5):
        times.append(robot.read_state().time_s)
        robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    assert times == sorted(times) and times[0] >= 0.0


def test_frame_id_wraps_past_65535(fake: FakeKortex) -> None:
    robot = KortexBackend("192.168.1.10", kortex=fake.api, first_frame_id=65533)
    try:
        drive(robot, gen3.HOME_Q, 5)
    finally:
        robot.close()
    assert [c.frame_id for c in fake.commands] == [65533, 65534, 65535, 0, 1, 2]
    assert all(c.command_ids == (c.frame_id,) * 7 for c in fake.commands)
    assert fake.fault_reason is None and all(c.accepted for c in fake.commands)


def test_clamp_prevents_a_following_error_fault(fake: FakeKortex, robot: KortexBackend) -> None:
    far = gen3.HOME_Q + np.array([1.5, 0.0, -1.5, 0.0, 1.5, 0.0, -1.5])  # 86 deg away
    robot.read_state()
    robot.send_command(far, ZEROS, 0.0)
    assert fake.fault_reason is None
    assert robot.clamp_count == 4
    moved = np.subtract(fake.commands[-1].positions_deg, fake.commands[-1].measured_deg)
    moved = (moved + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(np.abs(moved[[0, 2, 4, 6]]), DEFAULT_MAX_STEP_DEG, atol=1e-9)
    drive(robot, far, 400)
    assert fake.fault_reason is None
    np.testing.assert_allclose(robot.read_state().q, far, atol=1e-3)


def test_the_fake_faults_when_the_clamp_is_bypassed(fake: FakeKortex, robot: KortexBackend) -> None:
    """The following-error check is real: without the clamp, a far target faults the arm."""
    robot.max_step_deg = 30.0  # bypass the constructor's bound
    robot.read_state()
    robot.send_command(gen3.HOME_Q + np.array([0.5, 0, 0, 0, 0, 0, 0]), ZEROS, 0.0)
    assert fake.fault_reason is not None and "following error" in fake.fault_reason
    assert fake.active_state == ARMSTATE_IN_FAULT
    with pytest.raises(RobotError, match="fault"):
        robot.read_state()
    with pytest.raises(RobotError, match="fault"):
        robot.send_command(gen3.HOME_Q, ZEROS, 0.0)


def test_max_step_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_step_deg"):
        KortexBackend("192.168.1.10", kortex=FakeKortex().api, max_step_deg=5.0)


def test_gripper_maps_to_percent(fake: FakeKortex, robot: KortexBackend) -> None:
    for g, pct in ((0.0, 0.0), (0.5, 50.0), (1.0, 100.0), (1.7, 100.0), (-0.3, 0.0)):
        robot.read_state()
        robot.send_command(gen3.HOME_Q, ZEROS, g)
        position, velocity, force = fake.commands[-1].gripper  # type: ignore[misc]
        assert position == pytest.approx(pct)
        assert velocity == pytest.approx(robot.gripper_velocity_pct)
        assert force == pytest.approx(robot.gripper_force_pct)
    drive(robot, gen3.HOME_Q, 200, gripper=0.25)
    assert robot.read_state().gripper == pytest.approx(0.25, abs=1e-3)
    assert fake.gripper_pct == pytest.approx(25.0, abs=0.1)


def test_fault_surfaces_and_clear_faults_recovers(fake: FakeKortex, robot: KortexBackend) -> None:
    drive(robot, gen3.HOME_Q, 3)
    fake.inject_fault("overcurrent", actuator=3)
    robot.send_command(gen3.HOME_Q, ZEROS, 0.0)  # this frame's feedback shows the fault
    with pytest.raises(RobotError, match=r"Gen3 fault.*actuator 4"):
        robot.read_state()
    with pytest.raises(RobotError, match="clear_faults"):
        robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    assert robot.fault is not None

    robot.clear_faults()
    assert fake.clear_faults_calls == 1 and fake.fault_reason is None
    assert robot.fault is None
    # ClearFaults left the fake in single-level: the backend re-entered low-level.
    assert fake.servoing_modes[-2:] == [SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING]
    target = gen3.HOME_Q + 0.1
    drive(robot, target, 100)
    assert fake.fault_reason is None
    np.testing.assert_allclose(robot.read_state().q, target, atol=1e-3)


def test_kortex_errors_become_robot_errors(fake: FakeKortex, robot: KortexBackend) -> None:
    robot.read_state()
    fake.fail_next_refreshes = 1  # one lost frame is tolerated
    robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    assert robot.missed_refreshes == 1
    robot.read_state()
    fake.fail_next_refreshes = 3  # more than max_missed_refreshes=2 in a row is not
    robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    robot.send_command(gen3.HOME_Q, ZEROS, 0.0)
    with pytest.raises(RobotError, match="UDP timeout"):
        robot.send_command(gen3.HOME_Q, ZEROS, 0.0)


def test_bad_login_is_a_robot_error_and_releases_everything(fake: FakeKortex) -> None:
    with pytest.raises(RobotError, match="login failed"):
        KortexBackend("192.168.1.10", kortex=fake.api, password="wrong")
    assert fake.connected == set() and fake.open_sessions == set()


def test_close_is_idempotent_and_restores_single_level(
    fake: FakeKortex, robot: KortexBackend
) -> None:
    drive(robot, gen3.HOME_Q, 3)
    robot.close()
    robot.close()
    assert fake.servoing_mode == SINGLE_LEVEL_SERVOING
    assert fake.calls.count(f"Base.SetServoingMode {SINGLE_LEVEL_SERVOING}") == 1
    assert fake.open_sessions == set() and fake.connected == set()
    # Servoing mode restored before the sessions close.
    i_mode = fake.calls.index(f"Base.SetServoingMode {SINGLE_LEVEL_SERVOING}")
    assert i_mode < fake.calls.index("tcp.CloseSession")
    with pytest.raises(RobotError, match="closed"):
        robot.read_state()


@pytest.mark.parametrize("joint", [0, 2])  # joint_1 and joint_3 (continuous)
def test_continuous_joints_unwrap(joint: int) -> None:
    """Kortex reports 0..360: crossing 360 -> 0 and 180 -> 181 must not make q jump."""
    start = gen3.HOME_Q.copy()
    start[joint] = np.radians(-4.0)  # Kortex reports 356 deg
    fake = FakeKortex(initial_q=start, tau_s=0.005)
    robot = KortexBackend("192.168.1.10", kortex=fake.api)
    try:
        assert fake.positions_deg[joint] == pytest.approx(356.0)
        qs = []
        for target_deg in (8.0, 170.0, 200.0):
            target = start.copy()
            target[joint] = np.radians(target_deg)  # up through 0 deg, then past 180 deg
            for _ in range(150):
                qs.append(robot.read_state().q[joint])
                robot.send_command(target, ZEROS, 0.0)
        qs.append(robot.read_state().q[joint])
    finally:
        robot.close()
    steps = np.diff(qs)
    assert np.all(steps > -1e-6)  # monotonic: no 2*pi jumps either way
    assert np.max(np.abs(steps)) < np.radians(DEFAULT_MAX_STEP_DEG) + 1e-6
    assert qs[0] == pytest.approx(np.radians(-4.0), abs=1e-6)
    assert qs[-1] == pytest.approx(np.radians(200.0), abs=1e-3)  # 3.49 rad, beyond pi
    seen = [c.positions_deg[joint] for c in fake.commands]
    assert min(seen) < 5.0 and max(seen) > 355.0  # the commands wrapped at 360 too
    assert fake.fault_reason is None


def test_limited_joint_outside_the_model_is_an_error() -> None:
    q = gen3.HOME_Q.copy()
    q[1] = 2.5  # joint_2's limit is 2.24 rad
    with pytest.raises(RobotError, match="joint_2"):
        KortexBackend("192.168.1.10", kortex=FakeKortex(initial_q=q).api)


def test_cameras(fake: FakeKortex) -> None:
    robot = KortexBackend("192.168.1.10", kortex=fake.api)
    assert robot.camera_names == ()
    with pytest.raises(RobotError, match="RTSP"):
        robot.render_view("wrist", 64, 48)
    with pytest.raises(RobotError, match="RTSP"):
        robot.render_cameras(64, 48)
    robot.close()

    def wrist(width: int, height: int) -> np.ndarray:
        return np.full((height, width, 3), 7, dtype=np.uint8)

    robot = KortexBackend("192.168.1.10", kortex=FakeKortex().api, cameras={"wrist": wrist})
    assert robot.camera_names == ("wrist",)
    images = robot.render_cameras(64, 48)
    assert images["wrist"].shape == (48, 64, 3) and images["wrist"][0, 0, 0] == 7
    robot.close()


def test_missing_kortex_api_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kortex_api", None)  # makes `import kortex_api` fail
    for attempt in (load_kortex_api, lambda: KortexBackend("192.168.1.10")):
        with pytest.raises(KortexUnavailableError, match=r"pip install kortex_api") as info:
            attempt()
        assert isinstance(info.value, RobotError) and isinstance(info.value, ImportError)
        assert "protobuf" in str(info.value)


# -- the fake checks the protocol by itself (so a passing backend test means something) ------


def _raw_session(fake: FakeKortex):  # type: ignore[no-untyped-def]
    """A naive client built directly on the fake's API, in low-level servoing."""
    api = fake.api
    tcp, udp = api.tcp_transport(), api.udp_transport()
    tcp_router = api.router_client(tcp, lambda e: None)
    udp_router = api.router_client(udp, lambda e: None)
    tcp.connect("x", 10000)
    udp.connect("x", 10001)
    info = api.session_pb2.CreateSessionInfo()
    info.username, info.password = "admin", "admin"
    info.session_inactivity_timeout = info.connection_inactivity_timeout = 1000
    api.session_manager(tcp_router).CreateSession(info)
    api.session_manager(udp_router).CreateSession(info)
    base = api.base_client(tcp_router)
    cyclic = api.base_cyclic_client(udp_router)
    mode = api.base_pb2.ServoingModeInformation()
    mode.servoing_mode = api.base_pb2.LOW_LEVEL_SERVOING
    base.SetServoingMode(mode)
    command = api.base_cyclic_pb2.Command()
    for p in fake.positions_deg:
        a = command.actuators.add()
        a.flags, a.position = 1, float(p)
    return cyclic, command


def test_fake_faults_on_radians() -> None:
    fake = FakeKortex()
    cyclic, command = _raw_session(fake)
    cyclic.Refresh(command)
    assert fake.fault_reason is None
    command.frame_id = 1
    for a, q in zip(command.actuators, gen3.HOME_Q, strict=True):
        a.command_id, a.position = 1, float(q)  # radians by mistake
    feedback = cyclic.Refresh(command)
    assert "following error" in (fake.fault_reason or "")
    assert feedback.base.active_state == ARMSTATE_IN_FAULT


@pytest.mark.parametrize("mistake", ["skip_frame", "command_id", "flags", "gripper"])
def test_fake_faults_on_protocol_mistakes(mistake: str) -> None:
    fake = FakeKortex()
    cyclic, command = _raw_session(fake)
    cyclic.Refresh(command)
    command.frame_id = 2 if mistake == "skip_frame" else 1
    for a in command.actuators:
        a.command_id = command.frame_id
    if mistake == "command_id":
        command.actuators[3].command_id = 0
    if mistake == "flags":
        command.actuators[0].flags = 0
    if mistake == "gripper":
        command.interconnect.gripper_command.motor_cmd.add().position = 0.5 * 255
    cyclic.Refresh(command)
    assert fake.fault_reason is not None
