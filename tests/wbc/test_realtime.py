"""Real-time habits (gr2_wbc.realtime), the agent's trajectory/real-time settings, and the
loop's robot clock for the link thread.

Whether this machine permits SCHED_FIFO and mlockall depends on where the tests run (root
with CAP_SYS_NICE, a container without it, macOS): the tests accept either outcome but check
that what ``enter_realtime`` reports is what the kernel then says. No timed assertions.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from gr2_wbc import loop as loop_module
from gr2_wbc import realtime
from gr2_wbc.control.smoothing import ChunkSmoother
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import default_ik
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.realtime import RealtimeStatus, current_scheduler, enter_realtime, leave_realtime
from gr2_wbc.robots.base import ArmState
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.settings import AgentSettings
from pydantic import ValidationError

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ
HAS_SCHED = hasattr(os, "sched_setscheduler")


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a fresh thread (scheduling changes stay off pytest's main thread)."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller below
            out["error"] = err

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


# ---------------------------------------------------------------------- enter / leave


@pytest.mark.skipif(not HAS_SCHED, reason="os.sched_* is Linux-only")
def test_enter_reports_what_the_kernel_then_says_and_leave_restores() -> None:
    """Permitted or refused, the status matches sched_getscheduler; only the calling thread
    changes; leave_realtime puts SCHED_OTHER back."""
    main_before = os.sched_getscheduler(0)
    seen: dict[str, object] = {}
    entered, checked = threading.Event(), threading.Event()

    def worker() -> RealtimeStatus:
        seen["before"] = os.sched_getscheduler(0)
        status = enter_realtime(80, lock_memory=False)
        seen["during"] = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        entered.set()
        checked.wait()
        leave_realtime(status)
        leave_realtime(status)  # idempotent
        seen["after"] = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        return status

    box: dict[str, RealtimeStatus] = {}
    thread = threading.Thread(target=lambda: box.setdefault("s", worker()))
    thread.start()
    entered.wait()
    seen["main_during"] = os.sched_getscheduler(0)
    checked.set()
    thread.join()
    status = box["s"]

    policy, priority = seen["during"]  # type: ignore[misc]
    assert status.scheduler == realtime._POLICY_NAMES[policy]
    assert status.priority == priority
    assert status.requested_priority == 80 and not status.memory_locked
    if status.fifo:
        assert priority == 80
        assert status.message == "SCHED_FIFO priority 80, memory not locked (not requested)"
    else:
        assert seen["before"] == policy == os.SCHED_OTHER
        assert status.message.startswith("SCHED_FIFO not permitted (")
        assert "running SCHED_OTHER; to allow it" in status.message
        assert "CAP_SYS_NICE" in status.message and "ulimit -r" in status.message
    assert seen["main_during"] == main_before  # per thread: pytest's thread never changed
    assert seen["after"] == (os.SCHED_OTHER, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="mlockall/VmLck are Linux-only")
def test_enter_with_memory_locking_in_a_fresh_process() -> None:
    """The whole thing (SCHED_FIFO + mlockall) in its own process, so pytest's memory is never
    locked; memory_locked must agree with the kernel's VmLck, and leave undoes both."""
    script = """
import json, os
from gr2_wbc.realtime import enter_realtime, leave_realtime, current_scheduler
def vmlck():
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
status = enter_realtime(80)
during = (current_scheduler(), vmlck())
leave_realtime(status)
print(json.dumps({"status": status.to_dict(), "during": during,
                  "after": (current_scheduler(), vmlck())}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    status, ((sched, prio), locked_kb) = out["status"], out["during"]
    assert status["scheduler"] == sched and status["priority"] == prio
    assert status["memory_locked"] == (locked_kb > 0)
    if status["memory_locked"]:
        assert status["message"].endswith("memory locked")
    else:
        assert "memory not locked (" in status["message"] and "memlock" in status["message"]
    assert out["after"] == [["SCHED_OTHER", 0], 0]


@pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("setpriv") is None, reason="needs util-linux setpriv"
)
def test_refused_for_real_without_the_capabilities() -> None:
    """Drop CAP_SYS_NICE and CAP_IPC_LOCK (setpriv) and try: the refusal is reported with the
    reason and the fix, and the thread really stays SCHED_OTHER."""
    script = (
        "import json; from gr2_wbc.realtime import enter_realtime, current_scheduler; "
        "s = enter_realtime(80); print(json.dumps([s.to_dict(), current_scheduler()]))"
    )
    caps = "-sys_nice,-ipc_lock"
    result = subprocess.run(
        ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0 and result.stderr.startswith("setpriv"):
        pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    status, (sched, prio) = json.loads(result.stdout)
    assert status["scheduler"] == sched and status["priority"] == prio
    if sched != "SCHED_FIFO":  # (a generous RLIMIT_RTPRIO would still allow it)
        assert status["message"].startswith("SCHED_FIFO not permitted (EPERM")
        assert "CAP_SYS_NICE" in status["message"]


def test_a_refusal_keeps_the_policy_and_says_how_to_allow_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse, raising=False)
    status = enter_realtime(80, lock_memory=False)
    assert (status.scheduler, status.priority) == current_scheduler()
    assert not status.fifo and not status.memory_locked
    assert status.message.startswith("SCHED_FIFO not permitted (EPERM")
    for hint in (
        "CAP_SYS_NICE",
        "ulimit -r",
        "limits.conf",
        "--cap-add SYS_NICE",
        "securityContext",
    ):
        assert hint in status.message, hint
    leave_realtime(status)  # nothing was changed: nothing to restore
    assert (status.scheduler, status.priority) == current_scheduler()


def test_no_sched_setscheduler_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_setscheduler", raising=False)
    status = enter_realtime(80, lock_memory=False)
    assert "is not available on" in status.message and not status.fifo


@pytest.mark.parametrize("priority", [0, None])
def test_priority_zero_or_none_tries_nothing(
    priority: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_be_called(*_: object) -> None:
        raise AssertionError("sched_setscheduler called with real time off")

    monkeypatch.setattr(os, "sched_setscheduler", must_not_be_called, raising=False)
    status = enter_realtime(priority)
    assert status.message.startswith(f"real-time scheduling not requested (priority {priority})")
    assert (status.scheduler, status.priority) == current_scheduler()
    assert not status.memory_locked and status.to_dict()["requested_priority"] == priority
    leave_realtime(status)


@pytest.mark.parametrize("priority", [-1, 100])
def test_priority_out_of_range_is_an_error(priority: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.99"):
        enter_realtime(priority)


@pytest.mark.skipif(not HAS_SCHED, reason="os.sched_* is Linux-only")
def test_loop_run_enters_and_leaves_realtime_when_configured(
    robot: MujocoGen3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoopConfig.rt_priority set: run() records the status, the callback sees the thread
    as reported, and the thread is SCHED_OTHER again afterwards. (Memory locking is left to
    the subprocess test: it would lock all of pytest's memory.)"""
    monkeypatch.setattr(
        loop_module, "enter_realtime", lambda p: enter_realtime(p, lock_memory=False)
    )
    loop = make_loop(robot, rt_priority=80)
    seen: list[tuple[RealtimeStatus, tuple[str, int]]] = []

    def record(status: RealtimeStatus) -> None:
        seen.append((status, current_scheduler()))

    def run() -> tuple[str, int]:
        loop.run(threading.Event(), max_duration_s=5 * DT, on_realtime=record)
        return current_scheduler()

    after = _in_thread(run)
    assert loop.ticks == 5 and len(seen) == 1
    status, during = seen[0]
    assert loop.realtime_status is status
    assert (status.scheduler, status.priority) == during
    assert after == ("SCHED_OTHER", 0)


