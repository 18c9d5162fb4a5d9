"""Load on the policy server from many robots at once, over gRPC on loopback.

Starts a real `gr2-policy-server serve` process (in-process episode store, seeded random
weights of `--preset`, gr2-tiny by default) on free ports, or uses a running one
(`--server HOST:PORT`). Every robot is one episode on its own `StreamActions` stream, sending
the served views as raw RGB frames; all robots run as asyncio tasks in this one process
(grpc.aio), each with an observation message built once, of which only seq and capture time
change per step. Every chunk must answer its own episode and seq; one that does not is
counted as an error (kind `mismatched_chunk`). Two kinds of load:

- capacity: for each N of `--robots`, N robots in closed loop: each sends its next observation
  as soon as the chunk for the previous one arrives. After `--warmup` seconds it measures for
  `--duration` seconds: aggregate steps/s, client round trip p50/p99, the server-reported
  queue and compute times (chunk fields `queue_time_s`, `compute_time_s`), the mean batch
  size (delta of `gr2_policy_batch_size` _sum/_count on the server's /metrics over the
  window) and errors. Then `steps_per_s[8] / steps_per_s[1]`: with dynamic batching the target
  is >= 3 on CPU with gr2-tiny.
- realtime: `--rt-robots` robots, each sending one observation every 1/`--rt-hz` seconds on
  an absolute schedule, offset within the period by `--rt-phase` (random by default). A robot
  waits for the chunk of its previous observation before sending the next, as the WBC agent
  does; when that chunk comes after the next slot, the observation goes out at once and
  counts as late, and any slot that passed entirely counts as skipped (no catch-up bursts).
  Round trip p50/p99/max, queue time, mean batch size, errors, and whether p99 is under the
  control period.

Alongside: the CPU time of this client process per second of wall time (1.0 = one core busy;
compare with the core count to see whether the client was the bottleneck), the server's
(when this script started it) and the whole machine's busy share, the server settings used
and the machine (cores, torch threads, versions). It prints one JSON object; `--out FILE`
also writes it. A default run (4 x 21 s of capacity, 21 s of realtime, plus server start) takes
about two minutes.

Run with the project venv, e.g.
    .venv/bin/python bench/load.py --out bench/results/load_cpu_2core.json
    .venv/bin/python bench/load.py --duration 8 --rt-duration 8 --server-env GR2_RUNNER=onnx
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2_client import (
    AsyncActionStream,
    AsyncPolicyClient,
    ServerDescription,
    make_observation,
)

BIN = Path(sys.executable).parent
BATCH_METRIC = "gr2_policy_batch_size"
CLOSE_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles_ms(values: list[float], qs: tuple[int, ...] = (50, 99)) -> dict[str, float]:
    """Percentiles (and max when asked with q=100) of seconds, in milliseconds."""
    if not values:
        return {}
    arr = np.asarray(values) * 1e3
    out = {f"p{q}_ms": round(float(np.percentile(arr, q)), 3) for q in qs if q < 100}
    if 100 in qs:
        out["max_ms"] = round(float(arr.max()), 3)
    return out


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--server-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


class CpuClock:
    """CPU seconds of this process, of another process (from /proc) and busy share of the
    whole machine (from /proc/stat), between start() and stop()."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def _server_cpu_s(self) -> float | None:
        if self.server_pid is None:
            return None
        try:
            stat = Path(f"/proc/{self.server_pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime

    @staticmethod
    def _machine() -> tuple[int, int] | None:
        try:
            line = Path("/proc/stat").read_text().splitlines()[0]
        except OSError:
            return None
        ticks = [int(v) for v in line.split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks[:8]), idle

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._proc = time.process_time()
        self._server = self._server_cpu_s()
        self._mach = self._machine()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        client = time.process_time() - self._proc
        out: dict[str, Any] = {
            "client_cpu_s": round(client, 3),
            "client_cpu_per_wall_s": round(client / wall, 3),
        }
        server = self._server_cpu_s()
        if server is not None and self._server is not None:
            out["server_cpu_per_wall_s"] = round((server - self._server) / wall, 3)
        mach = self._machine()
        if mach is not None and self._mach is not None:
            total, idle = mach[0] - self._mach[0], mach[1] - self._mach[1]
            if total > 0:
                out["machine_busy_share"] = round(1.0 - idle / total, 3)
        return out


class Metrics:
    """Reads the batch-size histogram from the server's Prometheus /metrics."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.error: str | None = None

    def text(self) -> str | None:
        """The /metrics page; None (and `error` set) when there is none or it failed."""
        if self.url is None:
            return None
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                return resp.read().decode()
        except OSError as err:
            self.error = f"{type(err).__name__}: {err}"
            return None

    def _read(self) -> tuple[float, float] | None:
        text = self.text()
        if text is None:
            return None
        sums = re.findall(rf"^{BATCH_METRIC}_sum(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        counts = re.findall(rf"^{BATCH_METRIC}_count(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        if not counts:
            self.error = f"{BATCH_METRIC} not found in {self.url}"
            return None
        return sum(float(v) for v in sums), sum(float(v) for v in counts)

    async def snapshot(self) -> tuple[float, float] | None:
        return await asyncio.to_thread(self._read)

    @staticmethod
    def batch(
        before: tuple[float, float] | None, after: tuple[float, float] | None, window_s: float
    ) -> dict[str, Any]:
        if before is None or after is None:
            return {"mean_batch_size": None}
        d_sum, d_count = after[0] - before[0], after[1] - before[1]
        return {
            "mean_batch_size": round(d_sum / d_count, 3) if d_count > 0 else None,
            "batches_per_s": round(d_count / window_s, 2),
        }


# ---------------------------------------------------------------------------------------------
# Robots


@dataclass
class Step:
    t_send: float  # perf_counter when the observation was written
    t_recv: float  # perf_counter when its chunk was read
    queue_s: float
    compute_s: float
    slot: float = 0.0  # realtime: the scheduled send time
    late: bool = False  # realtime: sent after its slot because the previous chunk was late


@dataclass
class Robot:
    """One robot: one episode, one stream, one observation message reused every step."""

    index: int
    client: AsyncPolicyClient
    obs: pb.Observation
    episode_id: str = ""
    stream: AsyncActionStream | None = None
    seq: int = 0
    steps: list[Step] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (time, kind)
    skipped: list[float] = field(default_factory=list)  # realtime: slot times never sent

    async def open(self) -> None:
        self.episode_id = await self.client.start_episode(
            f"load bench robot {self.index}", robot_id=f"bench-{self.index}"
        )
        self.obs.episode_id = self.episode_id
        self.seq = 0
        self.stream = self.client.open_stream()

    async def step(self, slot: float = 0.0, late: bool = False) -> None:
        """One observation and its chunk; a failure is recorded and reopens the episode."""
        assert self.stream is not None
        self.obs.seq = self.seq
        t_send = time.perf_counter()
        self.obs.capture_time_s = t_send
        try:
            chunk = await self.stream.step(self.obs)
        except (grpc.aio.AioRpcError, EOFError) as err:
            kind = err.code().name if isinstance(err, grpc.aio.AioRpcError) else "EOF"
            self.errors.append((time.perf_counter(), kind))
            await self.reopen()
            return
        t_recv = time.perf_counter()
        if chunk.episode_id != self.episode_id or chunk.seq != self.seq:
            self.errors.append((t_recv, "mismatched_chunk"))
        else:
            self.steps.append(
                Step(t_send, t_recv, chunk.queue_time_s, chunk.compute_time_s, slot, late)
            )
        self.seq += 1

    async def reopen(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        await asyncio.sleep(0.1)  # no tight loop against a failing server
        try:
            await self.open()
        except grpc.aio.AioRpcError as err:
            self.errors.append((time.perf_counter(), f"start_episode:{err.code().name}"))
            self.stream = None

    async def close_stream(self) -> None:
        """Half-close the stream and wait for its status; a failure (recorded with kind
        `close_stream:CODE`) or a timeout cancels it."""
        if self.stream is None:
            return
        try:
            await asyncio.wait_for(self.stream.close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, grpc.aio.AioRpcError) as err:
            kind = err.code().name if isinstance(err, grpc.aio.AioRpcError) else "TIMEOUT"
            self.errors.append((time.perf_counter(), f"close_stream:{kind}"))
            self.stream.cancel()
        self.stream = None

    async def close(self) -> None:
        await self.close_stream()
        if self.episode_id:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.client.end_episode(self.episode_id, pb.EPISODE_OUTCOME_ABORTED)


async def closed_loop(robot: Robot, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if robot.stream is None:
            await robot.reopen()
            continue
        await robot.step()


async def on_schedule(robot: Robot, first_slot: float, period: float, end: float) -> None:
    """Send at first_slot + j * period until `end`; never more than one observation in flight."""
    j = 0
    while True:
        slot = first_slot + j * period
        if slot >= end:
            return
        now = time.perf_counter()
        late = now > slot
        if late:
            behind = int((now - first_slot) // period)  # the latest slot that has passed
            if behind > j:
                robot.skipped.extend(first_slot + i * period for i in range(j, behind))
                j, slot = behind, first_slot + behind * period
                if slot >= end:
                    return
        else:
            await asyncio.sleep(slot - now)
        if robot.stream is None:
            await robot.reopen()
        else:
            await robot.step(slot, late)
        j += 1


def make_robots(
    clients: list[AsyncPolicyClient], info: ServerDescription, n: int, seed: int
) -> list[Robot]:
    rng = np.random.default_rng(seed)
    return [Robot(i, clients[i % len(clients)], robot_observation(info, rng)) for i in range(n)]


def robot_observation(info: ServerDescription, rng: np.random.Generator) -> pb.Observation:
    """An observation of random images of the served views, with no episode yet."""
    images = {name: rng.integers(0, 256, (h, w, 3), np.uint8) for name, w, h in info.views}
    return make_observation(
        "", 0, images, [0.45, 0.0, 0.3], [0.0, 1.0, 0.0, 0.0], 0.0, capture_time_s=0.0
    )


def error_summary(robots: list[Robot], t0: float, t1: float) -> dict[str, Any]:
    kinds = Counter(kind for r in robots for t, kind in r.errors if t0 <= t <= t1)
    return {"errors": sum(kinds.values()), "errors_by_kind": dict(sorted(kinds.items()))}


# ---------------------------------------------------------------------------------------------
# The two loads


async def capacity(
    clients: list[AsyncPolicyClient],
    info: ServerDescription,
    n: int,
    args: argparse.Namespace,
    metrics: Metrics,
    cpu: CpuClock,
) -> dict[str, Any]:
    robots = make_robots(clients, info, n, seed=n)
    await asyncio.gather(*(r.open() for r in robots))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(closed_loop(r, stop)) for r in robots]
    await asyncio.sleep(args.warmup)
    before = await metrics.snapshot()
    cpu.start()
    w0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    w1 = time.perf_counter()
    usage = cpu.stop()
    after = await metrics.snapshot()
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.gather(*(r.close() for r in robots))

    window = w1 - w0
    done = [s for r in robots for s in r.steps if w0 <= s.t_recv <= w1]
    inside = [s for s in done if s.t_send >= w0]
    per_robot = [sum(1 for s in r.steps if w0 <= s.t_recv <= w1) / window for r in robots]
    return {
        "robots": n,
        "window_s": round(window, 3),
        "steps": len(done),
        "steps_per_s": round(len(done) / window, 2),
        "steps_per_s_per_robot_min": round(min(per_robot), 2),
        "round_trip": percentiles_ms([s.t_recv - s.t_send for s in inside], (50, 99, 100)),
        "queue": percentiles_ms([s.queue_s for s in inside]),
        "compute": percentiles_ms([s.compute_s for s in inside]),
        **Metrics.batch(before, after, window),
        **error_summary(robots, w0, w1),
        **usage,
    }


async def realtime(
    clients: list[AsyncPolicyClient],
    info: ServerDescription,
    args: argparse.Namespace,
    metrics: Metrics,
    cpu: CpuClock,
) -> dict[str, Any]:
    n, period = args.rt_robots, 1.0 / args.rt_hz
    robots = make_robots(clients, info, n, seed=1000 + n)
    await asyncio.gather(*(r.open() for r in robots))
    rng = random.Random(args.seed)
    if args.rt_phase == "aligned":
        phases = [0.0] * n
    elif args.rt_phase == "spread":
        phases = [period * i / n for i in range(n)]
    else:
        phases = [rng.uniform(0.0, period) for _ in range(n)]
    t0 = time.perf_counter() + 0.05
    w0 = t0 + args.warmup
    w1 = w0 + args.rt_duration
    tasks = [
        asyncio.create_task(on_schedule(r, t0 + p, period, w1))
        for r, p in zip(robots, phases, strict=True)
    ]
    await asyncio.sleep(w0 - time.perf_counter())
    before = await metrics.snapshot()
    cpu.start()
    await asyncio.gather(*tasks)
    usage = cpu.stop()
    after = await metrics.snapshot()
    end = time.perf_counter()
    await asyncio.gather(*(r.close() for r in robots))

    steps = [s for r in robots for s in r.steps if s.slot >= w0]
    on_time = [s.t_send - s.slot for s in steps if not s.late]
    rtt = [s.t_recv - s.t_send for s in steps]
    p99 = float(np.percentile(rtt, 99)) if rtt else float("inf")
    slots = len(steps) + sum(1 for r in robots for t in r.skipped if t >= w0)
    return {
        "robots": n,
        "hz": args.rt_hz,
        "period_ms": round(period * 1e3, 3),
        "phase": args.rt_phase,
        "window_s": round(end - w0, 3),
        "slots": slots,
        "steps": len(steps),
        "late_sends": sum(1 for s in steps if s.late),
        "skipped_slots": slots - len(steps),
        "round_trip": percentiles_ms(rtt, (50, 99, 100)),
        "queue": percentiles_ms([s.queue_s for s in steps]),
        "compute": percentiles_ms([s.compute_s for s in steps]),
        # how far after its slot an on-time observation went out (the client's own timing)
        "send_jitter": percentiles_ms(on_time, (50, 99, 100)) or None,
        **Metrics.batch(before, after, end - w0),
        **error_summary(robots, w0, end),
        "p99_below_period": p99 < period,
        **usage,
    }


# ---------------------------------------------------------------------------------------------
# Server and machine


@dataclass
class SpawnedServer:
    process: subprocess.Popen[bytes]
    log: TextIO
    target: str
    metrics_url: str
    argv: list[str]
    env: dict[str, str]  # GR2_* variables the server process sees

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text().splitlines(True)[-lines:])

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.process.returncode


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The started server's environment: this process's, minus GR2_REDIS_URL (the
    in-process store), then this script's settings, then --server-env, which wins.
    Settings travel as GR2_* variables rather than flags, because a flag would override
    the same setting given through --server-env."""
    env = {k: v for k, v in os.environ.items() if k != "GR2_REDIS_URL"}
    env.update(GR2_HOST="127.0.0.1", GR2_PRESET=args.preset, GR2_LOG_LEVEL="warning")
    if "GR2_CHECKPOINT" in args.server_env:
        env.pop("GR2_RANDOM_WEIGHTS", None)  # the two exclude each other
    else:
        env.update(GR2_RANDOM_WEIGHTS="true", GR2_CHECKPOINT="")
    if args.torch_threads:
        env["GR2_TORCH_THREADS"] = str(args.torch_threads)
    env.update(args.server_env)
    return env


def start_server(args: argparse.Namespace, env: dict[str, str]) -> SpawnedServer:
    grpc_port, http_port = free_port(), free_port()
    argv = [
        str(BIN / "gr2-policy-server"),
        "serve",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
    ]
    log = tempfile.NamedTemporaryFile("w+", prefix="gr2-load-server-", suffix=".log")  # noqa: SIM115
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = SpawnedServer(
        process,
        log,
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{http_port}/metrics",
        argv,
        {k: v for k, v in sorted(env.items()) if k.startswith("GR2_")},
    )
    deadline = time.monotonic() + args.startup_timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                return server
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                tail = server.log_tail()
                server.stop()
                raise SystemExit(f"server did not become ready; its log ends:\n{tail}") from None
            time.sleep(0.2)


def launch_server(
    args: argparse.Namespace, env: dict[str, str]
) -> tuple[SpawnedServer, dict[str, Any]]:
    """Start the server with `env` and wait until ready; also its settings, for the JSON."""
    threads = int(env.get("GR2_TORCH_THREADS") or 0)
    torch_threads = threads or default_torch_threads(env)
    t_start = time.perf_counter()
    spawned = start_server(args, env)
    return spawned, {
        "mode": "started by this script",
        "startup_s": round(time.perf_counter() - t_start, 2),
        "argv": [Path(spawned.argv[0]).name, *spawned.argv[1:]],
        "server_env_flags": args.server_env,
        "gr2_env": spawned.env,
        "torch_threads": torch_threads,
        "torch_threads_source": "GR2_TORCH_THREADS" if threads else "torch default (probed)",
        "store": "redis" if env.get("GR2_REDIS_URL") else "in-process",
    }


def stop_server(spawned: SpawnedServer, description: dict[str, Any]) -> None:
    """Stop a started server; add to its description whether it lived to the end (with its
    log's tail when not) and its exit code."""
    alive = spawned.process.poll() is None
    if not alive:
        description["log_tail"] = spawned.log_tail()
    description["exit_code"] = spawned.stop()
    description["alive_until_end"] = alive


def default_torch_threads(env: dict[str, str]) -> int | None:
    """torch's default intra-op thread count in an environment like the server's."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "loadavg_1m_at_start": round(load[0], 2) if load else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
    }


# ---------------------------------------------------------------------------------------------


async def run_loads(
    target: str, args: argparse.Namespace, metrics: Metrics, cpu: CpuClock
) -> dict[str, Any]:
    n_channels = 1 if args.shared_channel else max([*args.robots, args.rt_robots])
    clients = [AsyncPolicyClient(target) for _ in range(n_channels)]
    try:
        await clients[0].wait_ready(10.0)
        info = await clients[0].server_info()
        info.check_compatible()
        out: dict[str, Any] = {
            "preset": info.preset,
            "model_version": info.model_version,
            "views": [f"{name} {w}x{h} RAW_RGB8" for name, w, h in info.views],
            "payload_bytes": sum(w * h * 3 for _, w, h in info.views),
            "channels": "shared" if args.shared_channel else "one per robot",
        }
        if "capacity" in args.loads:
            rows = []
            for n in args.robots:
                rows.append(await capacity(clients, info, n, args, metrics, cpu))
                print(
                    f"[load] capacity N={n}: {rows[-1]['steps_per_s']} steps/s, "
                    f"round trip {rows[-1]['round_trip']}",
                    file=sys.stderr,
                )
            rate = {row["robots"]: row["steps_per_s"] for row in rows}
            out["capacity"] = rows
            out["steps_per_s_ratio_8_over_1"] = (
                round(rate[8] / rate[1], 3) if rate.get(1) and 8 in rate else None
            )
        if "realtime" in args.loads:
            out["realtime"] = await realtime(clients, info, args, metrics, cpu)
            print(
                f"[load] realtime: round trip {out['realtime']['round_trip']}, "
                f"late {out['realtime']['late_sends']}",
                file=sys.stderr,
            )
        return out
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a server this script starts (--server-env, --preset, --torch-threads,
    --startup-timeout); check them with check_server_arguments."""
    add = parser.add_argument
    add(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the started server, repeatable; wins over this "
        "script's own settings (e.g. GR2_MAX_BATCH_DELAY_MS=2, GR2_RUNNER=onnx, "
        "GR2_CHECKPOINT=DIR instead of random weights, GR2_DEVICE=cuda)",
    )
    add(
        "--preset",
        default="gr2-tiny",
        help="GR2_PRESET of the started server's seeded random weights (gr2-tiny)",
    )
    add(
        "--torch-threads",
        type=int,
        default=0,
        help="GR2_TORCH_THREADS of the started server; 0 (default) leaves it to the inherited "
        "environment or torch's default (one per core). On a quiet 2-core machine 2 threads "
        "served 133 steps/s at 8 robots; on a busy one, 1 thread avoids OpenMP stalls",
    )
    add(
        "--startup-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the started server's /readyz (180)",
    )


def check_server_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--server-env only with a started server; parse its KEY=VALUE pairs into a dict."""
    if args.server and args.server_env:
        parser.error("--server-env applies only to a server this script starts")
    try:
        args.server_env = parse_env_pairs(args.server_env)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as indented JSON on stdout; also write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--robots",
        type=parse_int_list,
        default=[1, 4, 8, 16],
        help="capacity: robot counts N to run in turn, comma-separated (default 1,4,8,16)",
    )
    add("--duration", type=float, default=20.0, help="capacity: seconds measured per N (20)")
    add(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds run before each measurement window and discarded (1.0)",
    )
    add("--rt-robots", type=int, default=16, help="realtime: number of robots (16)")
    add("--rt-hz", type=float, default=10.0, help="realtime: observations/s per robot (10)")
    add("--rt-duration", type=float, default=20.0, help="realtime: seconds measured (20)")
    add(
        "--rt-phase",
        choices=("random", "spread", "aligned"),
        default="random",
        help="realtime: each robot's schedule offset within the period: random (seeded by "
        "--seed), spread evenly, or all at once (default random)",
    )
    add(
        "--loads",
        type=lambda s: [v for v in s.split(",") if v],
        default=["capacity", "realtime"],
        help="which loads to run, comma-separated: capacity, realtime (default both)",
    )
    add(
        "--shared-channel",
        action="store_true",
        help="all robots share one gRPC channel (one HTTP/2 connection); by default each "
        "robot has its own, as separate robots would",
    )
    add("--seed", type=int, default=0, help="seed of the realtime phases (0)")
    add(
        "--server",
        metavar="HOST:PORT",
        help="use this running server instead of starting one (its settings are not known "
        "to this script; batch size needs --metrics-url)",
    )
    add(
        "--metrics-url",
        metavar="URL",
        help="Prometheus /metrics of the server (default: the one this script starts)",
    )
    add_server_arguments(parser)
    add("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    unknown = set(args.loads) - {"capacity", "realtime"}
    if unknown or not args.loads:
        parser.error(f"--loads: unknown {sorted(unknown)}; use capacity and/or realtime")
    check_server_arguments(parser, args)
    if min(args.duration, args.rt_duration, args.rt_hz) <= 0 or args.warmup < 0:
        parser.error("durations and --rt-hz must be positive, --warmup non-negative")
    if args.rt_robots < 1:
        parser.error("--rt-robots must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "load", "machine": machine_info()}
    spawned: SpawnedServer | None = None
    if args.server:
        target = args.server
        result["server"] = {
            "mode": "external",
            "target": target,
            "metrics_url": args.metrics_url,
            "note": "settings unknown to this script"
            + ("" if args.metrics_url else "; no --metrics-url, so no batch sizes"),
        }
        metrics_url = args.metrics_url
    else:
        spawned, result["server"] = launch_server(args, server_env(args))
        target, metrics_url = spawned.target, args.metrics_url or spawned.metrics_url
    metrics = Metrics(metrics_url)
    cpu = CpuClock(spawned.process.pid if spawned else None)
    try:
        result.update(asyncio.run(run_loads(target, args, metrics, cpu)))
    finally:
        if spawned is not None:
            stop_server(spawned, result["server"])
    if metrics.error:
        result["metrics_error"] = metrics.error
    result["wall_s"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
