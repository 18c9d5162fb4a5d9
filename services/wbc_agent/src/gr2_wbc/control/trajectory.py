"""Trajectory layer: the buffer of received end-effector chunks, sampled at the loop rate.

Times are ROBOT-clock seconds (the backend's ``ArmState.time_s``). The link converts the
server's waypoint offsets before calling :meth:`TrajectoryBuffer.add_chunk`
(``robot_capture_time_s + waypoint.time_offset_s``); two machines' wall clocks are never
compared here.

Sampling rules (``sample(t)``):

- no chunk yet: ``None``;
- inside a chunk: positions by a shape-preserving cubic (``interpolation="cubic"``, the
  default) or linearly; gripper linear between waypoints, orientation by slerp. The cubic is
  piecewise Hermite with Fritsch-Carlson tangents (monotone, like PCHIP): it passes through
  every waypoint, never overshoots the waypoints' range on a segment, and its velocity is
  continuous across waypoints. Linear interpolation's velocity jumps at every waypoint
  (at 50 ms spacing and 0.5 m/s^2 of curvature, 0.025 m/s), which the IK's acceleration
  bound then has to absorb;
- before a chunk's first waypoint: its first waypoint; after its last: its last waypoint, and
  ``expired=True`` (the watchdog decides what to do with an expired trajectory);
- a newer chunk (higher ``seq``) takes over at its *blend start* = ``max(first waypoint time,
  robot time of the first sample that sees it)``. Taking the later of the two skips waypoints
  already in the past (inference delay) without a jump: over ``blend_s`` the output
  cross-fades from the previous output to the new chunk with the min-jerk weight
  ``s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5`` (zero velocity and acceleration of the weight at
  both ends). A chunk that arrives while a blend is still running blends from that blend, so
  the output stays continuous; up to ``max_chunks`` chunks are kept for this nesting. Blend
  starts never go backwards: a newer chunk never starts before an older one.
- chunks with ``seq`` not above the newest accepted one are ignored (late or duplicate).

Each sample also carries the reference's own velocity and angular velocity (the segment rates,
and during a blend the exact derivative of the cross-fade), used as tracking feed-forward.

``blend="ensemble"`` selects temporal ensembling instead (as ACT does): every chunk that covers
``t`` contributes, weighted by ``exp(-ensemble_decay * age)`` (age: robot time since the
chunk's origin, so a positive decay favours newer predictions), and each chunk's weight ramps
in from its blend start and out towards its last waypoint with the min-jerk weight over
``blend_s``, so no chunk ever enters or leaves the average with a jump. The feed-forward rates
are the weighted rates (the weights' own derivative is left out). The newest chunk always
contributes; older ones are dropped once past their last waypoint.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from gr2_wbc.kinematics.rotations import quat_to_matrix, rotation_error, slerp

BLEND_MODES = ("min_jerk", "ensemble")
INTERPOLATIONS = ("cubic", "linear")


def monotone_tangents(times: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson tangents for monotone piecewise-cubic Hermite interpolation.

    Args:
        times: knot times, shape (k,), strictly increasing.
        slopes: secant slopes per segment, shape (k - 1, d).

    Returns:
        Tangents (k, d): 0 where the data turns (an extremum stays at a knot), the weighted
        harmonic mean of the adjacent slopes elsewhere (Fritsch and Butland's weights), the
        end segments' slopes at the two ends.
    """
    k = times.shape[0]
    out = np.zeros((k, slopes.shape[1]))
    if k < 2:
        return out
    out[0], out[k - 1] = slopes[0], slopes[k - 2]
    if k > 2:
        h = np.diff(times)
        d0, d1 = slopes[:-1], slopes[1:]
        w1 = (2.0 * h[1:] + h[:-1])[:, None]
        w2 = (h[1:] + 2.0 * h[:-1])[:, None]
        same = d0 * d1 > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (w1 + w2) / (w1 / d0 + w2 / d1)
        out[1:-1] = np.where(same, mean, 0.0)
    return out


def min_jerk_weight(tau: float) -> float:
    """Min-jerk blend weight ``10 tau^3 - 15 tau^4 + 6 tau^5`` with ``tau`` clipped to [0, 1]."""
    t = min(max(tau, 0.0), 1.0)
    return t * t * t * (10.0 + t * (-15.0 + 6.0 * t))


