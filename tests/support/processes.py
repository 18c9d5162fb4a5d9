"""Start real processes for tests: redis-server, the policy server, the agent.

Ports come from the OS (bind to port 0, read it back, release) so parallel runs do not clash.
Every helper stops what it started, even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


@contextmanager
def run_redis_server(
    workdir: Path,
    *,
    port: int | None = None,
    persistent: bool = False,
    password: str | None = None,
) -> Iterator[RedisServer]:
    """A real, throw-away redis-server on loopback. ``persistent``: an append-only file in
    ``workdir``, fsynced on every write, so a restart on the same port and workdir (after a
    SIGKILL too) finds every acknowledged write; otherwise persistence is off. ``password``:
    clients must authenticate (``url`` carries it)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: run `make test` (installs it through apt)")
    workdir.mkdir(parents=True, exist_ok=True)
    durability = (
        ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    )
    # free_port() closes its socket, so another process may take the port before redis binds
    # it; redis then exits at start-up and, when the port was ours to choose, new ones are tried.
    attempts = 1 if port else PORT_ATTEMPTS
    for attempt in range(attempts):
        chosen = port or free_port()
        log_path = workdir / f"redis-{chosen}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [exe, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "", *durability,
                 "--dir", str(workdir), "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            _wait_for_redis(chosen, 10.0, proc)
        except RuntimeError:
            stop_process(proc)
            in_use = "address already in use" in log_path.read_text(errors="replace").lower()
            if attempt + 1 < attempts and in_use:
                continue
            raise
        break
    try:
        yield RedisServer(port=chosen, proc=proc, password=password)
    finally:
        stop_process(proc)


PORT_ATTEMPTS = 3


def _wait_for_redis(port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    """Wait until *this* redis-server answers (its INFO names ``proc``'s pid): an open port
    alone could be another process that took it first; then ``proc`` exits and this raises
    RuntimeError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode} before it answered")
        client = redis.Redis(
            port=port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            if client.info("server").get("process_id") == proc.pid:
                return
        except redis.RedisError:
            pass
        finally:
            client.close()
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on 127.0.0.1:{port} did not answer in {timeout_s} s")


def script_path(name: str) -> str:
    """Path of a console script installed in this interpreter's environment."""
    path = BIN_DIR / name
    if not path.exists():
        raise RuntimeError(f"{name} not installed next to {sys.executable}: run `make install`")
    return str(path)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
