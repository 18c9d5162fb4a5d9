"""The default whole-body controller for the Gen3: the IK QP's tasks and limits."""

from __future__ import annotations

import numpy as np

from gr2_wbc.control.ik_qp import (
    IKQP,
    AccelerationLimit,
    DampingTask,
    JointPositionLimit,
    ManipulabilityTask,
    PoseTask,
    PostureTask,
    SelfCollisionDamper,
    TablePlaneDamper,
    VelocityLimit,
    WorkspaceBoxLimit,
)
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import CapsuleModel

# Commanded joint speeds stay this far below the URDF limits: the joint servos overshoot
# the command by a few percent while tracking (5 % measured in the sim), and the measured
# speed must stay within the limit.
VELOCITY_MARGIN = 0.9
# Joint acceleration bound on the command [rad/s^2]: 0 -> 1.1 rad/s in ~0.14 s.
ACCELERATION_LIMIT = 8.0
# Manipulability climbing weight: a gentle pull away from singularities in the null space.
MANIPULABILITY_WEIGHT = 5e-4
# Velocity dampers: a distance may shrink at most at DAMPER_RATE x its margin [1/s], i.e.
# gain = DAMPER_RATE / rate_hz of the margin per tick (0.05 at 200 Hz); at 2 cm of margin
# the approach speed is <= 0.2 m/s.
DAMPER_RATE = 10.0
# Every capsule (links, gripper incl. the open fingertips) stays this far above the table
# top (z = 0) [m]; the damper acts within TABLE_INFLUENCE_M of it.
TABLE_CLEARANCE_M = 0.005
TABLE_INFLUENCE_M = 0.10
# Self-collision: capsule surfaces (wrist/gripper vs base/upper arm, gripper vs forearm,
# forearm vs base) stay this far apart [m]; acting within SELF_INFLUENCE_M.
SELF_CLEARANCE_M = 0.01
SELF_INFLUENCE_M = 0.08
# The tool centre point stays inside this box (base frame) [m]: over the table in front of
# the robot (the sim table spans x -0.35..0.95, y -0.7..0.7); HOME_Q's tool is at
# (0.50, -0.02, 0.20). Low-level servoing bypasses Kinova's protection zones, so this box is
# the only Cartesian fence on hardware.
WORKSPACE_LOWER_M = (0.10, -0.60, 0.0)
WORKSPACE_UPPER_M = (0.90, 0.60, 0.80)
WORKSPACE_INFLUENCE_M = 0.10
# OSQP: with the dampers the active set can be degenerate (several rows at once when pushed
# into the table); tolerances of 1e-6 (qd error ~1e-3 rad/s in the weakest direction) and
# OSQP's automatic rho-update interval avoid the iteration limit there (measured: 0 failures
# in the adversarial tests against up to 15 % with 1e-7 and a fixed interval of 25).
OSQP_SETTINGS = {"eps_abs": 1e-6, "eps_rel": 1e-6, "adaptive_rho_interval": 0}


def default_ik(rate_hz: float) -> IKQP:
    """Pose tracking with posture regularisation toward HOME_Q, damping and manipulability
    climbing, under VELOCITY_MARGIN x the URDF velocity limits, an acceleration bound (the only
    constraint relaxed when the QP is infeasible), damped joint-position limits, and velocity
    dampers for the table plane, self-collision and the tool workspace box (one shared
    capsule model)."""
    dt = 1.0 / rate_hz
    gain = min(DAMPER_RATE * dt, 1.0)
    model = CapsuleModel()
    return IKQP(
        tasks=[
            PoseTask(jacobian_fn=model.tool_jacobian),
            PostureTask(gen3.HOME_Q),
            DampingTask(),
            ManipulabilityTask(MANIPULABILITY_WEIGHT, model),
        ],
        limits=[
            VelocityLimit(gen3.VELOCITY_LIMITS * VELOCITY_MARGIN),
            AccelerationLimit(np.full(gen3.N_JOINTS, ACCELERATION_LIMIT)),
            JointPositionLimit(),
            TablePlaneDamper(
                model,
                min_distance=TABLE_CLEARANCE_M,
                influence_distance=TABLE_INFLUENCE_M,
                gain=gain,
            ),
            SelfCollisionDamper(
                model,
                min_distance=SELF_CLEARANCE_M,
                influence_distance=SELF_INFLUENCE_M,
                gain=gain,
            ),
            WorkspaceBoxLimit(
                WORKSPACE_LOWER_M,
                WORKSPACE_UPPER_M,
                model,
                influence_distance=WORKSPACE_INFLUENCE_M,
                gain=gain,
            ),
        ],
        dt=dt,
        osqp_settings=OSQP_SETTINGS,
    )