def min_jerk_rate(tau: float) -> float:
    """``d/dtau`` of :func:`min_jerk_weight`: ``30 tau^2 (1 - tau)^2`` (0 outside (0, 1))."""
    if tau <= 0.0 or tau >= 1.0:
        return 0.0
    return 30.0 * tau * tau * (1.0 - tau) * (1.0 - tau)


@dataclass
class TrajectorySample:
    """The reference pose at one instant.

    Attributes:
        position: tool position target [m], base frame, shape (3,).
        quat_wxyz: tool orientation target, unit quaternion (w, x, y, z), shape (4,).
        velocity: time derivative of ``position`` [m/s], shape (3,) (feed-forward; zero
            while holding).
        angular_velocity: angular velocity of ``quat_wxyz`` [rad/s], base frame, shape (3,).
        gripper: gripper target, 0 (open) .. 1 (closed).
        seq: ``seq`` of the newest chunk contributing to this sample.
        expired: True once ``t`` is past the newest chunk's last waypoint (pose held).
        chunk_age_s: robot time since the newest chunk's origin (by default its first
            waypoint, i.e. about the capture time of the observation it answers) [s].
    """

    position: np.ndarray = field(default_factory=lambda: np.zeros(3))
    quat_wxyz: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0, 0.0]))
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    angular_velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    gripper: float = 0.0
    seq: int = -1
    expired: bool = False
    chunk_age_s: float = 0.0


class _Chunk:
    """One preallocated chunk slot (capacity ``k_max`` waypoints)."""

    def __init__(self, k_max: int) -> None:
        self.times = np.zeros(k_max)
        self.positions = np.zeros((k_max, 3))
        self.quats = np.zeros((k_max, 4))
        self.grippers = np.zeros(k_max)
        self.lin_vel = np.zeros((k_max, 3))  # per segment i -> i+1 [m/s]
        self.tangents = np.zeros((k_max, 3))  # per waypoint, cubic interpolation [m/s]
        self.cubic = True
        self.ang_vel = np.zeros((k_max, 3))  # per segment, base frame [rad/s]
        self.n = 0
        self.seq = -1
        self.origin_s = 0.0
        self.blend_start_s = math.nan  # set by the first sample() that sees the chunk

    def fill(self, seq: int, arrays: tuple[np.ndarray, ...], origin_s: float, cubic: bool) -> None:
        """Copy a validated chunk in: ``arrays`` = times, positions, unit quaternions,
        grippers, segment linear velocities (k-1, 3), segment angular velocities (k-1, 3),
        position tangents (k, 3)."""
        times, pos, quats, grip, lin_vel, ang_vel, tangents = arrays
        k = times.shape[0]
        self.n, self.seq, self.origin_s, self.blend_start_s = k, int(seq), origin_s, math.nan
        self.times[:k], self.positions[:k], self.quats[:k] = times, pos, quats
        self.grippers[:k] = grip
        self.lin_vel[: k - 1], self.ang_vel[: k - 1] = lin_vel, ang_vel
        self.tangents[:k] = tangents
        self.cubic = cubic

    def sample_into(
        self, t: float, pos: np.ndarray, quat: np.ndarray, vel: np.ndarray, omega: np.ndarray
    ) -> float:
        """Write the pose and its rates at ``t`` into the arrays; return the gripper."""
        n = self.n
        times = self.times
        inside = n > 1 and times[0] < t < times[n - 1]
        if not inside:
            i, a = (0, 0.0) if t <= times[0] or n == 1 else (n - 2, 1.0)
            vel[:] = 0.0
            omega[:] = 0.0
        else:
            i = int(np.searchsorted(times[:n], t, side="right")) - 1
            h = times[i + 1] - times[i]
            a = (t - times[i]) / h
            omega[:] = self.ang_vel[i]
            if self.cubic:
                self._hermite(i, a, h, pos, vel)
                return self._finish(i, i + 1, a, quat)
            vel[:] = self.lin_vel[i]
        j = min(i + 1, n - 1)
        np.multiply(self.positions[i], 1.0 - a, out=pos)
        pos += a * self.positions[j]
        return self._finish(i, j, a, quat)

    def _hermite(self, i: int, a: float, h: float, pos: np.ndarray, vel: np.ndarray) -> None:
        """Cubic Hermite position and velocity on segment ``i`` at fraction ``a``."""
        p0, p1 = self.positions[i], self.positions[i + 1]
        m0, m1 = self.tangents[i], self.tangents[i + 1]
        a2 = a * a
        a3 = a2 * a
        np.multiply(p0, 2.0 * a3 - 3.0 * a2 + 1.0, out=pos)
        pos += (-2.0 * a3 + 3.0 * a2) * p1
        pos += ((a3 - 2.0 * a2 + a) * h) * m0
        pos += ((a3 - a2) * h) * m1
        np.subtract(p1, p0, out=vel)
        vel *= (6.0 * a - 6.0 * a2) / h
        vel += (3.0 * a2 - 4.0 * a + 1.0) * m0
        vel += (3.0 * a2 - 2.0 * a) * m1

    def _finish(self, i: int, j: int, a: float, quat: np.ndarray) -> float:
        """Orientation (slerp) and gripper (linear) between waypoints ``i`` and ``j``."""
        if a <= 0.0 or a >= 1.0:
            quat[:] = self.quats[i if a <= 0.0 else j]
        else:
            quat[:] = slerp(self.quats[i], self.quats[j], a)
        return float((1.0 - a) * self.grippers[i] + a * self.grippers[j])


