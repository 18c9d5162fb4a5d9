"""Capsule collision model of the Gen3 + 2F-85 gripper: distances and their Jacobians.

Every capsule is a segment ``a -> b`` fixed in one frame of :func:`gen3.joint_frames` (link
frames 0..6, the flange 7, or the static base ``BASE_FRAME``) swept by a radius. The capsules
cover the MuJoCo scene's geoms (``gr2_wbc.robots.sim.scene``): each link capsule has the radius
of that link's motor housing (the sim's link capsules are 0.85 x thinner) and, where the link
runs along the joint axis, is extended by one radius to swallow the housing cylinder; links
that run across the joint axis get a separate housing capsule. The gripper is three capsules
(palm + coupling, fingers open, wrist camera) whose lowest point is 0.022 m beyond the tool
centre point along the approach axis (the sim's finger pads end 0.020 m beyond it).

:class:`CapsuleModel` evaluates, for one ``q``, and caches until ``q`` changes:

- :meth:`~CapsuleModel.table_distances`: per capsule endpoint, its height above the table
  plane minus the radius (the lowest point of a capsule is one of its endpoints), and the
  Jacobian of that distance, shapes (n, 2) and (n, 2, 7);
- :meth:`~CapsuleModel.pair_distances`: per listed capsule pair, segment-segment distance
  minus both radii, and its (n_pairs, 7) Jacobian;
- :meth:`~CapsuleModel.point`: position and (3, 7) Jacobian of a named point (``tool``,
  ``wrist``).

All Jacobians treat the closest points as material points of their links (the distance
gradient by the envelope theorem; exact wherever the closest points are unique). Buffers are
preallocated; a full evaluation takes a few tens of microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import rpy_to_matrix

BASE_FRAME: int = -1
"""Frame index of the static robot base (world)."""
FLANGE_FRAME: int = gen3.N_JOINTS
"""Frame index of the flange (index 7 of :func:`gen3.joint_frames`)."""


@dataclass(frozen=True)
class Capsule:
    """A segment ``a -> b`` in frame ``frame`` [m] swept by ``radius`` [m]."""

    name: str
    frame: int
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float


def _child(i: int) -> tuple[float, float, float]:
    """Origin of the next joint (or the flange) in the frame of link i+1 (0-based ``i``)."""
    return gen3.JOINTS[i + 1].xyz if i + 1 < gen3.N_JOINTS else gen3.FLANGE_XYZ


# Housing radii of links 1..7 in the sim (scene._LINK_RADIUS_M); a test checks they agree.
LINK_RADII_M: tuple[float, ...] = (0.055, 0.05, 0.05, 0.045, 0.04, 0.04, 0.04)

CAPSULES: tuple[Capsule, ...] = (
    # Base cylinder (r 0.06, z 0..0.156), static; not checked against the table it stands on.
    Capsule("base", BASE_FRAME, (0.0, 0.0, 0.0), (0.0, 0.0, 0.10), 0.06),
    Capsule("link_1", 0, (0.0, 0.0, LINK_RADII_M[0]), _child(0), LINK_RADII_M[0]),
    Capsule("housing_2", 1, (0.0, 0.0, -LINK_RADII_M[1]), (0.0, 0.0, LINK_RADII_M[1]), 0.05),
    Capsule("link_2", 1, (0.0, 0.0, 0.0), _child(1), LINK_RADII_M[1]),
    Capsule("link_3", 2, (0.0, 0.0, LINK_RADII_M[2]), _child(2), LINK_RADII_M[2]),
    Capsule("housing_4", 3, (0.0, 0.0, -LINK_RADII_M[3]), (0.0, 0.0, LINK_RADII_M[3]), 0.045),
    Capsule("link_4", 3, (0.0, 0.0, 0.0), _child(3), LINK_RADII_M[3]),
    Capsule("link_5", 4, (0.0, 0.0, LINK_RADII_M[4]), _child(4), LINK_RADII_M[4]),
    Capsule("housing_6", 5, (0.0, 0.0, -LINK_RADII_M[5]), (0.0, 0.0, LINK_RADII_M[5]), 0.04),
    Capsule("link_6", 5, (0.0, 0.0, 0.0), _child(5), LINK_RADII_M[5]),
    Capsule("link_7", 6, (0.0, 0.0, LINK_RADII_M[6]), _child(6), LINK_RADII_M[6]),
    # Gripper, flange frame (z = approach axis): coupling + palm box (half 0.03 x 0.045 x 0.035
    # at z 0.05); open fingers (y up to +-0.065, z 0.085..0.14); wrist camera box (x 0.03..0.09).
    Capsule("palm", FLANGE_FRAME, (0.0, 0.0, 0.0), (0.0, 0.0, 0.08), 0.06),
    Capsule("fingers", FLANGE_FRAME, (0.0, -0.05, 0.11), (0.0, 0.05, 0.11), 0.032),
    Capsule("camera", FLANGE_FRAME, (0.04, 0.0, 0.04), (0.07, 0.0, 0.04), 0.032),
)
"""The capsule model, base to gripper (radii [m] documented inline, all >= the sim geoms)."""

_PROXIMAL = ("base", "link_1", "housing_2", "link_2", "link_3")
_WRIST = ("housing_6", "link_6", "link_7", "palm", "fingers", "camera")
SELF_COLLISION_PAIRS: tuple[tuple[str, str], ...] = (
    tuple((w, p) for w in _WRIST for p in _PROXIMAL)
    + tuple((g, f) for g in ("palm", "fingers", "camera") for f in ("housing_4", "link_4"))
    + tuple((f, p) for f in ("link_4", "link_5") for p in ("base", "link_1"))
)
"""Non-adjacent pairs that can meet within the joint limits: wrist and gripper against the
base and upper arm, the gripper against the forearm, the forearm against the base (40)."""

POINTS: dict[str, tuple[int, tuple[float, float, float]]] = {
    "tool": (FLANGE_FRAME, (0.0, 0.0, gen3.TOOL_OFFSET_M)),
    "wrist": (FLANGE_FRAME, (0.0, 0.0, 0.0)),
}
"""Named points for workspace limits: frame and position in it [m]."""

TABLE_CAPSULES: tuple[str, ...] = tuple(
    c.name for c in CAPSULES if c.name not in ("base", "link_1", "housing_2")
)
"""Capsules checked against the table: all but the base and the two whose height J1 cannot
change (they stay >= 0.046 m above the table)."""


def cross(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a x b`` over the last axis (length 3) into ``out`` (broadcast shapes); several times
    faster than ``np.cross`` on the small arrays used here."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    np.subtract(a1 * b2, a2 * b1, out=out[..., 0])
    np.subtract(a2 * b0, a0 * b2, out=out[..., 1])
    np.subtract(a0 * b1, a1 * b0, out=out[..., 2])
    return out


_ORIGIN_R = np.array([rpy_to_matrix(j.rpy) for j in gen3.JOINTS])  # (7, 3, 3)
_ORIGIN_P = np.array([j.xyz for j in gen3.JOINTS])  # (7, 3)
_FLANGE_R = rpy_to_matrix(gen3.FLANGE_RPY)
_FLANGE_P = np.array(gen3.FLANGE_XYZ)


class CapsuleModel:
    """Forward kinematics + capsule distances for one ``q`` at a time (cached).

    Args:
        capsules: the capsules (default :data:`CAPSULES`).
        pairs: capsule name pairs for :meth:`pair_distances` (default
            :data:`SELF_COLLISION_PAIRS`).
        table_z: height of the table plane in the base frame [m].
        points: named points for :meth:`point` (default :data:`POINTS`).
    """

    def __init__(
        self,
        capsules: tuple[Capsule, ...] = CAPSULES,
        pairs: tuple[tuple[str, str], ...] = SELF_COLLISION_PAIRS,
        table_z: float = 0.0,
        points: dict[str, tuple[int, tuple[float, float, float]]] | None = None,
    ) -> None:
        n = gen3.N_JOINTS
        self.capsules = tuple(capsules)
        self.names = tuple(c.name for c in self.capsules)
        index = {name: i for i, name in enumerate(self.names)}
        self.pairs = tuple(pairs)
        self.table_z = float(table_z)
        self.points = dict(POINTS if points is None else points)
        # Frames: 0..6 links, 7 flange, 8 static base (identity).
        self.R = np.zeros((n + 2, 3, 3))
        self.p = np.zeros((n + 2, 3))
        self.R[n + 1] = np.eye(3)
        self._q = np.full(n, np.nan)
        self._valid: set[str] = set()
        # Capsule tables.
        frames = np.array([c.frame if c.frame >= 0 else n + 1 for c in self.capsules])
        self._cap_frame = frames
        self._local = np.array([[c.a, c.b] for c in self.capsules])  # (nc, 2, 3)
        self.radii = np.array([c.radius for c in self.capsules])
        n_moving = np.array([min(c.frame + 1, n) if c.frame >= 0 else 0 for c in self.capsules])
        self._cap_mask = (np.arange(n)[None, :] < n_moving[:, None]).astype(float)  # (nc, 7)
        self.moving = np.flatnonzero(n_moving > 0)
        """Indices of the capsules that move with the joints."""
        nc = len(self.capsules)
        self.ends = np.zeros((nc, 2, 3))
        """World endpoints of every capsule [m], shape (n_capsules, 2, 3)."""
        self._table_d = np.zeros((nc, 2))
        self._table_j = np.zeros((nc, 2, n))
        # Pairs.
        self._ia = np.array([index[a] for a, _ in self.pairs], dtype=int)
        self._ib = np.array([index[b] for _, b in self.pairs], dtype=int)
        self._pair_r = self.radii[self._ia] + self.radii[self._ib]
        self._mask_a = self._cap_mask[self._ia]
        self._mask_b = self._cap_mask[self._ib]
        npairs = len(self.pairs)
        self._pair_d = np.zeros(npairs)
        self._pair_j = np.zeros((npairs, n))
        self.closest = np.zeros((npairs, 2, 3))
        """Closest points of each pair (on the segments) [m], shape (n_pairs, 2, 3)."""
        self._point_p = {k: np.zeros(3) for k in self.points}
        self._point_j = {k: np.zeros((3, n)) for k in self.points}
        self._tmp33 = np.zeros((3, 3))
        self._lever = np.zeros((n, 3))
        self._tool_jac = np.zeros((6, n))
        self._nz = np.zeros((len(self.pairs), n, 3))
        self._rz = np.eye(3)

    # -- kinematics ------------------------------------------------------------------------

    def update(self, q: np.ndarray) -> None:
        """Forward kinematics at ``q`` [rad] (7,); a no-op when ``q`` did not change."""
        if np.array_equal(q, self._q):
            return
        self._q[:] = q
        self._valid.clear()
        rot, p, rz, tmp = self.R, self.p, self._rz, self._tmp33
        prev_r, prev_p = self.R[gen3.N_JOINTS + 1], self.p[gen3.N_JOINTS + 1]  # identity, 0
        for i in range(gen3.N_JOINTS):
            c, s = np.cos(q[i]), np.sin(q[i])
            rz[0, 0], rz[0, 1], rz[1, 0], rz[1, 1] = c, -s, s, c
            np.matmul(prev_r, _ORIGIN_R[i], out=tmp)
            np.matmul(tmp, rz, out=rot[i])
            np.matmul(prev_r, _ORIGIN_P[i], out=p[i])
            p[i] += prev_p
            prev_r, prev_p = rot[i], p[i]
        np.matmul(prev_r, _FLANGE_R, out=rot[gen3.N_JOINTS])
        np.matmul(prev_r, _FLANGE_P, out=p[gen3.N_JOINTS])
        p[gen3.N_JOINTS] += prev_p
        # Capsule endpoints in the world: R_f @ local + p_f.
        rf = rot[self._cap_frame]  # (nc, 3, 3)
        np.matmul(self._local, rf.transpose(0, 2, 1), out=self.ends)
        self.ends += p[self._cap_frame][:, None, :]

    @property
    def axes(self) -> np.ndarray:
        """Joint axes in the base frame, shape (7, 3) (a view)."""
        return self.R[: gen3.N_JOINTS, :, 2]

    @property
    def origins(self) -> np.ndarray:
        """Joint origins in the base frame [m], shape (7, 3) (a view)."""
        return self.p[: gen3.N_JOINTS]

    def _point_jacobian(self, point: np.ndarray, n_active: int, out: np.ndarray) -> None:
        """``out`` (3, 7) = linear Jacobian of a point [m] fixed to the frame moved by the
        first ``n_active`` joints."""
        np.subtract(point, self.origins, out=self._lever)
        cross(self.axes, self._lever, out.T)
        out[:, n_active:] = 0.0

    def tool_jacobian(self, q: np.ndarray) -> np.ndarray:
        """Geometric tool Jacobian (6, 7) [linear; angular] in the base frame, as
        :func:`gen3.tool_jacobian` (cached per ``q``; do not modify the returned array)."""
        self.update(q)
        if "tool_jacobian" not in self._valid:
            _, jv = self.point(q, "tool")
            self._tool_jac[:3] = jv
            self._tool_jac[3:] = self.axes.T
            self._valid.add("tool_jacobian")
        return self._tool_jac

    # -- queries ---------------------------------------------------------------------------

    def point(self, q: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Position [m] (3,) and linear Jacobian (3, 7) of the named point at ``q``."""
        self.update(q)
        p, jac = self._point_p[name], self._point_j[name]
        if name not in self._valid:
            frame, local = self.points[name]
            f = frame if frame >= 0 else gen3.N_JOINTS + 1
            np.matmul(self.R[f], local, out=p)
            p += self.p[f]
            self._point_jacobian(p, min(frame + 1, gen3.N_JOINTS) if frame >= 0 else 0, jac)
            self._valid.add(name)
        return p, jac

    def table_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per capsule endpoint: its height above the table minus the capsule radius [m],
        shape (n_capsules, 2), and the Jacobian (n_capsules, 2, 7) [m/rad] (the z row of the
        endpoint's point Jacobian).

        A capsule's lowest point is always one of its endpoints, so the clearance of capsule
        ``i`` is ``d[i].min()``. Both endpoints are returned (and both constrained by the
        table damper): bounding only the currently lower one switches rows whenever a
        capsule is level (e.g. the fingers with the tool pointing down), which makes the
        command chatter.
        """
        self.update(q)
        if "table" not in self._valid:
            pts = self.ends  # (nc, 2, 3)
            np.subtract(pts[:, :, 2], self.radii[:, None], out=self._table_d)
            self._table_d -= self.table_z
            z, o = self.axes, self.origins
            # (z_j x (p - o_j))_z = zx_j (py - oy_j) - zy_j (px - ox_j)
            jac = self._table_j
            np.multiply(pts[:, :, 1:2], z[None, None, :, 0], out=jac)
            jac -= pts[:, :, 0:1] * z[None, None, :, 1]
            jac -= z[:, 0] * o[:, 1] - z[:, 1] * o[:, 0]
            jac *= self._cap_mask[:, None, :]
            self._valid.add("table")
        return self._table_d, self._table_j

    def table_clearance(self, q: np.ndarray) -> np.ndarray:
        """Lowest point of every capsule above the table minus its radius [m], (n_capsules,)."""
        d, _ = self.table_distances(q)
        return d.min(axis=1)

    def pair_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pair: segment-segment distance minus both radii [m] (n_pairs,), and its
        Jacobian (n_pairs, 7) [m/rad]. Closest points are left in :attr:`closest`."""
        self.update(q)
        if "pairs" not in self._valid:
            self._segment_distances()
            self._valid.add("pairs")
        return self._pair_d, self._pair_j

    def _segment_distances(self) -> None:
        """Closest points of all pairs at once (Ericson, Real-Time Collision Detection 5.1.9)."""
        ea, eb = self.ends[self._ia], self.ends[self._ib]
        p1, p2 = ea[:, 0], eb[:, 0]
        d1, d2 = ea[:, 1] - p1, eb[:, 1] - p2
        r = p1 - p2
        a = np.einsum("ij,ij->i", d1, d1)
        e = np.einsum("ij,ij->i", d2, d2)
        f = np.einsum("ij,ij->i", d2, r)
        c = np.einsum("ij,ij->i", d1, r)
        b = np.einsum("ij,ij->i", d1, d2)
        denom = a * e - b * b
        parallel = denom <= 1e-12 * a * e
        s = np.clip((b * f - c * e) / np.where(parallel, 1.0, denom), 0.0, 1.0)
        s[parallel] = 0.0
        t = (b * s + f) / e
        below, above = t < 0.0, t > 1.0
        s = np.where(below, np.clip(-c / a, 0.0, 1.0), s)
        s = np.where(above, np.clip((b - c) / a, 0.0, 1.0), s)
        t = np.clip(t, 0.0, 1.0)
        c1 = self.closest[:, 0]
        c2 = self.closest[:, 1]
        np.multiply(d1, s[:, None], out=c1)
        c1 += p1
        np.multiply(d2, t[:, None], out=c2)
        c2 += p2
        diff = c1 - c2
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        np.subtract(dist, self._pair_r, out=self._pair_d)
        normal = diff / np.maximum(dist, 1e-12)[:, None]  # from b to a
        # n . (z_j x (c - o_j)) = (c - o_j) . (n x z_j)
        nz = cross(normal[:, None, :], self.axes[None, :, :], self._nz)  # (np, 7, 3)
        o_term = np.einsum("mjk,jk->mj", nz, self.origins)
        ja = np.einsum("mjk,mk->mj", nz, c1) - o_term
        jb = np.einsum("mjk,mk->mj", nz, c2) - o_term
        np.multiply(ja, self._mask_a, out=self._pair_j)
        self._pair_j -= jb * self._mask_b
