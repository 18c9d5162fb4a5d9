"""Rotation helpers in torch: unit quaternions (w, x, y, z) <-> matrices <-> 6-D rotations.

The 6-D representation (Zhou et al. 2019) is the first two columns of the rotation matrix,
``[R[:, 0], R[:, 1]]``; Gram-Schmidt maps any 6-vector back to a rotation, which makes it a
continuous regression target. All functions work on arbitrary leading batch dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-8


def identity_rot6d(*batch: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """6-D rotation of the identity, shape (*batch, 6)."""
    out = torch.zeros(*batch, 6, dtype=dtype, device=device)
    out[..., 0] = 1.0
    out[..., 4] = 1.0
    return out


def quat_normalize(q: Tensor) -> Tensor:
    """Unit quaternion with w >= 0 (the canonical sign), shape (..., 4). Zero stays zero."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_to_matrix(q: Tensor) -> Tensor:
    """Quaternion (..., 4) wxyz (normalised here) -> rotation matrix (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quat(m: Tensor) -> Tensor:
    """Rotation matrix (..., 3, 3) -> unit quaternion (..., 4) wxyz with w >= 0.

    Numerically robust for every angle: of the four algebraically equivalent formulas it
    takes the one with the largest denominator (as pytorch3d does).
    """
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.reshape(*m.shape[:-2], 9).unbind(-1)
    q_abs = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22),
        dim=-1,
    )
    q_abs = q_abs.clamp_min(0).sqrt()
    candidates = torch.stack(
        (
            torch.stack((q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), dim=-1),
            torch.stack((m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20), dim=-1),
            torch.stack((m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21), dim=-1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2), dim=-1),
        ),
        dim=-2,
    )
    candidates = candidates / (2 * q_abs[..., None].clamp_min(0.1))
    best = q_abs.argmax(dim=-1)[..., None, None].expand(*q_abs.shape[:-1], 1, 4)
    return quat_normalize(candidates.gather(-2, best).squeeze(-2))


def matrix_to_rot6d(m: Tensor) -> Tensor:
    """Rotation matrix (..., 3, 3) -> 6-D rotation (..., 6): first column, then second."""
    return m[..., :, :2].transpose(-1, -2).reshape(*m.shape[:-2], 6)


def rot6d_to_matrix(r: Tensor) -> Tensor:
    """Any 6-vector (..., 6) -> rotation matrix (..., 3, 3) by Gram-Schmidt on its halves."""
    a1, a2 = r[..., :3], r[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    a2 = a2 - (b1 * a2).sum(dim=-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def quat_to_rot6d(q: Tensor) -> Tensor:
    """Quaternion (..., 4) wxyz -> 6-D rotation (..., 6)."""
    return matrix_to_rot6d(quat_to_matrix(q))


def rot6d_to_quat(r: Tensor) -> Tensor:
    """6-D rotation (..., 6) -> unit quaternion (..., 4) wxyz with w >= 0."""
    return matrix_to_quat(rot6d_to_matrix(r))
