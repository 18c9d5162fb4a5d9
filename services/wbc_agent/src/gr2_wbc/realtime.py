"""Real-time habits for the control-loop thread: SCHED_FIFO and locked memory, when permitted.

DESIGN.md section 7, point 5. :func:`enter_realtime` is called by the thread that runs the
200 Hz loop (:meth:`gr2_wbc.loop.ControlLoop.run` does it when ``LoopConfig.rt_priority`` is
set), :func:`leave_realtime` undoes it. Neither ever fails the run: what was refused, why, and
how to allow it is in :attr:`RealtimeStatus.message`, one line for the log.

- Scheduling (Linux): ``sched_setscheduler(0, SCHED_FIFO, priority)``. Linux schedules
  threads, and pid 0 names the CALLING THREAD, so only the loop thread becomes real-time; the
  link thread, gRPC's threads and the metrics server stay SCHED_OTHER (threads inherit the
  policy of the thread that creates them, so create those before entering, as the agent does).
  Needs CAP_SYS_NICE or an RLIMIT_RTPRIO (``ulimit -r``) of at least the priority.
- Memory: ``mlockall(MCL_CURRENT | MCL_FUTURE)`` keeps every page of the process resident, so
  a tick never waits on a page fault served from swap. It locks the whole PROCESS (all
  threads) and new mappings are populated when made. Without CAP_IPC_LOCK the locked total is
  capped by RLIMIT_MEMLOCK (``ulimit -l``), and with MCL_FUTURE an allocation that would pass
  the cap FAILS (out of memory in the middle of a run). So without CAP_IPC_LOCK it is tried
  only when RLIMIT_MEMLOCK is unlimited; otherwise the message says so and how to allow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PRIORITY = 80
"""SCHED_FIFO priority of the loop thread (1..99): above the kernel's threaded IRQ handlers
(50) so device interrupts cannot delay a tick, below the watchdog/migration threads (99)."""

_CAP_IPC_LOCK = 14  # bit numbers in /proc/self/status CapEff (linux/capability.h)
_CAP_SYS_NICE = 23

_HOW_TO_FIFO = (
    "to allow it grant CAP_SYS_NICE (docker run --cap-add SYS_NICE, plus --cpu-rt-runtime on "
    "cgroup-v1 hosts; Kubernetes securityContext.capabilities.add: [SYS_NICE]; or setcap "
    "cap_sys_nice+ep on the interpreter) or raise the rtprio limit (ulimit -r 99; "
    "'@GROUP - rtprio 99' in /etc/security/limits.conf)"
)
_HOW_TO_MLOCK = (
    "to allow it grant CAP_IPC_LOCK (docker run --cap-add IPC_LOCK; Kubernetes "
    "securityContext.capabilities.add: [IPC_LOCK]) or lift the memlock limit (ulimit -l "
    "unlimited; '@GROUP - memlock unlimited' in /etc/security/limits.conf; docker run "
    "--ulimit memlock=-1)"
)

_POLICY_NAMES = {
    getattr(os, name): name
    for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
    if hasattr(os, name)
}


@dataclass
class RealtimeStatus:
    """What :func:`enter_realtime` achieved for the calling thread.

    Attributes:
        scheduler: the thread's scheduling policy after the attempt, read back from the
            kernel ("SCHED_FIFO", "SCHED_OTHER", ...; "unknown" where it cannot be read).
        priority: the thread's static priority after the attempt (0 for SCHED_OTHER).
        memory_locked: ``mlockall(MCL_CURRENT | MCL_FUTURE)`` succeeded.
        message: one line for the log: what runs, and for anything refused why and how to
            allow it.
        requested_priority: the priority asked for (None or 0: real-time not requested).
    """

    scheduler: str
    priority: int
    memory_locked: bool
    message: str
    requested_priority: int | None = None
    # What leave_realtime restores: the thread (native id) and its previous (policy, priority).
    _thread_id: int = field(default=0, repr=False)
    _previous: tuple[int, int] | None = field(default=None, repr=False)
    _left: bool = field(default=False, repr=False)

    @property
    def fifo(self) -> bool:
        """The thread runs SCHED_FIFO."""
        return self.scheduler == "SCHED_FIFO"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the run summary's ``"realtime"`` entry)."""
        return {
            "scheduler": self.scheduler,
            "priority": self.priority,
            "memory_locked": self.memory_locked,
            "requested_priority": self.requested_priority,
            "message": self.message,
        }


def current_scheduler() -> tuple[str, int]:
    """(policy name, static priority) of the calling thread; ("unknown", 0) off Linux."""
    try:
        policy = os.sched_getscheduler(0)
        priority = os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):
        return "unknown", 0
    return _POLICY_NAMES.get(policy, f"policy {policy}"), priority


