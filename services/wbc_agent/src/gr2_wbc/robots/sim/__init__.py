"""MuJoCo simulation of the Gen3 + parallel gripper on a table with blocks and two cameras.

Import :class:`gr2_wbc.robots.sim.backend.MujocoGen3` from its module; this package itself
does not import ``mujoco`` so that importing ``gr2_wbc.robots`` stays light.
"""
