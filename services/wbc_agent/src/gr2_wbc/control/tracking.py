"""Cartesian pose tracking: the desired tool twist that drives the IK QP's pose task."""

from __future__ import annotations

import numpy as np

from gr2_wbc.kinematics.rotations import quat_to_matrix, rotation_error


def _clamp_norm(v: np.ndarray, limit: float) -> None:
    """Scale ``v`` in place so that ``||v|| <= limit`` (direction kept)."""
    n = float(np.sqrt(v @ v))
    if n > limit:
        v *= limit / n


def pose_tracking_twist(
    T_current: np.ndarray,  # noqa: N803 - T is the usual name of a transform
    position_target: np.ndarray,
    quat_target: np.ndarray,
    kp_pos: float,
    kp_rot: float,
    v_max: float,
    w_max: float,
    twist_ff: np.ndarray | None = None,
) -> np.ndarray:
    """Pose feedback plus optional velocity feed-forward, with Cartesian speed clamps.

    ``v = v_ff + kp_pos (p_target - p)``, ``w = w_ff + kp_rot log(R_target R^T)``, then each
    is scaled down (direction kept) to its clamp. Without feed-forward a target moving at speed
    ``s`` is followed with a lag of ``s / kp_pos``.

    Args:
        T_current: current tool pose in the base frame, shape (4, 4).
        position_target: target tool position [m], base frame, shape (3,).
        quat_target: target tool orientation (w, x, y, z), shape (4,).
        kp_pos: position gain [1/s].
        kp_rot: orientation gain [1/s].
        v_max: clamp on the linear speed ``||v||`` [m/s].
        w_max: clamp on the angular speed ``||w||`` [rad/s].
        twist_ff: reference twist ``[v; w]`` [m/s, rad/s], base frame, shape (6,), e.g. the
            trajectory's own rate (:class:`TrajectorySample` ``velocity``/``angular_velocity``).

    Returns:
        Desired twist ``[v; w]``, shape (6,): linear velocity of the tool point [m/s] and
        angular velocity [rad/s], both in the base frame (the rows of ``gen3.tool_jacobian``).
        ``w`` is along ``log(R_target R^T)``, so it rotates the tool the short way.
    """
    twist = np.empty(6)
    v = twist[:3]
    w = twist[3:]
    np.subtract(position_target, T_current[:3, 3], out=v)
    v *= kp_pos
    w[:] = rotation_error(quat_to_matrix(quat_target), T_current[:3, :3])
    w *= kp_rot
    if twist_ff is not None:
        twist += twist_ff
    _clamp_norm(v, v_max)
    _clamp_norm(w, w_max)
    return twist
