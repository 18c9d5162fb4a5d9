"""`gr2-wbc-agent`: the edge whole-body-control agent.

`run` connects to a policy server, checks that the served views match the robot's cameras,
starts an episode, and tracks the streamed trajectory chunks with the 200 Hz IK-QP loop until
the requested number of control steps is done (plus a short settle), or ``--max-seconds``
of loop time have passed, then ends the episode.

Tasks (sim only): ``--task NAME --seed N`` runs the task of :mod:`gr2_wbc.tasks` in the scene
of seed N: the instruction is the task's (an explicit ``--instruction`` must match it), the
task's success check runs at every observation, and by default (``--stop-on-success``) the
episode ends ``--success-settle`` seconds after the first success, with outcome SUCCESS. The
summary's ``task`` entry holds the verdict, the success time and the numbers it was decided on.

Safety: the watchdog stops and holds the arm when the chunk stream goes stale; SIGUSR1 latches
the e-stop (``kill -USR1 PID``), SIGUSR2 resets it; with ``--estop-file PATH`` the e-stop also
latches while PATH exists. ``--record DIR`` writes DIR/ticks.npz (per-tick log, keys in
:mod:`gr2_wbc.recording`), DIR/cameras.mp4 and DIR/summary.json.

Real time: the loop thread runs SCHED_FIFO at ``--rt-priority`` (default 80) with memory
locked when the process is permitted; otherwise it runs SCHED_OTHER and logs how to allow it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from gr2_client import ClientError, FailoverClient, FailoverExhaustedError, ServerDescription
from pydantic import ValidationError

from gr2_wbc.controller import default_ik
from gr2_wbc.link import PolicyLink
from gr2_wbc.loop import ControlLoop, LoopConfig
from gr2_wbc.metrics import WBCMetrics, start_metrics_server
from gr2_wbc.realtime import RealtimeStatus
from gr2_wbc.recording import TickRecorder, save_observations
from gr2_wbc.settings import AgentSettings
from gr2_wbc.tasks import (
    SUCCESS_SETTLE_S,
    TaskCheckedRobot,
    TaskError,
    TaskInstance,
    TaskMonitor,
    sample_task,
)


def log(message: str) -> None:
    print(f"[gr2-wbc-agent] {message}", file=sys.stderr, flush=True)


def make_robot(kind: str, seed: int, args: argparse.Namespace | None = None):  # type: ignore[no-untyped-def]
    if kind == "sim":
        from gr2_wbc.robots.sim.backend import MujocoGen3

        return MujocoGen3(seed=seed)
    if kind == "kortex":
        from gr2_wbc.robots.base import RobotError
        from gr2_wbc.robots.kortex.backend import KortexBackend, KortexUnavailableError

        ip = getattr(args, "robot_ip", None) or os.environ.get("GR2_WBC_ROBOT_IP", "192.168.1.10")
        user = os.environ.get("GR2_WBC_ROBOT_USER", "admin")
        password = os.environ.get("GR2_WBC_ROBOT_PASSWORD", "admin")
        try:
            return KortexBackend(ip, username=user, password=password)
        except KortexUnavailableError as exc:
            raise SystemExit(f"{exc}; or use --robot sim") from None
        except RobotError as exc:
            raise SystemExit(f"cannot drive the Gen3 at {ip}: {exc}; or use --robot sim") from None
    raise SystemExit(f"robot backend {kind!r} is not available in this version; use --robot sim")


def camera_size(views: tuple[tuple[str, int, int], ...]) -> tuple[int, int]:
    sizes = {(w, h) for _, w, h in views}
    if len(sizes) != 1:
        raise ClientError(f"views of different sizes are not supported yet: {views}")
    return sizes.pop()


def _stop_after_link(
    link: PolicyLink, loop: ControlLoop, stop: threading.Event, settle_ticks: int
) -> None:
    """Once the episode's last chunk arrived, let the arm execute it, then stop the loop."""
    link.finished.wait()
    target = loop.ticks + settle_ticks
    while loop.ticks < target and not stop.is_set():
        time.sleep(0.01)
    stop.set()


def _log_realtime(status: RealtimeStatus) -> None:
    log(f"real time: {status.message}")


