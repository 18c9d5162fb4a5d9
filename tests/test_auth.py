"""API keys and per-key rate limits (docs/security.md) against real server processes on
loopback: every PolicyService RPC and /v1 route refuses a missing or wrong key before its
handler runs (nothing is created), health/metrics/the page stay open, the rate limit refuses
the call past the burst (StreamActions per observation) without touching other keys, and no
key or Redis password ever reaches the server's log. Plus the key and bucket logic itself."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from gr2_client import PolicyClient, make_observation
from gr2_policy.api.auth import (
    AccessGuard,
    KeyRing,
    KeySettingsError,
    RateLimitedError,
    RateLimiter,
    Unauthenticated,
    client_address,
    key_id,
)
from gr2_policy.settings import ServerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from tests.support.processes import (
    RedisServer,
    child_env,
    run_redis_server,
    script_path,
)
from tests.support.servers import PolicyServer, run_policy_server

PROBLEM = "application/problem+json"
# Long random-looking keys: a hit in the log cannot be a coincidence.
ROBOT_KEY = "k-robot-7f3c9a1e5b2d4f6a8c0e1b3d5f7a9c2e"
UNNAMED_KEY = "k-unnamed-2b4d6f8a0c1e3a5c7e9b1d3f5a7c9e0b"
WRONG_KEY = ROBOT_KEY + "x"
REDIS_PASSWORD = "redis-pw-5e8a1c3f7b9d2e4a6c8f0b1d"
RATE_KEYS = {name: f"k-{name}-{i}a9c4e7f1b3d5a8c2e6f0b4d7a1c" for i, name in enumerate("abcde")}
HOME_POS = np.array([0.45, 0.0, 0.35])
DOWN_QUAT = np.array([0.0, 1.0, 0.0, 0.0])


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A throw-away redis-server that requires a password (so the URL carries a secret)."""
    with run_redis_server(tmp_path_factory.mktemp("redis-auth"), password=REDIS_PASSWORD) as r:
        yield r


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, redis_with_password: RedisServer
) -> Iterator[PolicyServer]:
    """Keys on (one named, one not), no rate limit, episodes in a password-protected Redis."""
    with run_policy_server(
        Path(tmp_path_factory.mktemp("auth")),
        redis_url=redis_with_password.url,
        extra_args=("--random-weights",),
        env={"GR2_API_KEYS": f"robot-1:{ROBOT_KEY}, {UNNAMED_KEY}"},
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    """Keys on and 3 requests per key, then 1 per 100 s: the 4th is refused for sure."""
    keys = ",".join(f"{name}:{key}" for name, key in RATE_KEYS.items())
    with run_policy_server(
        Path(tmp_path_factory.mktemp("ratelimit")),
        extra_args=("--random-weights",),
        env={"GR2_API_KEYS": keys, "GR2_RATE_LIMIT_RPS": "0.01", "GR2_RATE_LIMIT_BURST": "3"},
    ) as srv:
        yield srv


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def observation(views: list[tuple[str, int, int]], episode_id: str, seq: int) -> pb.Observation:
    rng = np.random.default_rng(seq)
    images = {n: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for n, w, h in views}
    return make_observation(
        episode_id, seq, images, HOME_POS, DOWN_QUAT, 0.0, capture_time_s=0.2 * seq
    )


def expect_code(call, code: grpc.StatusCode) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    assert "Traceback" not in (info.value.details() or "")
    return info.value


def metric(http_url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def assert_problem(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and words.lower() in body["detail"].lower(), body
    return body


def episodes_of(server: PolicyServer, robot_id: str) -> list[dict]:
    response = httpx.get(
        f"{server.http_url}/v1/episodes", params={"limit": 1000}, headers=bearer(ROBOT_KEY)
    )
    assert response.status_code == 200, response.text
    return [e for e in response.json()["episodes"] if e["robot_id"] == robot_id]


# ----------------------------------------------------------------------------- gRPC side


def every_rpc(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], episode_id: str
) -> dict[str, object]:
    """One call of each PolicyService RPC (streams are drained, so their status shows)."""
    stub = pb_grpc.PolicyServiceStub(channel)
    obs = pb.Observation(episode_id=episode_id, seq=0)
    kw = {"metadata": metadata, "timeout": 10}
    return {
        "GetServerInfo": lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), **kw),
        "StartEpisode": lambda: stub.StartEpisode(
            pb.StartEpisodeRequest(instruction="open the drawer", robot_id="intruder"), **kw
        ),
        "Act": lambda: stub.Act(obs, **kw),
        "StreamActions": lambda: list(stub.StreamActions(iter([obs]), **kw)),
        "PredictVideo": lambda: list(
            stub.PredictVideo(pb.PredictVideoRequest(instruction="x", num_frames=1), **kw)
        ),
        "EndEpisode": lambda: stub.EndEpisode(pb.EndEpisodeRequest(episode_id=episode_id), **kw),
    }


