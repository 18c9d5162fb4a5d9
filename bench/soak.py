"""Soak: many robots running episodes against one policy server for minutes; leaks and errors.

Starts a real `gr2-policy-server serve` process (seeded random weights of `--preset`, gr2-tiny
by default, on CPU unless `--server-env GR2_DEVICE=cuda`; the in-process episode store, or a
throw-away redis-server with `--redis`), or uses a running one (`--server HOST:PORT`; its
memory is sampled only when `--server-pid` names its process on this machine).

`--robots` robots (32) run as asyncio tasks in this one process (grpc.aio, one channel per
robot, as separate robots would have), for `--duration` seconds (300) in all. Each robot runs
episodes one after another: StartEpisode, one StreamActions stream of `--episode-steps`
observations (50), each sent when the chunk of the previous one arrived, a clean close of the
stream, EndEpisode (success), then the next episode at once. So the episode lifecycle (the
server's sessions, KV-cache slots, store records) turns over all the time, not only the
steady stepping. By default the robots run in closed loop: the harshest steady load, with
the server busy all the time and the most steps and episodes per minute (on 2 CPU cores, 32
robots at a real robot's 10 Hz would ask 320 steps/s of a server that serves ~140, so a fixed
rate would be closed loop in effect anyway). `--hz` sends on each robot's own fixed schedule
instead (random phase, no catch-up after a late chunk; late sends are counted), which
represents robots where the server has the capacity for them, e.g. on a GPU.

Errors: every chunk must answer its own episode and seq (else kind `mismatched_chunk`); every
failed RPC is counted by status code (`CODE` for a step, `start_episode:CODE`,
`end_episode:CODE`, `close_stream:CODE`); a failed episode is ended as aborted and the robot
starts the next one. When the time is up, each robot finishes the step in flight and ends
its episode (aborted when short of `--episode-steps`), so every episode started is ended.

Memory: the server's resident set (VmRSS from /proc/PID/status) every `--rss-interval`
seconds (5). The baseline is its RSS after `--warmup` seconds (30) of the run, when the model,
the allocator's arenas and the KV pool are in use; the end is its RSS when the time is up,
still under load; growth = end / baseline - 1. Also its maximum, its RSS once all episodes
have ended, and the series as [t_s, bytes]. After the run, the server's /metrics must show
no active episodes and an empty KV cache (no session or slot left behind).

It prints progress to stderr every `--progress-interval` seconds (10) and one JSON object on
stdout (`--out FILE` also writes it): steps and steps/s, episodes started/ended/full, round
trip p50/p99/max, server queue and compute time and mean batch size (after warmup), errors
by kind, the RSS figures, this client's and the server's CPU use, the server's settings and
the machine. `"pass"` is true when there were no errors, RSS growth was under
`--max-rss-growth` (0.10) and no episode was left on the server; the exit code is 0 then,
1 otherwise.

Run with the project venv, e.g.
    .venv/bin/python bench/soak.py --out bench/results/soak_cpu_2core.json
    .venv/bin/python bench/soak.py --robots 32 --duration 30 --warmup 10 --episode-steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2_client import AsyncPolicyClient
from load import (
    CpuClock,
    Metrics,
    Robot,
    SpawnedServer,
    add_server_arguments,
    check_server_arguments,
    emit,
    error_summary,
    launch_server,
    machine_info,
    percentiles_ms,
    robot_observation,
    server_env,
    stop_server,
)

if TYPE_CHECKING:
    from tests.support.processes import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
STOP_TIMEOUT_S = 60.0  # for the robots to finish their step in flight and end their episodes
AFTER_END_GAUGES = ("gr2_policy_active_episodes", "gr2_policy_kv_cache_usage_ratio")
SERVER_COUNTERS = ("gr2_policy_episode_evictions_total", "gr2_policy_store_errors_total")


# ---------------------------------------------------------------------------------------------
# Memory


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, in bytes; None when it is gone (or this is not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


@dataclass
class RssSeries:
    """RSS samples of one process, as (seconds since the run started, bytes); the window
    from warmup_s to end_s (the time of `sample_end`) is the one measured."""

    pid: int
    t0: float
    warmup_s: float
    end_s: float = math.inf
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self) -> int | None:
        value = rss_bytes(self.pid)
        if value is not None:
            self.samples.append((time.perf_counter() - self.t0, value))
        return value

    def sample_end(self) -> int | None:
        """The sample that ends the measured window."""
        value = self.sample()
        self.end_s = time.perf_counter() - self.t0
        return value

    async def every(self, interval_s: float, stop: asyncio.Event) -> None:
        """Sample at 0, interval, 2 * interval, ... seconds of the run until `stop`."""
        k = 0
        while not stop.is_set():
            self.sample()
            k += 1
            with contextlib.suppress(TimeoutError):
                delay = self.t0 + k * interval_s - time.perf_counter()
                await asyncio.wait_for(stop.wait(), max(delay, 0.0))

    def summary(
        self, baseline: int | None, end: int | None, after: int | None, max_growth: float
    ) -> dict[str, Any]:
        values = [b for _, b in self.samples]
        growth = end / baseline - 1.0 if baseline and end else None
        # the trend after warmup, less sensitive than two samples to transient batch buffers
        steady = [(t, b) for t, b in self.samples if t >= self.warmup_s and t <= self.end_s]
        slope = None
        if len(steady) >= 3:
            ts, bs = zip(*steady, strict=True)
            slope = float(np.polyfit(ts, bs, 1)[0]) * 60 / MIB
        return {
            "pid": self.pid,
            "baseline_bytes": baseline,
            "end_bytes": end,
            "max_bytes": max(values) if values else None,
            "after_episodes_ended_bytes": after,
            "growth": round(growth, 5) if growth is not None else None,
            "growth_below_max": growth < max_growth if growth is not None else None,
            "trend_mib_per_min": round(slope, 3) if slope is not None else None,
            "baseline_mib": round(baseline / MIB, 1) if baseline else None,
            "end_mib": round(end / MIB, 1) if end else None,
            "series": [[round(t, 1), b] for t, b in self.samples],
        }


# ---------------------------------------------------------------------------------------------
# Robots


@dataclass
class SoakRobot(Robot):
    """A robot that runs episodes one after another (`run_episodes`)."""

    episodes_started: int = 0
    episodes_ended: int = 0
    full_episodes: int = 0
    late_sends: int = 0

    async def reopen(self) -> None:
        """After a failed step, drop the stream; `run_episodes` ends the episode as aborted
        and starts the next (Robot.reopen would start a new one and leave this one open)."""
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    async def begin(self) -> bool:
        """StartEpisode and open its stream; False (the error recorded) when it failed."""
        try:
            await self.open()
        except grpc.aio.AioRpcError as err:
            self.errors.append((time.perf_counter(), f"start_episode:{err.code().name}"))
            self.episode_id = ""
            return False
        self.episodes_started += 1
        return True

    async def finish(self, outcome: pb.EpisodeOutcome.ValueType) -> None:
        """Close the stream cleanly, then EndEpisode; failures are recorded as errors."""
        await self.close_stream()
        try:
            await self.client.end_episode(self.episode_id, outcome)
        except grpc.aio.AioRpcError as err:
            self.errors.append((time.perf_counter(), f"end_episode:{err.code().name}"))
        else:
            self.episodes_ended += 1
        self.episode_id = ""


class Pacer:
    """A fixed schedule: slots every 1/hz seconds from a phase; a send after its slot (the
    previous chunk came late) goes at once and the slots that passed are dropped."""

    def __init__(self, hz: float, phase_s: float) -> None:
        self.period = 1.0 / hz
        self.next = time.perf_counter() + phase_s

    async def wait(self) -> bool:
        """Wait for the next slot; True when it had already passed (a late send)."""
        now = time.perf_counter()
        late = now > self.next
        if late:
            self.next += (now - self.next) // self.period * self.period
        else:
            await asyncio.sleep(self.next - now)
        self.next += self.period
        return late


async def run_episodes(
    robot: SoakRobot, steps: int, stop: asyncio.Event, pacer: Pacer | None
) -> None:
    """Episodes of `steps` steps until `stop`; the one in progress then ends early."""
    while not stop.is_set():
        if not await robot.begin():
            await asyncio.sleep(0.1)  # no tight loop against a failing server
            continue
        errors_before, done = len(robot.errors), 0
        while done < steps and robot.stream is not None and not stop.is_set():
            if pacer is not None and await pacer.wait():
                robot.late_sends += 1
            await robot.step()
            done += 1
        full = done == steps and len(robot.errors) == errors_before and robot.stream is not None
        await robot.finish(pb.EPISODE_OUTCOME_SUCCESS if full else pb.EPISODE_OUTCOME_ABORTED)
        robot.full_episodes += int(full)


# ---------------------------------------------------------------------------------------------
# The run


def server_state(metrics: Metrics) -> dict[str, float] | None:
    """The server's gauges that must be zero once all episodes ended, and its counters of
    evictions and store errors (summed over labels); None without /metrics."""
    text = metrics.text()
    if text is None:
        return None
    out: dict[str, float] = {}
    for name in (*AFTER_END_GAUGES, *SERVER_COUNTERS):
        values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        if values:
            out[name] = sum(float(v) for v in values)
    return out


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(t - time.perf_counter(), 0.0))


async def progress(
    robots: list[SoakRobot], t0: float, rss: RssSeries | None, interval_s: float
) -> None:
    """A line on stderr every `interval_s`: steps, steps/s since the last line, RSS, errors."""
    last_t, last_steps = t0, 0
    while True:
        await asyncio.sleep(interval_s)
        now = time.perf_counter()
        steps = sum(len(r.steps) for r in robots)
        rate = (steps - last_steps) / (now - last_t)
        last_t, last_steps = now, steps
        mem = f"{rss.samples[-1][1] / MIB:.1f} MiB" if rss and rss.samples else "n/a"
        print(
            f"[soak] t={now - t0:5.0f}s steps={steps} ({rate:.1f}/s) "
            f"episodes={sum(r.episodes_started for r in robots)} rss={mem} "
            f"errors={sum(len(r.errors) for r in robots)}",
            file=sys.stderr,
            flush=True,
        )


async def soak(
    target: str,
    args: argparse.Namespace,
    metrics: Metrics,
    cpu: CpuClock,
    pids: dict[str, int],
) -> dict[str, Any]:
    clients = [AsyncPolicyClient(target) for _ in range(args.robots)]
    try:
        await clients[0].wait_ready(10.0)
        info = await clients[0].server_info()
        info.check_compatible()
        rng = np.random.default_rng(args.seed)
        robots = [
            SoakRobot(i, clients[i], robot_observation(info, rng)) for i in range(args.robots)
        ]
        phases = random.Random(args.seed)
        stop, stop_rss = asyncio.Event(), asyncio.Event()
        t0 = time.perf_counter()
        rss = {name: RssSeries(pid, t0, args.warmup) for name, pid in pids.items()}
        samplers = [asyncio.create_task(s.every(args.rss_interval, stop_rss)) for s in rss.values()]
        tasks = [
            asyncio.create_task(
                run_episodes(
                    r,
                    args.episode_steps,
                    stop,
                    Pacer(args.hz, phases.uniform(0.0, 1.0 / args.hz)) if args.hz else None,
                )
            )
            for r in robots
        ]
        reporter = asyncio.create_task(
            progress(robots, t0, rss.get("server"), args.progress_interval)
        )
        await sleep_until(t0 + args.warmup)
        baseline = {name: s.sample() for name, s in rss.items()}
        batch_before = await metrics.snapshot()
        cpu.start()
        w0 = time.perf_counter()
        await sleep_until(t0 + args.duration)
        end = {name: s.sample_end() for name, s in rss.items()}
        w1 = time.perf_counter()
        usage = cpu.stop()
        batch_after = await metrics.snapshot()
        stop.set()
        _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for robot, task in zip(robots, tasks, strict=True):
            if task in stuck:  # a step or an RPC that never answered
                robot.errors.append((time.perf_counter(), "stuck_at_end"))
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        t_done = time.perf_counter()
        after = {name: s.sample() for name, s in rss.items()}
        stop_rss.set()
        reporter.cancel()
        await asyncio.gather(*samplers, reporter, return_exceptions=True)
        state = await asyncio.to_thread(server_state, metrics)
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    steps = [s for r in robots for s in r.steps]
    measured = [s for s in steps if s.t_send >= w0 and s.t_recv <= w1]
    errors = error_summary(robots, -math.inf, math.inf)
    memory = {
        name: s.summary(baseline[name], end[name], after[name], args.max_rss_growth)
        for name, s in rss.items()
    }
    server_memory = memory.get("server")
    checks: dict[str, bool | None] = {
        "zero_errors": errors["errors"] == 0,
        "rss_growth_below_max": server_memory["growth_below_max"] if server_memory else None,
        "no_episode_left_on_server": (
            all(state.get(name) == 0 for name in AFTER_END_GAUGES) if state else None
        ),
        "every_robot_ran_a_full_episode": min(r.full_episodes for r in robots) > 0,
    }
    return {
        "preset": info.preset,
        "model_version": info.model_version,
        "views": [f"{name} {w}x{h} RAW_RGB8" for name, w, h in info.views],
        "payload_bytes": sum(w * h * 3 for _, w, h in info.views),
        "robots": args.robots,
        "load": f"{args.hz:g} Hz per robot" if args.hz else "closed loop",
        "episode_steps": args.episode_steps,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "ran_s": round(t_done - t0, 2),
        "steps": len(steps),
        "steps_per_s": round(sum(1 for s in steps if s.t_recv <= w1) / (w1 - t0), 2),
        "steps_per_robot_min": min(len(r.steps) for r in robots),
        "episodes_started": sum(r.episodes_started for r in robots),
        "episodes_ended": sum(r.episodes_ended for r in robots),
        "full_episodes": sum(r.full_episodes for r in robots),
        "full_episodes_per_robot_min": min(r.full_episodes for r in robots),
        **({"late_sends": sum(r.late_sends for r in robots)} if args.hz else {}),
        "after_warmup": {
            "window_s": round(w1 - w0, 2),
            "steps": len(measured),
            "steps_per_s": round(len(measured) / (w1 - w0), 2) if w1 > w0 else None,
            "round_trip": percentiles_ms([s.t_recv - s.t_send for s in measured], (50, 99, 100)),
            "queue": percentiles_ms([s.queue_s for s in measured]),
            "compute": percentiles_ms([s.compute_s for s in measured]),
            **Metrics.batch(batch_before, batch_after, w1 - w0),
            **usage,
        },
        **errors,
        "rss": server_memory,
        **({"redis_rss": memory["redis"]} if "redis" in memory else {}),
        "server_after_end": state,
        "criteria": {"errors": 0, "max_rss_growth": args.max_rss_growth},
        "checks": checks,
        "pass": all(v is not False for v in checks.values()),
    }


@contextlib.contextmanager
def redis_server(enabled: bool) -> Iterator[RedisServer | None]:
    """A throw-away redis-server (the tests' helper: persistence off, loopback) or None."""
    if not enabled:
        yield None
        return
    sys.path.insert(0, str(REPO_ROOT))
    from tests.support.processes import run_redis_server

    with (
        tempfile.TemporaryDirectory(prefix="gr2-soak-redis-") as workdir,
        run_redis_server(Path(workdir)) as redis,
    ):
        yield redis


# flag, type, default, help (the default is appended)
OPTIONS: tuple[tuple[str, type[int] | type[float], float, str], ...] = (
    ("--robots", int, 32, "concurrent robots"),
    ("--duration", float, 300.0, "seconds the robots run, warmup included"),
    ("--warmup", float, 30.0, "seconds into the run at which the baseline RSS is taken"),
    ("--episode-steps", int, 50, "steps of each episode"),
    ("--hz", float, 0.0, "observations/s per robot on a fixed schedule; 0 is closed loop"),
    ("--rss-interval", float, 5.0, "seconds between RSS samples"),
    ("--progress-interval", float, 10.0, "seconds between progress lines on stderr"),
    ("--max-rss-growth", float, 0.10, "pass criterion: server RSS end / baseline - 1 below"),
    ("--seed", int, 0, "seed of the robots' images and phases"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    for flag, kind, default, text in OPTIONS:
        add(flag, type=kind, default=default, help=f"{text} ({default:g})")
    add(
        "--server",
        metavar="HOST:PORT",
        help="use this running server instead of starting one (its settings are not known "
        "to this script)",
    )
    add(
        "--server-pid",
        type=int,
        help="with --server: its process id on this machine, for the RSS figures",
    )
    add(
        "--metrics-url",
        metavar="URL",
        help="Prometheus /metrics of the server (default: the one this script starts); "
        "for batch sizes and the check that no episode is left",
    )
    add(
        "--redis",
        action="store_true",
        help="start a throw-away redis-server and give the server its URL (GR2_REDIS_URL) "
        "instead of the in-process store; its RSS is reported too",
    )
    add_server_arguments(parser)
    add("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    check_server_arguments(parser, args)
    if args.server and args.redis:
        parser.error("--redis applies only to a server this script starts")
    if args.server_pid and not args.server:
        parser.error("--server-pid goes with --server")
    if args.robots < 1 or args.episode_steps < 1:
        parser.error("--robots and --episode-steps must be at least 1")
    if min(args.duration, args.rss_interval, args.progress_interval) <= 0 or args.hz < 0:
        parser.error("durations and intervals must be positive, --hz non-negative")
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be at least 0 and shorter than --duration")
    return args


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "soak", "machine": machine_info()}
    spawned: SpawnedServer | None = None
    pids: dict[str, int] = {}
    with redis_server(args.redis) as redis:
        if args.server:
            target, metrics_url = args.server, args.metrics_url
            result["server"] = {
                "mode": "external",
                "target": target,
                "pid": args.server_pid,
                "metrics_url": metrics_url,
                "note": "settings unknown to this script"
                + ("" if args.server_pid else "; no --server-pid, so no RSS figures"),
            }
            if args.server_pid:
                pids["server"] = args.server_pid
        else:
            env = server_env(args)
            if redis is not None:
                env["GR2_REDIS_URL"] = redis.url
                pids["redis"] = redis.proc.pid
            spawned, result["server"] = launch_server(args, env)
            target, metrics_url = spawned.target, args.metrics_url or spawned.metrics_url
            pids["server"] = spawned.process.pid
        metrics = Metrics(metrics_url)
        cpu = CpuClock(spawned.process.pid if spawned else None)
        try:
            result.update(asyncio.run(soak(target, args, metrics, cpu, pids)))
        finally:
            if spawned is not None:
                stop_server(spawned, result["server"])
    if spawned is not None and not result["server"]["alive_until_end"]:
        result["checks"]["server_alive_until_end"] = False
        result["pass"] = False
    if metrics.error:
        result["metrics_error"] = metrics.error
    result["wall_s"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)
    print(
        f"[soak] {'PASS' if result['pass'] else 'FAIL'}: {result['errors']} errors, "
        f"rss growth {(result['rss'] or {}).get('growth')}",
        file=sys.stderr,
    )
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
