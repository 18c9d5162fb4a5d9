"""Start the real policy server as a process and wait until it is ready."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.processes import child_env, free_port, script_path, stop_process


@dataclass
class PolicyServer:
    grpc_port: int
    http_port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_ready(server: PolicyServer, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"policy server exited with {server.proc.returncode}:\n{server.log_text()}"
            )
        try:
            if httpx.get(f"{server.http_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"policy server not ready after {timeout_s} s:\n{server.log_text()}")


@contextmanager
def run_policy_server(
    workdir: Path,
    *,
    redis_url: str | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[PolicyServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(PORT_ATTEMPTS):
        server = _start_policy_server(workdir, redis_url, extra_args, env)
        try:
            wait_ready(server)
        except RuntimeError:
            stop_process(server.proc)
            # free_port() closes its socket, so another process may take the port before the
            # server binds it; then the server exits at start-up: try again on new ports.
            if attempt + 1 < PORT_ATTEMPTS and "address already in use" in server.log_text():
                continue
            raise
        break
    try:
        yield server
    finally:
        stop_process(server.proc)


PORT_ATTEMPTS = 3


def _start_policy_server(
    workdir: Path, redis_url: str | None, extra_args: tuple[str, ...], env: dict[str, str] | None
) -> PolicyServer:
    grpc_port, http_port = free_port(), free_port()
    args = [
        script_path("gr2-policy-server"),
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        *extra_args,
    ]
    if redis_url:
        args += ["--redis-url", redis_url]
    log_path = workdir / f"policy-server-{grpc_port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(GR2_TORCH_THREADS="1", **(env or {})),
        )
    return PolicyServer(grpc_port, http_port, proc, log_path)


@contextmanager
def run_replicas(
    workdir: Path, redis_url: str, names: tuple[str, ...] = ("replica-a", "replica-b")
) -> Iterator[list[PolicyServer]]:
    """Policy server replicas (seeded random weights, so all serve the same model) sharing
    one Redis episode store, each named by GR2_REPLICA."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                run_policy_server(
                    workdir / name,
                    redis_url=redis_url,
                    env={"GR2_REPLICA": name, "GR2_RANDOM_WEIGHTS": "1"},
                )
            )
            for name in names
        ]


def health_status(target: str, service: str = "") -> int:
    """grpc.health.v1 Check over a plaintext channel (the status enum value)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return reply.status
