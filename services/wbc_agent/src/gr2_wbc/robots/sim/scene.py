"""MJCF scene of the Gen3 with a parallel gripper, a table, three blocks and two cameras.

The arm is generated from the kinematic tables in :mod:`gr2_wbc.kinematics.gen3` (never
retyped here), so the MuJoCo model and the numpy kinematics agree by construction; a test
checks it. The world frame is the robot base frame; the table top is the plane
``z = TABLE_TOP_Z_M`` (the arm is bolted onto the table).

Contact filtering: robot geoms have ``contype=2, conaffinity=0`` and the table and blocks
``contype=1, conaffinity=3``, so the robot touches the world but never itself (the IK QP keeps
self-collision away; the sim need not model it).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat, rpy_to_matrix

TIMESTEP_S: float = 0.001
"""Physics step [s]; the 200 Hz control period (5 ms) is a whole number of steps."""
TABLE_TOP_Z_M: float = 0.0
"""Height of the table top in the base frame [m]."""
TABLE_HEIGHT_M: float = 0.75
"""Distance from the floor to the table top [m]."""
BLOCK_SIZE_M: float = 0.04
"""Edge length of the cubes [m]."""
BLOCK_TOP_Z_M: float = TABLE_TOP_Z_M + BLOCK_SIZE_M
"""Height of a resting block's top face [m]."""
BLOCK_MASS_KG: float = 0.05
BLOCK_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.08, 0.08),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.2, 0.85),
}
"""Block colour name -> RGB; bodies are named ``block_<colour>``."""
BLOCK_REGION_X_M: tuple[float, float] = (0.38, 0.62)
BLOCK_REGION_Y_M: tuple[float, float] = (-0.2, 0.16)
"""Blocks are placed uniformly in this rectangle of the table (below HOME_Q's tool)."""
BLOCK_MIN_SPACING_M: float = 0.09

ARM_JOINT_NAMES: tuple[str, ...] = tuple(j.name for j in gen3.JOINTS)
POSITION_ACTUATOR_NAMES: tuple[str, ...] = tuple(f"pos_{n}" for n in ARM_JOINT_NAMES)
VELOCITY_ACTUATOR_NAMES: tuple[str, ...] = tuple(f"vel_{n}" for n in ARM_JOINT_NAMES)
GRIPPER_ACTUATOR_NAME: str = "gripper"
FINGER_JOINT_NAMES: tuple[str, str] = ("finger_left", "finger_right")
FINGER_TRAVEL_M: float = 0.0425
"""Travel of each finger from open (85 mm between the pads) to closed (pads touching) [m]."""
CAMERA_NAMES: tuple[str, str] = ("head", "wrist")

# Position servo gains per joint [N m/rad] and velocity gains [N m s/rad]: the large joints
# carry the arm, the wrist joints little; with the velocity feed-forward the tracking lag is
# about inertia * acceleration / kp, well under 0.01 rad at the arm's speeds.
_KP = (3000.0, 3000.0, 3000.0, 3000.0, 1000.0, 1000.0, 1000.0)
_KV = (150.0, 150.0, 150.0, 150.0, 40.0, 40.0, 40.0)
_ARMATURE = (0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05)
_LINK_MASS_KG = (1.3773, 1.1636, 1.1636, 0.9302, 0.6781, 0.6781, 0.5006)  # URDF masses
_LINK_RADIUS_M = (0.055, 0.05, 0.05, 0.045, 0.04, 0.04, 0.04)
_ROBOT = 'contype="2" conaffinity="0"'
_WORLD = 'contype="1" conaffinity="3"'


def _f(values: Iterable[float] | float) -> str:
    """Format numbers for MJCF (round-trip precision, space separated)."""
    if isinstance(values, float | int):
        return f"{float(values):.10g}"
    return " ".join(f"{float(v):.10g}" for v in values)


def _quat_from_rpy(rpy: tuple[float, float, float]) -> str:
    return _f(matrix_to_quat(rpy_to_matrix(rpy)))


