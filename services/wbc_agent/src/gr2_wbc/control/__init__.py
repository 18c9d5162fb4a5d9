"""Control layer of the WBC agent: trajectory buffer, pose tracking and the IK QP."""

from gr2_wbc.control.ik_qp import (
    IKQP,
    DampingTask,
    IKResult,
    JointPositionLimit,
    PoseTask,
    PostureTask,
    QPMatrices,
    VelocityLimit,
)
from gr2_wbc.control.tracking import pose_tracking_twist
from gr2_wbc.control.trajectory import TrajectoryBuffer, TrajectorySample, min_jerk_weight

__all__ = [
    "IKQP",
    "DampingTask",
    "IKResult",
    "JointPositionLimit",
    "PoseTask",
    "PostureTask",
    "QPMatrices",
    "TrajectoryBuffer",
    "TrajectorySample",
    "VelocityLimit",
    "min_jerk_weight",
    "pose_tracking_twist",
]
