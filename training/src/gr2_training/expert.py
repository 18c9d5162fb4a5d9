"""Scripted expert: demonstrations of the sim tasks, executed through the real agent stack.

For a :class:`~gr2_wbc.tasks.TaskInstance` the expert plans Cartesian keyframes from the
sim's true block pose (above the block, down, close, lift / push sideways ...; the tool keeps
pointing down with its start orientation, turned about the vertical only to line the fingers
up with a block's faces for grasping) and joins them with min-jerk segments. The plan is
executed exactly as a policy's output would be: the control loop (:class:`ControlLoop`,
``realtime=False``, ``default_ik``, the safety layer with its watchdog) tracks a
:class:`TrajectoryBuffer` that receives, at every observation (every ``step_period_s`` of
robot time), a chunk of the plan starting at the observation's capture time.

What is recorded per step (observation): both camera views (``image_size`` square), the state
(tool position [m], quaternion wxyz, measured gripper closure; base frame), the joint
positions [rad] and the robot time [s]. After the episode, ``actions[t, j-1]`` is the tool pose
the arm actually reached ``j * waypoint_dt_s`` after step ``t`` (j = 1..k), interpolated from
the 200 Hz tick record (positions linearly, orientations by slerp), with the gripper the
expert commanded then (its target, before the safety layer's rate limit: the quantity a
policy outputs); ``action_valid`` is False past the end of the tick record. The loop runs
``k * waypoint_dt_s`` past the last step, so normally every waypoint is valid.

An episode ends ``settle_s`` after the task first succeeds (checked at every observation with
the task's own physical check) or at ``max_seconds``; it is a success only if the task
succeeded and the check still holds at the last step (a block that slipped out is a failure).
Each seed varies the expert a little (speeds, approach height, grasp and touch heights, small
offsets and pauses), so demonstrations of one task are not copies of each other.

Recovery demonstrations (``detour=KINDS``, DART/DAgger-style): the expert first takes the
tool somewhere it should not go (past the target, above another block, anywhere in the
workspace, or down onto another block; :mod:`gr2_training.detours`), then does the task from
there. The steps observed before the detour is over get no action labels (``action_valid``
False), so a model trained on them learns only the way back, from states and motion histories
that the plain demonstrations never show: a closed-loop policy that strays has seen its way
home.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import default_ik
from gr2_wbc.kinematics.rotations import matrix_to_quat, quat_to_matrix, rot_z, slerp
from gr2_wbc.loop import ControlLoop, LoopConfig, ObservationSample
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.sim import scene
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.tasks import (
    SUCCESS_SETTLE_S,
    TaskInstance,
    TaskMonitor,
    block_extents,
    sample_task,
)

from gr2_training.detours import Detour, detour_for

_HALF = scene.BLOCK_SIZE_M / 2
# The IK keeps the open fingers' lowest point 5 mm above the table (controller.py), i.e. the
# tool point >= ~0.027 m; grasping and pushing aim a little above that.
_LOW_Z_RANGE_M = (0.030, 0.036)


@dataclass(frozen=True)
class EpisodeSpec:
    """The I/O contract the recorded episode must meet (the served model's).

    Defaults come from :class:`gr2_policy.model.config.GR2Config` (``gr2-tiny``) and the
    agent's :class:`LoopConfig`; :func:`EpisodeSpec.from_model_config` reads them.
    """

    views: tuple[str, ...] = ("head", "wrist")
    image_size: int = 64
    step_period_s: float = 0.2
    action_horizon: int = 10
    waypoint_dt_s: float = 0.1
    rate_hz: float = 200.0

    @classmethod
    def from_model_config(cls, preset: str = "gr2-tiny") -> EpisodeSpec:
        """Views, image size, horizon and waypoint spacing of the model ``preset``; the
        step period and rate of the agent's loop defaults."""
        from gr2_policy.model.config import GR2Config

        cfg = GR2Config.from_preset(preset)
        loop = LoopConfig()
        return cls(
            views=tuple(cfg.views),
            image_size=cfg.image_size,
            step_period_s=loop.observation_period_s,
            action_horizon=cfg.action_horizon,
            waypoint_dt_s=cfg.waypoint_dt_s,
            rate_hz=loop.rate_hz,
        )


@dataclass(frozen=True)
class Keyframe:
    """A pose the plan reaches ``duration_s`` after the previous keyframe.

    Attributes:
        duration_s: time of the min-jerk segment from the previous keyframe [s].
        position: tool position [m], base frame, shape (3,).
        yaw: turn of the tool about base z relative to its start orientation [rad].
        gripper: gripper target over the segment leading here (0 open .. 1 closed).
    """

    duration_s: float
    position: np.ndarray
    yaw: float
    gripper: float


class CartesianPlan:
    """Min-jerk segments through keyframes, starting at rest at the start pose at ``t0``.

    Args:
        t0: robot time of the start [s].
        start_position: tool position at the start [m] (3,).
        start_quat_wxyz: tool orientation at the start (4,); every pose of the plan is this
            orientation turned about base z by the keyframes' ``yaw``.
        keyframes: the poses to reach, in order.
    """

    def __init__(
        self,
        t0: float,
        start_position: np.ndarray,
        start_quat_wxyz: np.ndarray,
        keyframes: list[Keyframe],
    ) -> None:
        self.t0 = float(t0)
        self.start_rotation = quat_to_matrix(np.asarray(start_quat_wxyz, float))
        first = Keyframe(0.0, np.asarray(start_position, float), 0.0, 0.0)
        self.keyframes = [first, *keyframes]
        self.times = self.t0 + np.cumsum([k.duration_s for k in self.keyframes])

    @property
    def end_time_s(self) -> float:
        """Robot time the last keyframe is reached [s]."""
        return float(self.times[-1])

    def _segment(self, t: float) -> tuple[int, float]:
        """Index ``i`` of the keyframe being approached and the min-jerk phase 0..1."""
        i = int(np.searchsorted(self.times, t, side="left"))
        if i == 0:
            return 0, 1.0
        if i >= len(self.times):
            return len(self.times) - 1, 1.0
        tau = (t - self.times[i - 1]) / (self.times[i] - self.times[i - 1])
        tau = min(max(tau, 0.0), 1.0)
        return i, tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)

    def sample(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plan at robot times (n,): positions (n, 3) [m], quaternions (n, 4), grippers (n,)."""
        times = np.asarray(times, float)
        n = times.shape[0]
        pos, quats, grip = np.zeros((n, 3)), np.zeros((n, 4)), np.zeros(n)
        for row, t in enumerate(times):
            i, s = self._segment(float(t))
            a, b = self.keyframes[max(i - 1, 0)], self.keyframes[i]
            pos[row] = a.position + s * (b.position - a.position)
            yaw = a.yaw + s * (b.yaw - a.yaw)
            quats[row] = matrix_to_quat(rot_z(yaw) @ self.start_rotation)
            grip[row] = b.gripper if i > 0 else a.gripper
        return pos, quats, grip

    def gripper(self, times: np.ndarray) -> np.ndarray:
        """The gripper target at robot times (n,)."""
        return self.sample(times)[2]


@dataclass(frozen=True)
class ExpertStyle:
    """Per-episode variation of the expert (drawn from the seed by :meth:`draw`).

    Attributes:
        speed: average Cartesian speed of a move [m/s] (min-jerk peaks at 1.875 x this).
        approach_height: height of the approach point above the block's top [m].
        low_z: tool height for grasping and pushing [m].
        touch_clearance: tool height above the block's top when touching [m].
        offset: horizontal aim offset from the block's centre [m] (2,).
        pause: extra hold before going down [s].
        close_s: time given to the gripper to close [s].
        lift_z: tool height after lifting [m].
        push_past: how far past the block's start the tool's push ends [m] (from the
            block centre, along the push direction).
    """

    speed: float = 0.1
    approach_height: float = 0.08
    low_z: float = 0.032
    touch_clearance: float = 0.01
    offset: tuple[float, float] = (0.0, 0.0)
    pause: float = 0.1
    close_s: float = 0.6
    lift_z: float = 0.15
    push_past: float = 0.085

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ExpertStyle:
        return cls(
            speed=float(rng.uniform(0.08, 0.12)),
            approach_height=float(rng.uniform(0.05, 0.10)),
            low_z=float(rng.uniform(*_LOW_Z_RANGE_M)),
            touch_clearance=float(rng.uniform(0.004, 0.012)),
            offset=(float(rng.uniform(-0.004, 0.004)), float(rng.uniform(-0.004, 0.004))),
            pause=float(rng.uniform(0.0, 0.3)),
            close_s=float(rng.uniform(0.5, 0.7)),
            lift_z=float(rng.uniform(0.12, 0.18)),
            push_past=float(rng.uniform(0.075, 0.095)),
        )


def _move_time(a: np.ndarray, b: np.ndarray, speed: float, minimum: float = 0.4) -> float:
    return max(float(np.linalg.norm(np.asarray(b) - np.asarray(a))) / speed, minimum)


def _block_yaw(pose: np.ndarray) -> float:
    return math.atan2(pose[1, 0], pose[0, 0])


def grasp_yaw(block_pose: np.ndarray, start_rotation: np.ndarray) -> float:
    """Turn about base z [rad], within +-pi/4, that lines the finger axis (tool y) up with
    a face normal of the block (faces repeat every pi/2)."""
    finger = math.atan2(start_rotation[1, 1], start_rotation[0, 1])
    delta = _block_yaw(block_pose) - finger
    return (delta + math.pi / 4) % (math.pi / 2) - math.pi / 4


def plan_episode(
    instance: TaskInstance, sim: MujocoGen3, style: ExpertStyle, detour: Detour | None = None
) -> CartesianPlan:
    """The expert's plan for ``instance`` in ``sim`` now (from the true block pose); with a
    ``detour``, its first keyframes are the detour's and the task starts from there."""
    state = sim.read_state()
    start = state.ee_position
    pose = sim.block_pose(instance.colour)
    block = pose[:3, 3]
    _, top = block_extents(pose)
    aim = block[:2] + np.asarray(style.offset)
    speed = style.speed
    keys: list[Keyframe] = []

    def go(position: np.ndarray, yaw: float, gripper: float, minimum: float = 0.4) -> None:
        previous = keys[-1].position if keys else start
        duration = _move_time(previous, position, speed, minimum)
        keys.append(Keyframe(duration, np.asarray(position, float), yaw, gripper))

    def hold(duration: float, gripper: float) -> None:
        last = keys[-1]
        keys.append(Keyframe(duration, last.position, last.yaw, gripper))

    if detour is not None:
        # Gripper as the task starts (push goes with it closed); yaw 0: pick turns on the way.
        gripper = 1.0 if instance.name == "push" else 0.0
        for point in detour.waypoints:
            duration = _move_time(keys[-1].position if keys else start, point, detour.speed)
            keys.append(Keyframe(duration, point, 0.0, gripper))
        if detour.hold_s > 0.0:
            hold(detour.hold_s, gripper)

    if instance.name == "touch":
        above = np.array([aim[0], aim[1], top[2] + style.approach_height])
        go(above, 0.0, 0.0)
        hold(style.pause + 0.1, 0.0)
        go(np.array([aim[0], aim[1], top[2] + style.touch_clearance]), 0.0, 0.0)
        hold(1.5, 0.0)
    elif instance.name == "pick":
        yaw = grasp_yaw(pose, quat_to_matrix(state.ee_quat_wxyz))
        above = np.array([aim[0], aim[1], scene.BLOCK_TOP_Z_M + style.approach_height])
        go(above, yaw, 0.0, minimum=0.8)
        hold(style.pause + 0.1, 0.0)
        go(np.array([aim[0], aim[1], style.low_z]), yaw, 0.0)
        hold(style.close_s, 1.0)
        go(np.array([aim[0], aim[1], style.lift_z]), yaw, 1.0)
        hold(1.5, 1.0)
    elif instance.name == "push":
        d = float(instance.params["direction_y"])
        behind = block[1] - d * 0.075
        above = np.array([aim[0], behind, scene.BLOCK_TOP_Z_M + style.approach_height])
        go(above, 0.0, 1.0)
        hold(style.pause + 0.1, 1.0)
        go(np.array([aim[0], behind, style.low_z]), 0.0, 1.0)
        end = np.array([aim[0], block[1] + d * style.push_past, style.low_z])
        go(end, 0.0, 1.0)
        hold(0.3, 1.0)
        go(end + np.array([0.0, -d * 0.02, 0.08]), 0.0, 1.0)
        hold(1.5, 1.0)
    else:
        raise ValueError(f"no expert for task {instance.name!r}")
    return CartesianPlan(state.time_s, start, state.ee_quat_wxyz, keys)


def _interpolate_poses(
    t: np.ndarray, pos: np.ndarray, quats: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tool poses of a tick record (t (N,), pos (N, 3), quats (N, 4)) at ``query`` times (n,)
    inside [t[0], t[-1]]: positions linearly, orientations by slerp."""
    idx = np.clip(np.searchsorted(t, query, side="right") - 1, 0, t.shape[0] - 2)
    span = t[idx + 1] - t[idx]
    a = np.clip((query - t[idx]) / span, 0.0, 1.0)
    out_pos = pos[idx] * (1.0 - a)[:, None] + pos[idx + 1] * a[:, None]
    out_quat = np.array(
        [slerp(quats[i], quats[i + 1], float(s)) for i, s in zip(idx, a, strict=True)]
    )
    return out_pos, out_quat


def action_targets(
    record: dict[str, np.ndarray],
    step_times: np.ndarray,
    plan: CartesianPlan,
    horizon: int,
    waypoint_dt_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``actions`` (T, k, 8) and ``action_valid`` (T, k) for steps at ``step_times`` (T,):
    the recorded tool pose ``j * waypoint_dt_s`` (j = 1..k) after each step and the expert's
    gripper target then; invalid (and filled with the last pose) past the record's end."""
    t, pos, quats = record["t"], record["ee_pos"], record["ee_quat_wxyz"]
    query = step_times[:, None] + waypoint_dt_s * np.arange(1, horizon + 1)[None, :]
    valid = query <= t[-1] + 1e-9
    flat = np.minimum(query.ravel(), t[-1])
    p, q = _interpolate_poses(t, pos, quats, flat)
    grip = plan.gripper(flat)
    actions = np.concatenate([p, q, grip[:, None]], axis=1).reshape(*query.shape, 8)
    return actions, valid


@dataclass
class ExpertEpisode:
    """One demonstration: the arrays of :meth:`gr2_training.dataset.DatasetWriter.add`
    (``as_dataset_kwargs``) and how it went."""

    instance: TaskInstance
    success: bool
    images: dict[str, np.ndarray]
    states: np.ndarray
    actions: np.ndarray
    action_valid: np.ndarray
    times: np.ndarray
    joint_positions: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.states.shape[0])

    def as_dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DatasetWriter.add``."""
        return {
            "instruction": self.instance.instruction,
            "task": self.instance.name,
            "seed": self.instance.seed,
            "success": self.success,
            "images": self.images,
            "states": self.states,
            "actions": self.actions,
            "action_valid": self.action_valid,
            "times": self.times,
            "joint_positions": self.joint_positions,
            "extra": self.extra,
        }


def _state_vector(obs: ObservationSample) -> np.ndarray:
    s = obs.state
    return np.concatenate([s.ee_position, s.ee_quat_wxyz, [s.gripper]])


def style_for(instance: TaskInstance) -> ExpertStyle:
    """The expert's variation for this instance (deterministic per task and seed)."""
    salt = zlib.crc32(f"expert/{instance.name}".encode())
    return ExpertStyle.draw(np.random.default_rng([instance.seed, salt]))


def run_expert(
    instance: TaskInstance,
    spec: EpisodeSpec | None = None,
    *,
    max_seconds: float = 15.0,
    settle_s: float = SUCCESS_SETTLE_S,
    style: ExpertStyle | None = None,
    detour: tuple[str, ...] = (),
) -> ExpertEpisode:
    """Demonstrate ``instance`` in a fresh ``MujocoGen3(instance.seed)`` through the agent's
    control loop; see the module docstring for what is recorded. ``detour``: the kinds of
    detour to draw from (:data:`gr2_training.detours.DETOUR_WEIGHTS`); empty for a plain
    demonstration."""
    spec = spec or EpisodeSpec()
    style = style or style_for(instance)
    wall0 = time.perf_counter()
    sim = MujocoGen3(seed=instance.seed)
    try:
        way = detour_for(instance, sim, tuple(detour)) if detour else None
        return _run(instance, sim, spec, style, way, max_seconds, settle_s, wall0)
    finally:
        sim.close()


def _run(
    instance: TaskInstance,
    sim: MujocoGen3,
    spec: EpisodeSpec,
    style: ExpertStyle,
    detour: Detour | None,
    max_seconds: float,
    settle_s: float,
    wall0: float,
) -> ExpertEpisode:
    period = spec.step_period_s
    plan = plan_episode(instance, sim, style, detour)
    config = LoopConfig(
        rate_hz=spec.rate_hz,
        realtime=False,
        observation_period_s=period,
        camera_width=spec.image_size,
        camera_height=spec.image_size,
    )
    buffer = TrajectoryBuffer()
    recorder = TickRecorder(spec.rate_hz)
    loop = ControlLoop(sim, buffer, default_ik(spec.rate_hz), config, recorder=recorder)
    monitor = TaskMonitor(sim, instance, period, settle_s=settle_s)
    stop = threading.Event()
    chunk_offsets = np.arange(0.0, 1.0 + 1e-9, 0.05)  # 1 s of plan, 50 ms apart
    observations: list[ObservationSample] = []
    t0 = sim.read_state().time_s
    seq = 0

    def feed(t: float) -> None:
        nonlocal seq
        times = t + chunk_offsets
        buffer.add_chunk(seq, times, *plan.sample(times))
        seq += 1
        # ControlLoop.run starts with a full gc.collect() (then freezes the heap and
        # unfreezes it on return): with torch imported that walks ~200k objects, 45 ms per
        # 0.2 s segment, half the episode's time. Freezing first leaves it only the objects
        # made since; cyclic garbage waits for the end of the episode.
        gc.freeze()

    try:
        monitor.check(t0)
        while True:
            t = sim.read_state().time_s
            if monitor.success and t > monitor.success_time_s + settle_s + 1e-9:
                break
            if t - t0 >= max_seconds - 1e-9:
                break
            feed(t)
            loop.run(stop, max_duration_s=period)
            observations.append(loop.observations.get_nowait())
            monitor.check(sim.read_state().time_s)
        final = monitor.check()
        # Run on so the last steps' action waypoints exist (the arm keeps following the plan).
        tail = spec.action_horizon * spec.waypoint_dt_s
        while sim.read_state().time_s < observations[-1].capture_time_s + tail + 1e-9:
            feed(sim.read_state().time_s)
            loop.run(stop, max_duration_s=period)
        stats = loop.stats()
    finally:
        loop.close()
    record = recorder.arrays()
    times = np.array([o.capture_time_s for o in observations])
    actions, valid = action_targets(record, times, plan, spec.action_horizon, spec.waypoint_dt_s)
    if detour is not None:  # no labels until the detour is over: only the way back
        detour_end = plan.times[len(detour.waypoints) + (detour.hold_s > 0.0)]
        valid[times < detour_end - 1e-9] = False
    success = monitor.success and final.success
    extra = {
        "expert": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(style).items()},
        "task": monitor.summary(),
        "success_time_s": monitor.summary()["success_time_s"],
        "watchdog_trips": stats["watchdog_trips"],
        "qp_failures": stats["qp_failures"],
        "max_tracking_error_m": stats["max_tracking_error_m"],
        "wall_s": time.perf_counter() - wall0,
    }
    if detour is not None:
        extra["detour"] = {
            "kind": detour.kind,
            "position": detour.position.tolist(),
            "waypoints": detour.waypoints.tolist(),
            "speed": detour.speed,
            "hold_s": detour.hold_s,
            "end_s": float(detour_end - plan.t0),
        }
    return ExpertEpisode(
        instance=instance,
        success=bool(success),
        images={v: np.stack([o.images[v] for o in observations]) for v in spec.views},
        states=np.stack([_state_vector(o) for o in observations]),
        actions=actions,
        action_valid=valid,
        times=times,
        joint_positions=np.stack([o.state.q for o in observations]),
        extra=extra,
    )


def demonstrate(task: str, seed: int, spec: EpisodeSpec | None = None) -> ExpertEpisode:
    """``run_expert(sample_task(task, seed), spec)``."""
    return run_expert(sample_task(task, seed), spec)
