"""Adversarial chunks through the whole agent stack on the real MuJoCo Gen3.

Each case streams chunks the way the link does (robot-clock waypoint times, one chunk per
policy period) into the agent's own ``TrajectoryBuffer`` -> ``ControlLoop`` -> ``default_ik``
-> safety layer -> simulated arm, then checks every recorded tick:

- the commanded and the measured joint positions stay within the position limits;
- the commanded joint speeds stay within the velocity limits (the measured ones too);
- no link capsule goes under the table plane (z = 0), measured configuration;
- no two capsules of the self-collision pairs touch;
- when the stream stops, the tool ends inside the workspace box.

The loop runs with ``realtime=False``: all times are sim (robot) times, no timed assertions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from gr2_wbc.control.safety import SafetyConfig
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import WORKSPACE_LOWER_M, WORKSPACE_UPPER_M, default_ik
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import TABLE_CAPSULES, CapsuleModel
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.base import ArmState
from gr2_wbc.robots.sim.backend import MujocoGen3

RATE_HZ = 200.0
POLICY_PERIOD_S = 0.2
WAYPOINT_DT_S = 0.05
WAYPOINTS = 16  # 0.8 s horizon, like the policy's chunks
STREAM_S = 3.0
SETTLE_S = 1.5  # after the stream stops: the watchdog stops and holds the arm


@dataclass
class Chunk:
    seq: int
    times: np.ndarray
    positions: np.ndarray
    quats: np.ndarray
    grippers: np.ndarray


ChunkSource = Callable[[int, ArmState, np.random.Generator], list[Chunk]]
"""(policy step n, state at the observation, rng) -> chunks to deliver this period."""


def _chunk(seq: int, t0: float, positions: np.ndarray, quats: np.ndarray) -> Chunk:
    k = positions.shape[0]
    times = t0 + WAYPOINT_DT_S * np.arange(k)
    return Chunk(seq, times, positions, quats, np.linspace(0.0, 1.0, k))


def _tile(x: np.ndarray, k: int = WAYPOINTS) -> np.ndarray:
    return np.tile(np.asarray(x, dtype=float), (k, 1))


def _toward(target: tuple[float, float, float]) -> ChunkSource:
    """Every chunk: the first waypoint where the tool is, then straight to ``target``."""

    def source(n: int, state: ArmState, rng: np.random.Generator) -> list[Chunk]:
        pos = _tile(target)
        pos[0] = state.ee_position
        return [_chunk(n, state.time_s, pos, _tile(state.ee_quat_wxyz))]

    return source


def _jumps(n: int, state: ArmState, rng: np.random.Generator) -> list[Chunk]:
    """Alternating 0.5 m jumps: each chunk's waypoints sit 0.5 m away (+y, then -y, then up
    and forward), from the very first waypoint on."""
    offsets = np.array([[0.0, 0.5, 0.0], [0.0, -0.5, 0.0], [0.25, 0.0, 0.43]])
    pos = _tile(state.ee_position + offsets[n % 3])
    return [_chunk(n, state.time_s, pos, _tile(state.ee_quat_wxyz))]


def _wild_rotations(n: int, state: ArmState, rng: np.random.Generator) -> list[Chunk]:
    """Random unit quaternions at every waypoint (finite, but up to 180 deg apart at 20 Hz),
    low over the table so a flailing wrist would hit it."""
    quats = rng.normal(size=(WAYPOINTS, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    pos = _tile([0.45, 0.05, 0.06])
    pos[0] = state.ee_position
    return [_chunk(n, state.time_s, pos, quats)]


def _out_of_order(n: int, state: ArmState, rng: np.random.Generator) -> list[Chunk]:
    """Each period a batch of chunks in shuffled order: stale ones (seq below the newest
    seen), duplicates, and newer ones whose waypoint times start in the past or before the
    previous chunk's, with random targets over the whole reachable space."""
    base = 3 * n
    seqs = [base + 2, base, base + 1, base + 2, max(base - 3, 0)]
    out = []
    for seq in seqs:
        target = rng.uniform([-0.3, -0.9, -0.4], [1.2, 0.9, 1.1])
        pos = _tile(target)
        pos[0] = state.ee_position
        t0 = state.time_s - rng.uniform(0.0, 0.4)  # late by up to two periods
        out.append(_chunk(seq, t0, pos, _tile(state.ee_quat_wxyz)))
    return out


def _random_everything(n: int, state: ArmState, rng: np.random.Generator) -> list[Chunk]:
    """Random positions (1.5 m box around the base, half below the table top) and random
    orientations at every waypoint."""
    pos = rng.uniform([-0.75, -0.75, -0.5], [0.75, 0.75, 1.0], size=(WAYPOINTS, 3))
    quats = rng.normal(size=(WAYPOINTS, 4))
    return [_chunk(n, state.time_s, pos, quats)]


