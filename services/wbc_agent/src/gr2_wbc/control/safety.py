"""Safety layer of the control loop (DESIGN.md section 7, point 3).

Every tick the loop asks :meth:`SafetyLayer.update` which mode it is in, and passes its
command through :meth:`SafetyLayer.command` and :meth:`SafetyLayer.gripper_command`:

- :class:`Watchdog`: the trajectory is *stale* when the robot time is past the end of the
  newest chunk's horizon, or when no new chunk (a new ``seq``) arrived for ``stale_after_s``
  (about 3 policy periods). A stale trajectory is no longer followed: the commanded joint
  velocities are brought to zero with a smooth, jerk-limited profile (:class:`Brake`), then the
  reached position is held (zero velocity, fixed position target). A fresh chunk resumes
  tracking from the current pose: the target starts at the held tool pose with zero velocity
  and blends into the trajectory along a min-jerk profile (no jump of the target or of its
  velocity; :meth:`SafetyLayer.shape_target`).
- :class:`EStop`: a latched emergency stop. Triggered by :meth:`EStop.trigger` (any thread, or
  a signal handler: it takes no lock and does not log), or by a file existing
  (``SafetyConfig.estop_file``, polled every ``estop_file_poll_ticks`` ticks; creating the file
  is a way for an external process to stop the arm, e.g. ``touch /run/gr2/estop``). It brakes
  like the watchdog but with the e-stop deceleration, then holds, and stays latched until
  :meth:`EStop.reset` (a reset while the file still exists latches again at the next poll).
  Transitions are logged (logger ``gr2_wbc.safety``: CRITICAL for an e-stop, WARNING for a
  watchdog trip) by the loop thread.
- Command limits on the final command: every joint speed within ``joint_speed_limits`` and
  the tool's linear and angular speeds (``J(q) qd``) within ``tool_speed_max`` and
  ``tool_angular_speed_max``; a violating command is scaled down as a whole (its direction in
  joint space is kept). The gripper command is clamped to [0, 1] and its rate to
  ``gripper_rate_max`` per second.

States (:class:`SafetyState`, also the per-tick record's ``watchdog_state`` and the
``gr2_wbc_watchdog_state`` gauge): 0 TRACKING, 1 STOPPING, 2 HOLDING, 3 ESTOP (braking or
holding under a latched e-stop). Before the first chunk the loop is HOLDING.

All per-tick work writes into arrays allocated in the constructors.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gr2_wbc.control.trajectory import TrajectorySample, min_jerk_rate, min_jerk_weight
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat, quat_to_matrix, rotation_error, slerp

if TYPE_CHECKING:
    from gr2_wbc.metrics import WBCMetrics

logger = logging.getLogger("gr2_wbc.safety")

# Peak |d/dtau| and |d2/dtau2| of the min-jerk weight 10 t^3 - 15 t^4 + 6 t^5.
_MJ_PEAK_RATE = 1.875
_MJ_PEAK_ACCEL = 5.7735


class SafetyState(enum.IntEnum):
    """What the loop does with the trajectory (the number is what gets recorded/exported)."""

    TRACKING = 0
    STOPPING = 1
    HOLDING = 2
    ESTOP = 3


STATE_NAMES: tuple[str, ...] = tuple(s.name for s in SafetyState)
"""State names indexed by their number."""


@dataclass
class SafetyConfig:
    """Safety settings (the agent's defaults come from ``AgentSettings``, env ``GR2_WBC_*``).

    Attributes:
        watchdog: check staleness; ``None`` = only when the loop streams observations
            (``LoopConfig.observation_period_s > 0``), i.e. when a policy is in the loop.
            Without the watchdog an expired trajectory keeps its last waypoint as the target.
        stale_after_s: robot time without a new chunk before the trajectory is stale [s];
            ``None`` = 3 observation periods (0.6 s if observations are off).
        stop_decel: peak joint deceleration of a watchdog stop [rad/s^2].
        stop_jerk: peak joint jerk of a watchdog stop [rad/s^3].
        estop_decel: peak joint deceleration of an e-stop [rad/s^2].
        estop_jerk: peak joint jerk of an e-stop [rad/s^3].
        resume_s: minimum duration of the blend from the held pose when tracking resumes [s].
        resume_speed: the blend lasts at least ``1.875 |offset| / resume_speed`` [m/s]
            (and the same with ``resume_angular_speed`` [rad/s] for the orientation offset).
        resume_angular_speed: see ``resume_speed`` [rad/s].
        joint_speed_limits: per-joint clamp on the commanded speed [rad/s], shape (7,);
            ``None`` = ``joint_speed_fraction`` x the URDF limits.
        joint_speed_fraction: see ``joint_speed_limits``.
        tool_speed_max: clamp on the tool point's linear speed [m/s].
        tool_angular_speed_max: clamp on the tool's angular speed [rad/s].
        gripper_rate_max: clamp on the gripper command's rate [1/s] (1 = a full stroke).
        estop_file: a path whose existence latches the e-stop (``None``: off).
        estop_file_poll_ticks: ticks between checks of ``estop_file``.
    """

    watchdog: bool | None = None
    stale_after_s: float | None = None
    stop_decel: float = 5.0
    stop_jerk: float = 50.0
    estop_decel: float = 15.0
    estop_jerk: float = 300.0
    resume_s: float = 0.3
    resume_speed: float = 0.1
    resume_angular_speed: float = 0.5
    joint_speed_limits: np.ndarray | None = None
    joint_speed_fraction: float = 0.9
    tool_speed_max: float = 0.5
    tool_angular_speed_max: float = 2.0
    gripper_rate_max: float = 2.0
    estop_file: Path | None = None
    estop_file_poll_ticks: int = 10
    _resolved: bool = field(default=False, repr=False)

    def resolved(self, observation_period_s: float) -> SafetyConfig:
        """A copy with the ``None`` defaults filled in for a loop with this observation
        period [s]; raises ``ValueError`` on a non-positive limit."""
        if self._resolved:
            return self
        streaming = observation_period_s > 0.0
        watchdog = streaming if self.watchdog is None else self.watchdog
        stale = self.stale_after_s
        if stale is None:
            stale = 3.0 * observation_period_s if streaming else 0.6
        limits = self.joint_speed_limits
        if limits is None:
            limits = gen3.VELOCITY_LIMITS * self.joint_speed_fraction
        limits = np.array(limits, dtype=float).reshape(gen3.N_JOINTS)
        positive = (
            stale,
            self.stop_decel,
            self.stop_jerk,
            self.estop_decel,
            self.estop_jerk,
            self.resume_speed,
            self.resume_angular_speed,
            self.tool_speed_max,
            self.tool_angular_speed_max,
            self.gripper_rate_max,
            *limits,
        )
        if not all(v > 0.0 for v in positive) or self.resume_s < 0.0:
            raise ValueError(f"safety limits must be positive: {self}")
        return replace(
            self,
            watchdog=watchdog,
            stale_after_s=float(stale),
            joint_speed_limits=limits,
            estop_file=None if self.estop_file is None else Path(self.estop_file),
            _resolved=True,
        )


class Watchdog:
    """Decides whether the trajectory may be followed (robot-clock times).

    Args:
        stale_after_s: robot time without a new chunk before the trajectory is stale [s].
        enabled: False = only "no chunk at all" counts as stale.

    Attributes:
        last_seq: ``seq`` of the newest chunk seen (-1 before the first).
        last_new_s: robot time a new ``seq`` was first seen [s].
        reason: why the last :meth:`update` returned False (a short constant string).
    """

    NO_TRAJECTORY = "no trajectory"
    PAST_HORIZON = "past the end of the newest chunk's horizon"
    NOTHING_NEW = "no new chunk within stale_after_s"

    def __init__(self, stale_after_s: float, enabled: bool = True) -> None:
        self.stale_after_s = float(stale_after_s)
        self.enabled = enabled
        self.last_seq = -1
        self.last_new_s = -math.inf
        self.reason = self.NO_TRAJECTORY

    def update(self, t: float, sample: TrajectorySample | None) -> bool:
        """Note the sample at robot time ``t`` [s]; return True if it may be followed."""
        if sample is None:
            self.reason = self.NO_TRAJECTORY
            return False
        if sample.seq != self.last_seq:  # != also catches a restarted numbering (clear())
            self.last_seq = sample.seq
            self.last_new_s = t
        if not self.enabled:
            return True
        if sample.expired:
            self.reason = self.PAST_HORIZON
            return False
        if t - self.last_new_s > self.stale_after_s:
            self.reason = self.NOTHING_NEW
            return False
        return True


class EStop:
    """Latched emergency stop.

    :meth:`trigger` and :meth:`reset` only assign attributes (no lock, no logging), so they
    are safe from any thread and from a signal handler; the loop logs the transitions.

    Args:
        file: a path whose existence triggers the e-stop when :meth:`poll_file` runs.
    """

    def __init__(self, file: Path | None = None) -> None:
        self.file = file
        self.reason = ""
        self.triggers = 0
        self._latched = False

    @property
    def latched(self) -> bool:
        """True from :meth:`trigger` until :meth:`reset`."""
        return self._latched

    def trigger(self, reason: str = "api") -> None:
        """Latch the e-stop (a no-op while already latched: the first reason is kept)."""
        if not self._latched:
            self.reason = reason
            self.triggers += 1
            self._latched = True

    def reset(self) -> None:
        """Release the latch; the loop resumes once a fresh trajectory is there."""
        self._latched = False

    def poll_file(self) -> None:
        """Trigger if ``file`` exists."""
        if self.file is not None and not self._latched and self.file.exists():
            self.trigger(f"file {self.file} exists")


class Brake:
    """Synchronised smooth stop: ``qd(t) = qd0 (1 - s(t / T))``, ``s`` the min-jerk weight.

    All joints stop together along the direction they were moving (zero acceleration at both
    ends). ``T = max(1.875 |qd0|_inf / decel, sqrt(5.7735 |qd0|_inf / jerk))`` bounds the
    peak deceleration by ``decel`` and the jerk of the profile by ``jerk``; it is rounded up to
    whole ticks.

    Args:
        n: number of joints.
        dt: tick period [s].
    """

    def __init__(self, n: int, dt: float) -> None:
        self.dt = dt
        self.qd0 = np.zeros(n)
        self.duration_s = 0.0
        self.elapsed_s = 0.0
        self.active = False

    def start(self, qd0: np.ndarray, decel: float, jerk: float) -> None:
        """Begin a stop from the velocity ``qd0`` [rad/s] (the last command)."""
        self.qd0[:] = qd0
        v = float(np.max(np.abs(self.qd0)))
        t = max(_MJ_PEAK_RATE * v / decel, math.sqrt(_MJ_PEAK_ACCEL * v / jerk))
        self.duration_s = math.ceil(t / self.dt - 1e-9) * self.dt
        self.elapsed_s = 0.0
        self.active = self.duration_s > 0.0

    def step(self, out: np.ndarray) -> bool:
        """Write the next tick's velocity into ``out``; return False once at rest."""
        if not self.active:
            out[:] = 0.0
            return False
        self.elapsed_s += self.dt
        tau = self.elapsed_s / self.duration_s
        np.multiply(self.qd0, 1.0 - min_jerk_weight(tau), out=out)
        if tau >= 1.0 - 1e-9:
            out[:] = 0.0
            self.active = False
        return self.active


class SafetyLayer:
    """Watchdog, e-stop and command limits for one :class:`~gr2_wbc.loop.ControlLoop`.

    Args:
        config: resolved settings (see :meth:`SafetyConfig.resolved`).
        dt: tick period [s].
        metrics: a :class:`~gr2_wbc.metrics.WBCMetrics` to update (optional).

    Attributes:
        state: the current :class:`SafetyState`.
        estop: the latched e-stop (trigger it from anywhere).
        watchdog: the staleness check.
        watchdog_trips: stops caused by the watchdog.
        trip_reason: the watchdog's reason for the last trip (a ``Watchdog`` constant).
        speed_clamps: ticks whose command was scaled down by a speed clamp.
        last_scale: the factor the clamps applied to the last command (1 = unchanged).
    """

    def __init__(self, config: SafetyConfig, dt: float, metrics: WBCMetrics | None = None) -> None:
        if not config._resolved:
            config = config.resolved(0.0)
        self.config = config
        self.dt = dt
        self.metrics = metrics
        assert config.stale_after_s is not None and config.joint_speed_limits is not None
        self.watchdog = Watchdog(config.stale_after_s, bool(config.watchdog))
        self.estop = EStop(config.estop_file)
        self.state = SafetyState.HOLDING
        n = gen3.N_JOINTS
        self.brake = Brake(n, dt)
        self._limits = config.joint_speed_limits
        self._qd = np.zeros(n)
        self._q_cmd = np.zeros(n)
        self._last_qd = np.zeros(n)
        self._hold_q = np.zeros(n)
        self._hold_valid = False
        self._ratio = np.zeros(n)
        self._room = np.zeros(n)
        self._reach = _tool_reach()
        self._v = np.zeros(3)
        self._w = np.zeros(3)
        self._gripper: float | None = None
        self._resume_pending = False
        self._resume_t0 = 0.0
        self._resume_T = 0.0
        self._offset_p = np.zeros(3)
        self._offset_r = np.zeros(3)
        self._hold_p = np.zeros(3)
        self._hold_quat = np.zeros(4)
        self._ticks = 0
        self.watchdog_trips = 0
        self.trip_reason = ""
        self.speed_clamps = 0
        self.last_scale = 1.0

    # -- modes -------------------------------------------------------------------------------

    def update(self, t: float, sample: TrajectorySample | None) -> SafetyState:
        """Advance the state machine at robot time ``t`` [s] given this tick's sample."""
        cfg = self.config
        self._ticks += 1
        if cfg.estop_file is not None and self._ticks % cfg.estop_file_poll_ticks == 1:
            self.estop.poll_file()
        fresh = self.watchdog.update(t, sample)
        state = self.state
        if self.estop.latched:
            if state != SafetyState.ESTOP:
                logger.critical(
                    "E-STOP latched (%s) at t=%.3f s: stopping the arm", self.estop.reason, t
                )
                if state != SafetyState.HOLDING:
                    self.brake.start(self._last_qd, cfg.estop_decel, cfg.estop_jerk)
                if self.metrics is not None:
                    self.metrics.estops.inc()
                state = SafetyState.ESTOP
        elif state == SafetyState.ESTOP:
            logger.critical("E-stop reset at t=%.3f s", t)
            state = SafetyState.STOPPING if self.brake.active else SafetyState.HOLDING
        if state == SafetyState.TRACKING and not fresh:
            self.watchdog_trips += 1
            self.trip_reason = self.watchdog.reason
            logger.warning(
                "watchdog: %s (seq %d) at t=%.3f s: stopping the arm",
                self.watchdog.reason,
                self.watchdog.last_seq,
                t,
            )
            if self.metrics is not None:
                self.metrics.watchdog_trips.inc()
            self.brake.start(self._last_qd, cfg.stop_decel, cfg.stop_jerk)
            state = SafetyState.STOPPING
        elif state in (SafetyState.STOPPING, SafetyState.HOLDING) and fresh:
            if self.watchdog_trips or self.estop.triggers:
                logger.warning(
                    "fresh trajectory (seq %d) at t=%.3f s: resuming", self.watchdog.last_seq, t
                )
            self.brake.active = False
            self._hold_valid = False
            self._resume_pending = True
            state = SafetyState.TRACKING
        self.state = state
        if self.metrics is not None:
            self.metrics.watchdog_state.set(int(state))
        return state

    def shape_target(self, t: float, sample: TrajectorySample, tool: np.ndarray) -> None:
        """While TRACKING: start the target at the tool pose held when tracking (re)starts.

        On the first tracking tick the tool pose ``H`` is stored; for the resume duration
        ``T`` the target is the min-jerk blend ``(1 - s) H + s traj(t)`` (orientation by
        slerp), with the blend's exact rate as feed-forward (``s v_traj + s' (traj - H)``), so
        the target starts at the current pose with zero velocity. ``T`` is at least
        ``resume_s`` and long enough that the offset alone moves at most ``resume_speed``.
        Modifies ``sample``.
        """
        cfg = self.config
        if self._resume_pending:
            self._resume_pending = False
            self._hold_p[:] = tool[:3, 3]
            self._hold_quat[:] = matrix_to_quat(tool[:3, :3])
            np.subtract(sample.position, self._hold_p, out=self._offset_p)
            self._offset_r[:] = rotation_error(quat_to_matrix(sample.quat_wxyz), tool[:3, :3])
            dp = float(np.sqrt(self._offset_p @ self._offset_p))
            dr = float(np.sqrt(self._offset_r @ self._offset_r))
            self._resume_t0 = t
            self._resume_T = max(
                cfg.resume_s,
                _MJ_PEAK_RATE * dp / cfg.resume_speed,
                _MJ_PEAK_RATE * dr / cfg.resume_angular_speed,
            )
        if self._resume_T <= 0.0:
            return
        tau = (t - self._resume_t0) / self._resume_T
        if tau >= 1.0:
            self._resume_T = 0.0
            return
        w = min_jerk_weight(tau)
        rate = min_jerk_rate(tau) / self._resume_T
        offset_p, offset_r = self._offset_p, self._offset_r
        np.subtract(sample.position, self._hold_p, out=offset_p)
        offset_r[:] = rotation_error(
            quat_to_matrix(sample.quat_wxyz), quat_to_matrix(self._hold_quat)
        )
        sample.velocity *= w
        sample.velocity += rate * offset_p
        sample.angular_velocity *= w
        sample.angular_velocity += rate * offset_r
        sample.position[:] = self._hold_p
        sample.position += w * offset_p
        sample.quat_wxyz[:] = slerp(self._hold_quat, sample.quat_wxyz, w)

    # -- commands ----------------------------------------------------------------------------

    def command(
        self, q: np.ndarray, qd_tracking: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The final joint command for this tick: ``(q_cmd, qd_cmd)`` (internal arrays,
        valid until the next call).

        TRACKING uses ``qd_tracking`` (the IK's velocity), STOPPING/ESTOP brake, HOLDING
        holds the position latched when the arm came to rest. The speed clamps and the
        joint-range guard apply to all; ``q_cmd = q + qd dt`` (within the joint range) except
        while holding.
        """
        qd = self._qd
        state = self.state
        if state == SafetyState.TRACKING:
            assert qd_tracking is not None
            qd[:] = qd_tracking
        elif self.brake.active:
            if not self.brake.step(qd) and state == SafetyState.STOPPING:
                self.state = SafetyState.HOLDING
                if self.metrics is not None:
                    self.metrics.watchdog_state.set(int(SafetyState.HOLDING))
        else:
            qd[:] = 0.0
            if state == SafetyState.STOPPING:
                self.state = SafetyState.HOLDING
        self._clamp(q, qd)
        self._keep_in_range(q, qd)
        self._last_qd[:] = qd
        if self.state != SafetyState.TRACKING and not self.brake.active:
            if not self._hold_valid:  # latch once: re-reading q each tick would let it sag
                np.clip(q, gen3.JOINT_LOWER, gen3.JOINT_UPPER, out=self._hold_q)
                self._hold_valid = True
            return self._hold_q, qd
        self._hold_valid = False
        np.multiply(qd, self.dt, out=self._q_cmd)
        self._q_cmd += q
        np.clip(self._q_cmd, gen3.JOINT_LOWER, gen3.JOINT_UPPER, out=self._q_cmd)
        return self._q_cmd, qd

    def _keep_in_range(self, q: np.ndarray, qd: np.ndarray) -> None:
        """Last guard on the joint range: ``qd`` never moves a joint past its limit within
        this tick (nor further out, if the measured position already overshot it).

        The IK's position dampers keep ``q + qd dt`` inside the range only to the QP's
        tolerance (~1e-6 rad at a limit); this makes the command exact. It never pushes a
        joint back in (that could be a large velocity), and it only ever shrinks ``qd``.
        """
        room = self._room
        np.subtract(gen3.JOINT_UPPER, q, out=room)
        room /= self.dt
        np.maximum(room, 0.0, out=room)
        np.minimum(qd, room, out=qd)
        np.subtract(gen3.JOINT_LOWER, q, out=room)
        room /= self.dt
        np.minimum(room, 0.0, out=room)
        np.maximum(qd, room, out=qd)

    def _clamp(self, q: np.ndarray, qd: np.ndarray) -> None:
        """Scale ``qd`` in place to respect the joint and tool speed clamps."""
        cfg = self.config
        ratio = self._ratio
        np.abs(qd, out=ratio)
        if not ratio.any():
            self.last_scale = 1.0
            return
        # Cheap bounds first (most ticks): ||w|| <= sum |qd_i| (unit axes) and
        # ||v|| <= sum |qd_i| reach_i; the Jacobian (~40 us) only when a bound is exceeded.
        abs_sum = float(ratio.sum())
        reach_sum = float(ratio @ self._reach)
        ratio /= self._limits
        scale = 1.0 / max(1.0, float(ratio.max()))
        if (
            scale * reach_sum <= cfg.tool_speed_max
            and scale * abs_sum <= cfg.tool_angular_speed_max
        ):
            self._finish_clamp(qd, scale)
            return
        jac = gen3.tool_jacobian(q)
        np.dot(jac[:3], qd, out=self._v)
        np.dot(jac[3:], qd, out=self._w)
        v = scale * float(np.sqrt(self._v @ self._v))
        w = scale * float(np.sqrt(self._w @ self._w))
        if v > cfg.tool_speed_max:
            scale *= cfg.tool_speed_max / v
        if w > cfg.tool_angular_speed_max:
            scale *= cfg.tool_angular_speed_max / w
        self._finish_clamp(qd, scale)

    def _finish_clamp(self, qd: np.ndarray, scale: float) -> None:
        self.last_scale = scale
        if scale < 1.0:
            qd *= scale
            self.speed_clamps += 1
            if self.metrics is not None:
                self.metrics.speed_clamps.inc()

    def gripper_command(self, target: float | None, measured: float) -> float:
        """Gripper command: ``target`` (``None`` = keep the last command) clamped to [0, 1],
        moving at most ``gripper_rate_max * dt`` per tick. The first command starts from
        the measured closure."""
        if self._gripper is None:
            self._gripper = min(max(float(measured), 0.0), 1.0)
        if target is None or self.state != SafetyState.TRACKING:
            return self._gripper
        goal = min(max(float(target), 0.0), 1.0)
        step = self.config.gripper_rate_max * self.dt
        self._gripper += min(max(goal - self._gripper, -step), step)
        return self._gripper

    def stats(self) -> dict[str, object]:
        """JSON-ready counters and the current state."""
        return {
            "safety_state": STATE_NAMES[int(self.state)],
            "watchdog_trips": self.watchdog_trips,
            "watchdog_trip_reason": self.trip_reason or None,
            "estop_triggers": self.estop.triggers,
            "estop_latched": self.estop.latched,
            "estop_reason": self.estop.reason or None,
            "speed_clamps": self.speed_clamps,
        }


def _tool_reach() -> np.ndarray:
    """Upper bound of the distance from each joint axis to the tool point [m], shape (7,):
    the sum of the link offsets after the joint, the flange offset and the tool offset."""
    norms = [float(np.linalg.norm(j.xyz)) for j in gen3.JOINTS]
    tail = float(np.linalg.norm(gen3.FLANGE_XYZ)) + gen3.TOOL_OFFSET_M
    return np.array([sum(norms[i + 1 :]) + tail for i in range(gen3.N_JOINTS)])
