"""Kinova Gen3 7-DoF forward kinematics and Jacobian (numpy, float64).

The data is Kinova's published URDF (kortex_description, gen3 7-dof), DESIGN.md section 7.
Every joint rotates about its own local z axis. All poses are in the robot base frame (the
frame of ``base_link``: z up, x forward), lengths in metres, angles in radians.

Frame chain: ``T_link_i = T_link_{i-1} @ T_origin_i @ Rz(q_i)`` for i = 1..7, then
``T_flange = T_link_7 @ T_origin_flange`` and ``T_tool = T_flange @ Trans(0, 0, TOOL_OFFSET_M)``
(the Robotiq 2F-85 tool centre point, between the fingertips).

The MuJoCo scene (``gr2_wbc.robots.sim.scene``) is generated from the tables below, so the
simulated arm and this module cannot drift apart; a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr2_wbc.kinematics.rotations import pose_matrix, rpy_to_matrix

_PI = np.pi


@dataclass(frozen=True)
class JointSpec:
    """One revolute joint of the URDF.

    Attributes:
        name: joint name (``joint_1`` .. ``joint_7``).
        xyz: origin of the joint in the parent link frame [m], shape (3,).
        rpy: URDF roll/pitch/yaw of the joint frame relative to the parent [rad].
        limit: symmetric position limit [rad] (``q`` in ``[-limit, +limit]``), or ``None``
            for a continuous joint.
        velocity_limit: maximum speed [rad/s] (URDF value).
    """

    name: str
    xyz: tuple[float, float, float]
    rpy: tuple[float, float, float]
    limit: float | None
    velocity_limit: float


JOINTS: tuple[JointSpec, ...] = (
    JointSpec("joint_1", (0.0, 0.0, 0.15643), (_PI, 0.0, 0.0), None, 1.3963),
    JointSpec("joint_2", (0.0, 0.005375, -0.12838), (_PI / 2, 0.0, 0.0), 2.24, 1.3963),
    JointSpec("joint_3", (0.0, -0.21038, -0.006375), (-_PI / 2, 0.0, 0.0), None, 1.3963),
    JointSpec("joint_4", (0.0, 0.006375, -0.21038), (_PI / 2, 0.0, 0.0), 2.57, 1.3963),
    JointSpec("joint_5", (0.0, -0.20843, -0.006375), (-_PI / 2, 0.0, 0.0), None, 1.2218),
    JointSpec("joint_6", (0.0, 0.00017505, -0.10593), (_PI / 2, 0.0, 0.0), 2.09, 1.2218),
    JointSpec("joint_7", (0.0, -0.10593, -0.00017505), (-_PI / 2, 0.0, 0.0), None, 1.2218),
)
"""The seven joints, base to wrist (DESIGN.md section 7)."""

FLANGE_XYZ: tuple[float, float, float] = (0.0, 0.0, -0.061525)
"""Origin of the flange (end_effector_link) in the link-7 frame [m]."""
FLANGE_RPY: tuple[float, float, float] = (_PI, 0.0, 0.0)
"""Orientation of the flange frame relative to the link-7 frame [rad]."""
TOOL_OFFSET_M: float = 0.120
"""Robotiq 2F-85 tool centre point: distance along the flange z axis [m]."""

N_JOINTS: int = len(JOINTS)
JOINT_LOWER: np.ndarray = np.array([-j.limit if j.limit is not None else -np.inf for j in JOINTS])
"""Lower position limits [rad], shape (7,); ``-inf`` for continuous joints."""
JOINT_UPPER: np.ndarray = np.array([j.limit if j.limit is not None else np.inf for j in JOINTS])
"""Upper position limits [rad], shape (7,); ``+inf`` for continuous joints."""
VELOCITY_LIMITS: np.ndarray = np.array([j.velocity_limit for j in JOINTS])
"""URDF joint speed limits [rad/s], shape (7,)."""
CONTINUOUS: np.ndarray = np.array([j.limit is None for j in JOINTS])
"""Mask of the continuous (unlimited) joints, shape (7,) bool."""

HOME_Q: np.ndarray = np.array([0.0, 0.56, 0.0, 1.52, 0.0, 1.06, 0.0])
"""Ready pose [rad], shape (7,): elbow up, the tool pointing straight down (within 2 mrad) at
about (0.498, -0.025, 0.201) m in the base frame, i.e. 0.5 m in front of the base and 0.2 m
above the base plane (the table top in the sim); the tool y axis (finger travel) is along the
base y axis. Continuous joints sit at 0, far from any wrap-around."""

for _a in (JOINT_LOWER, JOINT_UPPER, VELOCITY_LIMITS, CONTINUOUS, HOME_Q):
    _a.setflags(write=False)

_ORIGINS: tuple[np.ndarray, ...] = tuple(pose_matrix(rpy_to_matrix(j.rpy), j.xyz) for j in JOINTS)
_FLANGE: np.ndarray = pose_matrix(rpy_to_matrix(FLANGE_RPY), FLANGE_XYZ)
_TOOL_IN_FLANGE: np.ndarray = pose_matrix(np.eye(3), (0.0, 0.0, TOOL_OFFSET_M))


def _rz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    tf = np.eye(4)
    tf[0, 0], tf[0, 1], tf[1, 0], tf[1, 1] = c, -s, s, c
    return tf


def _check_q(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (N_JOINTS,):
        raise ValueError(f"q must have shape ({N_JOINTS},), got {q.shape}")
    return q


def joint_frames(q: np.ndarray) -> np.ndarray:
    """World (base-frame) transforms of the link frames 1..7 and the flange.

    Args:
        q: joint positions [rad], shape (7,).

    Returns:
        Shape (8, 4, 4). ``[i]`` for i < 7 is the frame of link i+1 (after the rotation of
        joint i+1): its z column is that joint's axis and its translation the joint's origin.
        ``[7]`` is the flange frame.
    """
    q = _check_q(q)
    frames = np.empty((N_JOINTS + 1, 4, 4))
    tf = np.eye(4)
    for i in range(N_JOINTS):
        tf = tf @ _ORIGINS[i] @ _rz(q[i])
        frames[i] = tf
    frames[N_JOINTS] = tf @ _FLANGE
    return frames


def flange_pose(q: np.ndarray) -> np.ndarray:
    """Flange (end_effector_link) pose in the base frame, shape (4, 4); ``q`` [rad] (7,)."""
    return joint_frames(q)[N_JOINTS]


def tool_pose(q: np.ndarray) -> np.ndarray:
    """Tool centre point pose in the base frame, shape (4, 4); ``q`` [rad] (7,).

    The tool frame is the flange frame moved ``TOOL_OFFSET_M`` along the flange z axis; its
    z axis points out of the gripper (the approach direction).
    """
    return flange_pose(q) @ _TOOL_IN_FLANGE


def tool_jacobian(q: np.ndarray) -> np.ndarray:
    """Geometric Jacobian of the tool point in the base frame.

    Args:
        q: joint positions [rad], shape (7,).

    Returns:
        Shape (6, 7). Rows 0-2 map joint speeds [rad/s] to the tool point's linear velocity
        [m/s]; rows 3-5 to the tool frame's angular velocity [rad/s], both in the base frame.
    """
    frames = joint_frames(q)
    p_tool = (frames[N_JOINTS] @ _TOOL_IN_FLANGE)[:3, 3]
    axes = frames[:N_JOINTS, :3, 2]  # (7, 3) joint axes
    origins = frames[:N_JOINTS, :3, 3]  # (7, 3) joint origins
    jac = np.empty((6, N_JOINTS))
    jac[:3] = np.cross(axes, p_tool - origins).T
    jac[3:] = axes.T
    return jac


def manipulability(q: np.ndarray) -> float:
    """Yoshikawa manipulability ``sqrt(det(J J^T))`` of the tool Jacobian (>= 0).

    Units are mixed ([m] for the linear rows); it is a relative measure that falls to 0 at
    singularities.
    """
    jac = tool_jacobian(q)
    return float(np.sqrt(max(np.linalg.det(jac @ jac.T), 0.0)))


def wrap_continuous(q: np.ndarray) -> np.ndarray:
    """Wrap the continuous joints of ``q`` [rad] (7,) into (-pi, pi]; limited joints as given."""
    q = np.array(_check_q(q))
    wrapped = -np.remainder(-q + _PI, 2.0 * _PI) + _PI  # maps onto (-pi, pi]
    q[CONTINUOUS] = wrapped[CONTINUOUS]
    return q
