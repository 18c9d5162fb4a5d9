"""Kinova Gen3 kinematics (``gen3``) and rotation helpers (``rotations``), numpy only."""
