"""The real Kinova Gen3 as a :class:`~gr2_wbc.robots.base.RobotBackend`, via Kinova's kortex_api.

``kortex_api`` is not on PyPI (Kinova ships the wheel) and is imported lazily, only when a
:class:`KortexBackend` is built without an injected ``kortex`` namespace; importing this module
never needs it. Tests inject :class:`gr2_wbc.robots.kortex.fake.FakeKortex` instead.

Connection (DESIGN.md section 7, Kinova's ``api_python/examples/utilities.py``): one
``TCPTransport`` on port 10000 and one ``UDPTransport`` on port 10001, each with its own
``RouterClient`` and session (``SessionManager.CreateSession(CreateSessionInfo)``).
``BaseClient`` runs over TCP (servoing mode, ``ClearFaults``); ``BaseCyclicClient`` over UDP
(the cyclic ``Refresh``).

Low-level servoing (Kinova's ``108-Gen3_torque_control`` example, ros2_kortex's
``hardware_interface.cpp``): read the feedback, seed every actuator command with its measured
position, switch to ``LOW_LEVEL_SERVOING``, then send one ``BaseCyclic.Command`` per tick with
``frame_id`` incremented by one (0..65535, wrapping) and every actuator's ``command_id`` set to
that ``frame_id``, ``flags = 1`` (servoing). Positions are in degrees 0..360 as Kortex reports
them; the velocity field is left at 0 (it is unreliable in low-level mode; ros2_kortex leaves it
out too). In low-level mode Kinova's protection zones are bypassed: the agent's own workspace
limits are the only ones.

Following error: an actuator faults when ``|q_cmd - q_meas|`` exceeds 5 degrees. Every joint
command is therefore clamped to within ``max_step_deg`` (default 2 deg) of the last measured
position; :attr:`KortexBackend.clamp_count` counts the clamped joint commands. At 200 Hz a 2 deg
step allows about 400 deg/s, far above the Gen3 speed limits, so the clamp only bites on jumps
(a bad target, a stale command), never on a trajectory the IK-QP produced.

Reading and commanding share one UDP round trip: ``BaseCyclic.Refresh(command)`` sends the
command AND returns the feedback measured when it arrived. :meth:`KortexBackend.send_command`
calls ``Refresh`` and caches that feedback; the next :meth:`KortexBackend.read_state` returns
the cached feedback if it is fresh (not yet returned by a previous ``read_state`` and younger
than ``feedback_max_age_s``), and otherwise calls ``RefreshFeedback`` (a read-only round trip).
In the control loop (read, compute, send, wait) the state of tick k is thus the feedback of the
command of tick k-1, one period old at most, for one UDP round trip per tick.

Threading: drive one backend from one thread (the control loop); nothing here is locked,
except that :meth:`KortexBackend.render_view` is called from the loop's camera thread: the
injected camera sources must be safe to call from there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.rotations import matrix_to_quat
from gr2_wbc.robots.base import ArmState, RobotError

_log = logging.getLogger(__name__)

KORTEX_TCP_PORT: int = 10000
"""Kortex API port for configuration calls (BaseClient)."""
KORTEX_UDP_PORT: int = 10001
"""Kortex API port for the cyclic (real-time) calls (BaseCyclicClient)."""
FOLLOWING_ERROR_FAULT_DEG: float = 5.0
"""The Gen3 actuators fault when a position command is this far from the measured position."""
DEFAULT_MAX_STEP_DEG: float = 2.0
"""Default bound on ``|q_cmd - q_meas|`` per joint and command [deg]."""
MAX_STEP_LIMIT_DEG: float = FOLLOWING_ERROR_FAULT_DEG / 2.0
"""Largest ``max_step_deg`` accepted: half the fault threshold, for margin over one period."""
FRAME_ID_MODULUS: int = 65536
"""``frame_id`` runs 0..65535 and wraps to 0."""
SERVOING_FLAG: int = 1
"""``ActuatorCommand.flags`` value that makes the actuator follow the command (servoing)."""
LIMIT_TOLERANCE_RAD: float = 0.05
"""Slack on the limited joints' model limits before a reading counts as inconsistent [rad]."""

