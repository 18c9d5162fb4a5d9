"""The WBC agent's 200 Hz loop in real time: tick compute, loop period, deadlines, QP solves.

Runs the agent's own loop (absolute deadlines, frozen gc, the default IK QP with its
collision limits, the safety layer) on the simulated Gen3 for ``--seconds`` of wall time,
rendering both cameras for an observation every 0.2 s, while a scripted stand-in policy
answers each observation with a figure-eight chunk after 100 ms (``gr2_wbc.selftest``).
Prints one JSON object: tick compute p50/p99/max, loop period p50/p99/max, deadline misses,
QP solve p50/p99, the tracking error, and ratios to the period (one run, no thresholds).

    .venv/bin/python bench/wbc_loop.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.loop import LoopConfig
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.selftest import run_selftest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time to run [s]")
    parser.add_argument("--rate-hz", type=float, default=200.0)
    parser.add_argument("--delay", type=float, default=0.1, help="simulated inference [s]")
    parser.add_argument("--camera-size", type=int, default=64, help="observation images [px]")
    parser.add_argument("--blend", choices=["min_jerk", "ensemble"], default="min_jerk")
    parser.add_argument(
        "--rt-priority", type=int, default=80, help="SCHED_FIFO priority to try (0: don't)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()

    config = LoopConfig(
        rate_hz=args.rate_hz,
        realtime=True,
        observation_period_s=0.2,
        camera_width=args.camera_size,
        camera_height=args.camera_size,
        rt_priority=args.rt_priority or None,
    )
    robot = MujocoGen3(seed=0)
    print(f"[bench] {args.seconds:g} s at {args.rate_hz:g} Hz on the sim ...", file=sys.stderr)
    try:
        result = run_selftest(
            robot,
            args.seconds,
            config,
            delay_s=args.delay,
            buffer=TrajectoryBuffer(blend=args.blend),
        )
    finally:
        robot.close()
    status = result.loop.realtime_status
    figures = {
        "benchmark": "wbc_loop",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "scheduler": None if status is None else status.to_dict(),
        **result.figures,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
