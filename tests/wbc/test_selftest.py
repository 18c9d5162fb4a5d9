"""`gr2-wbc-agent selftest` (a scripted figure-eight, no policy server) and the loop's memory
in steady state."""

from __future__ import annotations

import json
import subprocess
import threading
import tracemalloc
from pathlib import Path

import numpy as np
from gr2_wbc.control.safety import SafetyConfig
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.controller import default_ik
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.recording import TickRecorder
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.selftest import ChunkShape, FigureEight

from tests.support.processes import child_env, script_path


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script_path("gr2-wbc-agent"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env(),
    )


def test_selftest_tracks_the_figure_eight_and_records(tmp_path: Path) -> None:
    result = run_agent("selftest", "--seconds", "3", "--record", str(tmp_path))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["chunks"] >= 10 and figures["observations"] >= 10
    assert figures["timing"]["ticks"] == 600 and figures["timing"]["qp_failures"] == 0
    assert figures["tracking"]["rms_error_m"] < 5e-3
    assert figures["scheduler"]["scheduler"] in ("SCHED_FIFO", "SCHED_OTHER")
    assert "self-test passed" in result.stderr and "real time" not in result.stdout
    ticks = np.load(tmp_path / "ticks.npz")
    assert ticks["t"].shape == (600,) and (ticks["chunk_seq"] >= 0).sum() > 500
    assert json.loads((tmp_path / "summary.json").read_text()) == figures


def test_selftest_fails_when_the_tracking_is_worse_than_asked() -> None:
    result = run_agent("selftest", "--seconds", "2", "--max-rms-mm", "0.001")
    assert result.returncode == 1
    assert "self-test FAILED: RMS tool error" in result.stderr
    assert "Traceback" not in result.stderr


def test_selftest_rejects_bad_arguments() -> None:
    result = run_agent("selftest", "--half-width", "0.5")
    assert result.returncode == 2 and "--half-width" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_loop_does_not_accumulate_memory_while_tracking() -> None:
    """In steady state a tick's temporaries are all freed: after a 10 s warm-up, 20 s of
    tracking streamed chunks (4000 ticks) leave the traced heap within 16 KiB of where it
    was (the trajectory slots, QP matrices, recorder and rings are all preallocated)."""
    robot = MujocoGen3(seed=0)
    buffer = TrajectoryBuffer()
    recorder = TickRecorder.for_duration(200.0, 30.0)
    config = LoopConfig(
        realtime=False, observation_period_s=0.0, safety=SafetyConfig(watchdog=True)
    )
    loop = ControlLoop(robot, buffer, default_ik(200.0), config, recorder=recorder)
    start = robot.read_state()
    reference = FigureEight(start.ee_position, start.time_s)
    shape = ChunkShape()
    quats = np.tile(start.ee_quat_wxyz, (shape.waypoints, 1))
    grippers = np.zeros(shape.waypoints)
    stop = threading.Event()

    def period(seq: int) -> None:
        times = shape.times(robot.read_state().time_s)
        buffer.add_chunk(seq, times, reference(times), quats, grippers)
        loop.run(stop, max_duration_s=0.2)

    tracemalloc.start()
    try:
        for seq in range(50):  # warm-up: lazily made caches, pending cyclic garbage
            period(seq)
        before, _ = tracemalloc.get_traced_memory()
        for seq in range(50, 150):
            period(seq)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        robot.close()
    assert loop.stats()["ticks"] == 150 * 40
    assert after - before < 16 * 1024, after - before