def resolve_task(args: argparse.Namespace) -> TaskInstance | None:
    """The task instance of ``--task``/``--seed`` (and ``args.instruction`` set from it), or
    None without ``--task``; SystemExit on an unknown task, a non-sim robot or an
    ``--instruction`` that is not the task's."""
    if args.task is None:
        if not args.instruction:
            raise SystemExit("run needs --instruction TEXT or --task NAME")
        return None
    if args.robot != "sim":
        raise SystemExit("--task needs --robot sim (the success checks read the simulation)")
    try:
        instance = sample_task(args.task, args.seed)
    except TaskError as err:
        raise SystemExit(str(err)) from None
    if args.instruction is not None and args.instruction != instance.instruction:
        raise SystemExit(
            f"--instruction {args.instruction!r} does not match task {args.task!r} seed "
            f"{args.seed}: {instance.instruction!r} (leave --instruction out)"
        )
    args.instruction = instance.instruction
    return instance


def summarise(
    args: argparse.Namespace, link: PolicyLink, loop: ControlLoop, video: Path | None
) -> dict[str, Any]:
    stats = loop.stats()
    start = np.asarray(stats["initial_tool_position"] or [np.nan] * 3)
    end = np.asarray(stats["final_tool_position"] or [np.nan] * 3)
    q0 = np.asarray(stats["initial_q"] or [np.nan] * 7)
    q1 = np.asarray(stats["final_q"] or [np.nan] * 7)
    return {
        "episode_id": link.report.episode_id,
        "instruction": args.instruction,
        "server": args.server,
        "robot": args.robot,
        "steps": link.report.steps,
        "requested_steps": args.steps,
        "error": link.report.error,
        "failovers": link.report.failovers,
        "servers_used": link.report.targets,
        "chunk_latency": link.report.latency_summary(),
        "clock": {  # server clock - robot clock, from round trips (gr2_wbc.control.clock)
            "offset_s": link.report.clock_offset_s,
            "error_bound_s": link.report.clock_error_bound_s,
        },
        "trajectory": {
            "blend": link.buffer.blend,
            "blend_s": link.buffer.blend_s,
            "ensemble_decay": link.buffer.ensemble_decay,
            "interpolation": link.buffer.interpolation,
            "smooth_chunks": link.smoother is not None,
        },
        "realtime": loop.realtime_status.to_dict() if loop.realtime_status else None,
        "loop": {
            "rate_hz": loop.config.rate_hz,
            "realtime": loop.config.realtime,
            "ticks": stats["ticks"],
            "deadline_misses": stats["deadline_misses"],
            "period_p50_s": stats["loop_period_p50_s"],
            "period_p99_s": stats["loop_period_p99_s"],
            "period_max_s": stats["loop_period_max_s"],
            "tick_compute_p50_s": stats["tick_compute_p50_s"],
            "tick_compute_p99_s": stats["tick_compute_p99_s"],
            "qp_solve_p50_s": stats["qp_solve_p50_s"],
            "qp_solve_p99_s": stats["qp_solve_p99_s"],
            "qp_failures": stats["qp_failures"],
            "qp_last_failure": stats["qp_last_failure"],
            "qp_relaxations": stats["qp_relaxations"],
            "lockstep_delay_s": loop.config.lockstep_delay_s,
            "lockstep_timeouts": loop.lockstep_timeouts,
            "render_p50_s": stats["render_p50_s"],
            "max_tracking_error_m": stats["max_tracking_error_m"],
        },
        "initial_q": stats["initial_q"],
        "final_q": stats["final_q"],
        "joint_motion_rad": float(np.abs(q1 - q0).max()),
        "initial_tool_position": stats["initial_tool_position"],
        "final_tool_position": stats["final_tool_position"],
        "tool_displacement_m": float(np.linalg.norm(end - start)),
        "q_min_seen": stats["q_min_seen"],
        "q_max_seen": stats["q_max_seen"],
        "qd_max_abs_seen": stats["qd_max_abs_seen"],
        "qd_cmd_max_abs": stats["qd_cmd_max_abs"],
        "video": str(video) if video else None,
        "video_frames": stats["video_frames"],
        "safety": {
            key: stats[key]
            for key in (
                "safety_state",
                "watchdog_trips",
                "estop_triggers",
                "estop_latched",
                "estop_reason",
                "speed_clamps",
            )
        },
        "max_seconds": args.max_seconds,
        "record": str(args.record) if args.record else None,
    }


def load_settings() -> AgentSettings | None:
    """The agent's settings from the environment; None (after logging what is wrong)
    when a GR2_WBC_ variable is invalid."""
    try:
        return AgentSettings()
    except ValidationError as err:
        problems = "; ".join(
            f"GR2_WBC_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors()
        )
        log(f"invalid setting: {problems}")
        return None


