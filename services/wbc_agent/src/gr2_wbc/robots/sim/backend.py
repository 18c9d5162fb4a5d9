"""The simulated Gen3 as a :class:`~gr2_wbc.robots.base.RobotBackend` (MuJoCo).

Headless rendering: set ``MUJOCO_GL=egl`` (or ``osmesa``) before ``mujoco`` is imported.

Threading: MuJoCo's ``Renderer`` owns an OpenGL context bound to the thread that created it,
so every ``MujocoGen3`` renders in a GL thread of its own (started at the first render, ended
by :meth:`MujocoGen3.close`): ``render_view`` may be called from any thread and waits for the
image. Rendering uses a separate ``MjData`` set from the scene snapshot
(:meth:`MujocoGen3.capture_scene`: the joint positions), so it never reads the physics'
``data`` while another thread steps it. Physics calls (``read_state``, ``send_command``,
``advance``) are not locked: drive them from one thread (the control loop).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import mujoco
import numpy as np

from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat
from gr2_wbc.robots.base import ArmState, RobotError
from gr2_wbc.robots.sim import scene

_SETTLE_S = 0.3  # let the blocks come to rest on the table before time starts


class MujocoGen3:
    """MuJoCo Gen3 + parallel gripper on a table with three blocks, head and wrist cameras.

    Control: each arm joint has a position servo (``kp``) and a velocity servo (``kv``), so
    the applied torque is ``kp (q_cmd - q) + kv (qd_cmd - qd)`` (plus gravity compensation):
    ``qd_cmd`` is used as velocity feed-forward, which removes the tracking lag a pure
    position servo has at speed. Pass zeros to get a plain damped position servo. The gripper
    is a position servo on the mean finger closure (0 open .. 1 closed); it stops short on an
    object and then squeezes it.

    Args:
        seed: randomises the block positions (see :func:`scene.block_layout`).
        initial_q: start configuration [rad], shape (7,); defaults to ``gen3.HOME_Q``.

    Attributes:
        model, data: the ``mujoco.MjModel`` / ``mujoco.MjData`` (public for tests and tools).
    """

    name: str = "sim"
    camera_names: tuple[str, ...] = scene.CAMERA_NAMES

    def __init__(self, seed: int = 0, initial_q: np.ndarray | None = None) -> None:
        self.seed = seed
        self.model = mujoco.MjModel.from_xml_string(scene.build_scene_xml(seed))
        self.data = mujoco.MjData(self.model)
        m = self.model
        joints = [m.joint(n) for n in scene.ARM_JOINT_NAMES]
        self._qpos_idx = np.array([int(j.qposadr[0]) for j in joints])
        self._dof_idx = np.array([int(j.dofadr[0]) for j in joints])
        self._pos_act = np.array([m.actuator(n).id for n in scene.POSITION_ACTUATOR_NAMES])
        self._vel_act = np.array([m.actuator(n).id for n in scene.VELOCITY_ACTUATOR_NAMES])
        self._grip_act = m.actuator(scene.GRIPPER_ACTUATOR_NAME).id
        self._finger_qpos = np.array([int(m.joint(n).qposadr[0]) for n in scene.FINGER_JOINT_NAMES])
        self._tool_site = m.site("tool").id
        self._flange_site = m.site("flange").id
        self._block_bodies = {c: m.body(f"block_{c}").id for c in scene.BLOCK_COLOURS}
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._gl: ThreadPoolExecutor | None = None  # the GL thread, one worker
        self._render_data: mujoco.MjData | None = None  # used in the GL thread only
        self._closed = False
        self.reset(gen3.HOME_Q if initial_q is None else initial_q)

    # -- state and commands -------------------------------------------------------------

    def reset(self, q: np.ndarray) -> None:
        """Put the arm at ``q`` [rad] (7,) at rest, gripper open, blocks settled; time = 0."""
        q = self._check_joint_vector(q, "q")
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        d.qpos[self._qpos_idx] = q
        d.ctrl[self._pos_act] = q
        d.ctrl[self._vel_act] = 0.0
        d.ctrl[self._grip_act] = 0.0
        mujoco.mj_forward(m, d)
        mujoco.mj_step(m, d, nstep=round(_SETTLE_S / m.opt.timestep))
        d.time = 0.0
        mujoco.mj_forward(m, d)

    def read_state(self) -> ArmState:
        """Snapshot of the arm from ``mjData``; the tool pose is the ``tool`` site."""
        d = self.data
        closure = float(np.mean(d.qpos[self._finger_qpos])) / scene.FINGER_TRAVEL_M
        return ArmState(
            time_s=float(d.time),
            q=d.qpos[self._qpos_idx].copy(),
            qd=d.qvel[self._dof_idx].copy(),
            gripper=min(max(closure, 0.0), 1.0),
            ee_position=d.site_xpos[self._tool_site].copy(),
            ee_quat_wxyz=matrix_to_quat(d.site_xmat[self._tool_site].reshape(3, 3)),
        )

    def send_command(self, q_cmd: np.ndarray, qd_cmd: np.ndarray, gripper_cmd: float) -> None:
        """Set the servo targets: joint positions [rad] (7,), joint velocity feed-forward
        [rad/s] (7,) and gripper closure (0 open .. 1 closed, clipped).

        Targets outside the joint limits or speed limits are clipped by the actuators'
        control ranges. Raises ``ValueError`` on a wrong shape or a non-finite value.
        """
        q_cmd = self._check_joint_vector(q_cmd, "q_cmd")
        qd_cmd = self._check_joint_vector(qd_cmd, "qd_cmd")
        if not math.isfinite(gripper_cmd):
            raise ValueError(f"gripper_cmd must be finite, got {gripper_cmd}")
        d = self.data
        d.ctrl[self._pos_act] = q_cmd
        d.ctrl[self._vel_act] = qd_cmd
        d.ctrl[self._grip_act] = min(max(gripper_cmd, 0.0), 1.0) * scene.FINGER_TRAVEL_M

    def advance(self, dt: float) -> None:
        """Step the physics by ``dt`` [s], a positive whole multiple of ``scene.TIMESTEP_S``.

        Raises:
            ValueError: if ``dt`` is not a positive multiple of the physics timestep.
        """
        step = float(self.model.opt.timestep)
        n = dt / step
        steps = round(n)
        if steps < 1 or abs(n - steps) > 1e-6:
            raise ValueError(f"dt={dt} s is not a positive multiple of the timestep {step} s")
        mujoco.mj_step(self.model, self.data, nstep=steps)
        # mj_step leaves positions-derived quantities (sites, cameras) one step behind qpos.
        mujoco.mj_forward(self.model, self.data)

    @property
    def timestep(self) -> float:
        """Physics timestep [s]."""
        return float(self.model.opt.timestep)

    def flange_pose(self) -> np.ndarray:
        """Flange site pose in the base frame, shape (4, 4)."""
        return self._site_pose(self._flange_site)

    def tool_pose(self) -> np.ndarray:
        """Tool site pose in the base frame, shape (4, 4)."""
        return self._site_pose(self._tool_site)

    def block_positions(self) -> dict[str, np.ndarray]:
        """Colour -> block centre position in the base frame [m], shape (3,)."""
        return {c: self.data.xpos[b].copy() for c, b in self._block_bodies.items()}

    def block_pose(self, colour: str) -> np.ndarray:
        """Pose of block ``colour`` (its centre and axes) in the base frame, shape (4, 4).

        Raises:
            KeyError: unknown colour.
        """
        body = self._block_bodies[colour]
        tf = np.eye(4)
        tf[:3, :3] = self.data.xmat[body].reshape(3, 3)
        tf[:3, 3] = self.data.xpos[body]
        return tf

    def block_contacts(self, colour: str) -> tuple[str, ...]:
        """What touches block ``colour`` now: the names of the geoms in contact with it
        (an unnamed geom by its body's name, e.g. ``finger_left``, ``block_red``,
        ``table``), sorted and unique. Contacts are those of the last ``mj_forward``
        (every :meth:`advance` ends with one).

        Raises:
            KeyError: unknown colour.
        """
        m, d = self.model, self.data
        body = self._block_bodies[colour]
        names = set()
        for i in range(d.ncon):
            g1, g2 = int(d.contact.geom1[i]), int(d.contact.geom2[i])
            b1, b2 = int(m.geom_bodyid[g1]), int(m.geom_bodyid[g2])
            if body not in (b1, b2) or b1 == b2:
                continue
            other = g2 if b1 == body else g1
            names.add(m.geom(other).name or m.body(int(m.geom_bodyid[other])).name)
        return tuple(sorted(names))

    # -- cameras ------------------------------------------------------------------------

    def capture_scene(self) -> np.ndarray:
        """The scene now, for :meth:`render_view`: a copy of ``qpos`` (arm, fingers, blocks)."""
        return self.data.qpos.copy()

    def render_view(
        self, name: str, width: int, height: int, scene: object | None = None
    ) -> np.ndarray:
        """Render camera ``name`` ("head" or "wrist"): RGB, shape (height, width, 3), uint8.

        Args:
            scene: a :meth:`capture_scene` snapshot; ``None`` renders the scene now (call it
                from the thread that steps the physics, or between steps).

        Raises:
            ValueError: unknown camera or a size beyond the offscreen buffer (1280 x 1024).
            RobotError: called after :meth:`close`.
        """
        if name not in self.camera_names:
            raise ValueError(f"unknown camera {name!r}; have {self.camera_names}")
        if self._closed:
            raise RobotError("render after close()")
        qpos = self.capture_scene() if scene is None else np.asarray(scene)
        if self._gl is None:
            self._gl = ThreadPoolExecutor(1, thread_name_prefix="gr2-sim-gl")
        return self._gl.submit(self._render_in_gl_thread, name, width, height, qpos).result()

    def render_cameras(self, width: int, height: int) -> dict[str, np.ndarray]:
        """Render every camera: name -> RGB, shape (height, width, 3), uint8."""
        return {n: self.render_view(n, width, height) for n in self.camera_names}

    def close(self) -> None:
        """Free the renderers (GL contexts, in their thread) and end the GL thread;
        idempotent. Physics stays usable."""
        self._closed = True
        if self._gl is not None:
            self._gl.submit(self._free_renderers).result()
            self._gl.shutdown()
            self._gl = None

    def __enter__(self) -> MujocoGen3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    def _render_in_gl_thread(
        self, name: str, width: int, height: int, qpos: np.ndarray
    ) -> np.ndarray:
        data = self._render_data
        if data is None:
            data = self._render_data = mujoco.MjData(self.model)
        data.qpos[:] = qpos
        mujoco.mj_kinematics(self.model, data)  # body, geom and site poses
        mujoco.mj_camlight(self.model, data)  # camera and light poses
        renderer = self._renderer(width, height)
        renderer.update_scene(data, camera=name)
        return renderer.render()

    def _free_renderers(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    def _renderer(self, width: int, height: int) -> mujoco.Renderer:
        """The renderer for one image size (GL thread only)."""
        key = (int(width), int(height))
        renderer = self._renderers.get(key)
        if renderer is None:
            renderer = mujoco.Renderer(self.model, height=key[1], width=key[0])
            # Headless EGL often means software rendering (llvmpipe): shadows, reflections
            # and the skybox cost ~6x (41 ms vs 6 ms for two 64x64 views) and would blow
            # the 5 ms tick budget of the 200 Hz loop that renders.
            for flag in (
                mujoco.mjtRndFlag.mjRND_SHADOW,
                mujoco.mjtRndFlag.mjRND_REFLECTION,
                mujoco.mjtRndFlag.mjRND_SKYBOX,
            ):
                renderer.scene.flags[flag] = 0
            self._renderers[key] = renderer
        return renderer

    def _site_pose(self, site_id: int) -> np.ndarray:
        tf = np.eye(4)
        tf[:3, :3] = self.data.site_xmat[site_id].reshape(3, 3)
        tf[:3, 3] = self.data.site_xpos[site_id]
        return tf

    @staticmethod
    def _check_joint_vector(v: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (gen3.N_JOINTS,):
            raise ValueError(f"{what} must have shape ({gen3.N_JOINTS},), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{what} must be finite, got {v}")
        return v
