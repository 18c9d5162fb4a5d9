"""`make demo`: policy server + WBC agent + simulated Gen3 running one episode.

Starts a throw-away redis-server (episode store), the policy server and the agent as separate
processes on loopback, runs one episode, and writes to --out:
  episode.mp4    head and wrist cameras side by side
  summary.json   steps, chunk latency percentiles, loop timing, arm motion, the episode record
  *.log          each process's log
Everything it starts is stopped again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUNDLED_CHECKPOINT = ROOT / "checkpoints" / "demo"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s; see {log}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--instruction", default="pick up the red block")
    parser.add_argument("--steps", type=int, default=60, help="control steps (observations)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    parser.add_argument("--no-redis", action="store_true", help="use the in-process store")
    args = parser.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MUJOCO_GL", "egl")
    procs: list[subprocess.Popen] = []
    try:
        if BUNDLED_CHECKPOINT.joinpath("config.json").exists():
            checkpoint = BUNDLED_CHECKPOINT
            say(f"checkpoint: bundled {checkpoint}")
        else:
            checkpoint = out / "checkpoint"
            say(f"no bundled checkpoint: writing random gr2-tiny weights to {checkpoint}")
            subprocess.run(
                [
                    str(BIN / "gr2-policy-server"),
                    "init-checkpoint",
                    "--preset",
                    "gr2-tiny",
                    "--seed",
                    "0",
                    "--out",
                    str(checkpoint),
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )

        redis_url = None
        if not args.no_redis and shutil.which("redis-server"):
            port = free_port()
            redis_dir = Path(tempfile.mkdtemp(prefix="gr2-demo-redis-"))
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(redis_dir),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
            redis_url = f"redis://127.0.0.1:{port}/0"
            say(f"redis-server on 127.0.0.1:{port}")

        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        server_log = out / "policy_server.log"
        cmd = [
            str(BIN / "gr2-policy-server"),
            "serve",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--checkpoint",
            str(checkpoint),
        ]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        say(f"starting policy server (gRPC :{grpc_port}, HTTP :{http_port})")
        with server_log.open("wb") as log:
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(server)
        wait_http(f"http://127.0.0.1:{http_port}/readyz", 180, server, server_log)
        say("policy server ready")

        agent_summary = out / "agent_summary.json"
        video = out / "episode.mp4"
        say(f"running the agent: {args.steps} steps of '{args.instruction}' on the simulated Gen3")
        agent = subprocess.run(
            [
                str(BIN / "gr2-wbc-agent"),
                "run",
                "--server",
                f"127.0.0.1:{grpc_port}",
                "--robot",
                "sim",
                "--instruction",
                args.instruction,
                "--steps",
                str(args.steps),
                "--seed",
                str(args.seed),
                "--video",
                str(video),
                "--summary",
                str(agent_summary),
                "--metrics-port",
                str(metrics_port),
                "--robot-id",
                "demo-gen3-sim",
            ],
            env=env,
            stdout=sys.stdout,
            stderr=(out / "agent.log").open("wb"),
        )
        if agent.returncode != 0:
            say(f"agent failed ({agent.returncode}); see {out / 'agent.log'}")
            return agent.returncode

        summary = json.loads(agent_summary.read_text())
        url = f"http://127.0.0.1:{http_port}/v1/episodes/{summary['episode_id']}"
        with urllib.request.urlopen(url, timeout=5) as r:
            summary["episode_record"] = json.loads(r.read())
        summary["store"] = "redis" if redis_url else "memory"
        summary["checkpoint"] = str(checkpoint)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lat = summary["chunk_latency"]
        loop = summary["loop"]
        say(
            f"done: {summary['steps']} steps, chunk round trip p50 "
            f"{lat['round_trip_p50_s'] * 1e3:.1f} ms / p99 {lat['round_trip_p99_s'] * 1e3:.1f} ms, "
            f"loop period p99 {loop['period_p99_s'] * 1e3:.2f} ms, "
            f"{loop['deadline_misses']} deadline misses, "
            f"tool moved {summary['tool_displacement_m'] * 100:.1f} cm"
        )
        say(f"wrote {video} and {out / 'summary.json'}")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
