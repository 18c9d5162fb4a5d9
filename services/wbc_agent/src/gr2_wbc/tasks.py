"""Language-conditioned tasks in the simulated Gen3 scene, with physical success checks.

A task turns a seed into a :class:`TaskInstance` (the instruction, the target block and any
parameter such as the side to push to) and judges the sim with :meth:`Task.check`. The scene
of a seed is :class:`~gr2_wbc.robots.sim.backend.MujocoGen3` ``(seed)``: the block layout
comes from :func:`gr2_wbc.robots.sim.scene.block_layout` ``(seed)``; the task picks its target
(and side) from the same seed with a generator salted by the task name, so one seed gives the
same scene to every task but not the same target.

Tasks (``TASKS``):

========= ================================== ==================================================
name      instruction                        success (checked on the sim's true state)
========= ================================== ==================================================
touch     ``touch the {colour} block``       a robot geom is in contact with the target block,
                                             or the tool centre point is within
                                             ``TOUCH_RADIUS_M`` of the centre of the block's
                                             top face (and above the table)
pick      ``pick up the {colour} block``     the block's lowest point is ``PICK_LIFT_M`` or
                                             more above the table and both finger pads touch
                                             it (the gripper holds it, it does not lie on
                                             something)
push      ``push the {colour} block to the   the block moved ``PUSH_DISTANCE_M`` or more along
          {side}``                           base y towards ``side`` since the start and still
                                             rests on the table
========= ================================== ==================================================

Sides are the robot's: the base frame has x forward and z up, so ``left`` is +y and ``right``
is -y (from the head camera, which faces the robot, they appear mirrored). A push instance
only names a side the block can be pushed to without running into another block (see
:class:`PushTask`).

Checking during an episode: :class:`TaskMonitor` checks at every observation time and keeps
the first success; :class:`TaskCheckedRobot` runs it in the control loop's thread (after each
physics step), which is how ``gr2-wbc-agent run --task`` checks a policy's episode.

Seeds: training data uses seeds below ``EVAL_SEED_START`` (``gr2-datagen`` refuses others);
evaluation uses seeds from ``EVAL_SEED_START`` on (:func:`eval_seeds`), so an evaluated scene
and target are never ones the model was trained on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gr2_wbc.robots.base import ArmState
from gr2_wbc.robots.sim import scene

EVAL_SEED_START: int = 1_000_000
"""First held-out evaluation seed; training seeds are 0 .. EVAL_SEED_START - 1."""

TOUCH_RADIUS_M: float = 0.025
"""Touch: the tool point within this distance of the top face's centre [m]."""
PICK_LIFT_M: float = 0.05
"""Pick: the block's lowest point at least this far above the table [m]."""
PUSH_DISTANCE_M: float = 0.08
"""Push: the block's centre moved at least this far along base y toward the side [m]."""
ON_TABLE_TOLERANCE_M: float = 0.01
"""Push: a block rests on the table when its lowest point is within this of the top [m]."""
SUCCESS_SETTLE_S: float = 0.5
"""Robot time an episode goes on after success before it ends (stop-on-success) [s]."""

SIDES: dict[str, float] = {"left": 1.0, "right": -1.0}
"""Side name -> sign of base y (the robot's left is +y)."""
WORLD_GEOMS: frozenset[str] = frozenset({"floor", "table", "table_base"})
"""Geoms of the static world (anything else touching a block is the robot or a block)."""
PAD_GEOMS: tuple[str, str] = tuple(f"{n}_pad" for n in scene.FINGER_JOINT_NAMES)  # type: ignore[assignment]
"""The two finger pads (what holds a grasped block)."""
_TABLE_HALF_EXTENT_M = (0.65, 0.7)  # scene's table top: centre (0.3, 0), half sizes x, y
_TABLE_CENTRE_X_M = 0.3


class TaskError(ValueError):
    """An unknown task, a bad seed, or an instruction that does not match the task."""


class TaskScene(Protocol):
    """What a success check reads from the sim (:class:`MujocoGen3` provides it)."""

    def read_state(self) -> ArmState: ...

    def block_pose(self, colour: str) -> np.ndarray: ...

    def block_contacts(self, colour: str) -> tuple[str, ...]: ...

    def block_positions(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TaskInstance:
    """One task to do in the scene of ``seed``.

    Attributes:
        name: the task (a key of ``TASKS``).
        seed: the scene seed (block layout) and the seed the target was drawn with.
        instruction: the language instruction given to the policy.
        colour: the target block's colour (a key of ``scene.BLOCK_COLOURS``).
        params: task parameters, JSON-ready (push: ``side`` and ``direction_y`` = +-1).
    """

    name: str
    seed: int
    instruction: str
    colour: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "instruction": self.instruction,
            "colour": self.colour,
            "params": dict(self.params),
        }


