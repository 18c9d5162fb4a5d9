"""Throw-away serving stack on loopback: redis-server (optional) + the policy server.

``make demo`` and ``gr2-eval`` run the real processes the way a deployment does (gRPC between
agent and server, the episode store in redis), each on free ports, and stop them all again on
exit, failure or Ctrl-C. Logs go to files in ``log_dir``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """A process of the stack did not start; the message names its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; no-op if it already ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    """Wait until ``url`` answers 200, failing early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"process exited early ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise StackError(f"{url} not ready after {timeout_s:.0f} s; see {log}")


def child_env() -> dict[str, str]:
    """The environment for child processes: unbuffered, headless MuJoCo."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MUJOCO_GL", "egl")
    return env


class LocalStack:
    """``with LocalStack(checkpoint, log_dir) as stack:`` -> ``stack.grpc_target`` etc.

    Args:
        checkpoint: checkpoint directory the policy server serves.
        log_dir: where ``policy_server.log`` goes.
        redis: run a throw-away redis-server for the episode store (if installed; otherwise
            the server's in-process store is used and ``redis_url`` stays None).
        server_args: extra ``gr2-policy-server serve`` arguments.
        say: progress messages.
    """

    def __init__(
        self,
        checkpoint: Path,
        log_dir: Path,
        *,
        redis: bool = True,
        server_args: tuple[str, ...] = (),
        say: Callable[[str], None] = print,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.log_dir = Path(log_dir)
        self.use_redis = redis
        self.server_args = server_args
        self.say = say
        self.env = child_env()
        self.redis_url: str | None = None
        self.grpc_port = self.http_port = 0
        self._procs: list[subprocess.Popen] = []

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.use_redis and shutil.which("redis-server"):
            port = free_port()
            redis_dir = tempfile.mkdtemp(prefix="gr2-redis-")
            redis_cmd = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", redis_dir,
            ]  # fmt: skip
            self._procs.append(
                subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            )
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.say(f"redis-server on 127.0.0.1:{port}")
        self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [
            str(BIN / "gr2-policy-server"), "serve",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--checkpoint", str(self.checkpoint), *self.server_args,
        ]  # fmt: skip
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        log_path = self.log_dir / "policy_server.log"
        self.say(f"starting policy server (gRPC :{self.grpc_port}, HTTP :{self.http_port})")
        with log_path.open("wb") as log:
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self._procs.append(server)
        wait_http(f"{self.http_url}/readyz", 180, server, log_path)
        self.say("policy server ready")
