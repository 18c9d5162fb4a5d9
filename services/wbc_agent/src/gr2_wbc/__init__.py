"""GR-2 Serve edge agent: Gen3 kinematics, trajectory + IK QP control, robot backends.

This package never imports torch: it runs on the robot PC, which has neither a GPU nor torch.
"""

__version__ = "0.1.0"