CASES: dict[str, ChunkSource] = {
    "0.5 m jumps": _jumps,
    "outside the workspace, forward": _toward((1.5, 0.0, 0.3)),
    "outside the workspace, up and aside": _toward((0.5, 1.2, 1.2)),
    "outside the workspace, behind the base": _toward((-0.6, -0.3, 0.3)),
    "under the table": _toward((0.5, 0.0, -0.3)),
    "under the table near the base": _toward((0.12, -0.1, -0.2)),
    "wild rotations": _wild_rotations,
    "chunks out of order": _out_of_order,
    "random positions and orientations": _random_everything,
}


@pytest.fixture
def robot() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=0)
    yield backend
    backend.close()


def stream(robot: MujocoGen3, source: ChunkSource, seed: int) -> tuple[dict, ControlLoop, int]:
    """Deliver ``source``'s chunks every policy period for STREAM_S, then nothing for
    SETTLE_S; return the tick record, the loop and the number of chunks accepted."""
    rng = np.random.default_rng(seed)
    buffer = TrajectoryBuffer()
    recorder = TickRecorder(RATE_HZ)
    config = LoopConfig(
        rate_hz=RATE_HZ,
        realtime=False,
        observation_period_s=0.0,
        safety=SafetyConfig(watchdog=True, stale_after_s=3 * POLICY_PERIOD_S),
    )
    loop = ControlLoop(robot, buffer, default_ik(RATE_HZ), config, recorder=recorder)
    stop = threading.Event()
    accepted = 0
    for n in range(round(STREAM_S / POLICY_PERIOD_S)):
        state = robot.read_state()
        for c in source(n, state, rng):
            accepted += buffer.add_chunk(c.seq, c.times, c.positions, c.quats, c.grippers)
        loop.run(stop, max_duration_s=POLICY_PERIOD_S)
    loop.run(stop, max_duration_s=SETTLE_S)
    return recorder.arrays(), loop, accepted


@pytest.mark.parametrize("case", list(CASES))
def test_adversarial_chunks_keep_the_arm_within_its_limits(robot: MujocoGen3, case: str) -> None:
    rec, loop, accepted = stream(robot, CASES[case], seed=sorted(CASES).index(case))
    n_ticks = round((STREAM_S + SETTLE_S) * RATE_HZ)
    assert rec["t"].shape[0] == n_ticks and accepted >= 1
    tracking = rec["chunk_seq"] >= 0
    assert tracking.sum() > 0.5 * STREAM_S * RATE_HZ  # the chunks were really followed
    tol = 1e-6

    # Joint position limits: commanded exactly; measured within the position servo's
    # overshoot (0.13 mrad measured, joint 4 arriving at its limit at 0.04 rad/s).
    for key, slack in (("q_cmd", 0.0), ("q", 1e-3)):
        assert np.all(rec[key] >= gen3.JOINT_LOWER - slack), key
        assert np.all(rec[key] <= gen3.JOINT_UPPER + slack), key
    # Velocity limits: commanded; the measured speed follows within the servo's overshoot,
    # which the 0.9 command margin absorbs.
    assert np.all(np.abs(rec["qd_cmd"]) <= gen3.VELOCITY_LIMITS + tol)
    assert np.all(np.abs(rec["qd"]) <= gen3.VELOCITY_LIMITS)

    # Collision model on the measured configuration of every tick.
    model = CapsuleModel()
    table = [model.names.index(n) for n in TABLE_CAPSULES]
    lowest, closest = np.inf, np.inf
    for q in rec["q"]:
        lowest = min(lowest, float(model.table_clearance(q)[table].min()))
        closest = min(closest, float(model.pair_distances(q)[0].min()))
    assert lowest >= 0.0, f"a capsule went {-lowest * 1e3:.1f} mm under the table"
    assert closest >= 0.0, f"capsules interpenetrate by {-closest * 1e3:.1f} mm"

    # The stream stopped: the arm ends at rest, the tool inside the workspace box.
    tool = gen3.tool_pose(rec["q"][-1])[:3, 3]
    lower, upper = np.array(WORKSPACE_LOWER_M), np.array(WORKSPACE_UPPER_M)
    assert np.all(tool >= lower - 1e-3) and np.all(tool <= upper + 1e-3), tool
    assert np.abs(rec["qd"][-1]).max() < 0.01
    assert loop.stats()["qp_failures"] == 0
    print(
        f"{case}: {accepted} chunks accepted, lowest capsule {lowest * 1e3:.1f} mm above "
        f"the table, closest pair {closest * 1e3:.1f} mm, tool ends at {np.round(tool, 3)}"
    )


def test_out_of_order_chunks_never_replace_a_newer_one(robot: MujocoGen3) -> None:
    """The buffer keeps following the newest seq: a stale chunk arriving later changes
    nothing the loop does."""
    rec, _, accepted = stream(robot, _out_of_order, seed=7)
    periods = round(STREAM_S / POLICY_PERIOD_S)
    assert accepted == periods  # exactly one new seq (base + 2) per period
    seq = rec["chunk_seq"][rec["chunk_seq"] >= 0]
    assert np.all(np.diff(seq) >= 0)  # the seq in use never goes back
    assert set(np.unique(seq)) <= {3 * n + 2 for n in range(periods)}