def _lookat_xyaxes(pos: np.ndarray, target: np.ndarray, up: np.ndarray) -> str:
    """MJCF ``xyaxes`` of a camera at ``pos`` looking at ``target`` (cameras look along -z)."""
    d = np.asarray(target, float) - np.asarray(pos, float)
    d /= np.linalg.norm(d)
    right = np.cross(d, up)
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, d)
    return _f(np.concatenate([right, cam_up]))


def _link_body(i: int, inner: str) -> str:
    """Body of link i+1 (0-based ``i``): joint, motor housing, capsule to the next joint."""
    spec = gen3.JOINTS[i]
    child_xyz = gen3.JOINTS[i + 1].xyz if i + 1 < gen3.N_JOINTS else gen3.FLANGE_XYZ
    r = _LINK_RADIUS_M[i]
    m = _LINK_MASS_KG[i]
    limits = (
        'limited="false"'
        if spec.limit is None
        else f'limited="true" range="{_f((-spec.limit, spec.limit))}"'
    )
    shade = "arm_dark" if i % 2 == 0 else "arm_light"
    return f"""
<body name="link_{i + 1}" pos="{_f(spec.xyz)}" quat="{_quat_from_rpy(spec.rpy)}" gravcomp="1">
  <joint name="{spec.name}" type="hinge" axis="0 0 1" {limits} damping="0.5"
         armature="{_f(_ARMATURE[i])}"/>
  <geom name="housing_{i + 1}" type="cylinder" size="{_f((r, r))}" mass="{_f(0.4 * m)}"
        material="arm_dark" {_ROBOT}/>
  <geom name="link_geom_{i + 1}" type="capsule" fromto="0 0 0 {_f(child_xyz)}"
        size="{_f(0.85 * r)}" mass="{_f(0.6 * m)}" material="{shade}" {_ROBOT}/>
  {inner}
</body>"""


def _gripper() -> str:
    """Flange site, a 2F-85-like parallel gripper (fingers slide along the tool y axis), the
    ``tool`` site ``TOOL_OFFSET_M`` along the flange z axis and the wrist camera."""
    travel = FINGER_TRAVEL_M
    pad = 0.005  # pad half thickness [m]
    fingers = []
    for name, sign in zip(FINGER_JOINT_NAMES, (1.0, -1.0), strict=True):
        fingers.append(f"""
  <body name="{name}" pos="0 {_f(sign * (travel + pad))} 0.085" gravcomp="1">
    <joint name="{name}" type="slide" axis="0 {_f(-sign)} 0" range="0 {_f(travel)}"
           damping="2" armature="0.01"/>
    <geom type="box" pos="0 {_f(sign * 0.011)} 0.022" size="0.011 0.006 0.022" mass="0.03"
          material="gripper_dark" {_ROBOT}/>
    <geom name="{name}_pad" type="box" pos="0 0 0.035" size="0.011 {_f(pad)} 0.02" mass="0.02"
          material="pad" friction="1.5 0.05 0.001" condim="4"
          solref="0.004 1" solimp="0.95 0.99 0.001" {_ROBOT}/>
  </body>""")
    tool = gen3.TOOL_OFFSET_M
    cam_pos = np.array([0.075, 0.0, 0.05])
    cam_axes = _lookat_xyaxes(cam_pos, np.array([0.0, 0.0, tool + 0.2]), np.array([1.0, 0, 0]))
    return f"""
<body name="gripper" pos="{_f(gen3.FLANGE_XYZ)}" quat="{_quat_from_rpy(gen3.FLANGE_RPY)}"
      gravcomp="1">
  <site name="flange" pos="0 0 0" size="0.01" rgba="1 1 0 0"/>
  <site name="tool" pos="0 0 {_f(tool)}" size="0.008" rgba="1 0 1 0"/>
  <geom name="coupling" type="cylinder" pos="0 0 0.008" size="0.038 0.008" mass="0.1"
        material="gripper_dark" {_ROBOT}/>
  <geom name="palm" type="box" pos="0 0 0.05" size="0.03 0.045 0.035" mass="0.6"
        material="gripper_dark" {_ROBOT}/>
  <geom name="camera_housing" type="box" pos="0.06 0 0.04" size="0.03 0.02 0.012" mass="0.05"
        material="arm_dark" {_ROBOT}/>
  <camera name="wrist" pos="{_f(cam_pos)}" xyaxes="{cam_axes}" fovy="65"/>
  {"".join(fingers)}
</body>"""


