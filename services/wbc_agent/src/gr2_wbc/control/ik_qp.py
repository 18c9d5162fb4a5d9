"""Differential IK as a small QP over joint velocities, solved by OSQP (mink-style).

Each objective is a :class:`Task` returning ``(H, c)`` of ``1/2 qd^T H qd + c^T qd``; each
constraint is a :class:`Limit` returning rows ``l <= A qd <= u``. :meth:`IKQP.build` stacks them
into :class:`QPMatrices` (inspectable by tests); :meth:`IKQP.solve` hands them to one OSQP
instance that is set up once with a fixed sparsity pattern (dense upper triangle of ``P``,
dense ``A``) and afterwards only updated and warm-started, so every tick has the same cost.

Cost: ``||J qd - v_des||^2_W + lambda ||qd||^2 + w_post ||qd - k_post (q_post - q)||^2``
(halved: OSQP minimises ``1/2 x^T P x + q^T x``, the minimiser is the same).
Variables: joint velocities ``qd`` [rad/s], shape (7,).
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
        self._solver: osqp.OSQP | None = None
        self._zero = np.zeros(n)

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
        """Stack all tasks and limits at joint positions ``q`` [rad] (7,)."""
        q = np.asarray(q, dtype=float)
        hess = np.zeros((self.n, self.n))
        grad = np.zeros(self.n)
        for task in self.tasks:
            h_task, g_task = task.compute_qp_objective(q)
            hess += h_task
            grad += g_task
        a_mat = np.empty((self.m, self.n))
        lo = np.empty(self.m)
        hi = np.empty(self.m)
        row = 0
        for lim in self.limits:
            a_lim, l_lim, u_lim = lim.compute_qp_inequalities(q, self.dt)
            k = lim.n_constraints
            a_mat[row : row + k], lo[row : row + k], hi[row : row + k] = a_lim, l_lim, u_lim
            row += k
        return QPMatrices(P=hess, c=grad, A=a_mat, l=lo, u=hi)

    def _p_data(self, hess: np.ndarray) -> np.ndarray:
        """Upper triangle of the (n, n) Hessian in the CSC order of the fixed pattern."""
        return hess[self._p_rows, self._p_cols]

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
        qp = self.build(q)
        t0 = time.perf_counter()
        if self._solver is None:
            self._setup(qp)
        else:
            if self.m:
                self._solver.update(
                    Px=self._p_data(qp.P), q=qp.c, l=qp.l, u=qp.u, Ax=qp.A.ravel(order="F")
                )
            else:
                self._solver.update(Px=self._p_data(qp.P), q=qp.c)
        assert self._solver is not None
        res = self._solver.solve(raise_error=False)
        elapsed = time.perf_counter() - t0
        status = str(res.info.status)
        iters = int(res.info.iter)
        x = res.x
        ok = res.info.status_val == osqp.SolverStatus.OSQP_SOLVED and np.all(np.isfinite(x))
        if ok and self.m:
            ax = qp.A @ x
            tol = self.feasibility_tol
            if np.any(ax < qp.l - tol) or np.any(ax > qp.u + tol):
                ok, status = False, f"{status} (bounds violated)"
        if not ok:
            # Do not warm-start the next tick from a failed iterate.
            self._solver.warm_start(x=self._zero, y=np.zeros(self.m))
            return IKResult(np.zeros(self.n), status, False, elapsed, iters)
        return IKResult(np.array(x), status, True, elapsed, iters)