INSTALL_HINT: str = (
    "the Kortex backend needs Kinova's kortex_api, which is not on PyPI: download the wheel "
    "from Kinova (github.com/Kinovarobotics/kortex, Releases / Kinova's artifactory), then "
    "`pip install kortex_api-2.6.0.post3-py3-none-any.whl` (it pins protobuf 3.x: if that "
    "clashes with this environment, install gr2_wbc and the wheel in a separate venv)"
)

CameraSource = Callable[[int, int], np.ndarray]
"""A camera: ``(width, height) -> RGB image (height, width, 3) uint8`` (e.g. an RTSP reader)."""


class KortexUnavailableError(RobotError, ImportError):
    """``kortex_api`` cannot be imported; the message says how to install it."""


@dataclass(frozen=True)
class KortexApi:
    """Exactly the kortex_api classes and messages :class:`KortexBackend` uses.

    :func:`load_kortex_api` fills it from the real package;
    :class:`gr2_wbc.robots.kortex.fake.FakeKortex` provides a stand-in with the same shape.

    Attributes:
        tcp_transport, udp_transport: ``kortex_api.TCPTransport.TCPTransport`` /
            ``kortex_api.UDPTransport.UDPTransport`` (called with no arguments).
        router_client: ``kortex_api.RouterClient.RouterClient(transport, error_callback)``.
        router_client_send_options: ``kortex_api.RouterClient.RouterClientSendOptions``.
        session_manager: ``kortex_api.SessionManager.SessionManager(router)``.
        base_client: ``...client_stubs.BaseClientRpc.BaseClient(router)``.
        base_cyclic_client: ``...client_stubs.BaseCyclicClientRpc.BaseCyclicClient(router)``.
        session_pb2, base_pb2, base_cyclic_pb2, common_pb2: the message modules
            ``kortex_api.autogen.messages.{Session,Base,BaseCyclic,Common}_pb2``.
        errors: the exception types kortex raises (``KException``, ``KServerException``).
    """

    tcp_transport: Callable[[], Any]
    udp_transport: Callable[[], Any]
    router_client: Callable[[Any, Callable[[Any], None]], Any]
    router_client_send_options: Callable[[], Any]
    session_manager: Callable[[Any], Any]
    base_client: Callable[[Any], Any]
    base_cyclic_client: Callable[[Any], Any]
    session_pb2: Any
    base_pb2: Any
    base_cyclic_pb2: Any
    common_pb2: Any
    errors: tuple[type[BaseException], ...]