def _arm() -> str:
    inner = _gripper()
    for i in reversed(range(gen3.N_JOINTS)):
        inner = _link_body(i, inner)
    base_h = gen3.JOINTS[0].xyz[2]
    return f"""
<geom name="base" type="cylinder" pos="0 0 {_f(base_h / 2)}" size="{_f((0.06, base_h / 2))}"
      material="arm_dark" {_ROBOT}/>
{inner}"""


def _actuators() -> str:
    lines = []
    for i, spec in enumerate(gen3.JOINTS):
        crange = (
            'ctrllimited="false"'
            if spec.limit is None
            else f'ctrlrange="{_f((-spec.limit, spec.limit))}"'
        )
        lines.append(
            f'<position name="{POSITION_ACTUATOR_NAMES[i]}" joint="{spec.name}" '
            f'kp="{_f(_KP[i])}" {crange}/>'
        )
    for i, spec in enumerate(gen3.JOINTS):
        vmax = spec.velocity_limit
        lines.append(
            f'<velocity name="{VELOCITY_ACTUATOR_NAMES[i]}" joint="{spec.name}" '
            f'kv="{_f(_KV[i])}" ctrlrange="{_f((-vmax, vmax))}"/>'
        )
    lines.append(
        f'<position name="{GRIPPER_ACTUATOR_NAME}" tendon="grip" kp="4000" kv="600" '
        f'ctrlrange="0 {_f(FINGER_TRAVEL_M)}" forcerange="-60 60"/>'
    )
    return "\n".join(lines)


def block_layout(seed: int) -> dict[str, tuple[float, float, float]]:
    """Random block placement: colour -> (x [m], y [m], yaw [rad]) on the table.

    Positions are uniform in ``BLOCK_REGION_*`` with centres at least ``BLOCK_MIN_SPACING_M``
    apart (rejection sampling); deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    placed: dict[str, tuple[float, float, float]] = {}
    for colour in BLOCK_COLOURS:
        while True:
            x = rng.uniform(*BLOCK_REGION_X_M)
            y = rng.uniform(*BLOCK_REGION_Y_M)
            if all(
                np.hypot(x - px, y - py) >= BLOCK_MIN_SPACING_M for px, py, _ in placed.values()
            ):
                break
        placed[colour] = (float(x), float(y), float(rng.uniform(-np.pi / 4, np.pi / 4)))
    return placed


def _blocks(seed: int) -> str:
    h = BLOCK_SIZE_M / 2
    out = []
    for colour, (x, y, yaw) in block_layout(seed).items():
        quat = _f((np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)))
        rgb = _f(BLOCK_COLOURS[colour])
        out.append(f"""
<body name="block_{colour}" pos="{_f((x, y, TABLE_TOP_Z_M + h))}" quat="{quat}">
  <freejoint name="block_{colour}"/>
  <geom type="box" size="{_f((h, h, h))}" mass="{_f(BLOCK_MASS_KG)}" rgba="{rgb} 1"
        friction="1 0.01 0.001" condim="4" {_WORLD}/>
