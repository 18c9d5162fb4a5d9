"""Rotation helpers in plain numpy (float64).

Conventions used everywhere in gr2_wbc:

- Quaternions are scalar-first ``(w, x, y, z)``, shape ``(4,)``, unit norm, Hamilton product
  (the convention of MuJoCo and of the wire contract's ``quat_wxyz``).
- Rotation matrices are ``(3, 3)`` and map vectors from the rotated (child) frame into the
  reference (parent) frame: ``v_parent = R @ v_child``.
- ``rpy`` is URDF's fixed-axis roll/pitch/yaw: ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`` [rad].
- Rotation vectors (axis-angle) are ``(3,)`` with the angle [rad] as their norm.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def rot_x(angle: float) -> np.ndarray:
    """Rotation about x by ``angle`` [rad]; shape (3, 3)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(angle: float) -> np.ndarray:
    """Rotation about y by ``angle`` [rad]; shape (3, 3)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(angle: float) -> np.ndarray:
    """Rotation about z by ``angle`` [rad]; shape (3, 3)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rpy_to_matrix(rpy: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """URDF roll/pitch/yaw [rad], shape (3,), to a rotation matrix, shape (3, 3)."""
    roll, pitch, yaw = (float(a) for a in rpy)
    return rot_z(yaw) @ rot_y(pitch) @ rot_x(roll)


def quat_normalize(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), shape (4,); the sign is kept (``q`` and ``-q`` differ).

    Raises:
        ValueError: if ``q`` has (near) zero norm or is not finite.
    """
    q = np.asarray(q, dtype=np.float64)
    n = float(np.linalg.norm(q))
    if not np.isfinite(n) or n < _EPS:
        raise ValueError(f"cannot normalise quaternion {q!r}")
    return q / n


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """Conjugate (= inverse for unit quaternions) of (w, x, y, z); shape (4,)."""
    q = np.asarray(q, dtype=np.float64)
    return np.array([q[0], -q[1], -q[2], -q[3]])


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of (w, x, y, z) quaternions (rotation ``b`` then ``a``)."""
    aw, ax, ay, az = np.asarray(a, dtype=np.float64)
    bw, bx, by, bz = np.asarray(b, dtype=np.float64)
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), shape (4,), to a rotation matrix, shape (3, 3).

    The input is normalised first, so slightly denormalised quaternions are accepted.
    """
    w, x, y, z = quat_normalize(q)
    return np.array(
        [
            [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
            [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
            [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(R: np.ndarray) -> np.ndarray:  # noqa: N803 - R is the standard name
    """Rotation matrix, shape (3, 3), to a unit quaternion (w, x, y, z) with ``w >= 0``.

    Shepperd's method: picks the numerically largest of w, x, y, z to divide by.
    """
    m = np.asarray(R, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > max(m[0, 0], m[1, 1], m[2, 2]):
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] >= m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = quat_normalize(np.array(q))
    return -q if q[0] < 0.0 else q


def axis_angle_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle [rad]), shape (3,), to a matrix, shape (3, 3) (Rodrigues)."""
    v = np.asarray(rotvec, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < _EPS:
        return np.eye(3)
    k = v / angle
    k_cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k_cross + (1.0 - np.cos(angle)) * (k_cross @ k_cross)


def matrix_log(R: np.ndarray) -> np.ndarray:  # noqa: N803
    """Log map of a rotation matrix, shape (3, 3), to a rotation vector, shape (3,) [rad].

    The angle is in [0, pi]; accurate near 0 and near pi (uses the quaternion, not acos).
    """
    q = matrix_to_quat(R)  # w >= 0, so the angle 2*atan2(|v|, w) lies in [0, pi]
    v = q[1:]
    s = float(np.linalg.norm(v))
    if s < _EPS:
        return 2.0 * v  # first-order: angle ~ 2|v|
    angle = 2.0 * np.arctan2(s, q[0])
    return v * (angle / s)


def rotation_error(R_target: np.ndarray, R: np.ndarray) -> np.ndarray:  # noqa: N803
    """Orientation error as a rotation vector in the reference (base) frame, shape (3,) [rad].

    ``log(R_target @ R.T)``: the rotation that, applied on the left of ``R``, gives
    ``R_target``. For a small error ``e``, ``R_target ~ (I + [e]x) R``, so ``e`` is directly
    comparable with the angular rows of a geometric Jacobian (``omega * dt``).
    """
    return matrix_log(np.asarray(R_target) @ np.asarray(R).T)


def slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions (w, x, y, z); shape (4,).

    Takes the short way round (flips ``q1`` if ``q0 . q1 < 0``). ``s`` = 0 gives ``q0``,
    ``s`` = 1 gives ``q1`` (up to sign); values outside [0, 1] extrapolate.
    """
    a = quat_normalize(q0)
    b = quat_normalize(q1)
    dot = float(np.dot(a, b))
    if dot < 0.0:
        b, dot = -b, -dot
    if dot > 0.9995:  # nearly parallel: linear interpolation is accurate and stable
        return quat_normalize(a + s * (b - a))
    theta = np.arccos(min(dot, 1.0))
    sin_theta = np.sin(theta)
    out = (np.sin((1.0 - s) * theta) * a + np.sin(s * theta) * b) / sin_theta
    return quat_normalize(out)


def pose_matrix(R: np.ndarray, p: np.ndarray) -> np.ndarray:  # noqa: N803
    """Homogeneous transform, shape (4, 4), from rotation (3, 3) and translation (3,) [m]."""
    tf = np.eye(4)
    tf[:3, :3] = R
    tf[:3, 3] = p
    return tf
