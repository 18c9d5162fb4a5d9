"""Differential IK as a small QP over joint velocities, solved by OSQP (mink-style).

Each objective is a :class:`Task` returning ``(H, c)`` of ``1/2 qd^T H qd + c^T qd``; each
constraint is a :class:`Limit` returning rows ``l <= A qd <= u``. :meth:`IKQP.build` stacks them
into :class:`QPMatrices` (inspectable by tests); :meth:`IKQP.solve` hands them to one OSQP
instance that is set up once with a fixed sparsity pattern (dense upper triangle of ``P``,
dense ``A``) and afterwards only updated and warm-started, so every tick has the same cost.

Cost: ``||J qd - v_des||^2_W + lambda ||qd||^2 + w_post ||qd - k_post (q_post - q)||^2
- w_manip grad(m) . qd`` (halved: OSQP minimises ``1/2 x^T P x + q^T x``, the minimiser is the
same). Variables: joint velocities ``qd`` [rad/s], shape (7,).

Collision avoidance uses velocity dampers (Faverjon & Tournassoud; mink's
``CollisionAvoidanceLimit``): for a distance ``d`` with Jacobian ``J_d`` the rate of change
``J_d qd`` may not be below ``-gain (d - d_safe) / dt`` while ``d < d_influence``, so ``d``
shrinks at most geometrically and never below ``d_safe`` (to first order). The dampers
(:class:`TablePlaneDamper`, :class:`SelfCollisionDamper`, :class:`WorkspaceBoxLimit`) share
one :class:`~gr2_wbc.kinematics.collision.CapsuleModel`, which caches the forward kinematics
per ``q``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import osqp
import scipy.sparse as sp

from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import TABLE_CAPSULES, CapsuleModel, cross


class Task(Protocol):
    """An objective term: ``(H, c)`` with ``H`` (n, n) symmetric PSD and ``c`` (n,)."""

    def compute_qp_objective(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class Limit(Protocol):
    """A constraint block: ``n_constraints`` rows ``lower <= A qd <= upper``."""

    n_constraints: int

    def compute_qp_inequalities(
        self, q: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class PoseTask:
    """Track a desired tool twist: ``||J(q) qd - v_des||^2_W``.

    Args:
        position_weight: weight of the linear rows [1/(m/s)^2 -> cost units].
        orientation_weight: weight of the angular rows [1/(rad/s)^2 -> cost units].
        jacobian_fn: ``q (7,) -> J (6, 7)`` [linear; angular] in the base frame; defaults to
            ``gen3.tool_jacobian``.
    """

    def __init__(
        self,
        position_weight: float = 1.0,
        orientation_weight: float = 0.25,
        jacobian_fn: Callable[[np.ndarray], np.ndarray] = gen3.tool_jacobian,
    ) -> None:
        self.weights = np.array([position_weight] * 3 + [orientation_weight] * 3, dtype=float)
        self.jacobian_fn = jacobian_fn
        self.target_twist = np.zeros(6)

    def set_target_twist(self, twist: np.ndarray) -> None:
        """Desired tool twist ``[v (m/s); w (rad/s)]``, base frame, shape (6,)."""
        self.target_twist[:] = twist

    def compute_jacobian(self, q: np.ndarray) -> np.ndarray:
        """Tool Jacobian at ``q`` [rad] (7,), shape (6, 7)."""
        return self.jacobian_fn(q)

    def compute_qp_objective(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``H = J^T W J`` (7, 7), ``c = -J^T W v_des`` (7,)."""
        jac = self.compute_jacobian(q)
        jac_t_w = jac.T * self.weights
        return jac_t_w @ jac, -(jac_t_w @ self.target_twist)


