"""Robot backends behind one interface (:class:`gr2_wbc.robots.base.RobotBackend`)."""

from gr2_wbc.robots.base import ArmState, RobotBackend, RobotError

__all__ = ["ArmState", "RobotBackend", "RobotError"]
