"""IK QP with real OSQP: closed forms, each limit in isolation, matrices, failures, tracking."""

from __future__ import annotations

import numpy as np
import pytest
from gr2_wbc.control.ik_qp import (
    IKQP,
    AccelerationLimit,
    DampingTask,
    JointPositionLimit,
    PoseTask,
    PostureTask,
    VelocityLimit,
)
from gr2_wbc.control.tracking import pose_tracking_twist
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat, quat_multiply, rotation_error

DT = 0.005
WIDE = np.full(7, 1e3)


def dls(jac: np.ndarray, w: np.ndarray, v: np.ndarray, lam: float) -> np.ndarray:
    """Damped least squares: argmin ||J x - v||^2_W + lam ||x||^2."""
    return np.linalg.solve(jac.T @ w @ jac + lam * np.eye(jac.shape[1]), jac.T @ w @ v)


@pytest.mark.parametrize("seed", range(4))
def test_unconstrained_solution_equals_damped_least_squares(seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = gen3.HOME_Q + rng.normal(scale=0.4, size=7)
    v = rng.normal(scale=0.2, size=6)
    pose, lam = PoseTask(position_weight=1.0, orientation_weight=0.3), 2e-3
    ik = IKQP([pose, DampingTask(lam)], [VelocityLimit(WIDE), JointPositionLimit(-WIDE, WIDE)], DT)
    pose.set_target_twist(v)
    res = ik.solve(q)
    assert res.solved and res.status == "solved"
    expected = dls(gen3.tool_jacobian(q), np.diag([1.0] * 3 + [0.3] * 3), v, lam)
    np.testing.assert_allclose(res.qd, expected, atol=1e-4)


def test_analytic_jacobian_with_posture_matches_closed_form() -> None:
    """A constant 'planar' Jacobian (no robot needed) plus the posture task."""
    rng = np.random.default_rng(7)
    J = rng.normal(size=(6, 7))
    pose = PoseTask(orientation_weight=0.5, jacobian_fn=lambda q: J)
    target = rng.normal(size=7)
    posture = PostureTask(target, weight=0.05, gain=2.0, continuous=np.zeros(7, bool))
    ik = IKQP([pose, posture, DampingTask(1e-3)], [VelocityLimit(WIDE)], DT)
    v = rng.normal(size=6)
    pose.set_target_twist(v)
    q = np.zeros(7)
    W = np.diag([1.0] * 3 + [0.5] * 3)
    H = J.T @ W @ J + (0.05 + 1e-3) * np.eye(7)
    expected = np.linalg.solve(H, J.T @ W @ v + 0.05 * 2.0 * (target - q))
    np.testing.assert_allclose(ik.solve(q).qd, expected, atol=1e-4)


def test_repeated_updates_match_a_fresh_solver() -> None:
    """The set-up-once/update path (Px ordering, Ax, warm start) gives the same answer as a
    new OSQP instance at every step of a moving configuration."""
    rng = np.random.default_rng(3)
    pose = PoseTask()
    tasks = [pose, DampingTask(1e-3), PostureTask(gen3.HOME_Q)]
    limits = [VelocityLimit(), JointPositionLimit()]
    ik = IKQP(tasks, limits, DT)
    q = gen3.HOME_Q.copy()
    for _ in range(5):
        pose.set_target_twist(rng.normal(scale=0.3, size=6))
        q = q + rng.normal(scale=0.05, size=7)
        warm = ik.solve(q)
        cold = IKQP(tasks, limits, DT).solve(q)
        assert warm.solved and cold.solved
        np.testing.assert_allclose(warm.qd, cold.qd, atol=1e-4)


def test_build_matrices_shapes_and_values() -> None:
    q = gen3.HOME_Q + 0.1
    v = np.array([0.1, -0.05, 0.02, 0.0, 0.3, -0.1])
    pose, lam = PoseTask(position_weight=2.0, orientation_weight=0.5), 1e-2
    vel, pos = VelocityLimit(), JointPositionLimit(gain=0.5)
    ik = IKQP([pose, DampingTask(lam)], [vel, pos], DT)
    pose.set_target_twist(v)
    qp = ik.build(q)
    J, W = gen3.tool_jacobian(q), np.diag([2.0] * 3 + [0.5] * 3)
    limited = np.flatnonzero(~gen3.CONTINUOUS)
    assert qp.P.shape == (7, 7) and qp.c.shape == (7,)
    assert qp.A.shape == (7 + limited.size, 7) == (10, 7)  # J2, J4, J6 are limited
    np.testing.assert_allclose(qp.P, J.T @ W @ J + lam * np.eye(7), atol=1e-12)
    np.testing.assert_allclose(qp.P, qp.P.T)
    np.testing.assert_allclose(qp.c, -J.T @ W @ v, atol=1e-12)
    np.testing.assert_array_equal(qp.A[:7], np.eye(7))
    np.testing.assert_array_equal(qp.A[7:], np.eye(7)[limited])
    np.testing.assert_allclose(qp.l[:7], -gen3.VELOCITY_LIMITS)
    np.testing.assert_allclose(qp.u[:7], gen3.VELOCITY_LIMITS)
    np.testing.assert_allclose(qp.u[7:], (gen3.JOINT_UPPER[limited] - q[limited]) * 0.5 / DT)
    np.testing.assert_allclose(qp.l[7:], (gen3.JOINT_LOWER[limited] - q[limited]) * 0.5 / DT)
    assert np.all(np.isfinite(qp.l)) and np.all(np.isfinite(qp.u))


def test_velocity_limit_alone_is_respected_and_active() -> None:
    pose = PoseTask()
    limits = np.full(7, 0.2)
    ik = IKQP([pose, DampingTask(1e-4)], [VelocityLimit(limits)], DT)
    pose.set_target_twist(np.array([1.0, 0.5, -0.5, 0.0, 0.0, 2.0]))  # far too fast
    res = ik.solve(gen3.HOME_Q)
    assert res.solved
    assert np.all(np.abs(res.qd) <= limits + 1e-6)
    assert np.isclose(np.abs(res.qd).max(), 0.2, atol=1e-5)  # the box is what stopped it


def test_acceleration_limit_alone_bounds_the_change_per_tick() -> None:
    pose = PoseTask()
    accel = AccelerationLimit(np.full(7, 8.0))
    ik = IKQP([pose, DampingTask(1e-4)], [accel], DT)
    pose.set_target_twist(np.array([0.5, 0.0, -0.3, 0.0, 0.0, 1.0]))
    free = IKQP([PoseTask(), DampingTask(1e-4)], [], DT)
    free.find_task(PoseTask).set_target_twist(pose.target_twist)
    unconstrained = free.solve(gen3.HOME_Q).qd
    assert np.abs(unconstrained).max() > 8.0 * DT * 10  # the task asks for far more
    previous = np.zeros(7)
    for _ in range(5):  # from rest, each tick may change qd by at most a_max * dt
        res = ik.solve(gen3.HOME_Q)
        assert res.solved
        assert np.all(np.abs(res.qd - previous) <= 8.0 * DT + 1e-6)
        assert np.abs(res.qd - previous).max() == pytest.approx(8.0 * DT, abs=1e-5)
        ik.note_command(res.qd)
        previous = res.qd
    with pytest.raises(ValueError):
        AccelerationLimit(np.zeros(7))


def test_acceleration_bound_yields_to_the_joint_position_limit() -> None:
    """Moving fast toward J4's limit, just short of it: keeping the acceleration bound would
    cross the limit (infeasible), so the bound is relaxed and the position limit holds."""
    pose = PoseTask()
    accel = AccelerationLimit(np.full(7, 8.0))
    position = JointPositionLimit()
    ik = IKQP([pose, DampingTask(1e-4)], [VelocityLimit(), accel, position], DT)
    q = gen3.HOME_Q.copy()
    q[3] = gen3.JOINT_UPPER[3] - 0.002
    previous = np.zeros(7)
    previous[3] = 1.2  # rad/s toward the upper limit
    ik.note_command(previous)
    res = ik.solve(q)
    assert res.solved and "acceleration bound relaxed" in res.status
    assert q[3] + res.qd[3] * DT <= gen3.JOINT_UPPER[3] + 1e-9
    accel.note_command(res.qd)
    assert not accel.relaxed  # only for that one retry


def test_joint_position_limit_alone_stops_at_the_limit() -> None:
    """A posture task pulls joint 4 well past its upper limit; integrating the QP's output
    approaches the limit but never crosses it, and the continuous joints get no row."""
    upper = gen3.JOINT_UPPER[3]
    target = gen3.HOME_Q.copy()
    target[3] = upper + 1.0
    limit = JointPositionLimit(gain=0.5)
    assert limit.n_constraints == 3
    ik = IKQP([PostureTask(target, weight=1.0, gain=5.0)], [limit], DT)
    q = gen3.HOME_Q.copy()
    q[3] = upper - 0.3
    highest = -np.inf
    for _ in range(400):
        res = ik.solve(q)
        assert res.solved
        q = q + res.qd * DT
        highest = max(highest, q[3])
    assert highest <= upper + 1e-6
    assert q[3] > upper - 1e-3  # it was pushed all the way up to the limit
    # Without the limit the same task goes straight through it.
    free = IKQP([PostureTask(target, weight=1.0, gain=5.0)], [], DT)
    q_free = gen3.HOME_Q.copy()
    q_free[3] = upper - 0.3
    for _ in range(100):
        q_free = q_free + free.solve(q_free).qd * DT
    assert q_free[3] > upper + 0.1


def test_infeasible_problem_falls_back_to_zero_velocity() -> None:
    # Joint 4 is 0.5 rad past its limit: the damper demands qd4 <= -50 rad/s, the box >= -0.1.
    q = gen3.HOME_Q.copy()
    q[3] = gen3.JOINT_UPPER[3] + 0.5
    pose = PoseTask()
    ik = IKQP([pose, DampingTask()], [VelocityLimit(np.full(7, 0.1)), JointPositionLimit()], DT)
    pose.set_target_twist(np.array([0.05, 0, 0, 0, 0, 0]))
    res = ik.solve(q)
    assert not res.solved
    assert "infeasible" in res.status
    np.testing.assert_array_equal(res.qd, np.zeros(7))
    assert ik.solve(gen3.HOME_Q).solved  # and it recovers once the problem is feasible


def test_iteration_limit_falls_back_to_zero_velocity() -> None:
    pose = PoseTask()
    ik = IKQP([pose, DampingTask()], [VelocityLimit()], DT, osqp_settings={"max_iter": 1})
    pose.set_target_twist(np.array([0.1, 0.1, 0.0, 0.0, 0.0, 0.5]))
    res = ik.solve(gen3.HOME_Q)
    assert not res.solved and "maximum iterations" in res.status
    np.testing.assert_array_equal(res.qd, np.zeros(7))


def test_posture_error_wraps_continuous_joints_only() -> None:
    task = PostureTask(np.zeros(7))
    q = np.zeros(7)
    q[0] = 2 * np.pi - 0.1  # continuous: the short way is +0.1
    q[1] = 2.0  # limited: no wrapping
    e = task.compute_error(q)
    assert e[0] == pytest.approx(0.1) and e[1] == pytest.approx(-2.0)


@pytest.mark.parametrize("seed", range(3))
def test_pose_task_jacobian_matches_finite_differences(seed: int) -> None:
    """The QP's velocity convention: rows 0-2 = d(tool position)/dq, rows 3-5 = the rotation
    vector rate in the base frame (what rotation_error and the tracking twist use)."""
    q = gen3.HOME_Q + np.random.default_rng(seed).normal(scale=0.5, size=7)
    J = PoseTask().compute_jacobian(q)
    h = 1e-6
    fd = np.empty((6, 7))
    for i in range(7):
        dq = np.zeros(7)
        dq[i] = h
        Tp, Tm = gen3.tool_pose(q + dq), gen3.tool_pose(q - dq)
        fd[:3, i] = (Tp[:3, 3] - Tm[:3, 3]) / (2 * h)
        fd[3:, i] = rotation_error(Tp[:3, :3], Tm[:3, :3]) / (2 * h)
    np.testing.assert_allclose(J, fd, atol=1e-6)


def test_tracking_twist_gains_and_clamps() -> None:
    T = gen3.tool_pose(gen3.HOME_Q)
    quat = matrix_to_quat(T[:3, :3])
    small = pose_tracking_twist(T, T[:3, 3] + [0.01, 0, 0], quat, 4.0, 2.0, 1.0, 1.0)
    np.testing.assert_allclose(small, [0.04, 0, 0, 0, 0, 0], atol=1e-12)
    big = pose_tracking_twist(T, T[:3, 3] + [0.3, 0.4, 0], quat, 4.0, 2.0, 0.25, 1.0)
    np.testing.assert_allclose(big[:3], [0.15, 0.2, 0.0], atol=1e-12)  # clamped, same direction
    yaw = np.array([np.cos(0.05), 0, 0, np.sin(0.05)])  # +0.1 rad about base z
    q_target = quat_multiply(yaw, quat)
    w = pose_tracking_twist(T, T[:3, 3], q_target, 4.0, 2.0, 1.0, 10.0)[3:]
    np.testing.assert_allclose(w, [0, 0, 0.2], atol=1e-9)
    w_clamped = pose_tracking_twist(T, T[:3, 3], q_target, 4.0, 2.0, 1.0, 0.05)[3:]
    np.testing.assert_allclose(w_clamped, [0, 0, 0.05], atol=1e-9)


def test_closed_loop_reaches_a_pose_target_kinematically() -> None:
    """Twist -> QP -> integrate (perfect kinematic robot): 5 cm sideways and 0.2 rad yaw."""
    pose = PoseTask()
    ik = IKQP(
        [pose, DampingTask(1e-3), PostureTask(gen3.HOME_Q)],
        [VelocityLimit(), JointPositionLimit()],
        DT,
    )
    q = gen3.HOME_Q.copy()
    T0 = gen3.tool_pose(q)
    p_target = T0[:3, 3] + [0.0, 0.05, 0.0]
    yaw = np.array([np.cos(0.1), 0, 0, np.sin(0.1)])
    quat_target = quat_multiply(yaw, matrix_to_quat(T0[:3, :3]))
    for _ in range(600):
        T = gen3.tool_pose(q)
        pose.set_target_twist(pose_tracking_twist(T, p_target, quat_target, 5, 3, 0.25, 1.0))
        res = ik.solve(q)
        assert res.solved
        q = q + res.qd * DT
    T = gen3.tool_pose(q)
    assert np.linalg.norm(T[:3, 3] - p_target) < 1e-3
    assert np.linalg.norm(rotation_error(T[:3, :3], T0[:3, :3]) - [0, 0, 0.2]) < 1e-2


def test_tracking_twist_adds_feed_forward_before_clamping() -> None:
    T = gen3.tool_pose(gen3.HOME_Q)
    quat = matrix_to_quat(T[:3, :3])
    ff = np.array([0.05, 0.0, 0.0, 0.0, 0.1, 0.0])
    twist = pose_tracking_twist(T, T[:3, 3] + [0, 0.01, 0], quat, 4.0, 2.0, 1.0, 1.0, ff)
    np.testing.assert_allclose(twist, [0.05, 0.04, 0, 0, 0.1, 0], atol=1e-12)
    fast = pose_tracking_twist(T, T[:3, 3], quat, 4.0, 2.0, 0.1, 1.0, np.r_[1.0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(fast[:3], [0.1, 0, 0], atol=1e-12)
