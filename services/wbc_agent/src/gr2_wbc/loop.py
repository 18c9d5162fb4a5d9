"""The 200 Hz control loop: trajectory sample -> pose twist -> IK QP -> joint command.

Everything of a tick runs in the thread that calls :meth:`ControlLoop.run`. Cameras do not:
when an observation (or a video frame) is due, the tick captures the state and the backend's
scene snapshot and hands them to a :class:`~gr2_wbc.cameras.CameraWorker`, which renders in
its own thread, so the images and the state published together describe the same instant
and a tick never waits for a camera. With ``realtime=False`` the loop waits for each frame
(results do not depend on the machine's speed).

Safety (:mod:`gr2_wbc.control.safety`): every tick the safety layer decides whether the
trajectory is followed (TRACKING) or the arm brakes (STOPPING, ESTOP) or holds (HOLDING), and
clamps the final joint, tool and gripper command. With a :class:`~gr2_wbc.recording.TickRecorder`
each tick's state and command are logged right after the command is sent.

Time: the trajectory is sampled at the ROBOT clock (``ArmState.time_s``). Pacing uses absolute
deadlines from ``time.perf_counter`` (``next += period``), so timing errors never accumulate.
Other threads read the robot clock between ticks with :meth:`ControlLoop.robot_time_s`.

Real time: with ``LoopConfig.rt_priority`` set, :meth:`ControlLoop.run` makes its thread
SCHED_FIFO and locks memory when permitted (:mod:`gr2_wbc.realtime`) and undoes it on exit.
"""

from __future__ import annotations

import gc
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gr2_wbc.cameras import CameraWorker, CaptureJob, ObservationSample, VideoFrames
from gr2_wbc.control.ik_qp import IKQP, PoseTask
from gr2_wbc.control.safety import SafetyConfig, SafetyLayer, SafetyState
from gr2_wbc.control.tracking import pose_tracking_twist
from gr2_wbc.control.trajectory import TrajectoryBuffer, TrajectorySample
from gr2_wbc.kinematics import gen3
from gr2_wbc.metrics import WBCMetrics
from gr2_wbc.realtime import RealtimeStatus, enter_realtime, leave_realtime
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.base import ArmState, RobotBackend
from gr2_wbc.timing import TimingRing

__all__ = ["ControlLoop", "LoopConfig", "ObservationSample"]


@dataclass
class LoopConfig:
    """Control loop settings.

    Attributes:
        rate_hz: control rate [Hz]; the period is also the sim step per tick.
        realtime: pace ticks to wall-clock deadlines; False runs as fast as possible.
        observation_period_s: robot time between observations for the policy [s]; <= 0
            turns observations off.
        camera_width, camera_height: observation image size [px] (the server's ViewSpec).
        video_fps: frame rate of the optional recording [1/s of robot time]; 0 = off.
        video_width, video_height: size of one camera in the recording [px].
        video_max_frames: recording capacity (frames beyond it are dropped and counted).
        kp_pos, kp_rot: Cartesian tracking gains [1/s].
        feedforward: add the trajectory's own velocity to the feedback twist (removes the
            ``speed / kp`` lag of pure feedback).
        v_max, w_max: Cartesian speed clamps [m/s], [rad/s].
        stats_window: ticks kept in the timing ring buffers (percentiles cover this window).
        gc_every_ticks: young-generation ``gc.collect(0)`` period while gc is disabled.
        safety: watchdog, e-stop and command limits (:class:`SafetyConfig`).
        lockstep_delay_s: with ``realtime=False`` only: the robot time after each
            observation at which the loop stops and waits (up to ``lockstep_timeout_s`` of
            wall time) for the chunk that answers it, so an unpaced sim never outruns the
            policy; the chunk then takes over at most this late (earlier if it was already
            there). ``None``: never wait (the sim runs as fast as it can).
        lockstep_timeout_s: the longest wall-time wait for one chunk [s].
        rt_priority: None (default): leave the thread's scheduling alone. Otherwise
            :meth:`ControlLoop.run` calls :func:`gr2_wbc.realtime.enter_realtime` with it
            (1..99: SCHED_FIFO + locked memory when permitted; 0: tried nothing, recorded).
    """

    rate_hz: float = 200.0
    realtime: bool = True
    observation_period_s: float = 0.2
    camera_width: int = 64
    camera_height: int = 64
    video_fps: float = 0.0
    video_width: int = 160
    video_height: int = 128
    video_max_frames: int = 1200
    kp_pos: float = 5.0
    kp_rot: float = 3.0
    feedforward: bool = True
    v_max: float = 0.25
    w_max: float = 1.0
    stats_window: int = 1 << 16
    gc_every_ticks: int = 200
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    rt_priority: int | None = None
    lockstep_delay_s: float | None = None
    lockstep_timeout_s: float = 10.0


