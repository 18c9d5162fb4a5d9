"""FakeKortex: a plain-Python stand-in for a Gen3 arm and the kortex_api classes that reach it.

The hardware cannot be here, so the tests drive :class:`~gr2_wbc.robots.kortex.backend.
KortexBackend` against this instead. It is NOT a mock library: it is a small simulation with
the shape of the kortex_api pieces the backend uses (:attr:`FakeKortex.api`, a
:class:`~gr2_wbc.robots.kortex.backend.KortexApi`), and it enforces the low-level servoing
protocol the way the real arm would, only more loudly:

* 7 actuators and a Robotiq gripper follow their commanded positions with a first-order lag
  (``tau_s``), one ``step_s`` of simulated time per cyclic ``Refresh``; positions are reported
  in degrees 0..360, the gripper in 0..100 %.
* ``BaseClient`` must be built on the TCP router and ``BaseCyclicClient`` on the UDP router,
  both after a session was created on that router with the right credentials.
* Every ``Refresh`` is recorded (:attr:`FakeKortex.commands`) and CHECKED: servoing mode is
  ``LOW_LEVEL_SERVOING``; ``frame_id`` is the previous one + 1 mod 65536 (the first frame after
  entering low-level or clearing faults may be any 0..65535); every actuator's ``command_id``
  equals ``frame_id`` and its ``flags`` is 1; every position is in [0, 360) and within the
  5-degree following-error bound of the simulated measured position (a position in radians by
  mistake almost always fails this); the gripper position, velocity and force are in 0..100.
  A violation faults the arm like the real one: ``active_state`` becomes ``ARMSTATE_IN_FAULT``,
  fault banks are set, the arm holds still and ignores commands until ``ClearFaults``;
  :attr:`FakeKortex.fault_reason` says why.

Modelling choices (the real arm's exact behaviour is not documented): ``ClearFaults`` leaves the
arm in ``SINGLE_LEVEL_SERVOING`` (the client must re-enter low-level explicitly), and
``RefreshFeedback`` reads without advancing simulated time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from gr2_wbc.kinematics import gen3
from gr2_wbc.robots.kortex.backend import (
    FOLLOWING_ERROR_FAULT_DEG,
    FRAME_ID_MODULUS,
    KORTEX_TCP_PORT,
    KORTEX_UDP_PORT,
    SERVOING_FLAG,
    KortexApi,
    wrap_360,
)

# Enum values as in Kinova's protos (Base.ServoingMode, Common.ArmState).
SINGLE_LEVEL_SERVOING = 2
LOW_LEVEL_SERVOING = 3
ARMSTATE_IN_FAULT = 4
ARMSTATE_SERVOING_LOW_LEVEL = 6
ARMSTATE_SERVOING_READY = 7

FOLLOWING_ERROR_BIT = 1 << 0
"""Fault bank bit the fake sets for a following error (the real bit layout is not modelled)."""
PROTOCOL_ERROR_BIT = 1 << 1
"""Fault bank bit the fake sets for any other protocol violation or injected fault."""


class FakeKException(Exception):  # noqa: N818 - named after kortex's KException
    """Stands in for ``kortex_api.Exceptions.KException`` (e.g. a UDP timeout)."""


class FakeKServerException(FakeKException):
    """Stands in for ``kortex_api.Exceptions.KServerException`` (the arm refused a call)."""


# -- messages (plain classes with the protobuf field names) ------------------------------------


class _Repeated(list):  # type: ignore[type-arg]
    """A repeated message field: ``add()`` appends a new element and returns it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        super().__init__()
        self._factory = factory

    def add(self) -> Any:
        item = self._factory()
        self.append(item)
        return item


class _ActuatorCommand:
    def __init__(self) -> None:
        self.command_id = 0
        self.flags = 0
        self.position = 0.0
        self.velocity = 0.0
        self.torque_joint = 0.0
        self.current_motor = 0.0


class _MotorCommand:
    def __init__(self) -> None:
        self.motor_id = 0
        self.position = 0.0
        self.velocity = 0.0
        self.force = 0.0


class _Command:
    """``BaseCyclic_pb2.Command``."""

    def __init__(self) -> None:
        self.frame_id = 0
        self.actuators = _Repeated(_ActuatorCommand)
        self.interconnect = SimpleNamespace(
            command_id=SimpleNamespace(identifier=0),
            gripper_command=SimpleNamespace(
                command_id=SimpleNamespace(identifier=0), motor_cmd=_Repeated(_MotorCommand)
            ),
        )