</body>""")
    return "".join(out)


def build_scene_xml(seed: int = 0) -> str:
    """The complete MJCF of the scene; ``seed`` randomises the block positions only.

    Names a backend can rely on: joints ``joint_1..7``, actuators ``pos_joint_i`` (position
    servo, target [rad]) and ``vel_joint_i`` (velocity feed-forward [rad/s]), ``gripper``
    (mean finger closure [m], 0 .. ``FINGER_TRAVEL_M``), sites ``flange`` and ``tool``,
    cameras ``head`` and ``wrist``, bodies ``block_red|green|blue`` (free joints of the same
    names).
    """
    top = TABLE_TOP_Z_M
    # The head camera frames the block region from across the table, so that a 4 cm block
    # is ~5 px wide at 64 px (from further away, ~2 px blocks did not survive tokenization).
    head_pos = np.array([0.80, -0.02, top + 0.45])
    head_axes = _lookat_xyaxes(head_pos, np.array([0.48, -0.02, top + 0.03]), np.array([0, 0, 1.0]))
    return f"""<mujoco model="gr2_gen3_scene">
<compiler angle="radian" autolimits="true"/>
<option timestep="{_f(TIMESTEP_S)}" integrator="implicitfast" gravity="0 0 -9.81"/>
<visual>
  <global offwidth="1280" offheight="1024"/>
  <headlight ambient="0.35 0.35 0.35" diffuse="0.4 0.4 0.4" specular="0.1 0.1 0.1"/>
  <quality shadowsize="2048"/>
</visual>
<asset>
  <texture name="sky" type="skybox" builtin="gradient" rgb1="0.55 0.65 0.8" rgb2="0.15 0.18 0.25"
           width="256" height="256"/>
  <texture name="floor" type="2d" builtin="checker" rgb1="0.3 0.32 0.36" rgb2="0.22 0.24 0.28"
           width="256" height="256"/>
  <material name="floor" texture="floor" texrepeat="8 8"/>
  <material name="table" rgba="0.62 0.6 0.56 1" specular="0.1"/>
  <material name="arm_light" rgba="0.78 0.79 0.8 1" specular="0.4" shininess="0.5"/>
  <material name="arm_dark" rgba="0.18 0.19 0.2 1" specular="0.3"/>
  <material name="gripper_dark" rgba="0.12 0.12 0.13 1"/>
  <material name="pad" rgba="0.35 0.35 0.38 1"/>
</asset>
<tendon>
  <fixed name="grip">
    <joint joint="{FINGER_JOINT_NAMES[0]}" coef="0.5"/>
    <joint joint="{FINGER_JOINT_NAMES[1]}" coef="0.5"/>
  </fixed>
</tendon>
<equality>
  <joint joint1="{FINGER_JOINT_NAMES[1]}" joint2="{FINGER_JOINT_NAMES[0]}" polycoef="0 1 0 0 0"/>
</equality>
<worldbody>
  <light name="key" pos="0.6 -0.6 2.2" dir="-0.2 0.3 -1" directional="true" castshadow="true"
         diffuse="0.6 0.6 0.6"/>
  <light name="fill" pos="1.5 1.0 1.5" dir="-1 -0.6 -0.8" directional="true" castshadow="false"
         diffuse="0.25 0.25 0.25"/>
  <geom name="floor" type="plane" pos="0 0 {_f(top - TABLE_HEIGHT_M)}" size="3 3 0.1"
        material="floor" {_WORLD}/>
  <geom name="table" type="box" pos="0.3 0 {_f(top - 0.025)}" size="0.65 0.7 0.025"
        material="table" {_WORLD}/>
  <geom name="table_base" type="box" pos="0.3 0 {_f(top - TABLE_HEIGHT_M / 2 - 0.025)}"
        size="0.55 0.6 {_f(TABLE_HEIGHT_M / 2 - 0.025)}" rgba="0.3 0.3 0.32 1" {_WORLD}/>
  <camera name="head" pos="{_f(head_pos)}" xyaxes="{head_axes}" fovy="48"/>
  {_arm()}
  {_blocks(seed)}
</worldbody>
<actuator>
{_actuators()}
</actuator>
</mujoco>
"""
