"""gRPC over TLS and mutual TLS (docs/security.md) against real server processes on loopback,
with throw-away certificates from trustme: who can connect and who cannot, the plaintext
health port for probes (also while draining), the clients and the `gr2` CLI with TLS
options, and bad TLS settings stopping the server with exit code 2 and one line."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from gr2_client import AsyncPolicyClient, PolicyClient, TlsConfig, make_observation
from gr2_wbc.settings import AgentSettings
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from tests.support.processes import child_env, free_port, script_path
from tests.support.servers import PolicyServer, health_status, run_policy_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Certs:
    """PEM files: our CA, the server's certificate, a client certificate from our CA, and
    a CA + client certificate nobody configured."""

    dir: Path

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.dir / f"{name.replace('_', '-')}.pem"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(out / "other-ca.pem"))
    for name, issuer, identities in (
        ("server", ca, ("localhost", "127.0.0.1")),
        ("client", ca, ("robot-1.gr2.test",)),
        ("rogue", other_ca, ("robot-1.gr2.test",)),
    ):
        cert = issuer.issue_cert(*identities)
        cert.cert_chain_pems[0].write_to_path(str(out / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(out / f"{name}-key.pem"))
    (out / "not-pem.pem").write_text("this is not a certificate\n")
    return Certs(out)


@dataclass
class TlsServer:
    server: PolicyServer
    health_port: int

    @property
    def target(self) -> str:
        return self.server.grpc_target


def tls_env(certs: Certs, health_port: int, *, mutual: bool) -> dict[str, str]:
    env = {
        "GR2_TLS_CERT_FILE": str(certs.server),
        "GR2_TLS_KEY_FILE": str(certs.server_key),
        "GR2_HEALTH_PORT": str(health_port),
    }
    if mutual:
        env["GR2_TLS_CLIENT_CA_FILE"] = str(certs.ca)
    return env


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsServer]:
    port = free_port()
    with run_policy_server(
        Path(tmp_path_factory.mktemp("tls")),
        extra_args=("--random-weights",),
        env=tls_env(certs, port, mutual=False),
    ) as srv:
        yield TlsServer(srv, port)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsServer]:
    port = free_port()
    with run_policy_server(
        Path(tmp_path_factory.mktemp("mtls")),
        extra_args=("--random-weights",),
        env=tls_env(certs, port, mutual=True),
    ) as srv:
        yield TlsServer(srv, port)


def refused(target: str, tls: TlsConfig | None) -> grpc.RpcError:
    """The connection attempt fails: UNAVAILABLE (the handshake did not complete)."""
    with (
        PolicyClient(target, tls=tls, timeout_s=10) as client,
        pytest.raises(grpc.RpcError) as info,
    ):
        client.server_info()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    return info.value


def one_step(client: PolicyClient) -> pb.TrajectoryChunk:
    views = client.server_info().views
    episode = client.start_episode("touch the red block", robot_id="tls-robot")
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for n, w, h in views}
    obs = make_observation(
        episode,
        0,
        images,
        np.array([0.45, 0.0, 0.35]),
        np.array([0.0, 1.0, 0.0, 0.0]),
        0.0,
        capture_time_s=0.0,
    )
    return client.act(obs)


# ------------------------------------------------------------------------------------ TLS


def test_tls_client_with_the_ca_connects(tls_server: TlsServer, certs: Certs) -> None:
    with PolicyClient(tls_server.target, tls=TlsConfig(ca_file=certs.ca)) as client:
        assert client.server_info().protocol_version == "1.0"
        assert one_step(client).seq == 0
    # The certificate names "localhost" too; an override checks against that name.
    tls = TlsConfig(ca_file=str(certs.ca), server_name_override="localhost")
    with PolicyClient(tls_server.target, tls=tls) as client:
        assert client.server_info().views


def test_tls_refuses_plaintext_and_untrusted_clients(tls_server: TlsServer, certs: Certs) -> None:
    refused(tls_server.target, None)  # plaintext to a TLS port
    refused(tls_server.target, TlsConfig(ca_file=certs.other_ca))  # server cert not trusted
    # The server's certificate is for localhost/127.0.0.1, not this name.
    refused(tls_server.target, TlsConfig(ca_file=certs.ca, server_name_override="gr2.example"))


def test_tls_serves_health_in_plaintext_on_its_own_port(tls_server: TlsServer) -> None:
    health_target = f"127.0.0.1:{tls_server.health_port}"
    for service in ("", "gr2.v1.PolicyService"):
        assert health_status(health_target, service) == SERVING
    # Only health there: the policy service is not reachable without TLS.
    with grpc.insecure_channel(health_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.PolicyServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tls_startup_log_says_what_each_port_serves(tls_server: TlsServer) -> None:
    text = (
        tls_server.server.log_text()
    )  # JSON lines, and gRPC core's own lines on failed handshakes
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    serving = next(line for line in lines if line.get("event") == "serving")
    assert serving["grpc"] == tls_server.target and serving["grpc_security"] == "TLS"
    assert serving["grpc_plaintext_health"] == f"127.0.0.1:{tls_server.health_port}"
    assert serving["auth"] == "off" and serving["rate_limit"] == "off"
    # No API keys: exactly one warning that the server is unauthenticated.
    warnings = [line for line in lines if line.get("event") == "unauthenticated"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"


def test_gr2_cli_tls_options(tls_server: TlsServer, certs: Certs) -> None:
    gr2 = script_path("gr2")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [gr2, "--server", tls_server.target, *args],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run("--tls-ca", str(certs.ca), "info", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["protocol_version"] == "1.0"
    plain = run("info")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    usage = run("--tls-ca", str(certs.ca), "--tls-cert", str(certs.client), "info")
    assert usage.returncode == 2 and "--tls-key" in usage.stderr
    missing = run("--tls-ca", str(certs.dir / "nope.pem"), "info")
    assert missing.returncode == 2 and "nope.pem" in missing.stderr


# ----------------------------------------------------------------------------- mutual TLS


def test_mtls_client_with_a_certificate_from_the_ca_connects(
    mtls_server: TlsServer, certs: Certs
) -> None:
    tls = TlsConfig(ca_file=certs.ca, cert_file=certs.client, key_file=certs.client_key)
    with PolicyClient(mtls_server.target, tls=tls) as client:
        assert one_step(client).seq == 0

    async def aio() -> str:
        async with AsyncPolicyClient(mtls_server.target, tls=tls) as client:
            return (await client.server_info()).protocol_version

    assert asyncio.run(aio()) == "1.0"


def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_server: TlsServer, certs: Certs
) -> None:
    refused(mtls_server.target, TlsConfig(ca_file=certs.ca))  # no client certificate
    rogue = TlsConfig(ca_file=certs.ca, cert_file=certs.rogue, key_file=certs.rogue_key)
    refused(mtls_server.target, rogue)  # signed by a CA the server does not trust
    refused(mtls_server.target, None)  # plaintext


def test_mtls_health_port_needs_no_certificate(mtls_server: TlsServer) -> None:
    assert health_status(f"127.0.0.1:{mtls_server.health_port}") == SERVING
    lines = mtls_server.server.log_text()
    assert '"grpc_security": "mutual TLS"' in lines


def test_plaintext_health_port_shows_the_drain(tmp_path: Path, certs: Certs) -> None:
    """SIGTERM: the plaintext health port answers NOT_SERVING while the server drains (the
    health servers share one HealthServicer), then closes with the rest."""
    port = free_port()
    env = {**tls_env(certs, port, mutual=False), "GR2_DRAIN_MIN_S": "3"}
    with run_policy_server(tmp_path, extra_args=("--random-weights",), env=env) as srv:
        target = f"127.0.0.1:{port}"
        assert health_status(target) == SERVING
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        seen = SERVING
        while seen == SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = health_status(target)
        assert seen == NOT_SERVING
        assert health_status(target, "gr2.v1.PolicyService") == NOT_SERVING
        assert srv.proc.wait(timeout=30) == 0


# ---------------------------------------------------------------------- bad TLS settings


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"GR2_TLS_CERT_FILE": "server"}, "GR2_TLS_KEY_FILE is not"),
        ({"GR2_TLS_KEY_FILE": "server_key"}, "GR2_TLS_CERT_FILE is not"),
        ({"GR2_TLS_CLIENT_CA_FILE": "ca"}, "needs the server's own certificate"),
        ({"GR2_TLS_CERT_FILE": "missing", "GR2_TLS_KEY_FILE": "server_key"}, "cannot read"),
        ({"GR2_TLS_CERT_FILE": "server", "GR2_TLS_KEY_FILE": "rogue_key"}, "cannot be used"),
        (
            {
                "GR2_TLS_CERT_FILE": "server",
                "GR2_TLS_KEY_FILE": "server_key",
                "GR2_TLS_CLIENT_CA_FILE": "not_pem",
            },
            "not a PEM file",
        ),
    ],
    ids=["cert-only", "key-only", "ca-only", "unreadable", "wrong-key", "ca-not-pem"],
)
def test_bad_tls_settings_exit_2_with_one_line(
    certs: Certs, files: dict[str, str], words: str
) -> None:
    env = child_env(**{name: str(getattr(certs, which)) for name, which in files.items()})
    result = subprocess.run(
        [script_path("gr2-policy-server"), "serve", "--grpc-port", "0", "--http-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert message.startswith("gr2-policy-server: ") and words in message


# ------------------------------------------------------------------- client-side settings


def test_client_tls_config_and_agent_settings(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="key_file"):
        TlsConfig(ca_file=certs.ca, cert_file=certs.client)
    assert TlsConfig(ca_file=certs.ca).channel_options() == []
    with pytest.raises(OSError):
        TlsConfig(ca_file=certs.dir / "nope.pem").channel_credentials()

    for name in ("TLS", "TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_SERVER_NAME"):
        monkeypatch.delenv(f"GR2_WBC_{name}", raising=False)
    assert AgentSettings().tls_config() is None  # plaintext by default
    monkeypatch.setenv("GR2_WBC_TLS_CA_FILE", str(certs.ca))
    monkeypatch.setenv("GR2_WBC_TLS_CERT_FILE", str(certs.client))
    with pytest.raises(ValidationError, match="GR2_WBC_TLS_KEY_FILE"):
        AgentSettings()
    monkeypatch.setenv("GR2_WBC_TLS_KEY_FILE", str(certs.client_key))
    assert AgentSettings().tls_config() == TlsConfig(
        ca_file=certs.ca, cert_file=certs.client, key_file=certs.client_key
    )