@dataclass(frozen=True)
class TaskOutcome:
    """The verdict of one check: ``success`` and the numbers it was decided on
    (``details``: JSON-ready floats [m], bools and names)."""

    success: bool
    details: dict[str, Any]


def _rng(name: str, seed: int) -> np.random.Generator:
    """The task's own generator for ``seed`` (salted by the task name, stable across runs)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def block_extents(pose: np.ndarray) -> tuple[float, np.ndarray]:
    """Lowest z of a block [m] and the centre of its top face [m] (3,), from its pose (4, 4):
    the top face is the one whose outward normal points most upward."""
    rot, centre = pose[:3, :3], pose[:3, 3]
    half = scene.BLOCK_SIZE_M / 2
    bottom = float(centre[2] - half * np.abs(rot[2]).sum())
    axis = int(np.argmax(np.abs(rot[2])))  # the block axis closest to vertical
    up = rot[:, axis] * math.copysign(1.0, rot[2, axis])
    return bottom, centre + half * up


def on_table(pose: np.ndarray) -> bool:
    """The block rests on the table: lowest point within ``ON_TABLE_TOLERANCE_M`` of the top
    and its centre over the table top."""
    bottom, _ = block_extents(pose)
    x, y = pose[0, 3] - _TABLE_CENTRE_X_M, pose[1, 3]
    over = abs(x) <= _TABLE_HALF_EXTENT_M[0] and abs(y) <= _TABLE_HALF_EXTENT_M[1]
    return bool(over and abs(bottom - scene.TABLE_TOP_Z_M) <= ON_TABLE_TOLERANCE_M)


def robot_contacts(contacts: Iterable[str]) -> list[str]:
    """The robot's geoms among a block's contacts (not the world, not other blocks)."""
    return [c for c in contacts if c not in WORLD_GEOMS and not c.startswith("block_")]


class Task:
    """Base class: a name, an instruction template and a success check."""

    name: str = ""
    template: str = ""

    def instruction(self, colour: str, **params: Any) -> str:
        return self.template.format(colour=colour, **params)

    def sample(self, seed: int) -> TaskInstance:
        """The instance for ``seed``: a target colour drawn uniformly (deterministic)."""
        seed = check_seed(seed)
        colour = str(_rng(self.name, seed).choice(list(scene.BLOCK_COLOURS)))
        return TaskInstance(self.name, seed, self.instruction(colour), colour)

    def instances(self, seed: int) -> list[TaskInstance]:
        """Every instance the scene of ``seed`` allows: one per block as the target, the
        drawn one (``sample``) first. Demonstrating them all gives the same first frame
        with different instructions, so only the instruction tells the episodes apart."""
        drawn = self.sample(seed)
        others = [c for c in scene.BLOCK_COLOURS if c != drawn.colour]
        return [drawn] + [
            TaskInstance(self.name, drawn.seed, self.instruction(c), c) for c in others
        ]

    def check(
        self, sim: TaskScene, instance: TaskInstance, start_blocks: dict[str, np.ndarray]
    ) -> TaskOutcome:
        """Judge the sim now; ``start_blocks`` = ``sim.block_positions()`` at the start."""
        raise NotImplementedError


class TouchTask(Task):
    name = "touch"
    template = "touch the {colour} block"

    def check(
        self, sim: TaskScene, instance: TaskInstance, start_blocks: dict[str, np.ndarray]
    ) -> TaskOutcome:
        pose = sim.block_pose(instance.colour)
        _, top = block_extents(pose)
        tool = sim.read_state().ee_position
        distance = float(np.linalg.norm(tool - top))
        touching = robot_contacts(sim.block_contacts(instance.colour))
        above_table = bool(tool[2] > scene.TABLE_TOP_Z_M)
        near = distance <= TOUCH_RADIUS_M and above_table
        return TaskOutcome(
            bool(touching) or near,
            {
                "tool_to_top_face_m": distance,
                "tool_height_m": float(tool[2] - scene.TABLE_TOP_Z_M),
                "robot_contacts": touching,
                "near": near,
            },
        )


class PickTask(Task):
    name = "pick"
    template = "pick up the {colour} block"

    def check(
        self, sim: TaskScene, instance: TaskInstance, start_blocks: dict[str, np.ndarray]
    ) -> TaskOutcome:
        pose = sim.block_pose(instance.colour)
        bottom, _ = block_extents(pose)
        lift = bottom - scene.TABLE_TOP_Z_M
        contacts = sim.block_contacts(instance.colour)
        held = all(p in contacts for p in PAD_GEOMS)
        gripper = sim.read_state().gripper
        return TaskOutcome(
            bool(lift >= PICK_LIFT_M and held),
            {
                "block_bottom_height_m": float(lift),
                "pads_in_contact": held,
                "gripper": float(gripper),
                "robot_contacts": robot_contacts(contacts),
            },
        )


class PushTask(Task):
    """Push the block sideways. The side is drawn per seed among those whose path is clear:
    the block's corridor (``PUSH_PATH_M`` long, ``PUSH_CORRIDOR_M`` wide) and the spot where
    the tool comes down (``PUSH_APPROACH_M`` on the other side) must be free of other blocks;
    if neither side of the drawn colour is clear, the next colour is tried."""

    name = "push"
    template = "push the {colour} block to the {side}"
    PUSH_PATH_M = 0.15  # how far past its start the block's path must be clear
    PUSH_APPROACH_M = 0.08  # where the tool comes down, before the block
    PUSH_CORRIDOR_M = 0.07  # half width of the cleared band (block + a neighbour's diagonal)

    def sample(self, seed: int) -> TaskInstance:
        seed = check_seed(seed)
        rng = _rng(self.name, seed)
        layout = scene.block_layout(seed)
        colours = list(scene.BLOCK_COLOURS)
        first = int(rng.integers(len(colours)))
        sides = list(SIDES) if rng.random() < 0.5 else list(reversed(SIDES))
        for i in range(len(colours)):
            colour = colours[(first + i) % len(colours)]
            for side in sides:
                if self.path_clear(layout, colour, SIDES[side]):
                    params = {"side": side, "direction_y": SIDES[side]}
                    return TaskInstance(
                        self.name, seed, self.instruction(colour, side=side), colour, params
                    )
        # No clear path anywhere (rare): keep the drawn target; the expert may fail it.
        colour, side = colours[first], sides[0]
        params = {"side": side, "direction_y": SIDES[side]}
        return TaskInstance(self.name, seed, self.instruction(colour, side=side), colour, params)

    def instances(self, seed: int) -> list[TaskInstance]:
        """The drawn instance first, then each other block with a clear side (tried in the
        drawn side order); blocks with no clear side are left out."""
        drawn = self.sample(seed)
        layout = scene.block_layout(drawn.seed)
        out = [drawn]
        first_side = drawn.params["side"]
        sides = [first_side] + [s for s in SIDES if s != first_side]
        for colour in scene.BLOCK_COLOURS:
            if colour == drawn.colour:
                continue
            side = next((s for s in sides if self.path_clear(layout, colour, SIDES[s])), None)
            if side is not None:
                params = {"side": side, "direction_y": SIDES[side]}
                text = self.instruction(colour, side=side)
                out.append(TaskInstance(self.name, drawn.seed, text, colour, params))
        return out

    def path_clear(
        self, layout: dict[str, tuple[float, float, float]], colour: str, direction: float
    ) -> bool:
        """No other block within the corridor swept from ``PUSH_APPROACH_M`` behind the
        block to ``PUSH_PATH_M`` past it (along ``direction`` in y)."""
        x, y, _ = layout[colour]
        # Behind: the closed fingers (half width 0.022) and a block's half diagonal (0.028)
        # around the approach point; ahead: a block's half diagonal past the path's end.
        behind = y - direction * (self.PUSH_APPROACH_M + 0.05)
        ahead = y + direction * (self.PUSH_PATH_M + 0.03)
        lo, hi = min(behind, ahead), max(behind, ahead)
        for other, (ox, oy, _) in layout.items():
            if other != colour and abs(ox - x) < self.PUSH_CORRIDOR_M and lo < oy < hi:
                return False
        return True

    def check(
        self, sim: TaskScene, instance: TaskInstance, start_blocks: dict[str, np.ndarray]
    ) -> TaskOutcome:
        pose = sim.block_pose(instance.colour)
        moved = pose[:3, 3] - np.asarray(start_blocks[instance.colour], dtype=float)
        direction = float(instance.params["direction_y"])
        along = float(moved[1] * direction)
        resting = on_table(pose)
        return TaskOutcome(
            bool(along >= PUSH_DISTANCE_M and resting),
            {
                "moved_along_side_m": along,
                "moved_x_m": float(moved[0]),
                "moved_z_m": float(moved[2]),
                "on_table": resting,
            },
        )


TASKS: dict[str, Task] = {t.name: t for t in (TouchTask(), PickTask(), PushTask())}
"""The task registry: name -> task."""


def check_seed(seed: int) -> int:
    """``seed`` as an int; raises :class:`TaskError` if negative."""
    seed = int(seed)
    if seed < 0:
        raise TaskError(f"seeds are >= 0, got {seed}")
    return seed


def is_eval_seed(seed: int) -> bool:
    """True for held-out evaluation seeds (>= ``EVAL_SEED_START``)."""
    return int(seed) >= EVAL_SEED_START


def eval_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` held-out evaluation seeds: ``EVAL_SEED_START + start`` onward."""
    return [EVAL_SEED_START + start + i for i in range(n)]


