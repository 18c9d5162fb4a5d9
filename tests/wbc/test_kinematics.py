"""Gen3 kinematics and rotation helpers, checked against scipy and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import (
    axis_angle_to_matrix,
    matrix_log,
    matrix_to_quat,
    quat_conjugate,
    quat_multiply,
    quat_normalize,
    quat_to_matrix,
    rotation_error,
    rpy_to_matrix,
    slerp,
)
from scipy.spatial.transform import Rotation, Slerp


def random_q(rng: np.random.Generator) -> np.ndarray:
    """A configuration inside the limits (continuous joints in [-pi, pi])."""
    lo = np.where(np.isfinite(gen3.JOINT_LOWER), gen3.JOINT_LOWER, -np.pi)
    hi = np.where(np.isfinite(gen3.JOINT_UPPER), gen3.JOINT_UPPER, np.pi)
    return rng.uniform(lo, hi)


# -- rotations --------------------------------------------------------------------------


def test_quat_matrix_round_trip_and_scipy() -> None:
    rng = np.random.default_rng(0)
    for r in Rotation.random(50, random_state=1):
        q = r.as_quat(scalar_first=True)
        np.testing.assert_allclose(quat_to_matrix(q), r.as_matrix(), atol=1e-12)
        q_back = matrix_to_quat(r.as_matrix())
        assert q_back[0] >= 0.0
        assert abs(abs(np.dot(q_back, q)) - 1.0) < 1e-12  # same rotation, sign canonical
        scaled = q * rng.uniform(0.5, 2.0)
        np.testing.assert_allclose(quat_to_matrix(scaled), r.as_matrix(), atol=1e-12)
    # the branches of Shepperd's method near 180 degree turns about each axis
    for axis in np.eye(3):
        R = axis_angle_to_matrix(axis * (np.pi - 1e-9))
        np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(R)), R, atol=1e-12)


def test_rpy_matches_urdf_fixed_axis_convention() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        rpy = rng.uniform(-np.pi, np.pi, 3)
        expected = Rotation.from_euler("xyz", rpy).as_matrix()  # extrinsic x, y, z
        np.testing.assert_allclose(rpy_to_matrix(rpy), expected, atol=1e-12)


def test_quat_multiply_conjugate_normalize() -> None:
    a, b = Rotation.random(2, random_state=3)
    qa, qb = a.as_quat(scalar_first=True), b.as_quat(scalar_first=True)
    np.testing.assert_allclose(
        quat_to_matrix(quat_multiply(qa, qb)), (a * b).as_matrix(), atol=1e-12
    )
    np.testing.assert_allclose(quat_multiply(qa, quat_conjugate(qa)), [1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(quat_normalize(3.0 * qa)), 1.0)
    np.testing.assert_allclose(quat_normalize(-qa), -qa, atol=1e-12)  # sign is kept
    with pytest.raises(ValueError):
        quat_normalize(np.zeros(4))
    with pytest.raises(ValueError):
        quat_normalize(np.array([np.nan, 0, 0, 1.0]))


def test_slerp_matches_scipy_and_takes_short_way() -> None:
    rots = Rotation.random(2, random_state=4)
    q0, q1 = rots.as_quat(scalar_first=True)
    ref = Slerp([0.0, 1.0], rots)
    for s in (0.0, 0.1, 0.5, 0.9, 1.0):
        np.testing.assert_allclose(quat_to_matrix(slerp(q0, q1, s)), ref(s).as_matrix(), atol=1e-9)
    # -q1 is the same rotation: the result must not go the long way round
    np.testing.assert_allclose(quat_to_matrix(slerp(q0, -q1, 0.3)), ref(0.3).as_matrix(), atol=1e-9)
    # nearly identical inputs use the linear branch and stay unit-norm
    q_near = quat_normalize(q0 + 1e-6)
    out = slerp(q0, q_near, 0.5)
    assert abs(np.linalg.norm(out) - 1.0) < 1e-12


def test_rotation_error_is_log_of_relative_rotation() -> None:
    rng = np.random.default_rng(5)
    targets, currents = Rotation.random(30, random_state=6), Rotation.random(30, random_state=7)
    for R_t, R in zip(targets, currents, strict=True):
        e = rotation_error(R_t.as_matrix(), R.as_matrix())
        np.testing.assert_allclose(e, (R_t * R.inv()).as_rotvec(), atol=1e-9)
        # applying the error on the left of R recovers the target
        np.testing.assert_allclose(
            axis_angle_to_matrix(e) @ R.as_matrix(), R_t.as_matrix(), atol=1e-9
        )
    assert np.all(rotation_error(np.eye(3), np.eye(3)) == 0.0)
    small = rng.normal(size=3) * 1e-9
    np.testing.assert_allclose(matrix_log(axis_angle_to_matrix(small)), small, atol=1e-15)
    near_pi = np.array([0.0, 0.0, np.pi - 1e-7])
    np.testing.assert_allclose(matrix_log(axis_angle_to_matrix(near_pi)), near_pi, atol=1e-8)


# -- Gen3 --------------------------------------------------------------------------------


def test_constants_follow_the_urdf_table() -> None:
    assert gen3.N_JOINTS == 7
    assert np.all(np.isinf(gen3.JOINT_LOWER[[0, 2, 4, 6]]))
    np.testing.assert_allclose(gen3.JOINT_UPPER[[1, 3, 5]], [2.24, 2.57, 2.09])
    np.testing.assert_allclose(gen3.JOINT_LOWER[[1, 3, 5]], [-2.24, -2.57, -2.09])
    np.testing.assert_allclose(gen3.VELOCITY_LIMITS, [1.3963] * 4 + [1.2218] * 3)
    assert np.isclose(gen3.TOOL_OFFSET_M, 0.120)
    assert np.all(gen3.HOME_Q >= gen3.JOINT_LOWER) and np.all(gen3.HOME_Q <= gen3.JOINT_UPPER)


def test_flange_at_zero_matches_design_reference() -> None:
    T = gen3.flange_pose(np.zeros(7))
    np.testing.assert_allclose(T[:3, 3], [0.0, -0.025, 1.187], atol=0.005)
    np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)
    # tool = flange moved 0.12 m along the flange z axis
    T_tool = gen3.tool_pose(np.zeros(7))
    np.testing.assert_allclose(T_tool[:3, 3], T[:3, 3] + 0.12 * T[:3, 2], atol=1e-12)


def test_joint_frames_shape_and_chain() -> None:
    q = random_q(np.random.default_rng(8))
    frames = gen3.joint_frames(q)
    assert frames.shape == (8, 4, 4)
    np.testing.assert_allclose(frames[7], gen3.flange_pose(q))
    np.testing.assert_allclose(frames[0][:3, 3], [0.0, 0.0, 0.15643], atol=1e-12)
    with pytest.raises(ValueError):
        gen3.joint_frames(np.zeros(6))


def test_home_pose_points_down_in_front_of_the_base() -> None:
    T = gen3.tool_pose(gen3.HOME_Q)
    x, y, z = T[:3, 3]
    assert 0.45 <= np.hypot(x, y) <= 0.6 and x > 0.4
    assert 0.15 <= z <= 0.25
    assert T[2, 2] < -0.999  # tool z axis (approach) points down


@pytest.mark.parametrize("seed", range(5))
def test_tool_jacobian_matches_finite_differences(seed: int) -> None:
    q = random_q(np.random.default_rng(100 + seed))
    J = gen3.tool_jacobian(q)
    assert J.shape == (6, 7)
    h = 1e-6
    J_fd = np.empty((6, 7))
    for i in range(7):
        dq = np.zeros(7)
        dq[i] = h
        T_plus, T_minus = gen3.tool_pose(q + dq), gen3.tool_pose(q - dq)
        J_fd[:3, i] = (T_plus[:3, 3] - T_minus[:3, 3]) / (2 * h)
        J_fd[3:, i] = rotation_error(T_plus[:3, :3], T_minus[:3, :3]) / (2 * h)
    np.testing.assert_allclose(J, J_fd, atol=1e-6)


def test_manipulability() -> None:
    assert gen3.manipulability(gen3.HOME_Q) > 0.01
    assert gen3.manipulability(np.zeros(7)) < 1e-9  # arm stretched straight up: singular


def test_wrap_continuous_only_touches_continuous_joints() -> None:
    q = np.array([3 * np.pi, 2.0, -3.5, -2.5, np.pi, 1.0, -np.pi])
    w = gen3.wrap_continuous(q)
    np.testing.assert_allclose(w[[1, 3, 5]], q[[1, 3, 5]])
    assert np.all(w[[0, 2, 4, 6]] > -np.pi) and np.all(w[[0, 2, 4, 6]] <= np.pi)
    np.testing.assert_allclose(gen3.flange_pose(w), gen3.flange_pose(q), atol=1e-12)