class TrajectoryBuffer:
    """Thread-safe buffer of trajectory chunks: the link thread adds, the control loop samples.

    Args:
        blend_s: cross-fade duration when a newer chunk takes over [s] (0 = switch at once);
            in ensemble mode the ramp-in/out time of each chunk's weight.
        max_waypoints: capacity of one chunk; longer chunks are rejected.
        max_chunks: chunks kept for nested blends (a chunk arriving during a running blend).
            If more than this many arrive within one blend window the oldest is dropped.
            Ensembling overlaps whole chunks: give it about chunk length / policy period.
        blend: "min_jerk" (cross-fade, the default) or "ensemble" (temporal ensembling).
        ensemble_decay: ensemble weight decay with chunk age [1/s] (> 0 favours newer).
        interpolation: "cubic" (monotone Hermite, velocity continuous; the default) or
            "linear" between waypoints.
    """

    def __init__(
        self,
        blend_s: float = 0.1,
        max_waypoints: int = 64,
        max_chunks: int = 4,
        blend: str = "min_jerk",
        ensemble_decay: float = 0.0,
        interpolation: str = "cubic",
    ) -> None:
        if blend_s < 0.0:
            raise ValueError("blend_s must be >= 0")
        if max_chunks < 2:
            raise ValueError("max_chunks must be >= 2")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.blend = blend
        self.ensemble_decay = float(ensemble_decay)
        self.blend_s = float(blend_s)
        self.max_waypoints = int(max_waypoints)
        self._slots = [_Chunk(max_waypoints) for _ in range(max_chunks)]
        self._active: list[_Chunk] = []  # oldest first; a fixed-capacity pool, never grows
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)  # notified when a chunk is accepted
        self._latest_seq = -1
        self._tmp = TrajectorySample()
        self._ref_quat = np.zeros(4)

    @property
    def latest_seq(self) -> int:
        """``seq`` of the newest accepted chunk (-1 before the first)."""
        return self._latest_seq

    def add_chunk(
        self,
        seq: int,
        times_s: np.ndarray,
        positions: np.ndarray,
        quats_wxyz: np.ndarray,
        grippers: np.ndarray,
        origin_time_s: float | None = None,
    ) -> bool:
        """Add a chunk; return False (and change nothing) if ``seq`` is not newer.

        Args:
            seq: the observation sequence number the chunk answers (monotonic per episode).
            times_s: waypoint times in robot-clock seconds, shape (k,), strictly increasing.
            positions: tool positions [m], base frame, shape (k, 3).
            quats_wxyz: tool orientations (w, x, y, z), shape (k, 4); normalised here.
            grippers: gripper targets 0..1, shape (k,).
            origin_time_s: robot time the chunk's age is measured from (default: first
                waypoint time).

        Raises:
            ValueError: on inconsistent shapes, non-finite values, non-increasing times,
                zero quaternions or more than ``max_waypoints`` waypoints.
        """
        times = np.asarray(times_s, dtype=np.float64)
        pos = np.asarray(positions, dtype=np.float64)
        quats = np.asarray(quats_wxyz, dtype=np.float64)
        grip = np.asarray(grippers, dtype=np.float64)
        k = times.shape[0] if times.ndim == 1 else -1
        if k < 1 or pos.shape != (k, 3) or quats.shape != (k, 4) or grip.shape != (k,):
            raise ValueError(
                f"chunk shapes mismatch: times {times.shape}, positions {pos.shape}, "
                f"quats {quats.shape}, grippers {grip.shape}"
            )
        if k > self.max_waypoints:
            raise ValueError(f"chunk has {k} waypoints, capacity is {self.max_waypoints}")
        if not all(np.all(np.isfinite(a)) for a in (times, pos, quats, grip)):
            raise ValueError("chunk contains non-finite values")
        if k > 1 and np.any(np.diff(times) <= 0.0):
            raise ValueError("waypoint times must be strictly increasing")
        norms = np.linalg.norm(quats, axis=1)
        if np.any(norms < 1e-9):
            raise ValueError("zero-norm quaternion in chunk")
        quats = quats / norms[:, None]
        for i in range(1, k):  # one hemisphere along the chunk, so the output never flips sign
            if quats[i] @ quats[i - 1] < 0.0:
                quats[i] = -quats[i]
        # Segment rates are computed before taking the lock: the loop never waits for them.
        dt = np.diff(times)
        lin_vel = np.diff(pos, axis=0) / dt[:, None]
        ang_vel = np.empty((k - 1, 3))
        for i in range(k - 1):  # slerp turns at the constant rate log(R_i+1 R_i^T) / dt
            rot = rotation_error(quat_to_matrix(quats[i + 1]), quat_to_matrix(quats[i]))
            ang_vel[i] = rot / dt[i]
        cubic = self.interpolation == "cubic"
        tangents = monotone_tangents(times, lin_vel) if cubic else np.zeros((k, 3))
        with self._lock:
            if seq <= self._latest_seq:
                return False
            if len(self._active) == len(self._slots):
                self._active.pop(0)  # overflow: drop the oldest nested blend source
            slot = next(s for s in self._slots if all(s is not a for a in self._active))
            origin = float(times[0] if origin_time_s is None else origin_time_s)
            slot.fill(seq, (times, pos, quats, grip, lin_vel, ang_vel, tangents), origin, cubic)
            self._active.append(slot)
            self._latest_seq = int(seq)
            self._added.notify_all()
        return True

    def wait_for_seq(self, seq: int, timeout_s: float) -> bool:
        """Block until a chunk with ``seq`` or newer was accepted; False on timeout."""
        with self._added:
            return self._added.wait_for(lambda: self._latest_seq >= seq, timeout_s)

    def clear(self) -> None:
        """Forget all chunks (e.g. at a new episode); ``seq`` numbering restarts too."""
        with self._lock:
            self._active.clear()
            self._latest_seq = -1

    def sample(self, t: float, out: TrajectorySample | None = None) -> TrajectorySample | None:
        """Reference at robot time ``t`` [s]; ``None`` before the first chunk.

        Pass ``out`` to have it filled in place (no allocation of the result object).
        """
        with self._lock:
            active = self._active
            if not active:
                return None
            if out is None:
                out = TrajectorySample()
            prev_start = -np.inf
            for c in active:
                if math.isnan(c.blend_start_s):  # first sample that sees this chunk
                    c.blend_start_s = max(t, float(c.times[0]), prev_start)
                prev_start = c.blend_start_s
            if self.blend == "ensemble":
                return self._sample_ensemble(t, out)
            # Chunks whose blend finished fully hide everything older: drop those.
            newest_done = 0
            for idx in range(len(active) - 1, 0, -1):
                if t >= active[idx].blend_start_s + self.blend_s:
                    newest_done = idx
                    break
            if newest_done:
                del active[:newest_done]
            gripper = active[0].sample_into(
                t, out.position, out.quat_wxyz, out.velocity, out.angular_velocity
            )
            new = self._tmp
            for idx in range(1, len(active)):
                c = active[idx]
                start = c.blend_start_s
                if t < start:  # not taken over yet; newer chunks start later still
                    break
                g = c.sample_into(
                    t, new.position, new.quat_wxyz, new.velocity, new.angular_velocity
                )
                if self.blend_s == 0.0 or t >= start + self.blend_s:
                    w, w_rate = 1.0, 0.0
                else:
                    tau = (t - start) / self.blend_s
                    w, w_rate = min_jerk_weight(tau), min_jerk_rate(tau) / self.blend_s
                # Rates: d/dt [(1-w) old + w new] = (1-w) old' + w new' + w' (new - old).
                if w_rate > 0.0:
                    dpos = w_rate * (new.position - out.position)
                    drot = w_rate * rotation_error(
                        quat_to_matrix(new.quat_wxyz), quat_to_matrix(out.quat_wxyz)
                    )
                out.velocity *= 1.0 - w
                out.velocity += w * new.velocity
                out.angular_velocity *= 1.0 - w
                out.angular_velocity += w * new.angular_velocity
                if w_rate > 0.0:
                    out.velocity += dpos
                    out.angular_velocity += drot
                out.position *= 1.0 - w
                out.position += w * new.position
                out.quat_wxyz[:] = slerp(out.quat_wxyz, new.quat_wxyz, w)
                gripper = (1.0 - w) * gripper + w * g
            newest = active[-1]
            out.gripper = float(gripper)
            out.seq = newest.seq
            out.expired = t > float(newest.times[newest.n - 1])
            out.chunk_age_s = float(t - newest.origin_s)
            return out

    def _ramp_out_start(self, index: int) -> float:
        """When chunk ``index`` (not the newest) starts ramping out: blend_s before its last
        waypoint, but never before its successor has fully ramped in, so the weights never
        all vanish together."""
        c, successor = self._active[index], self._active[index + 1]
        end = float(c.times[c.n - 1])
        return max(end - self.blend_s, successor.blend_start_s + self.blend_s)

    def _sample_ensemble(self, t: float, out: TrajectorySample) -> TrajectorySample:
        """Temporal ensembling (see the module docstring); called with the lock held."""
        active = self._active
        while len(active) > 1 and t >= self._ramp_out_start(0) + self.blend_s:
            del active[0]  # fully ramped out
        newest = active[-1]
        new = self._tmp
        total = gripper = 0.0
        out.position[:] = 0.0
        out.velocity[:] = 0.0
        out.angular_velocity[:] = 0.0
        quat_sum = self._ref_quat
        quat_sum[:] = 0.0
        for index, c in enumerate(active):
            if t < c.blend_start_s and index > 0:
                break  # not started yet; newer chunks start later still
            # exp(-decay * age), divided by the newest chunk's (it cancels in the average,
            # and the newest weighs 1, so a long hold cannot underflow every weight).
            w = math.exp(-self.ensemble_decay * (newest.origin_s - c.origin_s))
            if self.blend_s > 0.0:
                if index > 0:
                    w *= min_jerk_weight((t - c.blend_start_s) / self.blend_s)
                if c is not newest:
                    w *= 1.0 - min_jerk_weight((t - self._ramp_out_start(index)) / self.blend_s)
            if w <= 0.0:
                continue
            g = c.sample_into(t, new.position, new.quat_wxyz, new.velocity, new.angular_velocity)
            if total == 0.0:
                out.quat_wxyz[:] = new.quat_wxyz  # hemisphere reference for the average
            elif new.quat_wxyz @ out.quat_wxyz < 0.0:
                new.quat_wxyz *= -1.0
            total += w
            out.position += w * new.position
            out.velocity += w * new.velocity
            out.angular_velocity += w * new.angular_velocity
            quat_sum += w * new.quat_wxyz
            gripper += w * g
        out.position /= total
        out.velocity /= total
        out.angular_velocity /= total
        out.quat_wxyz[:] = quat_sum / np.linalg.norm(quat_sum)
        out.gripper = float(gripper / total)
        out.seq = newest.seq
        out.expired = t > float(newest.times[newest.n - 1])
        out.chunk_age_s = float(t - newest.origin_s)
        return out