def get_task(name: str) -> Task:
    """The registered task ``name``; raises :class:`TaskError` naming the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def sample_task(name: str, seed: int) -> TaskInstance:
    """``get_task(name).sample(seed)``."""
    return get_task(name).sample(seed)


def check_task(
    sim: TaskScene, instance: TaskInstance, start_blocks: dict[str, np.ndarray]
) -> TaskOutcome:
    """Judge ``instance`` on the sim now (see the task table in the module docstring)."""
    return get_task(instance.name).check(sim, instance, start_blocks)


class TaskMonitor:
    """Checks a task on the sim at every observation time (robot time ``t0 + i * period_s``)
    and remembers when it first succeeded.

    Call :meth:`on_time` from the thread that steps the sim (the control loop's: see
    :class:`TaskCheckedRobot`), so a check never reads the physics while it is stepped. With
    ``on_settled``, the monitor calls it once, ``settle_s`` of robot time after the first
    success (e.g. to end the episode).

    Args:
        sim: the scene (its block positions now are the start positions).
        instance: the task to check.
        period_s: robot time between checks [s] (the observation period).
        settle_s: robot time from the first success to ``stop`` [s].
        on_settled: called once (in the caller's thread) when the settle after the first
            success is over; ``None``: nothing.
    """

    def __init__(
        self,
        sim: TaskScene,
        instance: TaskInstance,
        period_s: float,
        *,
        settle_s: float = SUCCESS_SETTLE_S,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        if period_s <= 0.0:
            raise ValueError("period_s must be > 0")
        self.sim = sim
        self.instance = instance
        self.task = get_task(instance.name)
        self.period_s = float(period_s)
        self.settle_s = float(settle_s)
        self.on_settled = on_settled
        self.settled = False
        self.start_blocks = sim.block_positions()
        self.start_time_s = float(sim.read_state().time_s)
        self._next_s = self.start_time_s
        self.checks = 0
        self.success_time_s: float | None = None
        self.first_success: TaskOutcome | None = None
        self.last: TaskOutcome | None = None

    @property
    def success(self) -> bool:
        """The task succeeded at some check."""
        return self.success_time_s is not None

    def check(self, time_s: float | None = None) -> TaskOutcome:
        """Check now (``time_s``: the robot time now, for the record)."""
        outcome = self.task.check(self.sim, self.instance, self.start_blocks)
        self.checks += 1
        self.last = outcome
        if outcome.success and self.success_time_s is None:
            t = float(self.sim.read_state().time_s) if time_s is None else float(time_s)
            self.success_time_s = t
            self.first_success = outcome
        return outcome

    def on_time(self, time_s: float) -> None:
        """The sim reached robot time ``time_s``: check if an observation time has come,
        and call ``on_settled`` once the settle after success is over."""
        if time_s >= self._next_s - 1e-9:
            self.check(time_s)
            while self._next_s <= time_s + 1e-9:
                self._next_s += self.period_s
        if (
            not self.settled
            and self.success_time_s is not None
            and time_s >= self.success_time_s + self.settle_s - 1e-9
        ):
            self.settled = True
            if self.on_settled is not None:
                self.on_settled()

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the instance, ``success``, ``success_time_s`` (robot time since the
        start [s], None if never), the details of the first successful check (else of the
        last one), and the last check's verdict and details as ``final``."""
        shown = self.first_success or self.last
        t = self.success_time_s
        return {
            "name": self.instance.name,
            "seed": self.instance.seed,
            "instruction": self.instance.instruction,
            "colour": self.instance.colour,
            "params": dict(self.instance.params),
            "success": self.success,
            "success_time_s": None if t is None else round(t - self.start_time_s, 6),
            "checks": self.checks,
            "details": None if shown is None else shown.details,
            "final": None
            if self.last is None
            else {"success": self.last.success, "details": self.last.details},
        }


class TaskCheckedRobot:
    """A robot backend that runs a :class:`TaskMonitor` after every :meth:`advance`, in the
    control loop's thread; everything else is the wrapped backend's."""

    def __init__(self, robot: Any, monitor: TaskMonitor) -> None:
        self._robot = robot
        self.monitor = monitor
        self._time_s = float(robot.read_state().time_s)

    def advance(self, dt: float) -> None:
        self._robot.advance(dt)
        self._time_s += dt
        self.monitor.on_time(self._time_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._robot, name)
