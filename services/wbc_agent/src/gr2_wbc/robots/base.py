"""The robot backend interface shared by the simulated and the real (Kortex) arm.

Frames and units: joint values in [rad] and [rad/s] in the order joint_1..joint_7; Cartesian
values in the robot base frame (z up, x forward) in [m]; quaternions scalar-first (w, x, y, z);
gripper 0 = fully open .. 1 = fully closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class RobotError(Exception):
    """A backend fault: the robot cannot be read or commanded (connection lost, fault state)."""


@dataclass
class ArmState:
    """A snapshot of the arm, taken at ``time_s`` on the robot's clock.

    Attributes:
        time_s: robot clock [s] (simulation time for the sim); only differences are meaningful.
        q: joint positions [rad], shape (7,).
        qd: joint velocities [rad/s], shape (7,).
        gripper: gripper closure, 0 open .. 1 closed (measured, so a held object stops it short).
        ee_position: tool centre point position in the base frame [m], shape (3,).
        ee_quat_wxyz: tool orientation in the base frame, unit quaternion (w, x, y, z), (4,).
    """

    time_s: float
    q: np.ndarray
    qd: np.ndarray
    gripper: float
    ee_position: np.ndarray
    ee_quat_wxyz: np.ndarray


@runtime_checkable
class RobotBackend(Protocol):
    """What the control loop needs from a robot.

    Attributes:
        name: short backend name (``"sim"``, ``"kortex"``).
        camera_names: the views :meth:`render_cameras` returns, e.g. ``("head", "wrist")``.
    """

    name: str
    camera_names: tuple[str, ...]

    def read_state(self) -> ArmState:
        """Return the current state (a copy the caller may keep)."""
        ...

    def send_command(self, q_cmd: np.ndarray, qd_cmd: np.ndarray, gripper_cmd: float) -> None:
        """Set joint position targets [rad] (7,), joint velocity feed-forward [rad/s] (7,) and
        the gripper target (0 open .. 1 closed)."""
        ...

    def advance(self, dt: float) -> None:
        """Let ``dt`` [s] pass: the sim steps its physics, hardware does nothing."""
        ...

    def render_cameras(self, width: int, height: int) -> dict[str, np.ndarray]:
        """Capture every camera: name -> RGB image, shape (height, width, 3), uint8."""
        ...

    def capture_scene(self) -> object | None:
        """What the cameras would see now, cheaply (called in the control loop's thread):
        the sim copies its joint positions; live cameras return ``None`` (they are read
        when rendered)."""
        ...

    def render_view(
        self, name: str, width: int, height: int, scene: object | None = None
    ) -> np.ndarray:
        """Capture one camera (a name in ``camera_names``): RGB, (height, width, 3), uint8,
        of ``scene`` (from :meth:`capture_scene`; ``None``: now). Callable from any thread."""
        ...

    def close(self) -> None:
        """Release resources (renderers, connections); safe to call twice."""
        ...