def cmd_selftest(args: argparse.Namespace) -> int:
    """Track a scripted figure-eight (no policy server) and judge the result."""
    from gr2_wbc.selftest import run_selftest

    settings = load_settings()
    if settings is None:
        return 2
    rate_hz = args.rate_hz or settings.rate_hz
    rt_priority = settings.rt_priority if args.rt_priority is None else args.rt_priority
    robot = make_robot(args.robot, args.seed, args)
    config = LoopConfig(
        rate_hz=rate_hz,
        realtime=True,
        observation_period_s=settings.observation_period_s,
        safety=settings.safety_config(),
        rt_priority=rt_priority,
    )
    buffer = settings.trajectory_buffer(args.blend)
    recorder = TickRecorder.for_duration(rate_hz, args.seconds)
    log(
        f"self-test on {args.robot}: figure-eight (+-{args.half_width * 1e3:g} mm across, "
        f"+-{args.half_width * 5e2:g} mm up) for {args.seconds:g} s at {rate_hz:g} Hz, "
        f"{args.delay * 1e3:g} ms simulated inference, blend {buffer.blend}"
    )
    try:
        result = run_selftest(
            robot,
            args.seconds,
            config,
            delay_s=args.delay,
            buffer=buffer,
            reference_kwargs={
                "half_width_m": args.half_width,
                "half_height_m": args.half_width / 2,
            },
            recorder=recorder,
        )
    finally:
        robot.close()
    status = result.loop.realtime_status
    figures = {**result.figures, "scheduler": status.to_dict() if status else None}
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        recorder.save(args.record / "ticks.npz")
        (args.record / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    rms = figures["tracking"]["rms_error_m"]
    timing = figures["timing"]
    problems = []
    if not rms < args.max_rms_mm * 1e-3:
        problems.append(f"RMS tool error {rms * 1e3:.2f} mm > {args.max_rms_mm:g} mm")
    if figures["watchdog_trips"]:
        problems.append(f"{figures['watchdog_trips']} watchdog trips")
    if timing["qp_failures"]:
        problems.append(f"{timing['qp_failures']} QP fallbacks")
    log(
        f"RMS tool error {rms * 1e3:.2f} mm, tick compute p99 "
        f"{timing['tick_compute_p99_ms']:.2f} ms, {timing['deadline_misses']} deadline misses"
    )
    if problems:
        log("self-test FAILED: " + "; ".join(problems))
        return 1
    log("self-test passed")
    return 0


def fetch_server_info(server: str, settings: AgentSettings) -> ServerDescription:
    """GetServerInfo from the first of the comma-separated servers that answers (a few
    seconds at most: an unreachable server at start-up is a configuration error)."""

    async def fetch() -> ServerDescription:
        client = FailoverClient(
            server,
            api_key=settings.api_key_value(),
            tls=settings.tls_config(),
            give_up_after_s=5.0,
            connect_timeout_s=2.0,
        )
        async with client:
            return await client.server_info()

    return asyncio.run(fetch())


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings is None:
        return 2
    server = args.server or settings.server
    args.server = server
    rate_hz = args.rate_hz or settings.rate_hz
    rt_priority = settings.rt_priority if args.rt_priority is None else args.rt_priority
    metrics_port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    instance = resolve_task(args)
    robot = make_robot(args.robot, args.seed, args)
    try:
        info = fetch_server_info(server, settings)
        info.check_compatible(robot.camera_names)
        width, height = camera_size(info.views)
    except grpc.RpcError as err:
        log(f"cannot reach the policy server at {server}: {err.code().name}: {err.details()}")
        robot.close()
        return 2
    except FailoverExhaustedError as err:
        log(f"cannot reach the policy server: {err}")
        robot.close()
        return 2
    except ClientError as err:
        log(f"incompatible server: {err}")
        robot.close()
        return 2
    log(
        f"server {server}: {info.model_name} {info.model_version} ({info.preset}), "
        f"views {[v[0] for v in info.views]} {width}x{height}, k={info.action_horizon}"
    )

    safety = settings.safety_config()
    if args.stale_after is not None:
        safety.stale_after_s = args.stale_after
    if args.estop_file is not None:
        safety.estop_file = args.estop_file
    record_video = bool(args.video or args.record)
    video_max_frames = LoopConfig.video_max_frames
    if args.max_seconds is not None and record_video:
        video_max_frames = math.ceil(args.max_seconds * args.video_fps) + 1
    metrics = WBCMetrics()
    if metrics_port:
        start_metrics_server(metrics.registry, settings.metrics_host, metrics_port)
        log(f"metrics on http://{settings.metrics_host}:{metrics_port}/metrics")
    config = LoopConfig(
        rate_hz=rate_hz,
        realtime=not args.no_realtime,
        observation_period_s=args.observation_period or settings.observation_period_s,
        camera_width=width,
        camera_height=height,
        video_fps=args.video_fps if record_video else 0.0,
        video_max_frames=video_max_frames,
        safety=safety,
        # --no-realtime runs unpaced: a SCHED_FIFO thread that never sleeps would starve the
        # link and gRPC threads on its core, so real time is not tried (and the log says so).
        rt_priority=0 if args.no_realtime else rt_priority,
        lockstep_delay_s=args.lockstep_delay if args.no_realtime else None,
    )
    recorder = None
    if args.record is not None:
        if args.max_seconds is not None:
            recorder = TickRecorder.for_duration(rate_hz, args.max_seconds)
        else:
            recorder = TickRecorder(rate_hz)
    blend = args.blend or settings.blend
    max_chunks = 4
    if blend == "ensemble":  # every chunk that still covers the present takes part
        chunk_s = info.action_horizon * info.waypoint_dt_s
        max_chunks = max(max_chunks, math.ceil(chunk_s / config.observation_period_s) + 1)
    buffer = settings.trajectory_buffer(blend, max_chunks=max_chunks)
    smooth = settings.smooth_chunks if args.smooth_chunks is None else args.smooth_chunks
    smoother = settings.chunk_smoother() if smooth else None
    stop = threading.Event()
    link: PolicyLink | None = None
    monitor = None
    backend = robot
    if instance is not None:

        def end_on_success() -> None:  # the loop thread, settle_s after the first success
            if link is not None:
                link.stop_outcome = "success"
            stop.set()

        monitor = TaskMonitor(
            robot,
            instance,
            config.observation_period_s,
            settle_s=args.success_settle,
            on_settled=end_on_success if args.stop_on_success else None,
        )
        backend = TaskCheckedRobot(robot, monitor)
        log(f"task {instance.name} seed {instance.seed}: {instance.instruction!r}")
    loop = ControlLoop(backend, buffer, default_ik(rate_hz), config, metrics, recorder)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # E-stop by signal: the handlers only latch/unlatch (no lock, no I/O); the loop logs.
    estop = loop.safety.estop
    signal.signal(signal.SIGUSR1, lambda *_: estop.trigger("SIGUSR1"))
    signal.signal(signal.SIGUSR2, lambda *_: estop.reset())
    link = PolicyLink(
        server,
        args.instruction,
        loop.observations,
        buffer,
        max_steps=args.steps,
        robot_id=args.robot_id,
        api_key=settings.api_key_value(),
        stop=stop,
        robot_clock=loop.robot_time_s,
        smoother=smoother,
        keep_observations=args.record is not None,
        reconnect_timeout_s=settings.reconnect_timeout_s,
        step_timeout_s=settings.step_timeout_s,
        client_options={"tls": settings.tls_config()},
    )
    loop.lockstep_last_seq = args.steps - 1
    link.start()
    settle_ticks = int(args.settle * rate_hz)
    threading.Thread(
        target=_stop_after_link, args=(link, loop, stop, settle_ticks), daemon=True
    ).start()
    max_duration = args.steps * config.observation_period_s * 4 + args.settle + 30.0
    if args.max_seconds is not None:
        max_duration = min(max_duration, args.max_seconds)
    log(
        f"trajectory: {buffer.interpolation} interpolation, blend {buffer.blend} over "
        f"{buffer.blend_s:g} s"
        + (f", ensemble decay {buffer.ensemble_decay:g}/s" if blend == "ensemble" else "")
        + (
            f", chunk smoothing (jerk weight {smoother.jerk_weight:g}, tolerance "
            f"{smoother.tolerance_m * 1e3:g} mm)"
            if smoother
            else ", no chunk smoothing"
        )
    )
    log(f"running {args.steps} steps of {args.instruction!r} at {rate_hz:g} Hz")
    try:
        loop.run(stop, max_duration_s=max_duration, on_realtime=_log_realtime)
    finally:
        stop.set()
        link.join(timeout=15)
    time_limited = args.max_seconds is not None and loop.ticks >= round(args.max_seconds * rate_hz)
    if time_limited:
        log(f"--max-seconds {args.max_seconds:g} reached after {link.report.steps} steps")
    stopped_on_success = monitor is not None and monitor.settled and args.stop_on_success
    if monitor is not None:
        monitor.check()  # the final state (the loop has stopped: safe to read the sim here)
    video = None
    if args.video and loop.video_frames:
        args.video.parent.mkdir(parents=True, exist_ok=True)
        video = loop.write_video(args.video)
        log(f"video: {video}")
    summary = summarise(args, link, loop, video)
    if monitor is not None:
        summary["task"] = {**monitor.summary(), "stopped_on_success": stopped_on_success}
        task = summary["task"]
        log(
            f"task {task['name']} seed {task['seed']}: "
            + (f"SUCCESS at {task['success_time_s']:.2f} s" if task["success"] else "not done")
        )
    robot.close()
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if args.record is not None and recorder is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        recorder.save(args.record / "ticks.npz")
        if loop.video_frames:
            loop.write_video(args.record / "cameras.mp4")
        if link.sent:
            save_observations(args.record / "observations.npz", link.sent, args.instruction)
        (args.record / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"recording: {args.record} ({recorder.count} ticks, {loop.video_frames} frames)")
    lat = summary["chunk_latency"]
    if lat:
        clock = summary["clock"]
        offset = ""
        if clock["offset_s"] is not None:
            offset = (
                f", clock offset {clock['offset_s']:.4f} s +- {clock['error_bound_s'] * 1e3:.1f} ms"
            )
        log(
            f"episode {summary['episode_id']}: {summary['steps']} steps, round trip p50 "
            f"{lat['round_trip_p50_s'] * 1e3:.1f} ms p99 {lat['round_trip_p99_s'] * 1e3:.1f} ms, "
            f"{summary['loop']['deadline_misses']} deadline misses{offset}"
        )
    if link.report.error is not None:
        log(f"episode failed: {link.report.error}")
        return 1
    if link.report.steps < args.steps and not time_limited and not stopped_on_success:
        log(f"stopped after {link.report.steps} of {args.steps} steps")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gr2-wbc-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one episode against a policy server")
    run.add_argument(
        "--server",
        default=None,
        help="HOST:PORT, or several comma-separated replicas to fail over between "
        "(env GR2_WBC_SERVER, default localhost:50051)",
    )
    run.add_argument("--robot", choices=["sim", "kortex"], default="sim")
    run.add_argument(
        "--robot-ip",
        default=None,
        help="Gen3 address for --robot kortex (env GR2_WBC_ROBOT_IP, default 192.168.1.10; "
        "login from GR2_WBC_ROBOT_USER / GR2_WBC_ROBOT_PASSWORD, default admin/admin)",
    )
    run.add_argument(
        "--instruction", default=None, help="language instruction (required without --task)"
    )
    run.add_argument(
        "--task",
        default=None,
        help="sim task (touch, pick, push; gr2_wbc.tasks): its instruction for --seed, "
        "checked at every observation; the summary gets a 'task' entry",
    )
    run.add_argument(
        "--stop-on-success",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --task: end the episode (outcome SUCCESS) --success-settle seconds after "
        "the task first succeeds (default on)",
    )
    run.add_argument(
        "--success-settle",
        type=float,
        default=SUCCESS_SETTLE_S,
        help=f"seconds from success to the end with --stop-on-success (default "
        f"{SUCCESS_SETTLE_S:g})",
    )
    run.add_argument("--steps", type=int, default=50, help="control steps (observations)")
    run.add_argument("--robot-id", default="", help="robot name recorded with the episode")
    run.add_argument(
        "--seed", type=int, default=0, help="sim scene seed (and the task's target with --task)"
    )
    run.add_argument("--rate-hz", type=float, default=None, help="loop rate (default 200)")
    run.add_argument(
        "--observation-period",
        type=float,
        default=None,
        help="seconds between observations (default 0.2)",
    )
    run.add_argument(
        "--settle", type=float, default=1.0, help="seconds to keep tracking after the last chunk"
    )
    run.add_argument(
        "--no-realtime",
        action="store_true",
        help="run the simulation as fast as possible (same controller logic); the loop "
        "waits for each observation's chunk (see --lockstep-delay), so the sim never outruns "
        "the policy",
    )
    run.add_argument(
        "--lockstep-delay",
        type=float,
        default=0.1,
        help="with --no-realtime: robot seconds after each observation at which the loop "
        "waits for its chunk (the simulated inference time, default 0.1)",
    )
    run.add_argument(
        "--rt-priority",
        type=int,
        default=None,
        metavar="N",
        help="SCHED_FIFO priority of the loop thread (1-99, with memory locked) when "
        "permitted, else SCHED_OTHER with a logged hint (env GR2_WBC_RT_PRIORITY, default 80; "
        "0: off; --no-realtime: off)",
    )
    run.add_argument(
        "--blend",
        choices=["min_jerk", "ensemble"],
        default=None,
        help="how a new chunk takes over: min-jerk cross-fade or temporal ensembling "
        "(env GR2_WBC_BLEND, default min_jerk; GR2_WBC_BLEND_S, GR2_WBC_ENSEMBLE_DECAY)",
    )
    run.add_argument(
        "--smooth-chunks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="smooth each chunk's waypoints with a small jerk QP (env GR2_WBC_SMOOTH_CHUNKS, "
        "default off; GR2_WBC_SMOOTH_JERK_WEIGHT, GR2_WBC_SMOOTH_TOLERANCE_M)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="/metrics port (env GR2_WBC_METRICS_PORT, default 9102; 0: off)",
    )
    run.add_argument("--video", type=Path, default=None, help="write an MP4 of both cameras")
    run.add_argument("--video-fps", type=float, default=10.0)
    run.add_argument("--summary", type=Path, default=None, help="write a JSON summary")
    run.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/ticks.npz (per-tick log), DIR/cameras.mp4 and DIR/summary.json",
    )
    run.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop after this much loop time even if steps remain (exit 0)",
    )
    run.add_argument(
        "--stale-after",
        type=float,
        default=None,
        help="seconds without a new chunk before the watchdog stops the arm "
        "(env GR2_WBC_STALE_AFTER_S, default 3 observation periods)",
    )
    run.add_argument(
        "--estop-file",
        type=Path,
        default=None,
        help="latch the e-stop while this path exists (env GR2_WBC_ESTOP_FILE)",
    )
    run.set_defaults(func=cmd_run)

    test = sub.add_parser(
        "selftest",
        help="track a scripted figure-eight without a policy server (commissioning check)",
        description="Stream a figure-eight around the tool's current position as chunks, "
        "answering each observation after a simulated inference delay, and track it in real "
        "time. Prints JSON (timing, tracking error) and exits 1 if the RMS tool error "
        "exceeds --max-rms-mm, the watchdog trips or the QP falls back. On --robot kortex "
        "THE ARM MOVES: +-half-width across and +-half-width/2 up and down.",
    )
    test.add_argument("--robot", choices=["sim", "kortex"], default="sim")
    test.add_argument("--robot-ip", default=None, help="as for run")
    test.add_argument("--seed", type=int, default=0, help="sim scene seed")
    test.add_argument("--seconds", type=float, default=20.0, help="duration [s]")
    test.add_argument("--rate-hz", type=float, default=None, help="loop rate (default 200)")
    test.add_argument("--delay", type=float, default=0.1, help="simulated inference [s]")
    test.add_argument("--half-width", type=float, default=0.10, help="figure half-width [m]")
    test.add_argument("--blend", choices=["min_jerk", "ensemble"], default=None)
    test.add_argument("--rt-priority", type=int, default=None, metavar="N", help="as for run")
    test.add_argument("--max-rms-mm", type=float, default=5.0, help="pass threshold [mm]")
    test.add_argument(
        "--record", type=Path, default=None, metavar="DIR", help="write ticks.npz, summary.json"
    )
    test.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(  # libraries: warnings and up; the agent's own modules: info
        level=logging.WARNING, format="[gr2-wbc-agent] %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("gr2_wbc").setLevel(logging.INFO)
    if args.command == "selftest":
        if args.seconds <= 0 or args.delay < 0 or not 0 < args.half_width <= 0.2:
            parser.error("selftest needs --seconds > 0, --delay >= 0, 0 < --half-width <= 0.2")
        if args.rt_priority is not None and not 0 <= args.rt_priority <= 99:
            parser.error("--rt-priority must be 0 (off) to 99")
        return int(args.func(args))
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    if getattr(args, "max_seconds", None) is not None and args.max_seconds <= 0:
        raise SystemExit("--max-seconds must be positive")
    if getattr(args, "success_settle", 0.0) < 0:
        raise SystemExit("--success-settle must be >= 0")
    if getattr(args, "stale_after", None) is not None and args.stale_after <= 0:
        raise SystemExit("--stale-after must be positive")
    if getattr(args, "rt_priority", None) is not None and not 0 <= args.rt_priority <= 99:
        raise SystemExit("--rt-priority must be 0 (off) to 99")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