def test_loop_leaves_scheduling_alone_by_default(
    robot: MujocoGen3, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_be_called(*_: object) -> None:
        raise AssertionError("enter_realtime called with rt_priority None")

    monkeypatch.setattr(loop_module, "enter_realtime", must_not_be_called)
    loop = make_loop(robot)
    loop.run(threading.Event(), max_duration_s=2 * DT)
    assert loop.ticks == 2 and loop.realtime_status is None


# ---------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("GR2_WBC_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_settings_defaults_match_the_trajectory_classes(clean_env: pytest.MonkeyPatch) -> None:
    settings = AgentSettings()
    buffer, smoother = TrajectoryBuffer(), ChunkSmoother()
    assert settings.blend == buffer.blend == "min_jerk"
    assert settings.blend_s == buffer.blend_s
    assert settings.ensemble_decay == buffer.ensemble_decay
    assert settings.smooth_chunks is False
    assert settings.smooth_jerk_weight == smoother.jerk_weight
    assert settings.smooth_tolerance_m == smoother.tolerance_m
    assert settings.rt_priority == realtime.DEFAULT_PRIORITY == 80
    for name, info in AgentSettings.model_fields.items():
        assert info.description, f"{name} has no description"


def test_settings_parse_environment_variables(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in {
        "GR2_WBC_BLEND": "ensemble",
        "GR2_WBC_BLEND_S": "0.25",
        "GR2_WBC_ENSEMBLE_DECAY": "4",
        "GR2_WBC_SMOOTH_CHUNKS": "true",
        "GR2_WBC_SMOOTH_JERK_WEIGHT": "1e-5",
        "GR2_WBC_SMOOTH_TOLERANCE_M": "0.005",
        "GR2_WBC_RT_PRIORITY": "0",
    }.items():
        clean_env.setenv(key, value)
    settings = AgentSettings()
    assert settings.blend == "ensemble" and settings.blend_s == 0.25
    assert settings.ensemble_decay == 4.0 and settings.smooth_chunks is True
    assert settings.rt_priority == 0
    buffer = settings.trajectory_buffer(max_chunks=6)
    assert (buffer.blend, buffer.blend_s, buffer.ensemble_decay) == ("ensemble", 0.25, 4.0)
    assert settings.trajectory_buffer("min_jerk").blend == "min_jerk"  # the CLI flag wins
    smoother = settings.chunk_smoother()
    assert (smoother.jerk_weight, smoother.tolerance_m) == (1e-5, 0.005)


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("GR2_WBC_BLEND", "cubic", "blend"),
        ("GR2_WBC_BLEND_S", "-0.1", "blend_s"),
        ("GR2_WBC_RT_PRIORITY", "100", "rt_priority"),
        ("GR2_WBC_SMOOTH_TOLERANCE_M", "-1", "smooth_tolerance_m"),
    ],
)
def test_settings_reject_bad_values_naming_the_field(
    clean_env: pytest.MonkeyPatch, key: str, value: str, field: str
) -> None:
    clean_env.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        AgentSettings()
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


