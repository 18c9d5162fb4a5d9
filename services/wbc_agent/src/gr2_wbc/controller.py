"""The default whole-body controller for the Gen3: the IK QP's tasks and limits."""

from __future__ import annotations

import numpy as np

from gr2_wbc.control.ik_qp import (
    IKQP,
    AccelerationLimit,
    DampingTask,
    JointPositionLimit,
    PoseTask,
    PostureTask,
    VelocityLimit,
)
from gr2_wbc.kinematics import gen3

# Commanded joint speeds stay this far below the URDF limits: the joint servos overshoot
# the command by a few percent while tracking (5 % measured in the sim), and the measured
# speed must stay within the limit.
VELOCITY_MARGIN = 0.9
# Joint acceleration bound on the command [rad/s^2]: 0 -> 1.1 rad/s in ~0.14 s.
ACCELERATION_LIMIT = 8.0


def default_ik(rate_hz: float) -> IKQP:
    """Pose tracking with posture regularisation toward HOME_Q and damping, under
    VELOCITY_MARGIN x the URDF velocity limits, an acceleration bound and damped
    joint-position limits."""
    return IKQP(
        tasks=[PoseTask(), PostureTask(gen3.HOME_Q), DampingTask()],
        limits=[
            VelocityLimit(gen3.VELOCITY_LIMITS * VELOCITY_MARGIN),
            AccelerationLimit(np.full(gen3.N_JOINTS, ACCELERATION_LIMIT)),
            JointPositionLimit(),
        ],
        dt=1.0 / rate_hz,
    )