@pytest.mark.parametrize(
    ("metadata", "reason", "words"),
    [
        ((), "missing", "missing API key: send metadata 'authorization: Bearer <key>'"),
        ((("authorization", f"Bearer {WRONG_KEY}"),), "invalid", "invalid API key"),
        ((("authorization", f"Basic {ROBOT_KEY}"),), "malformed", "expected 'Bearer <key>'"),
    ],
    ids=["no-key", "wrong-key", "not-bearer"],
)
def test_every_rpc_refuses_a_missing_or_wrong_key(
    server: PolicyServer, metadata: tuple[tuple[str, str], ...], reason: str, words: str
) -> None:
    with PolicyClient(server.grpc_target, api_key=ROBOT_KEY) as client:
        live = client.start_episode("keep me", robot_id="witness")
    before = metric(server.http_url, "gr2_policy_auth_failures_total", reason=reason)
    with grpc.insecure_channel(server.grpc_target) as channel:
        calls = every_rpc(channel, metadata, live)
        assert set(calls) == {
            m.name for m in pb.DESCRIPTOR.services_by_name["PolicyService"].methods
        }
        for name, call in calls.items():
            err = expect_code(call, grpc.StatusCode.UNAUTHENTICATED)
            assert err.details() == words or words in err.details(), (name, err.details())
    after = metric(server.http_url, "gr2_policy_auth_failures_total", reason=reason)
    assert after - before == len(calls)
    # Nothing ran: no episode was started, and the live one was neither stepped nor ended.
    assert episodes_of(server, "intruder") == []
    record = httpx.get(f"{server.http_url}/v1/episodes/{live}", headers=bearer(ROBOT_KEY)).json()
    assert record["status"] == "active" and record["steps"] == 0 and record["last_seq"] == -1