class _ServoingModeInformation:
    def __init__(self) -> None:
        self.servoing_mode = 0


class _CreateSessionInfo:
    def __init__(self) -> None:
        self.username = ""
        self.password = ""
        self.session_inactivity_timeout = 0
        self.connection_inactivity_timeout = 0


class _RouterClientSendOptions:
    def __init__(self) -> None:
        self.andForget = False
        self.delay_ms = 0
        self.timeout_ms = 10


@dataclass(frozen=True)
class RecordedCommand:
    """One ``Refresh`` as the fake received it.

    Attributes:
        frame_id: the command's frame_id.
        command_ids: each actuator's command_id.
        flags: each actuator's flags.
        positions_deg: each actuator's commanded position [deg].
        measured_deg: each simulated actuator's position when the command arrived [deg].
        gripper: (position, velocity, force) [%] of ``motor_cmd[0]``, or None.
        accepted: False if the arm was (or went) in fault and ignored it.
    """

    frame_id: int
    command_ids: tuple[int, ...]
    flags: tuple[int, ...]
    positions_deg: tuple[float, ...]
    measured_deg: tuple[float, ...]
    gripper: tuple[float, float, float] | None
    accepted: bool


def _angle_diff_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` the short way round, in (-180, 180] [deg]."""
    return -np.remainder(-(np.asarray(a) - np.asarray(b)) + 180.0, 360.0) + 180.0


# -- the simulated arm -------------------------------------------------------------------------


class FakeKortex:
    """A simulated Gen3 + gripper and the kortex_api stand-ins bound to it (see module doc).

    Args:
        initial_q: start joint positions [rad], shape (7,); default ``gen3.HOME_Q``.
        initial_gripper_pct: start gripper position [0-100 %].
        step_s: simulated time per cyclic Refresh [s] (the 200 Hz period by default).
        tau_s: joint position lag time constant [s].
        gripper_tau_s: gripper lag time constant [s].
        username, password: the credentials the fake accepts.
        has_gripper: whether a gripper is on the interconnect.

    Attributes:
        api: the :class:`KortexApi` to pass to ``KortexBackend(kortex=...)``.
        positions_deg, velocities_deg: simulated actuators [deg], [deg/s], shape (7,).
        gripper_pct: simulated gripper position [%].
        servoing_mode: current ``Base`` servoing mode (2 single-level, 3 low-level).
        servoing_modes: every mode set through ``SetServoingMode``, in order.
        fault_reason: why the arm is in fault, or None.
        commands: every Refresh received (:class:`RecordedCommand`).
        calls: a log of the API calls (``"tcp.connect 10000"``, ``"Base.ClearFaults"``...).
        fail_next_refreshes: make the next N cyclic calls raise :class:`FakeKException`.
        clear_faults_calls: how often ``ClearFaults`` was called.
    """

    def __init__(
        self,
        initial_q: np.ndarray | None = None,
        *,
        initial_gripper_pct: float = 0.0,
        step_s: float = 0.005,
        tau_s: float = 0.03,
        gripper_tau_s: float = 0.05,
        username: str = "admin",
        password: str = "admin",
        has_gripper: bool = True,
    ) -> None:
        q = gen3.HOME_Q if initial_q is None else np.asarray(initial_q, dtype=np.float64)
        self.positions_deg = wrap_360(np.degrees(q))
        self.velocities_deg = np.zeros(gen3.N_JOINTS)
        self.targets_deg = self.positions_deg.copy()
        self.gripper_pct = float(initial_gripper_pct)
        self.gripper_target_pct = self.gripper_pct
        self.step_s = step_s
        self.tau_s = tau_s
        self.gripper_tau_s = gripper_tau_s
        self.username = username
        self.password = password
        self.has_gripper = has_gripper

        self.servoing_mode = SINGLE_LEVEL_SERVOING
        self.servoing_modes: list[int] = []
        self.fault_reason: str | None = None
        self.base_fault_bank_a = 0
        self.actuator_fault_bank_a = np.zeros(gen3.N_JOINTS, dtype=np.int64)
        self.last_frame_id: int | None = None
        self.commands: list[RecordedCommand] = []
        self.calls: list[str] = []
        self.fail_next_refreshes = 0
        self.clear_faults_calls = 0
        self.time_s = 0.0

        self.api = KortexApi(
            tcp_transport=lambda: _Transport(self, "tcp"),
            udp_transport=lambda: _Transport(self, "udp"),
            router_client=lambda transport, callback: _Router(self, transport, callback),
            router_client_send_options=_RouterClientSendOptions,
            session_manager=lambda router: _SessionManager(self, router),
            base_client=lambda router: _BaseClient(self, router),
            base_cyclic_client=lambda router: _BaseCyclicClient(self, router),
            session_pb2=SimpleNamespace(CreateSessionInfo=_CreateSessionInfo),
            base_pb2=SimpleNamespace(
                ServoingModeInformation=_ServoingModeInformation,
                SINGLE_LEVEL_SERVOING=SINGLE_LEVEL_SERVOING,
                LOW_LEVEL_SERVOING=LOW_LEVEL_SERVOING,
            ),
            base_cyclic_pb2=SimpleNamespace(Command=_Command),
            common_pb2=SimpleNamespace(
                ARMSTATE_IN_FAULT=ARMSTATE_IN_FAULT,
                ARMSTATE_SERVOING_LOW_LEVEL=ARMSTATE_SERVOING_LOW_LEVEL,
                ARMSTATE_SERVOING_READY=ARMSTATE_SERVOING_READY,
            ),
            errors=(FakeKException, FakeKServerException),
        )
        self._open_sessions: set[str] = set()
        self._connected: set[str] = set()

    # -- inspection and fault injection -------------------------------------------------

    @property
    def active_state(self) -> int:
        """``Common.ArmState`` as the base reports it."""
        if self.fault_reason is not None:
            return ARMSTATE_IN_FAULT
        if self.servoing_mode == LOW_LEVEL_SERVOING:
            return ARMSTATE_SERVOING_LOW_LEVEL
        return ARMSTATE_SERVOING_READY

    @property
    def connected(self) -> set[str]:
        """Transports connected now (``"tcp"``, ``"udp"``)."""
        return set(self._connected)

    @property
    def open_sessions(self) -> set[str]:
        """Sessions open now (``"tcp"``, ``"udp"``)."""
        return set(self._open_sessions)

    def joint_positions_rad(self) -> np.ndarray:
        """Simulated joint positions [rad] in (-pi, pi], shape (7,)."""
        return -np.remainder(-np.radians(self.positions_deg) + math.pi, 2 * math.pi) + math.pi

    def inject_fault(self, reason: str, actuator: int | None = None) -> None:
        """Put the arm in fault as a real fault would (actuator: 0-based index or None)."""
        self._fault(reason, PROTOCOL_ERROR_BIT, actuator)

    # -- simulation -----------------------------------------------------------------------

    def _fault(self, reason: str, bit: int, actuator: int | None) -> None:
        if self.fault_reason is None:
            self.fault_reason = reason
        self.base_fault_bank_a |= bit
        if actuator is not None:
            self.actuator_fault_bank_a[actuator] |= bit
        self.targets_deg = self.positions_deg.copy()  # hold still
        self.gripper_target_pct = self.gripper_pct

    def _check(self, command: Any) -> tuple[str, int, int | None] | None:
        """The first protocol violation in ``command``: (reason, fault bit, actuator)."""
        if self.servoing_mode != LOW_LEVEL_SERVOING:
            return ("cyclic command while not in LOW_LEVEL_SERVOING", PROTOCOL_ERROR_BIT, None)
        actuators = list(command.actuators)
        if len(actuators) != gen3.N_JOINTS:
            return (f"{len(actuators)} actuator commands, expected 7", PROTOCOL_ERROR_BIT, None)
        frame = command.frame_id
        if not (isinstance(frame, int) and 0 <= frame < FRAME_ID_MODULUS):
            return (f"frame_id {frame!r} is not in 0..65535", PROTOCOL_ERROR_BIT, None)
        if self.last_frame_id is not None:
            expected = (self.last_frame_id + 1) % FRAME_ID_MODULUS
            if frame != expected:
                return (
                    f"frame_id {frame} after {self.last_frame_id} (expected {expected})",
                    PROTOCOL_ERROR_BIT,
                    None,
                )
        for i, a in enumerate(actuators):
            if a.command_id != frame:
                return (
                    f"actuator {i + 1} command_id {a.command_id} != frame_id {frame}",
                    PROTOCOL_ERROR_BIT,
                    i,
                )
            if a.flags != SERVOING_FLAG:
                return (f"actuator {i + 1} flags {a.flags} != 1", PROTOCOL_ERROR_BIT, i)
            p = float(a.position)
            if not (math.isfinite(p) and 0.0 <= p < 360.0):
                return (
                    f"actuator {i + 1} position {p} is not in [0, 360) degrees",
                    PROTOCOL_ERROR_BIT,
                    i,
                )
            err = abs(float(_angle_diff_deg(p, self.positions_deg[i])))
            if err > FOLLOWING_ERROR_FAULT_DEG:
                return (
                    f"following error on actuator {i + 1}: commanded {p:.3f} deg, measured "
                    f"{self.positions_deg[i]:.3f} deg ({err:.2f} > {FOLLOWING_ERROR_FAULT_DEG})",
                    FOLLOWING_ERROR_BIT,
                    i,
                )
        motors = list(command.interconnect.gripper_command.motor_cmd)
        if motors:
            m = motors[0]
            for field in ("position", "velocity", "force"):
                value = float(getattr(m, field))
                if not (math.isfinite(value) and 0.0 <= value <= 100.0):
                    return (f"gripper {field} {value} is not in 0..100 %", PROTOCOL_ERROR_BIT, None)
        return None

    def _refresh(self, command: Any) -> SimpleNamespace:
        self.calls.append("BaseCyclic.Refresh")
        self._require_session("udp", "Refresh")
        self._maybe_fail()
        measured = tuple(float(p) for p in self.positions_deg)
        violation = None if self.fault_reason is not None else self._check(command)
        accepted = self.fault_reason is None and violation is None
        if violation is not None:
            self._fault(*violation)
        if accepted:
            self.targets_deg = np.array([float(a.position) for a in command.actuators])
            motors = list(command.interconnect.gripper_command.motor_cmd)
            if motors and self.has_gripper:
                self.gripper_target_pct = float(motors[0].position)
        motors = list(command.interconnect.gripper_command.motor_cmd)
        self.commands.append(
            RecordedCommand(
                frame_id=command.frame_id,
                command_ids=tuple(a.command_id for a in command.actuators),
                flags=tuple(a.flags for a in command.actuators),
                positions_deg=tuple(float(a.position) for a in command.actuators),
                measured_deg=measured,
                gripper=(
                    (float(motors[0].position), float(motors[0].velocity), float(motors[0].force))
                    if motors
                    else None
                ),
                accepted=accepted,
            )
        )
        self.last_frame_id = command.frame_id
        self._step()
        return self._feedback()

    def _step(self) -> None:
        alpha = 1.0 - math.exp(-self.step_s / self.tau_s)
        move = alpha * _angle_diff_deg(self.targets_deg, self.positions_deg)
        self.positions_deg = wrap_360(self.positions_deg + move)
        self.velocities_deg = move / self.step_s
        beta = 1.0 - math.exp(-self.step_s / self.gripper_tau_s)
        self.gripper_pct += beta * (self.gripper_target_pct - self.gripper_pct)
        self.time_s += self.step_s

    def _feedback(self) -> SimpleNamespace:
        """A ``BaseCyclic_pb2.Feedback`` of the simulated arm."""
        actuators = [
            SimpleNamespace(
                position=float(self.positions_deg[i]),
                velocity=float(self.velocities_deg[i]),
                torque=0.0,
                fault_bank_a=int(self.actuator_fault_bank_a[i]),
                fault_bank_b=0,
            )
            for i in range(gen3.N_JOINTS)
        ]
        motors = (
            [SimpleNamespace(position=self.gripper_pct, velocity=0.0)] if self.has_gripper else []
        )
        return SimpleNamespace(
            frame_id=self.last_frame_id or 0,
            base=SimpleNamespace(
                active_state=self.active_state,
                fault_bank_a=self.base_fault_bank_a,
                fault_bank_b=0,
            ),
            actuators=actuators,
            interconnect=SimpleNamespace(gripper_feedback=SimpleNamespace(motor=motors)),
        )

    def _maybe_fail(self) -> None:
        if self.fail_next_refreshes > 0:
            self.fail_next_refreshes -= 1
            raise FakeKException("UDP timeout: no answer from the arm within timeout_ms")

    def _require(self, router: _Router, kind: str, what: str) -> None:
        if router.transport.kind != kind:
            raise FakeKServerException(f"{what} must use the {kind.upper()} router")
        self._require_session(kind, what)

    def _require_session(self, kind: str, what: str) -> None:
        if kind not in self._open_sessions or kind not in self._connected:
            raise FakeKServerException(f"{what}: no session on the {kind.upper()} connection")


# -- the kortex_api classes, bound to one FakeKortex -------------------------------------------


class _Transport:
    def __init__(self, arm: FakeKortex, kind: str) -> None:
        self.arm = arm
        self.kind = kind

    def connect(self, ip: str, port: int) -> None:
        self.arm.calls.append(f"{self.kind}.connect {port}")
        expected = KORTEX_TCP_PORT if self.kind == "tcp" else KORTEX_UDP_PORT
        if port != expected:
            raise FakeKException(f"{self.kind.upper()} connection to {ip}:{port} refused")
        self.arm._connected.add(self.kind)

    def disconnect(self) -> None:
        self.arm.calls.append(f"{self.kind}.disconnect")
        self.arm._connected.discard(self.kind)


class _Router:
    def __init__(self, arm: FakeKortex, transport: _Transport, callback: Callable[[Any], None]):
        self.arm = arm
        self.transport = transport
        self.callback = callback
        self.active = True

    def SetActivationStatus(self, active: bool) -> None:  # noqa: N802 - kortex's name
        self.arm.calls.append(f"{self.transport.kind}.router.SetActivationStatus {active}")
        self.active = active


class _SessionManager:
    def __init__(self, arm: FakeKortex, router: _Router) -> None:
        self.arm = arm
        self.router = router

    def CreateSession(self, info: _CreateSessionInfo) -> None:  # noqa: N802
        kind = self.router.transport.kind
        self.arm.calls.append(f"{kind}.CreateSession {info.username}")
        if kind not in self.arm._connected:
            raise FakeKException(f"CreateSession on a {kind.upper()} transport not connected")
        if (info.username, info.password) != (self.arm.username, self.arm.password):
            raise FakeKServerException("login failed: wrong username or password")
        if info.session_inactivity_timeout <= 0 or info.connection_inactivity_timeout <= 0:
            raise FakeKServerException("session timeouts must be positive")
        self.arm._open_sessions.add(kind)

    def CloseSession(self, options: Any = None) -> None:  # noqa: N802
        kind = self.router.transport.kind
        self.arm.calls.append(f"{kind}.CloseSession")
        self.arm._open_sessions.discard(kind)


class _BaseClient:
    def __init__(self, arm: FakeKortex, router: _Router) -> None:
        arm._require(router, "tcp", "BaseClient")
        self.arm = arm

    def SetServoingMode(self, info: _ServoingModeInformation) -> None:  # noqa: N802
        arm = self.arm
        mode = info.servoing_mode
        arm.calls.append(f"Base.SetServoingMode {mode}")
        arm._require_session("tcp", "SetServoingMode")
        if mode not in (SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING):
            raise FakeKServerException(f"unsupported servoing mode {mode}")
        arm.servoing_mode = mode
        arm.servoing_modes.append(mode)
        arm.last_frame_id = None
        arm.targets_deg = arm.positions_deg.copy()  # the arm holds where it is

    def GetServoingMode(self) -> _ServoingModeInformation:  # noqa: N802
        info = _ServoingModeInformation()
        info.servoing_mode = self.arm.servoing_mode
        return info

    def ClearFaults(self) -> None:  # noqa: N802
        arm = self.arm
        arm.calls.append("Base.ClearFaults")
        arm._require_session("tcp", "ClearFaults")
        arm.clear_faults_calls += 1
        arm.fault_reason = None
        arm.base_fault_bank_a = 0
        arm.actuator_fault_bank_a[:] = 0
        arm.servoing_mode = SINGLE_LEVEL_SERVOING
        arm.last_frame_id = None
        arm.targets_deg = arm.positions_deg.copy()


class _BaseCyclicClient:
    def __init__(self, arm: FakeKortex, router: _Router) -> None:
        arm._require(router, "udp", "BaseCyclicClient")
        self.arm = arm

    def Refresh(self, command: Any, device_id: int = 0, options: Any = None) -> Any:  # noqa: N802
        return self.arm._refresh(command)

    def RefreshFeedback(self, device_id: int = 0, options: Any = None) -> Any:  # noqa: N802
        self.arm.calls.append("BaseCyclic.RefreshFeedback")
        self.arm._require_session("udp", "RefreshFeedback")
        self.arm._maybe_fail()
        return self.arm._feedback()
