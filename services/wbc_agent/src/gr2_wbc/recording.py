"""Per-tick recording of the control loop (``gr2-wbc-agent run --record DIR``).

The loop writes one row per tick into preallocated arrays, after the command is sent. With a
fixed ``capacity`` (``--max-seconds`` gives the exact number of ticks) nothing is allocated
during the run; without one the arrays start at ``initial_capacity`` rows and double when full
(one copy, after that tick's command, so it never delays a command).

``DIR/ticks.npz`` (``np.load(path)``, no pickle), N = ticks recorded, every per-tick array has
N rows:

===================== ========== ======= =======================================================
key                   shape      dtype   meaning [unit]
===================== ========== ======= =======================================================
``t``                 (N,)       float64 robot time of the tick (``ArmState.time_s``) [s]
``q``                 (N, 7)     float64 measured joint positions [rad]
``qd``                (N, 7)     float64 measured joint velocities [rad/s]
``q_cmd``             (N, 7)     float64 commanded joint positions [rad]
``qd_cmd``            (N, 7)     float64 commanded joint velocities, after the safety layer
                                         [rad/s]
``ee_pos``            (N, 3)     float64 measured tool position, base frame [m]
``ee_quat_wxyz``      (N, 4)     float64 measured tool orientation, unit quaternion (w, x, y, z)
``gripper``           (N,)       float64 measured gripper closure (0 open .. 1 closed)
``gripper_cmd``       (N,)       float64 commanded gripper closure (0 .. 1)
``chunk_seq``         (N,)       int64   ``seq`` of the chunk being tracked; -1 when not
                                         tracking (no chunk, stopping, holding, e-stop)
``watchdog_state``    (N,)       int8    safety state: 0 TRACKING, 1 STOPPING, 2 HOLDING,
                                         3 ESTOP (``SafetyState``)
``speed_scale``       (N,)       float64 factor the speed clamps applied to the command
                                         (1 = unchanged)
``compute_s``         (N,)       float64 tick compute time, state read .. command sent [s]
``deadline_miss``     (N,)       bool    the tick overran its deadline (realtime runs only)
``rate_hz``           ()         float64 loop rate [Hz]
``watchdog_state_names`` (4,)    str     state names indexed by ``watchdog_state``
``dropped``           ()         int64   ticks not recorded (fixed capacity exhausted)
===================== ========== ======= =======================================================

``DIR/observations.npz`` holds what the link sent to the policy, one row per observation
(T = observations sent): ``time_s`` (T,) capture time [s]; ``image_<view>`` (T, H, W, 3) uint8
for each camera; ``state`` (T, 8) float64 tool position [m], quaternion (w, x, y, z) and gripper
closure, as sent; ``q`` (T, 7) joint positions [rad]; ``instruction`` () str. It is enough to
replay the episode through the model offline (``gr2-eval`` does, for its predicted-frame
videos).

``DIR/cameras.mp4`` holds the cameras side by side (H.264, the loop's video recording, see
:meth:`gr2_wbc.loop.ControlLoop.write_video`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gr2_wbc.control.safety import STATE_NAMES
from gr2_wbc.robots.base import ArmState

N_JOINTS = 7

KEYS: tuple[str, ...] = (
    "t",
    "q",
    "qd",
    "q_cmd",
    "qd_cmd",
    "ee_pos",
    "ee_quat_wxyz",
    "gripper",
    "gripper_cmd",
    "chunk_seq",
    "watchdog_state",
    "speed_scale",
    "compute_s",
    "deadline_miss",
    "rate_hz",
    "watchdog_state_names",
    "dropped",
)
"""Every key of ``ticks.npz``."""

_COLUMNS: dict[str, tuple[tuple[int, ...], type]] = {
    "t": ((), np.float64),
    "q": ((N_JOINTS,), np.float64),
    "qd": ((N_JOINTS,), np.float64),
    "q_cmd": ((N_JOINTS,), np.float64),
    "qd_cmd": ((N_JOINTS,), np.float64),
    "ee_pos": ((3,), np.float64),
    "ee_quat_wxyz": ((4,), np.float64),
    "gripper": ((), np.float64),
    "gripper_cmd": ((), np.float64),
    "chunk_seq": ((), np.int64),
    "watchdog_state": ((), np.int8),
    "speed_scale": ((), np.float64),
    "compute_s": ((), np.float64),
    "deadline_miss": ((), np.bool_),
}


class TickRecorder:
    """Preallocated per-tick log of the control loop.

    Args:
        rate_hz: loop rate [Hz] (stored with the data).
        capacity: fixed number of rows (ticks beyond it are counted in ``dropped``); ``None``
            grows by doubling from ``initial_capacity``.
        initial_capacity: first allocation when ``capacity`` is ``None``.
    """

    def __init__(
        self, rate_hz: float, capacity: int | None = None, initial_capacity: int = 1 << 14
    ) -> None:
        self.rate_hz = float(rate_hz)
        self.fixed = capacity is not None
        rows = int(capacity) if capacity is not None else int(initial_capacity)
        if rows < 1:
            raise ValueError("capacity must be >= 1")
        self._cols = {k: np.zeros((rows, *shape), dtype) for k, (shape, dtype) in _COLUMNS.items()}
        self.count = 0
        self.dropped = 0

    @classmethod
    def for_duration(cls, rate_hz: float, seconds: float) -> TickRecorder:
        """A fixed-capacity recorder for a run of at most ``seconds`` [s] of loop time."""
        return cls(rate_hz, capacity=int(np.ceil(seconds * rate_hz)) + 1)

    @property
    def capacity(self) -> int:
        """Rows allocated."""
        return int(self._cols["t"].shape[0])

    def record(
        self,
        state: ArmState,
        q_cmd: np.ndarray,
        qd_cmd: np.ndarray,
        gripper_cmd: float,
        chunk_seq: int,
        watchdog_state: int,
        speed_scale: float,
        compute_s: float,
    ) -> None:
        """Write one tick's row (call after the command is sent)."""
        i = self.count
        if i >= self.capacity:
            if self.fixed:
                self.dropped += 1
                return
            self._grow()
        c = self._cols
        c["t"][i] = state.time_s
        c["q"][i] = state.q
        c["qd"][i] = state.qd
        c["q_cmd"][i] = q_cmd
        c["qd_cmd"][i] = qd_cmd
        c["ee_pos"][i] = state.ee_position
        c["ee_quat_wxyz"][i] = state.ee_quat_wxyz
        c["gripper"][i] = state.gripper
        c["gripper_cmd"][i] = gripper_cmd
        c["chunk_seq"][i] = chunk_seq
        c["watchdog_state"][i] = watchdog_state
        c["speed_scale"][i] = speed_scale
        c["compute_s"][i] = compute_s
        c["deadline_miss"][i] = False
        self.count = i + 1

    def mark_deadline_miss(self) -> None:
        """Flag the last recorded tick as having overrun its deadline."""
        if self.count and not (self.fixed and self.dropped):
            self._cols["deadline_miss"][self.count - 1] = True

    def _grow(self) -> None:
        for key, arr in self._cols.items():
            bigger = np.zeros((2 * arr.shape[0], *arr.shape[1:]), arr.dtype)
            bigger[: arr.shape[0]] = arr
            self._cols[key] = bigger

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the recorded rows and the metadata, keyed as in ``ticks.npz``."""
        out = {k: v[: self.count].copy() for k, v in self._cols.items()}
        out["rate_hz"] = np.array(self.rate_hz)
        out["watchdog_state_names"] = np.array(STATE_NAMES)
        out["dropped"] = np.array(self.dropped, dtype=np.int64)
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``ticks.npz`` (compressed) to ``path``; returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as f:
            np.savez_compressed(f, **self.arrays())  # type: ignore[arg-type]
        return out


def save_observations(path: str | Path, samples: list, instruction: str) -> Path:
    """Write the observations the link sent (``ObservationSample`` list) as
    ``observations.npz`` (keys in the module docstring)."""
    if not samples:
        raise ValueError("no observations to save")
    names = tuple(samples[0].images)
    arrays: dict[str, np.ndarray] = {
        "time_s": np.array([s.capture_time_s for s in samples]),
        "state": np.array(
            [
                np.concatenate(
                    [s.state.ee_position, s.state.ee_quat_wxyz, [min(max(s.state.gripper, 0), 1)]]
                )
                for s in samples
            ]
        ),
        "q": np.array([s.state.q for s in samples]),
        "instruction": np.array(instruction),
    }
    for name in names:
        arrays[f"image_{name}"] = np.stack([s.images[name] for s in samples])
    out = Path(path)
    np.savez_compressed(out, **arrays)
    return out