# ---------------------------------------------------------------------- robot clock


class StateSpy:
    """Delegates to a real backend and keeps the robot time of every state read."""

    def __init__(self, inner: MujocoGen3) -> None:
        self.inner = inner
        self.camera_names = inner.camera_names
        self.times: list[float] = []

    def read_state(self) -> ArmState:
        state = self.inner.read_state()
        self.times.append(state.time_s)
        return state

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def robot() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def make_loop(backend: object, **cfg: object) -> ControlLoop:
    config = LoopConfig(rate_hz=RATE_HZ, realtime=False, observation_period_s=0.0, **cfg)  # type: ignore[arg-type]
    return ControlLoop(backend, TrajectoryBuffer(), default_ik(RATE_HZ), config)  # type: ignore[arg-type]


def test_robot_time_is_within_a_tick_of_the_latest_state(robot: MujocoGen3) -> None:
    spy = StateSpy(robot)
    loop = make_loop(spy)
    assert loop.robot_time_s() == 0.0  # before the first tick (documented)
    values = []
    for _ in range(20):  # one tick per run: the latest state time is known exactly
        loop.run(threading.Event(), max_duration_s=DT)
        t_state = spy.times[-1]
        for _ in range(3):
            now = loop.robot_time_s()
            assert t_state <= now <= t_state + DT, (t_state, now)
            values.append(now)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert spy.times == sorted(spy.times) and len(spy.times) == 20


def test_robot_time_never_decreases_while_the_loop_runs(robot: MujocoGen3) -> None:
    """Read from another thread while the loop ticks (as the link does)."""
    spy = StateSpy(robot)
    loop = make_loop(spy)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (loop.run(threading.Event(), max_duration_s=400 * DT), done.set())
    )
    thread.start()
    values = []
    while not done.is_set():
        values.append(loop.robot_time_s())
        time.sleep(1e-4)  # a reader now and then, as the link is (no timing is asserted)
    thread.join()
    values.append(loop.robot_time_s())
    assert loop.ticks == 400 and len(values) > 1
    assert all(b >= a for a, b in itertools.pairwise(values))
    first_state, last_state = spy.times[0], spy.times[-1]
    assert all(v == 0.0 or first_state <= v <= last_state + DT for v in values)
    assert last_state <= values[-1] <= last_state + DT
