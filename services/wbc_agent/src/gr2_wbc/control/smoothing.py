"""Optional smoothing of a chunk's waypoint positions by a small QP (OSQP).

Per axis, with the chunk's k waypoints p (uniformly spaced by dt):

    minimise   sum_i (x_i - p_i)^2  +  jerk_weight * sum_j (D3 x)_j^2
    subject to |x_i - p_i| <= tolerance_m

where D3 x are third differences / dt^3 (jerk). The box keeps the smoothed path within a
tolerance of what the policy asked for (fidelity), the jerk term removes the policy's
high-frequency wobble. The problem's matrices depend only on k and dt, so one OSQP instance
per k is set up once and reused (warm-started) for every chunk and axis; it runs on the link
thread, never in the 200 Hz loop. Orientations and the gripper pass through unchanged.
"""

from __future__ import annotations

import numpy as np
import osqp
from scipy import sparse


class ChunkSmoother:
    """Smooths (k, 3) waypoint positions; instances are not thread-safe (one per link)."""

    def __init__(self, jerk_weight: float = 1e-6, tolerance_m: float = 0.01) -> None:
        if jerk_weight < 0.0 or tolerance_m < 0.0:
            raise ValueError("jerk_weight and tolerance_m must be >= 0")
        self.jerk_weight = jerk_weight
        self.tolerance_m = tolerance_m
        self._solvers: dict[tuple[int, float], osqp.OSQP] = {}

    def _solver(self, k: int, dt: float) -> osqp.OSQP:
        key = (k, round(dt, 9))
        solver = self._solvers.get(key)
        if solver is None:
            d3 = (
                sparse.diags(
                    [-1.0, 3.0, -3.0, 1.0], [0, 1, 2, 3], shape=(max(k - 3, 0), k), format="csc"
                )
                / dt**3
            )
            p = sparse.identity(k, format="csc") + self.jerk_weight * (d3.T @ d3)
            solver = osqp.OSQP()
            solver.setup(
                P=sparse.triu(p, format="csc"),
                q=np.zeros(k),
                A=sparse.identity(k, format="csc"),
                l=np.zeros(k),
                u=np.zeros(k),
                verbose=False,
                eps_abs=1e-7,
                eps_rel=1e-7,
                # Off: OSQP 1.1 prints "Polishing not needed" even with verbose=False, and
                # the result is clipped into the fidelity band anyway.
                polishing=False,
            )
            self._solvers[key] = solver
        return solver

    def smooth(self, times_s: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Smoothed copy of ``positions`` (k, 3); chunks of fewer than 4 waypoints, or a
        solver that does not converge, return the input unchanged (never something unchecked).
        """
        k = positions.shape[0]
        if k < 4 or self.jerk_weight == 0.0:
            return positions.copy()
        dt = float(times_s[-1] - times_s[0]) / (k - 1)
        solver = self._solver(k, dt)
        out = np.empty_like(positions)
        for axis in range(3):
            target = positions[:, axis]
            solver.update(q=-target, l=target - self.tolerance_m, u=target + self.tolerance_m)
            result = solver.solve(raise_error=False)
            x = result.x
            solved = result.info.status_val == osqp.SolverStatus.OSQP_SOLVED
            if not solved or x is None or not np.all(np.isfinite(x)):
                return positions.copy()
            out[:, axis] = np.clip(x, target - self.tolerance_m, target + self.tolerance_m)
        return out