def enter_realtime(priority: int | None, *, lock_memory: bool = True) -> RealtimeStatus:
    """Make the calling thread SCHED_FIFO at ``priority`` and lock the process's memory.

    Args:
        priority: SCHED_FIFO priority, 1..99; None or 0 tries nothing (the status says so).
        lock_memory: also try ``mlockall(MCL_CURRENT | MCL_FUTURE)`` (process-wide).

    Returns:
        The outcome; never raises for a refusal (EPERM, a missing capability, a non-Linux
        platform): the thread then keeps its policy and :attr:`RealtimeStatus.message` says
        why and how to allow it. Pass it to :func:`leave_realtime` when done.

    Raises:
        ValueError: ``priority`` is outside 0..99.
    """
    if priority is not None and not 0 <= priority <= 99:
        raise ValueError(f"SCHED_FIFO priority must be 1..99 (0: off), got {priority}")
    thread_id = threading.get_native_id()
    if not priority:
        name, prio = current_scheduler()
        return RealtimeStatus(
            scheduler=name,
            priority=prio,
            memory_locked=False,
            message=f"real-time scheduling not requested (priority {priority}): running "
            f"{name}, memory not locked",
            requested_priority=priority,
            _thread_id=thread_id,
        )

    previous: tuple[int, int] | None = None
    fifo_error: str | None = None
    try:
        old = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        previous = old
    except AttributeError:
        fifo_error = f"os.sched_setscheduler is not available on {sys.platform}"
    except OSError as err:
        fifo_error = _fifo_refusal(err, priority)
    name, prio = current_scheduler()

    memory_locked = False
    mlock_error: str | None = None
    if lock_memory:
        memory_locked, mlock_error = _lock_memory()

    if fifo_error is None:
        head = f"SCHED_FIFO priority {prio}"
    else:
        head = f"SCHED_FIFO not permitted ({fifo_error}): running {name}; {_HOW_TO_FIFO}"
    if memory_locked:
        tail = "memory locked"
    elif not lock_memory:
        tail = "memory not locked (not requested)"
    else:
        tail = f"memory not locked ({mlock_error}; {_HOW_TO_MLOCK})"
    return RealtimeStatus(
        scheduler=name,
        priority=prio,
        memory_locked=memory_locked,
        message=f"{head}; {tail}" if fifo_error else f"{head}, {tail}",
        requested_priority=priority,
        _thread_id=thread_id,
        _previous=previous,
    )


def leave_realtime(status: RealtimeStatus) -> None:
    """Undo :func:`enter_realtime`: restore the thread's previous policy (normally
    SCHED_OTHER) if it was changed, and ``munlockall`` if memory was locked. Idempotent; may
    be called from another thread (the thread is addressed by its native id). ``status``
    keeps describing what the run had.

    Raises:
        OSError: the kernel refused to restore the policy (not expected: a thread may always
            lower its own priority back to SCHED_OTHER).
    """
    if status._left:
        return
    status._left = True
    try:
        if status._previous is not None:
            policy, priority = status._previous
            target = 0 if status._thread_id == threading.get_native_id() else status._thread_id
            os.sched_setscheduler(target, policy, os.sched_param(priority))
    finally:
        if status.memory_locked:
            libc = _libc()
            if libc is not None:
                libc.munlockall()


def _fifo_refusal(err: OSError, priority: int) -> str:
    """Why ``sched_setscheduler`` refused, in words (errno, capability, rtprio limit)."""
    code = errno.errorcode.get(err.errno or 0, str(err.errno))
    if err.errno != errno.EPERM:
        return f"{code}: {err.strerror}"
    cap = _has_capability(_CAP_SYS_NICE)
    if cap:
        return (
            "EPERM: CAP_SYS_NICE is held, so the cgroup has no real-time budget (cpu.rt_runtime_us)"
        )
    details = ["no CAP_SYS_NICE"] if cap is False else []
    rtprio = _rlimit("RLIMIT_RTPRIO")
    if rtprio is not None and rtprio < priority:
        details.append(f"RLIMIT_RTPRIO {rtprio} < {priority}")
    return "EPERM: " + ", ".join(details) if details else "EPERM"


def _lock_memory() -> tuple[bool, str | None]:
    """(locked, why not) for ``mlockall(MCL_CURRENT | MCL_FUTURE)``."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mlockall"):
        return False, f"mlockall is not available on {sys.platform}"
    limit = _rlimit("RLIMIT_MEMLOCK")
    if _has_capability(_CAP_IPC_LOCK) is not True and limit is not None:
        # A finite limit without CAP_IPC_LOCK: MCL_FUTURE would turn the first allocation
        # past the limit into an out-of-memory error in the middle of the run.
        return False, (
            f"not tried: RLIMIT_MEMLOCK is {limit / 2**20:g} MiB without CAP_IPC_LOCK, so "
            "locking would fail or make later allocations fail"
        )
    current, future = _mcl_flags()
    if libc.mlockall(current | future) != 0:
        code = ctypes.get_errno()
        return False, f"mlockall: {errno.errorcode.get(code, str(code))}: {os.strerror(code)}"
    return True, None


def _mcl_flags() -> tuple[int, int]:
    """(MCL_CURRENT, MCL_FUTURE) for this architecture (asm/mman.h)."""
    if platform.machine().lower().startswith(("ppc", "powerpc", "sparc", "alpha")):
        return 0x2000, 0x4000
    return 1, 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def _rlimit(name: str) -> int | None:
    """The soft limit ``name`` (a ``resource`` constant), None when unlimited or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(getattr(resource, name))
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _has_capability(bit: int) -> bool | None:
    """Whether the process's effective capability set has ``bit``; None if unknown."""
    try:
        with Path("/proc/self/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