def _patch_collections_for_old_protobuf() -> None:
    """kortex_api pins protobuf 3.5, which uses ``collections.MutableMapping`` (removed in
    Python 3.10); Kinova's own examples add these aliases back before importing it."""
    import collections
    import collections.abc

    for name in ("Mapping", "MutableMapping", "MutableSequence", "Sequence"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


def load_kortex_api() -> KortexApi:
    """Import the real ``kortex_api`` and return the pieces the backend uses.

    Raises:
        KortexUnavailableError: (a :class:`RobotError` and an ``ImportError``) when the
            package is missing or broken; the message says how to install it.
    """
    _patch_collections_for_old_protobuf()
    try:
        from kortex_api.autogen.client_stubs.BaseClientRpc import BaseClient
        from kortex_api.autogen.client_stubs.BaseCyclicClientRpc import BaseCyclicClient
        from kortex_api.autogen.messages import Base_pb2, BaseCyclic_pb2, Common_pb2, Session_pb2
        from kortex_api.Exceptions.KException import KException
        from kortex_api.Exceptions.KServerException import KServerException
        from kortex_api.RouterClient import RouterClient, RouterClientSendOptions
        from kortex_api.SessionManager import SessionManager
        from kortex_api.TCPTransport import TCPTransport
        from kortex_api.UDPTransport import UDPTransport
    except ImportError as exc:
        raise KortexUnavailableError(f"{INSTALL_HINT}; import failed: {exc}") from exc
    return KortexApi(
        tcp_transport=TCPTransport,
        udp_transport=UDPTransport,
        router_client=RouterClient,
        router_client_send_options=RouterClientSendOptions,
        session_manager=SessionManager,
        base_client=BaseClient,
        base_cyclic_client=BaseCyclicClient,
        session_pb2=Session_pb2,
        base_pb2=Base_pb2,
        base_cyclic_pb2=BaseCyclic_pb2,
        common_pb2=Common_pb2,
        errors=(KException, KServerException),
    )


def _describe(exc: BaseException) -> str:
    """The message of a kortex exception (its ``__str__`` has been known to fail)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - kortex's own exception formatting may raise
        text = ""
    if not text:
        code = getattr(exc, "get_error_code", None)
        sub = getattr(exc, "get_error_sub_code", None)
        if callable(code) and callable(sub):
            text = f"error_code={code()} sub_error_code={sub()}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def wrap_pi(x: np.ndarray) -> np.ndarray:
    """Wrap angles [rad] into (-pi, pi]."""
    return -np.remainder(-np.asarray(x, dtype=np.float64) + np.pi, 2.0 * np.pi) + np.pi


def wrap_360(deg: np.ndarray) -> np.ndarray:
    """Wrap angles [deg] into [0, 360) (guarding the float case ``-1e-20 % 360 == 360``)."""
    out = np.remainder(np.asarray(deg, dtype=np.float64), 360.0)
    out[out >= 360.0] = 0.0
    return out


class KortexBackend:
    """A Kinova Gen3 (+ Robotiq 2F-85 on the interconnect) in low-level servoing.

    Construction connects, checks the arm is not in fault, seeds the command at the measured
    position and enters ``LOW_LEVEL_SERVOING``; :meth:`close` goes back to
    ``SINGLE_LEVEL_SERVOING`` and releases sessions and transports.

    Joint values: Kortex reports 0..360 deg; :meth:`read_state` converts to rad in (-pi, pi]
    and then unwraps the continuous joints (1, 3, 5, 7) against the previous reading, so ``q``
    is continuous (it may leave (-pi, pi] after a full turn). Limited joints (2, 4, 6) are
    checked against ``gen3`` limits (+ ``LIMIT_TOLERANCE_RAD``); a reading outside means the
    model and the arm disagree and raises :class:`RobotError`. ``ee_position``/``ee_quat_wxyz``
    come from our own FK (``gen3.tool_pose``) so that sim and hardware agree.

    Args:
        ip: the arm's address (factory default 192.168.1.10).
        username, password: Kortex login (factory default admin / admin).
        kortex: the kortex_api pieces; default :func:`load_kortex_api` (the real package).
        cameras: optional name -> :data:`CameraSource`; the Gen3 wrist camera is an RTSP
            stream this backend does not decode, so without this ``camera_names`` is empty.
        max_step_deg: bound on ``|q_cmd - q_meas|`` per joint and command [deg], in
            (0, ``MAX_STEP_LIMIT_DEG``]; public attribute afterwards.
        gripper_velocity_pct, gripper_force_pct: Robotiq speed and force limits [0-100 %].
        refresh_timeout_ms: UDP timeout of one cyclic Refresh [ms].
        max_missed_refreshes: consecutive failed Refresh calls tolerated (the frame is lost,
            the next tick sends a new one) before :class:`RobotError`.
        feedback_max_age_s: cached feedback older than this is re-read by :meth:`read_state`.
        first_frame_id: ``frame_id`` of the first cyclic frame (0..65535).
        session_inactivity_timeout_ms, connection_inactivity_timeout_ms: session settings.
        clear_faults_timeout_s: how long :meth:`clear_faults` waits for the fault to go.
        clock: monotonic clock [s] used for ``ArmState.time_s`` and feedback ages.

    Attributes:
        clamp_count: joint commands clamped to ``max_step_deg`` so far (all joints).
        clamp_counts: the same per joint, shape (7,) int.
        missed_refreshes: failed cyclic Refresh calls so far (tolerated or not).
        frames_sent: cyclic command frames sent.

    Raises:
        KortexUnavailableError: ``kortex_api`` is not installed (and no ``kortex`` given).
        RobotError: connection, login, fault or protocol failure (kortex's message included).
    """

    name: str = "kortex"

    def __init__(
        self,
        ip: str,
        *,
        username: str = "admin",
        password: str = "admin",
        kortex: KortexApi | None = None,
        cameras: Mapping[str, CameraSource] | None = None,
        max_step_deg: float = DEFAULT_MAX_STEP_DEG,
        gripper_velocity_pct: float = 50.0,
        gripper_force_pct: float = 50.0,
        refresh_timeout_ms: int = 5,
        max_missed_refreshes: int = 2,
        feedback_max_age_s: float = 0.02,
        first_frame_id: int = 0,
        session_inactivity_timeout_ms: int = 60000,
        connection_inactivity_timeout_ms: int = 2000,
        clear_faults_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < max_step_deg <= MAX_STEP_LIMIT_DEG:
            raise ValueError(
                f"max_step_deg must be in (0, {MAX_STEP_LIMIT_DEG}], got {max_step_deg}"
            )
        for what, pct in (("velocity", gripper_velocity_pct), ("force", gripper_force_pct)):
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"gripper_{what}_pct must be in [0, 100], got {pct}")
        if not 0 <= first_frame_id < FRAME_ID_MODULUS:
            raise ValueError(f"first_frame_id must be in [0, 65535], got {first_frame_id}")
        self.ip = ip
        self.max_step_deg = float(max_step_deg)
        self.gripper_velocity_pct = float(gripper_velocity_pct)
        self.gripper_force_pct = float(gripper_force_pct)
        self.max_missed_refreshes = int(max_missed_refreshes)
        self.feedback_max_age_s = float(feedback_max_age_s)
        self.clear_faults_timeout_s = float(clear_faults_timeout_s)
        self._cameras: dict[str, CameraSource] = dict(cameras or {})
        self.camera_names: tuple[str, ...] = tuple(self._cameras)
        self._clock = clock
        self._t0 = clock()

        self.clamp_count = 0
        self.clamp_counts = np.zeros(gen3.N_JOINTS, dtype=np.int64)
        self.missed_refreshes = 0
        self.frames_sent = 0
        self._consecutive_missed = 0
        self._frame_id = (first_frame_id - 1) % FRAME_ID_MODULUS  # incremented before each send
        self.router_errors: list[str] = []

        # Connection objects (None until made, so close() works on a half-built backend).
        self._tcp: Any = None
        self._udp: Any = None
        self._tcp_router: Any = None
        self._udp_router: Any = None
        self._tcp_session: Any = None
        self._udp_session: Any = None
        self._base: Any = None
        self._cyclic: Any = None
        self._send_options: Any = None
        self._command: Any = None
        self._gripper_motor: Any = None
        self._low_level = False
        self._closed = False

        # Latest feedback, converted.
        self._feedback: Any = None
        self._feedback_t = 0.0
        self._feedback_fresh = False
        self._fault: str | None = None
        self._q: np.ndarray | None = None
        self._q_deg = np.zeros(gen3.N_JOINTS)
        self._qd = np.zeros(gen3.N_JOINTS)
        self._gripper = 0.0

        self._api = kortex if kortex is not None else load_kortex_api()
        try:
            self._connect(
                ip, username, password, refresh_timeout_ms,
                session_inactivity_timeout_ms, connection_inactivity_timeout_ms,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    # -- RobotBackend ---------------------------------------------------------------------

    def read_state(self) -> ArmState:
        """The arm state from the cached ``Refresh`` feedback if fresh, else ``RefreshFeedback``.

        Raises:
            RobotError: closed, communication failure, arm fault (until :meth:`clear_faults`)
                or a limited joint outside the model's limits.
        """
        self._check_open()
        age = self._clock() - self._feedback_t
        if not (self._feedback_fresh and age <= self.feedback_max_age_s):
            feedback = self._call("BaseCyclic.RefreshFeedback", self._cyclic.RefreshFeedback)
            self._store_feedback(feedback)
        self._feedback_fresh = False
        if self._fault is not None:
            raise RobotError(self._fault)
        assert self._q is not None
        q = self._q.copy()
        tool = gen3.tool_pose(q)
        return ArmState(
            time_s=self._feedback_t - self._t0,
            q=q,
            qd=self._qd.copy(),
            gripper=self._gripper,
            ee_position=tool[:3, 3].copy(),
            ee_quat_wxyz=matrix_to_quat(tool[:3, :3]),
        )

    def send_command(self, q_cmd: np.ndarray, qd_cmd: np.ndarray, gripper_cmd: float) -> None:
        """Send one cyclic frame: joint position targets [rad] (7,), gripper (0 open .. 1 closed).

        Each target is clipped to the model limits (limited joints), taken the short way round
        (continuous joints), then clamped to within ``max_step_deg`` of the last measured
        position and converted to Kortex degrees 0..360. ``qd_cmd`` is validated but not sent
        (the velocity field is unreliable in low-level servoing). The feedback that ``Refresh``
        returns is cached for the next :meth:`read_state`.

        Raises:
            ValueError: wrong shape or a non-finite value.
            RobotError: closed, arm fault, or more than ``max_missed_refreshes`` consecutive
                failed frames.
        """
        q_cmd = _check_joint_vector(q_cmd, "q_cmd")
        _check_joint_vector(qd_cmd, "qd_cmd")
        if not math.isfinite(gripper_cmd):
            raise ValueError(f"gripper_cmd must be finite, got {gripper_cmd}")
        self._check_open()
        if self._fault is not None:
            raise RobotError(self._fault)
        assert self._q is not None
        target = np.clip(q_cmd, gen3.JOINT_LOWER, gen3.JOINT_UPPER)
        delta = target - self._q
        delta[gen3.CONTINUOUS] = wrap_pi(delta[gen3.CONTINUOUS])
        delta_deg = np.degrees(delta)
        clamped = np.abs(delta_deg) > self.max_step_deg
        if clamped.any():
            self.clamp_counts += clamped
            self.clamp_count += int(clamped.sum())
            delta_deg = np.clip(delta_deg, -self.max_step_deg, self.max_step_deg)
        positions = wrap_360(self._q_deg + delta_deg)
        positions[positions >= 360.0 - 1e-4] = 0.0  # would round to 360.0 in the float32 field
        for actuator, position in zip(self._command.actuators, positions, strict=True):
            actuator.position = float(position)
        if self._gripper_motor is not None:
            self._gripper_motor.position = 100.0 * min(max(float(gripper_cmd), 0.0), 1.0)
        self._send_frame(tolerate=True)

    def advance(self, dt: float) -> None:
        """Nothing to do: on hardware time passes by itself (the loop keeps the deadlines)."""

    def capture_scene(self) -> None:
        """Live cameras: nothing to capture ahead; a frame is read when rendered."""
        return None

    def render_view(
        self, name: str, width: int, height: int, scene: object | None = None
    ) -> np.ndarray:
        """Capture camera ``name`` from the injected sources: RGB (height, width, 3) uint8
        (``scene`` is ignored: the sources are live).

        Raises:
            RobotError: no such camera (the Gen3 wrist camera is RTSP, not handled here) or a
                source returned a wrong image.
        """
        source = self._cameras.get(name)
        if source is None:
            raise RobotError(
                f"the Kortex backend has no camera {name!r} (have {self.camera_names}): the "
                "Gen3 wrist camera is an RTSP stream (rtsp://<arm-ip>/color) that this backend "
                "does not decode; pass cameras={name: source} to KortexBackend"
            )
        image = np.asarray(source(width, height))
        if image.shape != (height, width, 3) or image.dtype != np.uint8:
            raise RobotError(
                f"camera {name!r} returned {image.shape} {image.dtype}, "
                f"expected ({height}, {width}, 3) uint8"
            )
        return image

    def render_cameras(self, width: int, height: int) -> dict[str, np.ndarray]:
        """Capture every injected camera: name -> RGB (height, width, 3) uint8.

        Raises:
            RobotError: no camera was injected (see :meth:`render_view`).
        """
        if not self._cameras:
            raise RobotError(
                "the Kortex backend has no cameras: the Gen3 wrist camera is an RTSP stream "
                "this backend does not decode; pass cameras={'wrist': source} to KortexBackend"
            )
        return {n: self.render_view(n, width, height) for n in self.camera_names}

    def close(self) -> None:
        """Back to ``SINGLE_LEVEL_SERVOING``, close both sessions and transports; idempotent.

        Errors while closing are logged, not raised (close runs in ``finally`` blocks).
        """
        if self._closed:
            return
        self._closed = True
        errors = self._api.errors if getattr(self, "_api", None) is not None else ()
        steps: list[tuple[str, Callable[[], object]]] = []
        if self._base is not None and self._low_level:
            steps.append(("SetServoingMode(SINGLE_LEVEL_SERVOING)", self._set_single_level))
        for what, session in (("UDP", self._udp_session), ("TCP", self._tcp_session)):
            if session is not None:
                steps.append((f"{what} CloseSession", session.CloseSession))
        for what, router in (("UDP", self._udp_router), ("TCP", self._tcp_router)):
            if router is not None:
                steps.append(
                    (f"{what} router deactivation", lambda r=router: r.SetActivationStatus(False))
                )
        for what, transport in (("UDP", self._udp), ("TCP", self._tcp)):
            if transport is not None:
                steps.append((f"{what} disconnect", transport.disconnect))
        for what, step in steps:
            try:
                step()
            except errors as exc:
                _log.warning("kortex close: %s failed: %s", what, _describe(exc))
        self._low_level = False

    def __enter__(self) -> KortexBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        """The active fault's description, or None."""
        return self._fault

    def clear_faults(self) -> None:
        """Clear the arm's faults and resume low-level servoing from the measured position.

        Sequence (as ros2_kortex): SINGLE_LEVEL_SERVOING, ``Base.ClearFaults()``, wait until
        the feedback shows no fault (``clear_faults_timeout_s``), then re-seed the command at
        the measured position and re-enter LOW_LEVEL_SERVOING.

        Raises:
            RobotError: the fault does not clear, or a kortex call fails.
        """
        self._check_open()
        if self._low_level:
            try:  # a faulted arm may refuse it; ClearFaults below is what matters
                self._set_single_level()
            except self._api.errors as exc:
                _log.warning("SetServoingMode(SINGLE_LEVEL) before ClearFaults: %s", _describe(exc))
            self._low_level = False
        self._call("Base.ClearFaults", self._base.ClearFaults)
        deadline = self._clock() + self.clear_faults_timeout_s
        while True:
            feedback = self._call("BaseCyclic.RefreshFeedback", self._cyclic.RefreshFeedback)
            message = self._fault_message(feedback)
            if message is None:
                break
            if self._clock() >= deadline:
                raise RobotError(f"ClearFaults did not clear the fault: {message}")
            time.sleep(0.05)
        self._fault = None
        self._enter_low_level()

    # -- internals ------------------------------------------------------------------------

    def _connect(
        self,
        ip: str,
        username: str,
        password: str,
        refresh_timeout_ms: int,
        session_inactivity_timeout_ms: int,
        connection_inactivity_timeout_ms: int,
    ) -> None:
        api = self._api
        self._tcp = api.tcp_transport()
        self._tcp_router = api.router_client(self._tcp, self._on_router_error)
        self._udp = api.udp_transport()
        self._udp_router = api.router_client(self._udp, self._on_router_error)
        self._call(f"TCP connect to {ip}:{KORTEX_TCP_PORT}", self._tcp.connect, ip, KORTEX_TCP_PORT)
        self._call(f"UDP connect to {ip}:{KORTEX_UDP_PORT}", self._udp.connect, ip, KORTEX_UDP_PORT)

        info = api.session_pb2.CreateSessionInfo()
        info.username = username
        info.password = password
        info.session_inactivity_timeout = int(session_inactivity_timeout_ms)
        info.connection_inactivity_timeout = int(connection_inactivity_timeout_ms)
        tcp_session = api.session_manager(self._tcp_router)
        self._call("TCP CreateSession", tcp_session.CreateSession, info)
        self._tcp_session = tcp_session
        udp_session = api.session_manager(self._udp_router)
        self._call("UDP CreateSession", udp_session.CreateSession, info)
        self._udp_session = udp_session

        self._base = api.base_client(self._tcp_router)
        self._cyclic = api.base_cyclic_client(self._udp_router)
        options = api.router_client_send_options()
        options.andForget = False
        options.delay_ms = 0
        options.timeout_ms = int(refresh_timeout_ms)
        self._send_options = options
        self._enter_low_level()

    def _enter_low_level(self) -> None:
        """Seed a new command at the measured position, enter LOW_LEVEL, send the first frame."""
        api = self._api
        feedback = self._call("BaseCyclic.RefreshFeedback", self._cyclic.RefreshFeedback)
        if len(feedback.actuators) != gen3.N_JOINTS:
            raise RobotError(
                f"expected a {gen3.N_JOINTS}-actuator Gen3, the arm reports "
                f"{len(feedback.actuators)} actuators"
            )
        self._store_feedback(feedback)
        if self._fault is not None:
            raise RobotError(f"{self._fault} (the arm was in fault before low-level servoing)")
        command = api.base_cyclic_pb2.Command()
        for measured in feedback.actuators:
            actuator = command.actuators.add()
            actuator.flags = SERVOING_FLAG
            actuator.position = measured.position
        motors = feedback.interconnect.gripper_feedback.motor
        self._gripper_motor = None
        if len(motors) > 0:
            command.interconnect.command_id.identifier = 0  # as Kinova's gripper example
            motor = command.interconnect.gripper_command.motor_cmd.add()
            motor.position = motors[0].position
            motor.velocity = self.gripper_velocity_pct
            motor.force = self.gripper_force_pct
            self._gripper_motor = motor
        self._command = command
        mode = api.base_pb2.ServoingModeInformation()
        mode.servoing_mode = api.base_pb2.LOW_LEVEL_SERVOING
        self._call("Base.SetServoingMode(LOW_LEVEL)", self._base.SetServoingMode, mode)
        self._low_level = True
        self._send_frame(tolerate=False)

    def _set_single_level(self) -> None:
        mode = self._api.base_pb2.ServoingModeInformation()
        mode.servoing_mode = self._api.base_pb2.SINGLE_LEVEL_SERVOING
        self._base.SetServoingMode(mode)

    def _send_frame(self, *, tolerate: bool) -> None:
        """Number the command (frame_id + 1, wrapping; command_id = frame_id) and Refresh."""
        self._frame_id = (self._frame_id + 1) % FRAME_ID_MODULUS
        command = self._command
        command.frame_id = self._frame_id
        for actuator in command.actuators:
            actuator.command_id = self._frame_id
        self.frames_sent += 1
        try:
            feedback = self._cyclic.Refresh(command, 0, self._send_options)
        except self._api.errors as exc:
            self.missed_refreshes += 1
            self._consecutive_missed += 1
            if not tolerate or self._consecutive_missed > self.max_missed_refreshes:
                raise RobotError(
                    f"BaseCyclic.Refresh failed ({self._consecutive_missed} in a row): "
                    f"{_describe(exc)}"
                ) from exc
            _log.warning("BaseCyclic.Refresh failed, frame lost: %s", _describe(exc))
            return
        self._store_feedback(feedback)

    def _store_feedback(self, feedback: Any) -> None:
        """Cache ``feedback``: convert units, unwrap continuous joints, note faults."""
        self._feedback = feedback
        self._feedback_t = self._clock()
        self._consecutive_missed = 0  # the link works
        self._feedback_fresh = True
        message = self._fault_message(feedback)
        if message is not None:
            self._fault = message
        deg = np.array([a.position for a in feedback.actuators], dtype=np.float64)
        self._q_deg = deg
        q = wrap_pi(np.radians(deg))
        if self._q is not None:
            cont = gen3.CONTINUOUS
            q[cont] = self._q[cont] + wrap_pi(q[cont] - self._q[cont])
        self._q = q
        self._qd = np.radians([a.velocity for a in feedback.actuators])
        motors = feedback.interconnect.gripper_feedback.motor
        if len(motors) > 0:
            self._gripper = min(max(float(motors[0].position) / 100.0, 0.0), 1.0)
        limited = ~gen3.CONTINUOUS
        outside = limited & (
            (q < gen3.JOINT_LOWER - LIMIT_TOLERANCE_RAD)
            | (q > gen3.JOINT_UPPER + LIMIT_TOLERANCE_RAD)
        )
        if outside.any():
            joints = ", ".join(
                f"joint_{i + 1}={q[i]:.3f} rad ({deg[i]:.1f} deg)" for i in np.flatnonzero(outside)
            )
            raise RobotError(
                f"joint reading outside the model limits: {joints}; check the arm's zero "
                "position and gen3.JOINTS"
            )

    def _fault_message(self, feedback: Any) -> str | None:
        """Describe the faults in ``feedback`` (arm state, base and actuator fault banks)."""
        base = feedback.base
        parts = []
        if base.active_state == self._api.common_pb2.ARMSTATE_IN_FAULT:
            parts.append("arm state ARMSTATE_IN_FAULT")
        if base.fault_bank_a or base.fault_bank_b:
            parts.append(f"base fault banks a=0x{base.fault_bank_a:x} b=0x{base.fault_bank_b:x}")
        for i, actuator in enumerate(feedback.actuators):
            if actuator.fault_bank_a or actuator.fault_bank_b:
                parts.append(
                    f"actuator {i + 1} fault banks a=0x{actuator.fault_bank_a:x} "
                    f"b=0x{actuator.fault_bank_b:x}"
                )
        if not parts:
            return None
        return "Gen3 fault: " + "; ".join(parts) + " (call clear_faults() once it is safe)"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a kortex function, turning kortex's exceptions into :class:`RobotError`."""
        try:
            return fn(*args)
        except self._api.errors as exc:
            raise RobotError(f"kortex {what} failed: {_describe(exc)}") from exc

    def _on_router_error(self, exc: Any) -> None:
        """RouterClient error callback (runs on kortex's thread): keep the last few messages."""
        self.router_errors.append(_describe(exc))
        del self.router_errors[:-20]

    def _check_open(self) -> None:
        if self._closed:
            raise RobotError("the Kortex backend is closed")


def _check_joint_vector(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (gen3.N_JOINTS,):
        raise ValueError(f"{what} must have shape ({gen3.N_JOINTS},), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be finite, got {v}")
    return v