def test_handlers_are_not_entered_without_a_key(server: PolicyServer) -> None:
    """An observation without images is INVALID_ARGUMENT inside the handler: without a key
    the call never gets there, and the handler's request counter does not move."""
    labels = {"method": "Act", "code": "INVALID_ARGUMENT"}
    before = metric(server.http_url, "gr2_policy_requests_total", **labels)
    with PolicyClient(server.grpc_target) as client:
        expect_code(
            lambda: client.act(pb.Observation(episode_id="no-such-episode", seq=0)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    with PolicyClient(server.grpc_target, api_key=ROBOT_KEY) as client:
        expect_code(
            lambda: client.act(pb.Observation(episode_id="no-such-episode", seq=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    after = metric(server.http_url, "gr2_policy_requests_total", **labels)
    assert after - before == 1  # only the call with the key reached the handler


@pytest.mark.parametrize("key", [ROBOT_KEY, UNNAMED_KEY], ids=["named", "unnamed"])
def test_right_key_starts_and_streams_an_episode(server: PolicyServer, key: str) -> None:
    with PolicyClient(server.grpc_target, api_key=key) as client:
        views = client.server_info().views
        episode = client.start_episode("pick up the red block", robot_id=f"robot-{key[:9]}")
        chunks = list(client.stream_actions(observation(views, episode, s) for s in range(2)))
        assert [c.seq for c in chunks] == [0, 1]
        assert all(len(c.waypoints) > 0 for c in chunks)
        assert client.end_episode(episode).steps == 2


def test_health_needs_no_key_but_reflection_does(server: PolicyServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "gr2.v1.PolicyService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        expect_code(
            lambda: list(refl.ServerReflectionInfo(iter([request]), timeout=5)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        replies = refl.ServerReflectionInfo(
            iter([request]), timeout=5, metadata=(("authorization", f"Bearer {ROBOT_KEY}"),)
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "gr2.v1.PolicyService" in names


# ----------------------------------------------------------------------------- REST side


@pytest.mark.parametrize("path", ["/v1/info", "/v1/episodes", "/v1/samples", "/v1/episodes/x"])
def test_rest_v1_refuses_a_missing_or_wrong_key(server: PolicyServer, path: str) -> None:
    url = f"{server.http_url}{path}"
    missing = httpx.get(url)
    assert_problem(missing, 401, "missing API key")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    for headers in (bearer(WRONG_KEY), {"Authorization": f"Basic {ROBOT_KEY}"}):
        wrong = httpx.get(url, headers=headers)
        body = assert_problem(wrong, 401, "API key")
        assert body["code"] == "UnauthenticatedError"
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    good = httpx.get(url, headers=bearer(UNNAMED_KEY))
    assert good.status_code in (200, 404), good.text  # /v1/episodes/x: a real 404 from inside


def test_rest_refuses_before_reading_an_upload(server: PolicyServer) -> None:
    """No key and a body over the upload limit: 401, not 413 (auth comes first), and no
    prediction ran."""
    before = metric(server.http_url, "gr2_policy_video_tokens_total")
    response = httpx.post(
        f"{server.http_url}/v1/predict-video",
        content=b"\0" * (9 * 1024 * 1024),
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert_problem(response, 401, "missing API key")
    small = httpx.post(
        f"{server.http_url}/v1/predict-video",
        json={"instruction": "x", "images": [], "num_frames": 1},
        headers=bearer(WRONG_KEY),
    )
    assert_problem(small, 401, "invalid API key")
    assert metric(server.http_url, "gr2_policy_video_tokens_total") == before


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/openapi.json", "/docs"],
)
def test_rest_exempt_paths_need_no_key(server: PolicyServer, path: str) -> None:
    response = httpx.get(f"{server.http_url}{path}")
    assert response.status_code == 200, (path, response.status_code, response.text[:200])


def test_openapi_documents_the_bearer_key(server: PolicyServer) -> None:
    spec = httpx.get(f"{server.http_url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/info"]["get"]["security"] == [{"apiKey": []}]
    assert "401" in spec["paths"]["/v1/info"]["get"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_refuses_grpc_calls_past_the_burst(limited_server: PolicyServer) -> None:
    srv = limited_server
    before = metric(srv.http_url, "gr2_policy_rate_limited_total", key="a")
    with PolicyClient(srv.grpc_target, api_key=RATE_KEYS["a"]) as client:
        for _ in range(3):
            client.server_info()
        err = expect_code(client.server_info, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "rate limit" in err.details() and "0.01 requests/s" in err.details()
    assert "bursts of 3" in err.details() and "'a'" in err.details()
    trailing = dict(err.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 90  # one token every 100 s
    assert metric(srv.http_url, "gr2_policy_rate_limited_total", key="a") == before + 1
    with PolicyClient(srv.grpc_target, api_key=RATE_KEYS["b"]) as other:
        assert other.server_info().protocol_version  # another key is unaffected


def test_rate_limit_counts_every_stream_observation(limited_server: PolicyServer) -> None:
    """StartEpisode takes 1 of the 3 tokens and the first two observations the rest: the
    third observation on the same stream is refused (counting calls only would let it by)."""
    with PolicyClient(limited_server.grpc_target, api_key=RATE_KEYS["c"]) as client:
        episode = client.start_episode("push the block", robot_id="rate-c")
        views = [("head", 64, 64), ("wrist", 64, 64)]  # gr2-tiny's views (no call to spare)
        received: list[int] = []
        stream = client.stream_actions(observation(views, episode, s) for s in range(3))
        with pytest.raises(grpc.RpcError) as info:
            for chunk in stream:
                received.append(chunk.seq)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "rate limit" in info.value.details()
    assert received == [0, 1]


def test_rate_limit_refuses_rest_calls_with_retry_after(limited_server: PolicyServer) -> None:
    url = f"{limited_server.http_url}/v1/info"
    for _ in range(3):
        assert httpx.get(url, headers=bearer(RATE_KEYS["d"])).status_code == 200
    refused = httpx.get(url, headers=bearer(RATE_KEYS["d"]))
    body = assert_problem(refused, 429, "rate limit exceeded")
    assert body["code"] == "RateLimitedError" and "0.01 requests/s" in body["detail"]
    assert int(refused.headers["retry-after"]) >= 90
    assert httpx.get(url, headers=bearer(RATE_KEYS["e"])).status_code == 200
    # Exempt paths are not limited either.
    for _ in range(5):
        assert httpx.get(f"{limited_server.http_url}/healthz").status_code == 200


# ------------------------------------------------------------------------- secrets, logs


def test_no_secret_in_the_log_or_metrics(
    server: PolicyServer, limited_server: PolicyServer
) -> None:
    with PolicyClient(server.grpc_target, api_key=ROBOT_KEY) as client:
        client.server_info()
    for key in (WRONG_KEY, UNNAMED_KEY + "0"):
        with PolicyClient(server.grpc_target, api_key=key) as client:
            expect_code(client.server_info, grpc.StatusCode.UNAUTHENTICATED)
        httpx.get(f"{server.http_url}/v1/info", headers=bearer(key))
    with PolicyClient(limited_server.grpc_target, api_key=RATE_KEYS["a"]) as client:
        expect_code(client.server_info, grpc.StatusCode.RESOURCE_EXHAUSTED)

    log = server.log_text() + limited_server.log_text()
    # The log did record the events (so the absence below means something) ...
    assert "auth_failed" in log and "robot-1" in log and key_id(UNNAMED_KEY) in log
    # ... but never a key, a near-miss key or the Redis password.
    for secret in (ROBOT_KEY, UNNAMED_KEY, WRONG_KEY, REDIS_PASSWORD, *RATE_KEYS.values()):
        assert secret not in log
        assert secret[8:24] not in log  # nor a recognisable piece of one
    metrics_text = httpx.get(f"{server.http_url}/metrics").text
    metrics_text += httpx.get(f"{limited_server.http_url}/metrics").text
    for secret in (ROBOT_KEY, UNNAMED_KEY, *RATE_KEYS.values()):
        assert secret not in metrics_text


def test_bad_key_settings_exit_2_without_showing_the_keys(tmp_path: Path) -> None:
    secret = "k-secret-0c7e1a9f3b5d"
    for value, words in (
        (f"bad name:{secret}", "name before ':'"),
        (f"a:{secret},b:{secret}", "same key"),
        (f"a:{secret},a:{secret}z", "used twice"),
        ("robot:", "empty"),
    ):
        result = subprocess.run(
            [script_path("gr2-policy-server"), "serve", "--grpc-port", "0", "--http-port", "0"],
            env=child_env(GR2_API_KEYS=value),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert words in err and secret not in err + result.stdout


def test_default_settings_bind_to_loopback_and_hide_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GR2_HOST", raising=False)
    monkeypatch.setenv("GR2_API_KEYS", f"robot:{ROBOT_KEY},{UNNAMED_KEY}")
    settings = ServerSettings()
    assert settings.host == "127.0.0.1"
    assert settings.rate_limit_rps == 0  # rate limits are off unless asked for
    assert len(settings.api_keys) == 2
    assert ROBOT_KEY not in repr(settings) and ROBOT_KEY not in str(settings.model_dump())


# ---------------------------------------------------------------------- key/bucket logic


def test_keyring_parses_names_and_verifies() -> None:
    ring = KeyRing.parse([SecretStr(f"robot-1:{ROBOT_KEY}"), f" {UNNAMED_KEY} ", ""])
    assert ring.names == ("robot-1", key_id(UNNAMED_KEY))
    assert re.fullmatch(r"key-[0-9a-f]{8}", key_id(UNNAMED_KEY))
    assert ring.verify(ROBOT_KEY) == "robot-1"
    assert ring.verify(UNNAMED_KEY) == key_id(UNNAMED_KEY)
    assert ring.verify(WRONG_KEY) is None and ring.verify("") is None
    assert ring.authenticate(f"bearer  {ROBOT_KEY} ", "http") == "robot-1"
    refused = [
        (None, "missing"),
        ("", "missing"),
        ("Bearer", "malformed"),
        (f"Token {ROBOT_KEY}", "malformed"),
        (f"Bearer {WRONG_KEY}", "invalid"),
    ]
    for value, reason in refused:
        with pytest.raises(Unauthenticated) as info:
            ring.authenticate(value, "grpc")
        assert info.value.reason == reason
    assert ROBOT_KEY not in repr(ring)


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        (["-bad:k1234567890"], "name before ':'"),
        (["a:k1234567890", "b:k1234567890"], "same key"),
        (["a:k1234567890", "a:k0987654321"], "used twice"),
        (["a:two words"], "whitespace"),
        (["a:"], "empty"),
    ],
)
def test_keyring_refuses_bad_entries(entries: list[str], words: str) -> None:
    with pytest.raises(KeySettingsError) as info:
        KeyRing.parse(entries)
    assert words in str(info.value)
    assert "1234567890" not in str(info.value) and "two words" not in str(info.value)


def test_token_bucket_burst_refill_and_bound() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, max_buckets=2, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token every 0.5 s
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") > 0
    now[0] = 100.0  # refills up to the burst, no further
    assert [limiter.acquire("a") == 0.0 for _ in range(4)] == [True, True, True, False]
    assert limiter.acquire("b") == 0.0 and limiter.acquire("c") == 0.0  # "a" is forgotten
    assert limiter.acquire("a") == 0.0  # ... and starts again full
    assert RateLimiter(0.5).burst == 1 and RateLimiter(7.2).burst == 8
    with pytest.raises(KeySettingsError):
        RateLimiter(0.0)


def test_guard_buckets_by_key_or_client_address() -> None:
    guard = AccessGuard(None, RateLimiter(0.001, 1))
    guard.charge(None, "ipv4:10.0.0.1:5000")
    with pytest.raises(RateLimitedError) as info:
        guard.charge(None, "ipv4:10.0.0.1:6000")  # another connection, same host
    assert info.value.retry_after_header == "1000"
    guard.charge(None, "ipv6:[::1]:5000")  # another host
    guard.charge("robot", "ipv4:10.0.0.1:5000")  # a key has its own bucket
    assert client_address("ipv4:127.0.0.1:443") == "127.0.0.1"
    assert client_address("ipv6:[2001:db8::1]:443") == "2001:db8::1"
    assert client_address("127.0.0.1") == "127.0.0.1"  # an HTTP client host as is


# ------------------------------------------------------------------------------ web page


def test_web_page_asks_for_and_uses_the_key(server: PolicyServer) -> None:
    from tests.support.browser import headless_chrome

    with headless_chrome() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def wait(script: str) -> object:
            return WebDriverWait(driver, 30, poll_frequency=0.1).until(
                lambda d: d.execute_script(script)
            )

        driver.get(f"{server.http_url}/")
        message = wait(
            "const e = document.getElementById('error'); return !e.hidden && e.textContent;"
        )
        assert "needs an API key" in str(message)
        field = driver.find_element(By.ID, "api-key")
        field.send_keys(ROBOT_KEY)
        driver.find_element(By.ID, "api-key-use").click()
        wait("return document.body.dataset.ready === 'true' && !!document.querySelector('.sample')")
        assert driver.execute_script("return document.getElementById('error').hidden")
        assert ROBOT_KEY not in driver.current_url
        stored = driver.execute_script("return sessionStorage.getItem('gr2.apiKey')")
        assert stored == ROBOT_KEY
        # A reload keeps the key for this tab and loads straight away.
        driver.refresh()
        wait("return document.body.dataset.ready === 'true'")
        # A wrong key is reported as such.
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(WRONG_KEY)
        driver.find_element(By.ID, "api-key-use").click()
        message = wait(
            "const e = document.getElementById('error'); return !e.hidden && e.textContent;"
        )
        assert "did not accept this API key" in str(message)
