"""Detours for recovery demonstrations: where the scripted expert goes wrong first.

A detour is drawn per episode from the sim's true block poses (see
:mod:`gr2_training.expert`, which plans it ahead of the task and leaves the steps before it
ends unlabelled). The kinds mimic how a closed-loop policy strays: it overshoots the target,
heads for another block (partway or all the way), comes down on one, or wanders off.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from gr2_wbc.robots.sim import scene

if TYPE_CHECKING:
    from gr2_wbc.robots.sim.backend import MujocoGen3
    from gr2_wbc.tasks import TaskInstance


@dataclass(frozen=True)
class Detour:
    """The wrong way a recovery demonstration goes first (see the module docstring).

    Attributes:
        kind: one of :data:`DETOUR_WEIGHTS`: ``overshoot`` (past the target, along the line
            from the start), ``other_block`` (above a block that is not the target),
            ``toward_block`` (part of the way from the start to above another block, where a
            policy that took the instruction for another colour turns back), ``anywhere`` (in
            the workspace), ``wrong_block`` (down onto another block, as if touching it, and a
            pause there).
        waypoints: where the tool goes, in order [m], base frame (n, 3).
        speed: average speed of the detour moves [m/s].
        hold_s: pause at the last waypoint [s].
    """

    kind: str
    waypoints: np.ndarray
    speed: float
    hold_s: float = 0.0

    @property
    def position(self) -> np.ndarray:
        """Where the detour ends [m] (3,)."""
        return self.waypoints[-1]


DETOUR_WEIGHTS = {
    "overshoot": 0.5,
    "other_block": 0.25,
    "anywhere": 0.25,
    "wrong_block": 0.25,
    "toward_block": 0.25,
}
"""Detour kinds and their relative frequency when several are allowed."""
DETOUR_KINDS = tuple(DETOUR_WEIGHTS)
DEFAULT_DETOURS = ("overshoot", "other_block", "anywhere")
# Detour points stay inside the agent's workspace box (controller.WORKSPACE_*), 2 cm in, where
# a straying policy ends up, and high enough above the blocks not to touch or push any (but
# wrong_block, which comes down on a block from above it).
_DETOUR_X_M = (0.12, 0.88)
_DETOUR_Y_M = (-0.58, 0.58)
_DETOUR_CLEARANCE_M = (0.05, 0.16)  # above a block's top face
_TOWARD_FRACTION = (0.3, 0.8)  # how far toward_block goes of the way to the other block


def check_detour_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` when it names at least one kind and only known ones, else ``ValueError``."""
    unknown = [k for k in kinds if k not in DETOUR_WEIGHTS]
    if not kinds or unknown:
        raise ValueError(f"unknown detour kind(s) {unknown}; known: {', '.join(DETOUR_KINDS)}")
    return kinds


def _inside_workspace(xy: np.ndarray) -> np.ndarray:
    """``xy`` [m] clipped to the box detour points stay in."""
    return np.clip(xy, [_DETOUR_X_M[0], _DETOUR_Y_M[0]], [_DETOUR_X_M[1], _DETOUR_Y_M[1]])


def draw_detour(
    instance: TaskInstance,
    sim: MujocoGen3,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = DEFAULT_DETOURS,
) -> Detour:
    """A detour for ``instance`` in ``sim`` now, of one of ``kinds`` (drawn by
    :data:`DETOUR_WEIGHTS`)."""
    check_detour_kinds(kinds)
    start = sim.read_state().ee_position
    target = sim.block_pose(instance.colour)[:3, 3]
    weights = np.array([DETOUR_WEIGHTS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    others = [c for c in scene.BLOCK_COLOURS if c != instance.colour]
    if kind == "overshoot":
        heading = target[:2] - start[:2]
        norm = float(np.linalg.norm(heading))
        u = heading / norm if norm > 1e-6 else np.array([1.0, 0.0])
        side = np.array([-u[1], u[0]])
        xy = target[:2] + u * rng.uniform(0.06, 0.40) + side * rng.uniform(-0.06, 0.06)
    elif kind in ("other_block", "wrong_block", "toward_block"):
        other = sim.block_pose(others[int(rng.integers(len(others)))])[:3, 3]
        xy = other[:2] + rng.uniform(-0.02, 0.02, size=2)
    else:
        xy = np.array([rng.uniform(*_DETOUR_X_M), rng.uniform(*_DETOUR_Y_M)])
    xy = _inside_workspace(xy)
    z = scene.BLOCK_TOP_Z_M + rng.uniform(*_DETOUR_CLEARANCE_M)
    if kind == "toward_block":  # stop part of the way there, on the way down from the start
        fraction = rng.uniform(*_TOWARD_FRACTION)
        xy = _inside_workspace(start[:2] + fraction * (xy - start[:2]))
        z = max(z, start[2] + fraction * (z - start[2]))
    speed = float(rng.uniform(0.10, 0.20))
    if kind != "wrong_block":
        return Detour(kind, np.array([[xy[0], xy[1], z]]), speed)
    # Come down on the other block from above it, as a touch would (within 1 cm of the point
    # above, itself within 2 cm of the block's centre).
    low = np.array(
        [*(xy + rng.uniform(-0.01, 0.01, size=2)), scene.BLOCK_TOP_Z_M + rng.uniform(0.004, 0.012)]
    )
    waypoints = np.array([[xy[0], xy[1], z], low])
    return Detour(kind, waypoints, speed, hold_s=float(rng.uniform(0.2, 1.0)))


def detour_for(
    instance: TaskInstance, sim: MujocoGen3, kinds: tuple[str, ...] = DEFAULT_DETOURS
) -> Detour:
    """The detour of ``instance`` (deterministic per task, seed and ``kinds``)."""
    salt = zlib.crc32(f"detour/{instance.name}/{instance.colour}".encode())
    return draw_detour(instance, sim, np.random.default_rng([instance.seed, salt]), kinds)