class PostureTask:
    """Pull toward a posture with a small weight: ``w ||qd - gain (q_target - q)||^2``.

    Continuous joints use the wrapped difference (the short way round).

    Args:
        target_q: posture [rad], shape (7,) (e.g. ``gen3.HOME_Q``).
        weight: cost weight (keep it small: it only resolves the redundancy).
        gain: convergence rate toward the posture [1/s].
        continuous: mask of joints whose error is wrapped to (-pi, pi], shape (7,).
    """

    def __init__(
        self,
        target_q: np.ndarray,
        weight: float = 1e-3,
        gain: float = 1.0,
        continuous: np.ndarray = gen3.CONTINUOUS,
    ) -> None:
        self.target_q = np.array(target_q, dtype=float)
        self.weight = float(weight)
        self.gain = float(gain)
        self.continuous = np.asarray(continuous, dtype=bool)

    def compute_error(self, q: np.ndarray) -> np.ndarray:
        """``q_target - q`` [rad] (7,), continuous joints wrapped to (-pi, pi]."""
        e = self.target_q - q
        wrapped = np.remainder(e + np.pi, 2.0 * np.pi) - np.pi
        return np.where(self.continuous, wrapped, e)

    def compute_qp_objective(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``H = w I``, ``c = -w gain e``."""
        n = self.target_q.shape[0]
        return self.weight * np.eye(n), -self.weight * self.gain * self.compute_error(q)


class DampingTask:
    """Velocity damping ``lambda ||qd||^2`` (Levenberg-Marquardt regularisation).

    Args:
        weight: lambda [cost units / (rad/s)^2].
        n: number of joints.
    """

    def __init__(self, weight: float = 1e-3, n: int = gen3.N_JOINTS) -> None:
        self.weight = float(weight)
        self.n = n

    def compute_qp_objective(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``H = lambda I``, ``c = 0``."""
        return self.weight * np.eye(self.n), np.zeros(self.n)


class VelocityLimit:
    """Joint speed box ``-v_max <= qd <= v_max`` [rad/s]; ``limits`` shape (7,)."""

    def __init__(self, limits: np.ndarray = gen3.VELOCITY_LIMITS) -> None:
        self.limits = np.array(limits, dtype=float)
        self.n_constraints = self.limits.shape[0]
        self._A = np.eye(self.n_constraints)

    def compute_qp_inequalities(
        self, q: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A = I, l = -v_max, u = v_max)``."""
        return self._A, -self.limits, self.limits


class ManipulabilityTask:
    """Climb the Yoshikawa manipulability ``m(q) = sqrt(det(J J^T))``: cost ``-w grad(m) . qd``.

    The gradient is analytic (the geometric Jacobian's derivative, Haviland & Corke 2023):
    ``dm/dq_j = m tr((J J^T)^-1 dJ/dq_j J^T)``, about 30 us per tick (7 x 7 cross products and
    a 6 x 6 solve), against ~0.3 ms for finite differences (14 Jacobians). The term is linear,
    so the damping and posture tasks bound it: in the Jacobian's null space the resulting speed
    is about ``w |grad m| / (lambda + w_post)``.

    Args:
        weight: ``w`` [cost units / (rad/s) per unit of m/rad].
        model: shared kinematics cache (one is made when omitted).
    """

    def __init__(self, weight: float = 5e-4, model: CapsuleModel | None = None) -> None:
        n = gen3.N_JOINTS
        self.weight = float(weight)
        self.model = model if model is not None else CapsuleModel()
        self._hess = np.zeros((n, n))
        self._grad = np.zeros(n)
        self._zx_jv = np.zeros((n, n, 3))
        self._zx_z = np.zeros((n, n, 3))
        self._upper = np.triu(np.ones((n, n), dtype=bool))[:, :, None]  # j <= i
        self._strict = np.triu(np.ones((n, n)), 1)[:, :, None]  # j < i

    def compute_manipulability(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        """``(m, dm/dq)`` at ``q`` [rad] (7,); the gradient has shape (7,) [1/rad]."""
        jac = self.model.tool_jacobian(q)
        z = self.model.axes
        jv = jac[:3].T  # (7, 3): linear columns of J
        gram = jac @ jac.T
        m = float(np.sqrt(max(np.linalg.det(gram), 0.0)))
        if m < 1e-12:
            self._grad[:] = 0.0
            return m, self._grad
        # dJ_i/dq_j (linear): z_j x Jv_i for j <= i, z_i x Jv_j for j > i; angular: z_j x z_i
        # for j < i. Stored as [j, i, row].
        cross(z[:, None, :], jv[None, :, :], self._zx_jv)
        lin = np.where(self._upper, self._zx_jv, self._zx_jv.transpose(1, 0, 2))
        cross(z[:, None, :], z[None, :, :], self._zx_z)
        self._zx_z *= self._strict
        b = np.linalg.solve(gram, jac)  # (J J^T)^-1 J, (6, 7)
        np.einsum("jis,si->j", lin, b[:3], out=self._grad)
        self._grad += np.einsum("jis,si->j", self._zx_z, b[3:])
        self._grad *= m
        return m, self._grad

    def compute_qp_objective(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``H = 0``, ``c = -w grad(m)``."""
        _, grad = self.compute_manipulability(q)
        return self._hess, -self.weight * grad


class VelocityDamper:
    """Rows ``J_d qd >= -gain (d - d_safe) / dt`` for distances ``d < d_influence``.

    The base of the collision limits: subclasses supply ``(d, J_d)`` with
    :meth:`compute_distances`. Rows whose distance is beyond ``influence_distance`` are left
    unbounded (the sparsity pattern stays fixed). Where ``d < d_safe`` already (drift, or a
    start outside the safe set) the required separation speed is capped at
    ``recovery_speed`` so that the QP stays feasible while it recovers.

    These rows are safety constraints: :meth:`IKQP.solve` never relaxes them.

    Args:
        n_constraints: number of distances.
        min_distance: ``d_safe`` [m].
        influence_distance: ``d_influence`` [m] (> ``min_distance``).
        gain: fraction of the remaining margin that may be consumed per tick, in (0, 1];
            ``gain / dt`` is the convergence rate [1/s].
        recovery_speed: largest separation speed demanded inside ``d_safe`` [m/s] (>= 0).
    """

    def __init__(
        self,
        n_constraints: int,
        min_distance: float,
        influence_distance: float,
        gain: float,
        recovery_speed: float = 0.02,
    ) -> None:
        if not 0.0 < gain <= 1.0:
            raise ValueError("gain must be in (0, 1]")
        if influence_distance <= min_distance:
            raise ValueError("influence_distance must exceed min_distance")
        if recovery_speed < 0.0:
            raise ValueError("recovery_speed must be >= 0")
        self.n_constraints = n_constraints
        self.min_distance = float(min_distance)
        self.influence_distance = float(influence_distance)
        self.gain = float(gain)
        self.recovery_speed = float(recovery_speed)
        self._A = np.zeros((n_constraints, gen3.N_JOINTS))
        self._l = np.zeros(n_constraints)
        self._u = np.full(n_constraints, np.inf)

    def compute_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(d (n,) [m], J_d (n, 7) [m/rad])`` at ``q``; implemented by subclasses."""
        raise NotImplementedError

    def compute_qp_inequalities(
        self, q: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A = J_d, l = max(-gain (d - d_safe)/dt, ...) capped, u = +inf)``."""
        d, jac = self.compute_distances(q)
        self._A[:] = jac
        lo = self._l
        np.subtract(d, self.min_distance, out=lo)
        lo *= -self.gain / dt
        np.minimum(lo, self.recovery_speed, out=lo)
        lo[d >= self.influence_distance] = -np.inf
        return self._A, lo, self._u


class TablePlaneDamper(VelocityDamper):
    """Keeps every capsule's lowest point ``min_distance`` above the table plane.

    Two rows per capsule, one per endpoint (the lowest point is always an endpoint; see
    :meth:`CapsuleModel.table_distances`).

    Args:
        model: shared capsule model (one is made when omitted).
        capsules: names of the capsules to check (default ``TABLE_CAPSULES``).
        min_distance: clearance kept above the table [m].
        influence_distance: clearance below which a capsule is constrained [m].
        gain: see :class:`VelocityDamper`.
        recovery_speed: see :class:`VelocityDamper` [m/s].
    """

    def __init__(
        self,
        model: CapsuleModel | None = None,
        capsules: Sequence[str] = TABLE_CAPSULES,
        min_distance: float = 0.005,
        influence_distance: float = 0.10,
        gain: float = 0.05,
        recovery_speed: float = 0.02,
    ) -> None:
        self.model = model if model is not None else CapsuleModel()
        self.index = np.array([self.model.names.index(c) for c in capsules], dtype=int)
        n_rows = 2 * len(self.index)
        super().__init__(n_rows, min_distance, influence_distance, gain, recovery_speed)
        self._d = np.zeros(n_rows)
        self._jac = np.zeros((n_rows, gen3.N_JOINTS))

    def compute_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clearance of both endpoints of the selected capsules above the table [m] (rows
        ``2 i``, ``2 i + 1`` for capsule ``i``) and its Jacobian."""
        d, jac = self.model.table_distances(q)
        np.take(d, self.index, axis=0, out=self._d.reshape(-1, 2))
        np.take(jac, self.index, axis=0, out=self._jac.reshape(-1, 2, gen3.N_JOINTS))
        return self._d, self._jac


class SelfCollisionDamper(VelocityDamper):
    """Keeps the model's capsule pairs (``CapsuleModel.pairs``) ``min_distance`` apart.

    Args:
        model: shared capsule model (one is made when omitted); its ``pairs`` are checked.
        min_distance: clearance between capsule surfaces [m].
        influence_distance: clearance below which a pair is constrained [m].
        gain: see :class:`VelocityDamper`.
        recovery_speed: see :class:`VelocityDamper` [m/s].
    """

    def __init__(
        self,
        model: CapsuleModel | None = None,
        min_distance: float = 0.01,
        influence_distance: float = 0.08,
        gain: float = 0.05,
        recovery_speed: float = 0.02,
    ) -> None:
        self.model = model if model is not None else CapsuleModel()
        super().__init__(
            len(self.model.pairs), min_distance, influence_distance, gain, recovery_speed
        )

    def compute_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Surface distance of every pair [m] and its Jacobian."""
        return self.model.pair_distances(q)


class WorkspaceBoxLimit(VelocityDamper):
    """Keeps named points (the tool, optionally the wrist) inside an axis-aligned box.

    One damper row per face and point: ``d = p - lower`` and ``d = upper - p``.

    Args:
        lower: box corner (x, y, z) [m] in the base frame.
        upper: opposite corner [m].
        model: shared capsule model (one is made when omitted).
        points: names of :data:`~gr2_wbc.kinematics.collision.POINTS` to bound.
        min_distance: margin kept from each face [m].
        influence_distance: distance from a face below which it is constrained [m].
        gain: see :class:`VelocityDamper`.
        recovery_speed: see :class:`VelocityDamper` [m/s].
    """

    def __init__(
        self,
        lower: Sequence[float],
        upper: Sequence[float],
        model: CapsuleModel | None = None,
        points: Sequence[str] = ("tool",),
        min_distance: float = 0.0,
        influence_distance: float = 0.10,
        gain: float = 0.05,
        recovery_speed: float = 0.02,
    ) -> None:
        self.lower = np.array(lower, dtype=float)
        self.upper = np.array(upper, dtype=float)
        if self.lower.shape != (3,) or np.any(self.upper <= self.lower):
            raise ValueError("need lower < upper, shape (3,)")
        self.model = model if model is not None else CapsuleModel()
        self.points = tuple(points)
        for name in self.points:
            if name not in self.model.points:
                raise ValueError(f"unknown point {name!r}")
        super().__init__(
            6 * len(self.points), min_distance, influence_distance, gain, recovery_speed
        )
        self._d = np.zeros(self.n_constraints)
        self._jac = np.zeros((self.n_constraints, gen3.N_JOINTS))

    def compute_distances(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each point to each face (inside positive) [m] and its Jacobian; rows
        per point: x_min, y_min, z_min, x_max, y_max, z_max."""
        for k, name in enumerate(self.points):
            p, jac = self.model.point(q, name)
            r = 6 * k
            np.subtract(p, self.lower, out=self._d[r : r + 3])
            np.subtract(self.upper, p, out=self._d[r + 3 : r + 6])
            self._jac[r : r + 3] = jac
            np.negative(jac, out=self._jac[r + 3 : r + 6])
        return self._d, self._jac


# OSQP treats bounds beyond its OSQP_INFTY (1e30) as infinite.
_RELAXED_BOUND = 1e30


class AccelerationLimit:
    """Bounds the change of the command per tick: ``|qd - qd_prev| <= a_max dt``.

    ``qd_prev`` is the last velocity actually commanded, reported through
    :meth:`IKQP.note_command` (the loop does this every tick, also when it holds or falls
    back). Without it a jump in the commanded velocity makes the joint servos overshoot the
    velocity limit (11 % measured in the sim).

    Args:
        limits: acceleration limits [rad/s^2], shape (7,).
    """

    def __init__(self, limits: np.ndarray) -> None:
        self.limits = np.array(limits, dtype=float)
        if np.any(self.limits <= 0.0):
            raise ValueError("acceleration limits must be positive")
        self.n_constraints = self.limits.shape[0]
        self.previous = np.zeros(self.n_constraints)
        self.relaxed = False  # set by IKQP.solve for one retry when the QP is infeasible
        self._A = np.eye(self.n_constraints)
        self._wide = np.full(self.n_constraints, _RELAXED_BOUND)

    def note_command(self, qd: np.ndarray) -> None:
        """Record the velocity commanded this tick [rad/s], shape (7,)."""
        self.previous[:] = qd

    def compute_qp_inequalities(
        self, q: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A = I, l = qd_prev - a_max dt, u = qd_prev + a_max dt)``; unbounded while
        ``relaxed``."""
        if self.relaxed:
            return self._A, -self._wide, self._wide
        step = self.limits * dt
        return self._A, self.previous - step, self.previous + step


class JointPositionLimit:
    """Damped joint position limits: ``(q_min - q) g / dt <= qd <= (q_max - q) g / dt``.

    Joints with both bounds infinite (continuous) get no row; a single infinite side is left
    unbounded. ``gain`` in (0, 1] is the fraction of the remaining distance allowed per tick.

    Args:
        lower: lower limits [rad], shape (7,).
        upper: upper limits [rad], shape (7,).
        gain: damping gain (dimensionless).
    """

    def __init__(
        self,
        lower: np.ndarray = gen3.JOINT_LOWER,
        upper: np.ndarray = gen3.JOINT_UPPER,
        gain: float = 0.5,
    ) -> None:
        if not 0.0 < gain <= 1.0:
            raise ValueError("gain must be in (0, 1]")
        lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
        self.index = np.flatnonzero(np.isfinite(lower) | np.isfinite(upper))
        self.lower, self.upper, self.gain = lower[self.index], upper[self.index], gain
        self.n_constraints = int(self.index.size)
        self._A = np.zeros((self.n_constraints, lower.shape[0]))
        self._A[np.arange(self.n_constraints), self.index] = 1.0

    def compute_qp_inequalities(
        self, q: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Selection rows of the limited joints and their damped velocity bounds [rad/s]."""
        qi = q[self.index]
        k = self.gain / dt
        return self._A, (self.lower - qi) * k, (self.upper - qi) * k


@dataclass(frozen=True)
class QPMatrices:
    """One tick's QP ``min 1/2 x^T P x + c^T x  s.t.  l <= A x <= u`` (dense, for inspection).

    Attributes:
        P: (n, n) symmetric cost Hessian.
        c: (n,) cost gradient.
        A: (m, n) constraint matrix.
        l: (m,) lower bounds (may hold -inf).
        u: (m,) upper bounds (may hold +inf).
    """

    P: np.ndarray
    c: np.ndarray
    A: np.ndarray
    l: np.ndarray  # noqa: E741 - OSQP's name
    u: np.ndarray


@dataclass(frozen=True)
class IKResult:
    """Solver output: ``qd`` [rad/s] (7,) (zeros unless ``solved``), OSQP ``status`` text,
    ``solve_time_s`` (update + solve, wall [s]) and ADMM ``iterations``."""

    qd: np.ndarray
    status: str
    solved: bool
    solve_time_s: float
    iterations: int = 0


# Tight tolerances: the damping direction is weakly penalised (lambda ~ 1e-3), so the error in
# qd is about eps / lambda; 1e-7 keeps it near 1e-5 rad/s. Warm-started ticks take ~10-30
# iterations (tens of microseconds for 7 variables).
DEFAULT_OSQP_SETTINGS: dict[str, Any] = {
    "verbose": False,
    "eps_abs": 1e-7,
    "eps_rel": 1e-7,
    "adaptive_rho_interval": 25,
    "polishing": False,  # OSQP 1.x prints a line per solve when polishing is on
    "max_iter": 4000,
    "check_termination": 10,
    "warm_starting": True,
}


_ACCEPTED = (osqp.SolverStatus.OSQP_SOLVED, osqp.SolverStatus.OSQP_SOLVED_INACCURATE)


class IKQP:
    """Differential IK over joint velocities with tasks and limits (set up once, then updated).

    Args:
        tasks: objective terms (at least one).
        limits: constraint blocks (may be empty).
        dt: control period [s] (used by position-type limits).
        n: number of joints.
        osqp_settings: overrides of :data:`DEFAULT_OSQP_SETTINGS`.
        feasibility_tol: a returned ``qd`` violating a bound by more than this [rad/s] is
            treated as a failure (OSQP tolerances are relative; never send unchecked output).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        limits: Sequence[Limit],
        dt: float,
        n: int = gen3.N_JOINTS,
        osqp_settings: dict[str, Any] | None = None,
        feasibility_tol: float = 1e-4,
    ) -> None:
        if not tasks:
            raise ValueError("IKQP needs at least one task")
        if dt <= 0.0:
            raise ValueError("dt must be > 0")
        self.tasks = list(tasks)
        self.limits = list(limits)
        self.dt = float(dt)
        self.n = n
        self.m = sum(lim.n_constraints for lim in self.limits)
        self.feasibility_tol = feasibility_tol
        self._settings = {**DEFAULT_OSQP_SETTINGS, **(osqp_settings or {})}
        self._triu = np.triu_indices(n)
        # CSC order of a dense upper triangle: column by column, rows 0..j.
        order = np.lexsort((self._triu[0], self._triu[1]))
        self._p_rows, self._p_cols = self._triu[0][order], self._triu[1][order]
        self._p_flat = self._p_rows * n + self._p_cols
        self._solver: osqp.OSQP | None = None
        self._zero = np.zeros(n)
        self._zero_y = np.zeros(self.m)
        # Per-tick buffers (A in Fortran order so its CSC data is a view, no copy).
        self._P = np.zeros((n, n))
        self._c = np.zeros(n)
        self._A = np.zeros((self.m, n), order="F")
        self._l = np.zeros(self.m)
        self._u = np.zeros(self.m)
        self._px = np.zeros(self._p_flat.size)
        self._ax = np.zeros(self.m)

    def find_task(self, kind: type) -> Any:
        """The first task that is an instance of ``kind`` (e.g. ``PoseTask``)."""
        for task in self.tasks:
            if isinstance(task, kind):
                return task
        raise LookupError(f"no {kind.__name__} in this IKQP")

    def note_command(self, qd: np.ndarray) -> None:
        """Tell stateful limits (e.g. :class:`AccelerationLimit`) the velocity commanded this
        tick [rad/s], shape (7,)."""
        for limit in self.limits:
            note = getattr(limit, "note_command", None)
            if note is not None:
                note(qd)

    def build(self, q: np.ndarray) -> QPMatrices:
        """Stack all tasks and limits at joint positions ``q`` [rad] (7,) (copies, for
        inspection; :meth:`solve` uses preallocated buffers)."""
        self._fill(q)
        return QPMatrices(
            P=self._P.copy(), c=self._c.copy(), A=np.array(self._A), l=self._l.copy(),
            u=self._u.copy(),
        )  # fmt: skip

    def _fill(self, q: np.ndarray) -> None:
        """Evaluate every task and limit at ``q`` into the preallocated buffers."""
        q = np.asarray(q, dtype=float)
        hess, grad = self._P, self._c
        hess.fill(0.0)
        grad.fill(0.0)
        for task in self.tasks:
            h_task, g_task = task.compute_qp_objective(q)
            hess += h_task
            grad += g_task
        a_mat, lo, hi = self._A, self._l, self._u
        row = 0
        for lim in self.limits:
            a_lim, l_lim, u_lim = lim.compute_qp_inequalities(q, self.dt)
            k = lim.n_constraints
            a_mat[row : row + k], lo[row : row + k], hi[row : row + k] = a_lim, l_lim, u_lim
            row += k

    def _p_data(self, hess: np.ndarray) -> np.ndarray:
        """Upper triangle of the (n, n) Hessian in the CSC order of the fixed pattern."""
        return np.take(hess, self._p_flat, out=self._px)

    def _setup(self, qp: QPMatrices) -> None:
        n, m = self.n, self.m
        p_csc = sp.csc_matrix(
            (self._p_data(qp.P), self._p_rows, np.r_[0, np.cumsum(np.arange(1, n + 1))]),
            shape=(n, n),
        )
        # Dense pattern (explicit zeros kept) so any limit may change its A rows later.
        a_csc = sp.csc_matrix(
            (qp.A.ravel(order="F"), np.tile(np.arange(m), n), m * np.arange(n + 1)),
            shape=(m, n),
        )
        self._solver = osqp.OSQP()
        self._solver.setup(p_csc, qp.c, a_csc, qp.l, qp.u, **self._settings)

    def solve(self, q: np.ndarray) -> IKResult:
        """Build at ``q`` [rad] (7,) and solve; a failed solve returns zero velocity.

        When the problem is infeasible and a limit can yield (``AccelerationLimit``: comfort,
        not safety), it is relaxed and the problem solved once more; the status then says so.
        """
        result = self._solve_once(q)
        yielding = [lim for lim in self.limits if isinstance(lim, AccelerationLimit)]
        if result.solved or not yielding:
            return result
        for lim in yielding:
            lim.relaxed = True
        try:
            retry = self._solve_once(q)
        finally:
            for lim in yielding:
                lim.relaxed = False
        status = f"{retry.status} (acceleration bound relaxed after {result.status})"
        return dataclasses.replace(
            retry, status=status, solve_time_s=result.solve_time_s + retry.solve_time_s
        )

    def _solve_once(self, q: np.ndarray) -> IKResult:
        self._fill(q)
        t0 = time.perf_counter()
        a_data = self._A.ravel(order="F")  # a view: _A is Fortran-ordered
        if self._solver is None:
            self._setup(QPMatrices(P=self._P, c=self._c, A=self._A, l=self._l, u=self._u))
        elif self.m:
            self._solver.update(
                Px=self._p_data(self._P), q=self._c, l=self._l, u=self._u, Ax=a_data
            )
        else:
            self._solver.update(Px=self._p_data(self._P), q=self._c)
        assert self._solver is not None
        res = self._solver.solve(raise_error=False)
        elapsed = time.perf_counter() - t0
        status = str(res.info.status)
        iters = int(res.info.iter)
        x = res.x
        # "solved inaccurate" (tolerances x 10) is accepted: the bounds are checked below.
        ok = res.info.status_val in _ACCEPTED and np.all(np.isfinite(x))
        if ok and self.m:
            np.matmul(self._A, x, out=self._ax)
            tol = self.feasibility_tol
            if np.any(self._ax < self._l - tol) or np.any(self._ax > self._u + tol):
                ok, status = False, f"{status} (bounds violated)"
        if not ok:
            # Do not warm-start the next tick from a failed iterate.
            self._solver.warm_start(x=self._zero, y=self._zero_y)
            return IKResult(np.zeros(self.n), status, False, elapsed, iters)
        return IKResult(np.array(x), status, True, elapsed, iters)