class ControlLoop:
    """Tracks the :class:`TrajectoryBuffer` with an :class:`IKQP` on a :class:`RobotBackend`.

    Args:
        backend: the robot (sim or hardware).
        buffer: trajectory chunks, filled by the link thread.
        ik: the IK QP; it must contain a :class:`PoseTask`, whose target twist is set per tick.
        config: loop settings.
        metrics: Prometheus metrics to update (optional).
        recorder: per-tick log to fill (optional).

    Attributes:
        safety: the :class:`SafetyLayer` (``loop.safety.estop.trigger(...)`` stops the arm).
        observations: single-slot queue of the newest :class:`ObservationSample` (the link
            always gets the newest; an unconsumed older one is replaced).
        realtime_status: what :meth:`run` got from :func:`gr2_wbc.realtime.enter_realtime`
            (None when ``config.rt_priority`` is None or before the first run).
    """

    def __init__(
        self,
        backend: RobotBackend,
        buffer: TrajectoryBuffer,
        ik: IKQP,
        config: LoopConfig | None = None,
        metrics: WBCMetrics | None = None,
        recorder: TickRecorder | None = None,
    ) -> None:
        self.backend = backend
        self.buffer = buffer
        self.ik = ik
        self.config = config or LoopConfig()
        self.metrics = metrics
        self.dt = 1.0 / self.config.rate_hz
        self.recorder = recorder
        self.safety = SafetyLayer(
            self.config.safety.resolved(self.config.observation_period_s), self.dt, metrics
        )
        self._pose_task: PoseTask = ik.find_task(PoseTask)
        self.observations: queue.Queue[ObservationSample] = queue.Queue(maxsize=1)
        n = self.config.stats_window
        self._period, self._compute, self._qp = TimingRing(n), TimingRing(n), TimingRing(n)
        self._sample = TrajectorySample()
        self._ff = np.zeros(6)
        self.ticks = 0
        self.deadline_misses = 0
        self.qp_failures = 0
        self.qp_last_failure: str | None = None
        self.qp_relaxations = 0
        self.max_tracking_error_m = 0.0
        self.last_tracking_error_m = math.nan
        self._gripper_cmd = math.nan
        self._next_obs_t: float | None = None
        self._obs_submitted = 0
        # Lockstep: (robot time to wait at, chunk seq to wait for), see LoopConfig.
        self._lockstep_due: tuple[float, int] | None = None
        self.lockstep_last_seq: int | None = None  # no waits for seqs beyond this (the link's last)
        self.lockstep_timeouts = 0
        self._stop: threading.Event | None = None
        self._next_video_t: float | None = None
        self._warm_sizes: set[tuple[int, int]] = set()
        cfg = self.config
        self.video: VideoFrames | None = None
        if cfg.video_fps > 0.0 and backend.camera_names:
            self.video = VideoFrames(
                cfg.video_max_frames, cfg.video_width, cfg.video_height, backend.camera_names
            )
        self.cameras = CameraWorker(backend, self.observations, self.video, n)
        self.initial_q: np.ndarray | None = None
        self.final_q: np.ndarray | None = None
        # Running extremes of measured q and of |qd| (measured and commanded), shape (7,).
        self.q_min_seen = np.full(gen3.N_JOINTS, np.inf)
        self.q_max_seen = np.full(gen3.N_JOINTS, -np.inf)
        self.qd_max_abs_seen = np.zeros(gen3.N_JOINTS)
        self.qd_cmd_max_abs = np.zeros(gen3.N_JOINTS)
        self.realtime_status: RealtimeStatus | None = None
        # (robot time of the latest tick's state [s], perf_counter when it was read [s]),
        # replaced as one tuple so a reader in another thread never sees a torn pair.
        self._clock_ref: tuple[float, float] | None = None
        self._clock_last = -math.inf  # newest value robot_time_s returned (monotonic guard)
        self._clock_lock = threading.Lock()  # readers only; the loop thread never takes it

    def robot_time_s(self) -> float:
        """The robot clock now [s], readable from any thread between ticks.

        The robot time of the latest tick's state plus the wall time (``perf_counter``)
        elapsed since that state was read, capped at one period: past it the next tick's
        state is due, and when the loop runs faster or slower than wall time (``realtime``
        False, or overruns) the wall clock says nothing about the robot's. So the value
        lies within one tick after the latest state time, and it never decreases (a value
        below one already returned is raised to it). Before the first tick: 0.0 (no state
        read yet; the link reads it only after an observation, which a tick produces).
        """
        ref = self._clock_ref
        if ref is None:
            return 0.0
        state_time, read_at = ref
        now = state_time + min(max(time.perf_counter() - read_at, 0.0), self.dt)
        with self._clock_lock:
            if now < self._clock_last:
                now = self._clock_last
            self._clock_last = now
        return now

    def run(
        self,
        stop: threading.Event,
        max_duration_s: float | None = None,
        *,
        on_realtime: Callable[[RealtimeStatus], None] | None = None,
    ) -> None:
        """Run ticks in the calling thread until ``stop`` is set or the duration is reached.

        Args:
            stop: set it (from any thread) to end the loop after the current tick.
            max_duration_s: loop time to run [s] = ticks x period (wall time when
                ``realtime``, robot/sim time otherwise); ``None`` runs until ``stop``.
            on_realtime: called (in this thread, before the first tick) with the
                :class:`RealtimeStatus` when ``config.rt_priority`` is set, e.g. to log it.

        Why gc is frozen and disabled for the duration: a full collection walks every live
        object (~70k objects, ~30 ms measured with MuJoCo, numpy and gRPC loaded) and would
        land in a random tick, several periods long. ``gc.freeze()`` moves the heap that
        exists now out of all future collections; ``gc.disable()`` stops automatic ones. The
        hot path only makes short-lived acyclic objects, freed by reference counting, so
        nothing piles up; a young-generation ``gc.collect(0)`` (microseconds, the frozen heap
        is not scanned) runs every ``gc_every_ticks`` after a tick's work to bound cycles
        made by other threads (gc state is process-wide). Both are undone on exit.
        """
        cfg = self.config
        max_ticks = None if max_duration_s is None else round(max_duration_s * cfg.rate_hz)
        self._stop = stop
        period = self.dt
        self._warm_up_cameras()
        rt = None
        gc_was_enabled = gc.isenabled()
        try:
            if cfg.rt_priority is not None:  # before the clock starts: mlockall faults pages in
                rt = self.realtime_status = enter_realtime(cfg.rt_priority)
                if on_realtime is not None:
                    on_realtime(rt)
            gc.collect()
            gc.freeze()
            gc.disable()
            next_deadline = time.perf_counter()
            last_start = math.nan
            done = 0
            while not stop.is_set() and (max_ticks is None or done < max_ticks):
                if cfg.realtime:
                    delay = next_deadline - time.perf_counter()
                    if delay > 0.0:
                        time.sleep(delay)
                start = time.perf_counter()
                if not math.isnan(last_start):
                    self._period.push(start - last_start)
                    if self.metrics is not None:
                        self.metrics.loop_period.observe(start - last_start)
                last_start = start
                self._tick()
                done += 1
                next_deadline += period
                end = time.perf_counter()
                if cfg.realtime and end > next_deadline:
                    # Overran into the next slot; skip slots that are already entirely past,
                    # keeping deadlines on the original grid (no drift).
                    self.deadline_misses += 1
                    if self.metrics is not None:
                        self.metrics.deadline_misses.inc()
                    if self.recorder is not None:
                        self.recorder.mark_deadline_miss()
                    next_deadline += period * math.floor((end - next_deadline) / period)
                if cfg.gc_every_ticks > 0 and self.ticks % cfg.gc_every_ticks == 0:
                    gc.collect(0)
        finally:
            gc.unfreeze()
            if gc_was_enabled:
                gc.enable()
            if rt is not None:
                leave_realtime(rt)
        # Frames captured by the last ticks are published before run() returns.
        self.cameras.wait_idle(timeout=5.0)
        self.cameras.raise_error()

    def _warm_up_cameras(self) -> None:
        """Render every camera once at each size this run will use, before the clock starts:
        the first render at a size creates a GL context (~200-300 ms measured with EGL),
        which would otherwise land in a tick."""
        cfg = self.config
        sizes = set()
        if cfg.observation_period_s > 0.0:
            sizes.add((cfg.camera_width, cfg.camera_height))
        if cfg.video_fps > 0.0:
            sizes.add((cfg.video_width, cfg.video_height))
        for width, height in sizes - self._warm_sizes:
            for name in self.backend.camera_names:
                self.backend.render_view(name, width, height)
            self._warm_sizes.add((width, height))

    def _tick(self) -> None:
        """One control tick (see the module docstring for the order of operations)."""
        cfg = self.config
        t0 = time.perf_counter()
        state = self.backend.read_state()
        self._clock_ref = (state.time_s, t0)
        q = state.q
        if self.initial_q is None:
            self.initial_q = q.copy()
        np.minimum(self.q_min_seen, q, out=self.q_min_seen)
        np.maximum(self.q_max_seen, q, out=self.q_max_seen)
        np.maximum(self.qd_max_abs_seen, np.abs(state.qd), out=self.qd_max_abs_seen)
        t = state.time_s
        if self._lockstep_due is not None:
            self._maybe_wait_for_chunk(t)
            t0 = time.perf_counter()  # the wait is not compute
        sample = self.buffer.sample(t, out=self._sample)
        safety = self.safety
        mode = safety.update(t, sample)
        qd_ik = None
        gripper_target = None
        seq = -1
        if mode == SafetyState.TRACKING and sample is not None:
            tool = gen3.tool_pose(q)
            err = float(np.linalg.norm(sample.position - tool[:3, 3]))
            safety.shape_target(t, sample, tool)  # smooth start after a (re)start
            ff = None
            if cfg.feedforward:
                ff = self._ff
                ff[:3] = sample.velocity
                ff[3:] = sample.angular_velocity
            twist = pose_tracking_twist(
                tool,
                sample.position,
                sample.quat_wxyz,
                cfg.kp_pos,
                cfg.kp_rot,
                cfg.v_max,
                cfg.w_max,
                ff,
            )
            self._pose_task.set_target_twist(twist)
            result = self.ik.solve(q)
            self._qp.push(result.solve_time_s)
            if not result.solved:
                self.qp_failures += 1
                self.qp_last_failure = result.status
            elif "relaxed" in result.status:
                self.qp_relaxations += 1
            qd_ik = result.qd
            gripper_target = sample.gripper
            seq = sample.seq
            self.last_tracking_error_m = err
            self.max_tracking_error_m = max(self.max_tracking_error_m, err)
            if self.metrics is not None:
                self.metrics.qp_solve.observe(result.solve_time_s)
                self.metrics.tracking_error.set(err)
                self.metrics.chunk_age.set(sample.chunk_age_s)
        q_cmd, qd = safety.command(q, qd_ik)
        self._gripper_cmd = safety.gripper_command(gripper_target, state.gripper)
        np.maximum(self.qd_cmd_max_abs, np.abs(qd), out=self.qd_cmd_max_abs)
        self.ik.note_command(qd)
        self.backend.send_command(q_cmd, qd, self._gripper_cmd)
        compute = time.perf_counter() - t0
        self._compute.push(compute)
        if self.metrics is not None:
            self.metrics.tick_compute.observe(compute)
        if self.recorder is not None:
            self.recorder.record(
                state, q_cmd, qd, self._gripper_cmd, seq, int(safety.state),
                safety.last_scale, compute,
            )  # fmt: skip
        self._maybe_capture(state)
        self.backend.advance(self.dt)
        self.final_q = q
        self.ticks += 1

    def _maybe_capture(self, state: ArmState) -> None:
        """Hand an observation (and a video frame) to the camera worker when due on robot
        time (the first observation at tick 0). Capturing is cheap (a copy of the scene);
        the rendering happens in the worker's thread."""
        cfg = self.config
        t = state.time_s
        if self._next_obs_t is None:
            self._next_obs_t = t if cfg.observation_period_s > 0.0 else math.inf
        jobs = 0
        if t >= self._next_obs_t - 1e-9:
            self._next_obs_t += cfg.observation_period_s
            if self._next_obs_t <= t:  # fell behind: restart the grid from now
                self._next_obs_t = t + cfg.observation_period_s
            scene = self.backend.capture_scene()
            job = CaptureJob("obs", t, state, scene, cfg.camera_width, cfg.camera_height)
            self.cameras.submit(job)
            jobs += 1
            if cfg.lockstep_delay_s is not None and not cfg.realtime:
                self._lockstep_due = (t + cfg.lockstep_delay_s, self._obs_submitted)
            self._obs_submitted += 1
        if self.video is not None:
            if self._next_video_t is None:
                self._next_video_t = t
            if t >= self._next_video_t - 1e-9:
                self._next_video_t += 1.0 / cfg.video_fps
                scene = self.backend.capture_scene()
                job = CaptureJob("video", t, state, scene, cfg.video_width, cfg.video_height)
                self.cameras.submit(job)
                jobs += 1
        if jobs and not cfg.realtime:  # unpaced: every frame, whatever the machine's speed
            self.cameras.wait_idle()

    def _maybe_wait_for_chunk(self, t: float) -> None:
        """Lockstep (``LoopConfig.lockstep_delay_s``): at the due robot time, wait for the
        chunk answering the last observation (the link numbers chunks by observation)."""
        due = self._lockstep_due
        if due is None or t < due[0] - 1e-9:
            return
        self._lockstep_due = None
        seq = due[1]
        if self.lockstep_last_seq is not None and seq > self.lockstep_last_seq:
            return
        deadline = time.monotonic() + self.config.lockstep_timeout_s
        while not self.buffer.wait_for_seq(seq, 0.05):
            if (self._stop is not None and self._stop.is_set()) or time.monotonic() > deadline:
                self.lockstep_timeouts += 1
                return

    @property
    def observations_produced(self) -> int:
        """Observations published so far."""
        return self.cameras.observations_produced

    @property
    def video_frames(self) -> int:
        """Video frames recorded so far."""
        return 0 if self.video is None else self.video.count

    @property
    def video_dropped(self) -> int:
        """Video frames not recorded (the worker was busy, or the capacity was reached)."""
        return self.cameras.video_dropped + (0 if self.video is None else self.video.dropped)

    def write_video(self, path: str | Path) -> Path:
        """Write the recorded frames (cameras side by side) as an MP4 (H.264) to ``path``.

        Raises:
            RuntimeError: if nothing was recorded (``video_fps`` = 0 or no tick ran).
        """
        self.cameras.wait_idle(timeout=5.0)
        if self.video is None or self.video.count == 0:
            raise RuntimeError("no video frames recorded (set LoopConfig.video_fps > 0)")
        return self.video.write(path, self.config.video_fps)

    def close(self) -> None:
        """Stop the camera worker's thread (the backend is the caller's to close)."""
        self.cameras.close()

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary of the run so far.

        Counts; timing percentiles over the last ``stats_window`` ticks [s] (``loop_period``,
        ``tick_compute`` = read state .. command sent, ``qp_solve``, ``render``); tracking
        error [m]; q at the first and the last tick [rad] and the tool positions there [m];
        per-joint extremes of measured q [rad] and of |qd| measured and commanded [rad/s].
        """

        def vec(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(x) for x in a]

        q0, q1 = self.initial_q, self.final_q
        out: dict[str, Any] = {
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "qp_failures": self.qp_failures,
            "qp_last_failure": self.qp_last_failure,
            "qp_relaxations": self.qp_relaxations,
            "qp_solves": self._qp.count,
            "max_tracking_error_m": self.max_tracking_error_m,
            "last_tracking_error_m": self.last_tracking_error_m,
            "observations_produced": self.observations_produced,
            "video_frames": self.video_frames,
            "video_dropped": self.video_dropped,
            "initial_q": vec(q0),
            "final_q": vec(q1),
            "initial_tool_position": None if q0 is None else vec(gen3.tool_pose(q0)[:3, 3]),
            "final_tool_position": None if q1 is None else vec(gen3.tool_pose(q1)[:3, 3]),
            "q_min_seen": vec(self.q_min_seen),
            "q_max_seen": vec(self.q_max_seen),
            "qd_max_abs_seen": vec(self.qd_max_abs_seen),
            "qd_cmd_max_abs": vec(self.qd_cmd_max_abs),
            **self.safety.stats(),
        }
        for name, ring in (
            ("loop_period", self._period),
            ("tick_compute", self._compute),
            ("qp_solve", self._qp),
            ("render", self.cameras.render_times),
        ):
            out.update(ring.percentiles(name))
        return out
