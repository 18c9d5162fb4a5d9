"""The MuJoCo Gen3 scene and sim backend (real MuJoCo, headless EGL rendering, no mocks)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np
import pytest
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import rotation_error
from gr2_wbc.robots.base import RobotBackend, RobotError
from gr2_wbc.robots.sim import scene
from gr2_wbc.robots.sim.backend import MujocoGen3

DT = 0.005  # the 200 Hz control period


@pytest.fixture
def sim() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def random_q(rng: np.random.Generator) -> np.ndarray:
    lo = np.where(np.isfinite(gen3.JOINT_LOWER), gen3.JOINT_LOWER, -np.pi)
    hi = np.where(np.isfinite(gen3.JOINT_UPPER), gen3.JOINT_UPPER, np.pi)
    return rng.uniform(lo, hi)


def test_mujoco_model_matches_numpy_kinematics(sim: MujocoGen3) -> None:
    """Acceptance: the generated MJCF and gen3.py agree at 20 random configurations."""
    m, d = sim.model, sim.data
    rng = np.random.default_rng(1234)
    for _ in range(20):
        q = random_q(rng)
        d.qpos[sim._qpos_idx] = q
        mujoco.mj_kinematics(m, d)
        for T_sim, T_np in (
            (sim.flange_pose(), gen3.flange_pose(q)),
            (sim.tool_pose(), gen3.tool_pose(q)),
        ):
            assert np.linalg.norm(T_sim[:3, 3] - T_np[:3, 3]) < 1e-3
            assert np.linalg.norm(rotation_error(T_np[:3, :3], T_sim[:3, :3])) < 0.01


def test_joint_limits_and_names_come_from_the_table(sim: MujocoGen3) -> None:
    for spec in gen3.JOINTS:
        j = sim.model.joint(spec.name)
        assert bool(sim.model.jnt_limited[j.id]) == (spec.limit is not None)
        if spec.limit is not None:
            np.testing.assert_allclose(sim.model.jnt_range[j.id], [-spec.limit, spec.limit])
    assert sim.model.opt.timestep == scene.TIMESTEP_S


def test_starts_settled_at_home(sim: MujocoGen3) -> None:
    assert isinstance(sim, RobotBackend)
    state = sim.read_state()
    assert state.time_s == 0.0
    np.testing.assert_allclose(state.q, gen3.HOME_Q, atol=1e-6)
    np.testing.assert_allclose(state.ee_position, gen3.tool_pose(gen3.HOME_Q)[:3, 3], atol=1e-3)
    assert state.ee_quat_wxyz.shape == (4,) and state.gripper < 0.01
    other = MujocoGen3(seed=0, initial_q=np.zeros(7))
    np.testing.assert_allclose(other.read_state().q, np.zeros(7), atol=1e-6)


def test_holds_home_without_sagging(sim: MujocoGen3) -> None:
    sim.send_command(gen3.HOME_Q, np.zeros(7), 0.0)
    sim.advance(1.0)
    state = sim.read_state()
    assert state.time_s == pytest.approx(1.0)
    np.testing.assert_allclose(state.q, gen3.HOME_Q, atol=1e-3)
    np.testing.assert_allclose(state.ee_position, gen3.tool_pose(gen3.HOME_Q)[:3, 3], atol=1e-3)


def test_position_servo_tracks_a_step(sim: MujocoGen3) -> None:
    target = gen3.HOME_Q + np.array([0.2, -0.2, 0.2, -0.2, 0.2, -0.2, 0.2])
    sim.send_command(target, np.zeros(7), 0.0)
    for _ in range(int(1.0 / DT)):
        sim.advance(DT)
    np.testing.assert_allclose(sim.read_state().q, target, atol=0.01)


def test_velocity_feed_forward_tracks_a_smooth_move(sim: MujocoGen3) -> None:
    """Min-jerk move of up to 0.5 rad in 1 s (peak ~0.94 rad/s): lag stays under 0.3 deg."""
    q0, delta, duration = gen3.HOME_Q.copy(), np.array([0.5, -0.4, 0.5, -0.5, 0.5, -0.5, 0.5]), 1.0
    worst = 0.0
    for k in range(1, int(duration / DT) + 1):
        s = k * DT / duration
        pos = 10 * s**3 - 15 * s**4 + 6 * s**5
        vel = (30 * s**2 - 60 * s**3 + 30 * s**4) / duration
        sim.send_command(q0 + pos * delta, vel * delta, 0.0)
        sim.advance(DT)
        worst = max(worst, float(np.abs(sim.read_state().q - (q0 + pos * delta)).max()))
    assert worst < 0.005


def test_gripper_closes_and_opens(sim: MujocoGen3) -> None:
    fingers = sim.data.qpos[sim._finger_qpos].copy()
    sim.send_command(gen3.HOME_Q, np.zeros(7), 1.0)
    sim.advance(0.6)
    closed = sim.data.qpos[sim._finger_qpos].copy()
    assert np.all(closed - fingers > 0.9 * scene.FINGER_TRAVEL_M)
    assert abs(closed[0] - closed[1]) < 1e-3  # the equality keeps the fingers symmetric
    assert sim.read_state().gripper > 0.95
    sim.send_command(gen3.HOME_Q, np.zeros(7), 0.0)
    sim.advance(0.6)
    assert sim.read_state().gripper < 0.05
    eq = sim.model.eq(0)
    assert eq.type[0] == mujoco.mjtEq.mjEQ_JOINT
    finger_ids = {sim.model.joint(n).id for n in scene.FINGER_JOINT_NAMES}
    assert {int(eq.obj1id[0]), int(eq.obj2id[0])} == finger_ids


def _move_tool(
    sim: MujocoGen3,
    q: np.ndarray,
    target: np.ndarray,
    rot: np.ndarray,
    duration: float,
    gripper: float,
) -> np.ndarray:
    """Straight-line tool move by damped least-squares IK on gen3 (test helper, not the QP)."""
    start = gen3.tool_pose(q)[:3, 3]
    n = int(duration / DT)
    for k in range(1, n + 1):
        s = k / n
        s = 3 * s**2 - 2 * s**3
        T = gen3.tool_pose(q)
        err = np.r_[start + s * (target - start) - T[:3, 3], rotation_error(rot, T[:3, :3])]
        J = gen3.tool_jacobian(q)
        dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), err)
        q = q + dq
        sim.send_command(q, dq / DT, gripper)
        sim.advance(DT)
    sim.send_command(q, np.zeros(7), gripper)
    sim.advance(0.2)
    return q


def test_gripper_picks_up_a_block() -> None:
    sim = MujocoGen3(seed=1)
    block = sim.block_positions()["red"]
    yaw = np.arctan2(*sim.data.xmat[sim.model.body("block_red").id].reshape(3, 3)[[1, 0], 0])
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-1.0, 1.0, -1.0])
    q = sim.read_state().q
    q = _move_tool(sim, q, block + np.array([0.0, 0.0, 0.12]), R, 1.0, 0.0)
    q = _move_tool(sim, q, block, R, 0.8, 0.0)
    q = _move_tool(sim, q, block, R, 0.5, 1.0)
    grip = sim.read_state().gripper
    assert 0.4 < grip < 0.7  # stopped by the 4 cm block, not closed
    q = _move_tool(sim, q, block + np.array([0.05, 0.0, 0.15]), R, 1.0, 1.0)
    state = sim.read_state()
    lifted = sim.block_positions()["red"]
    assert lifted[2] > block[2] + 0.14  # carried with the tool, not left on the table
    assert np.linalg.norm(lifted - state.ee_position) < 0.01


def _colour_pixels(img: np.ndarray) -> dict[str, int]:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return {
        "red": int(((r > 100) & (r > 2 * g) & (r > 2 * b)).sum()),
        "green": int(((g > 80) & (g > 1.5 * r) & (g > 1.5 * b)).sum()),
        "blue": int(((b > 100) & (b > 2 * r) & (b > 1.5 * g)).sum()),
    }


def test_cameras_render_the_scene(sim: MujocoGen3) -> None:
    images = sim.render_cameras(160, 120)
    assert set(images) == {"head", "wrist"} == set(sim.camera_names)
    for img in images.values():
        assert img.shape == (120, 160, 3) and img.dtype == np.uint8
        assert img.std() > 20.0
    head = _colour_pixels(images["head"])
    assert all(n >= 8 for n in head.values()), head  # all three blocks in view
    assert not np.array_equal(images["head"], images["wrist"])
    assert sim.render_view("head", 64, 48).shape == (48, 64, 3)
    with pytest.raises(ValueError):
        sim.render_view("nope", 64, 48)


def test_render_from_any_thread_and_of_a_captured_scene(sim: MujocoGen3) -> None:
    """Renders run in the backend's GL thread: any thread may ask. A captured scene renders
    as it was when captured, whatever the physics did since."""
    before = sim.capture_scene()
    image_before = sim.render_view("wrist", 32, 24)
    results: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: results.append(sim.render_view("wrist", 32, 24)))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(results[0], image_before)
    q = sim.read_state().q
    q[0] += 0.6  # turn the base: the wrist camera sees something else
    sim.send_command(q, np.zeros(7), 0.0)
    for _ in range(200):
        sim.advance(0.005)
    moved = sim.render_view("wrist", 32, 24)
    assert np.abs(moved.astype(int) - image_before.astype(int)).mean() > 5.0
    np.testing.assert_array_equal(sim.render_view("wrist", 32, 24, before), image_before)
    sim.close()
    with pytest.raises(RobotError):
        sim.render_view("wrist", 32, 24)


def test_blocks_are_seeded_on_the_table() -> None:
    layouts = []
    for seed in (0, 1, 2):
        backend = MujocoGen3(seed=seed)
        blocks = backend.block_positions()
        assert set(blocks) == {"red", "green", "blue"}
        for p in blocks.values():
            assert p[2] == pytest.approx(scene.TABLE_TOP_Z_M + scene.BLOCK_SIZE_M / 2, abs=2e-3)
            assert scene.BLOCK_REGION_X_M[0] <= p[0] <= scene.BLOCK_REGION_X_M[1]
            assert scene.BLOCK_REGION_Y_M[0] <= p[1] <= scene.BLOCK_REGION_Y_M[1]
        layouts.append(np.array(list(blocks.values())))
    assert np.abs(layouts[0] - layouts[1]).max() > 0.01
    assert np.abs(layouts[1] - layouts[2]).max() > 0.01
    again = np.array(list(MujocoGen3(seed=1).block_positions().values()))
    np.testing.assert_allclose(again, layouts[1], atol=1e-9)
    # the tool at HOME_Q is above the table
    assert gen3.tool_pose(gen3.HOME_Q)[2, 3] - scene.TABLE_TOP_Z_M > 0.15


def test_advance_requires_a_multiple_of_the_timestep(sim: MujocoGen3) -> None:
    for bad in (0.0015, 0.0, -0.005, 0.0004):
        with pytest.raises(ValueError):
            sim.advance(bad)
    assert sim.read_state().time_s == 0.0
    sim.advance(DT)
    assert sim.read_state().time_s == pytest.approx(DT)


def test_send_command_validates_inputs(sim: MujocoGen3) -> None:
    with pytest.raises(ValueError):
        sim.send_command(np.zeros(6), np.zeros(7), 0.0)
    with pytest.raises(ValueError):
        sim.send_command(np.full(7, np.nan), np.zeros(7), 0.0)
    with pytest.raises(ValueError):
        sim.send_command(gen3.HOME_Q, np.zeros(7), float("inf"))
