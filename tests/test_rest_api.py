"""The policy server's HTTP side against a real server process backed by a real
redis-server: health, readiness, info, episodes, metrics, and problem-details errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from gr2.v1 import policy_pb2 as pb
from gr2_client import PolicyClient, make_observation

from tests.support.processes import RedisServer
from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e

SERVER_METRICS = [
    "gr2_policy_step_latency_seconds",
    "gr2_policy_queue_time_seconds",
    "gr2_policy_first_chunk_latency_seconds",
    "gr2_policy_batch_size",
    "gr2_policy_active_episodes",
    "gr2_policy_kv_cache_usage_ratio",
    "gr2_policy_episode_evictions_total",
    "gr2_policy_video_tokens_total",
    "gr2_policy_requests_total",
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("rest")), redis_url=redis_server.url
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: PolicyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=10) as c:
        yield c


def run_episode(server: PolicyServer, steps: int, outcome: int) -> str:
    with PolicyClient(server.grpc_target) as client:
        info = client.server_info()
        episode = client.start_episode("stack the green block", robot_id="gen3-lab-1")
        for seq in range(steps):
            images = {n: np.full((h, w, 3), 40 * seq % 255, np.uint8) for n, w, h in info.views}
            client.act(
                make_observation(
                    episode,
                    seq,
                    images,
                    [0.4, 0.0, 0.3],
                    [0, 1, 0, 0],
                    0.0,
                    capture_time_s=seq * 0.2,
                )
            )
        client.end_episode(episode, outcome, note="placed it")
    return episode


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "draining": False, "store": True}


def test_info_matches_grpc(http: httpx.Client, server: PolicyServer) -> None:
    body = http.get("/v1/info").json()
    with PolicyClient(server.grpc_target) as client:
        info = client.server_info()
    assert body["model_version"] == info.model_version
    assert [(v["name"], v["width"], v["height"]) for v in body["views"]] == list(info.views)
    assert body["action_horizon"] == info.action_horizon


def test_episode_state_and_metrics_are_kept_in_redis(
    http: httpx.Client, server: PolicyServer, redis_server: RedisServer
) -> None:
    episode = run_episode(server, steps=5, outcome=pb.EPISODE_OUTCOME_SUCCESS)
    record = http.get(f"/v1/episodes/{episode}").json()
    assert record["episode_id"] == episode
    assert record["status"] == "ended" and record["outcome"] == "success"
    assert record["note"] == "placed it" and record["robot_id"] == "gen3-lab-1"
    assert record["steps"] == 5 and record["last_seq"] == 4
    latency = record["chunk_latency"]
    assert latency["count"] == 5
    assert 0 < latency["p50_s"] <= latency["p90_s"] <= latency["p99_s"] <= latency["max_s"]
    # It really lives in the redis-server, not in the process.
    r = redis.Redis.from_url(redis_server.url)
    assert any(episode in key.decode() for key in r.scan_iter(match="*"))
    listed = http.get("/v1/episodes", params={"limit": 50}).json()["episodes"]
    assert episode in [e["episode_id"] for e in listed]
    ended = http.get("/v1/episodes", params={"status": "ended"}).json()["episodes"]
    assert all(e["status"] == "ended" for e in ended)


def test_unknown_episode_is_404_problem(http: httpx.Client) -> None:
    response = http.get("/v1/episodes/does-not-exist")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 404 and body["title"] == "Not Found"
    assert body["type"] == "urn:gr2:problem:episode-not-found"
    assert body["code"] == "EpisodeNotFoundError"
    assert "does-not-exist" in body["detail"]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": "many"}, {"status": "sleeping"}])
def test_bad_query_is_422_problem(http: httpx.Client, params: dict) -> None:
    response = http.get("/v1/episodes", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 422 and body["title"] and body["type"]
    assert next(iter(params)) in body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/nope", 404), ("POST", "/healthz", 405)]
)
def test_http_errors_are_problems(http: httpx.Client, method: str, path: str, status: int) -> None:
    response = http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status


def test_metrics_exposes_every_server_metric(http: httpx.Client, server: PolicyServer) -> None:
    run_episode(server, steps=2, outcome=pb.EPISODE_OUTCOME_FAILURE)
    text = http.get("/metrics").text
    for name in SERVER_METRICS:
        assert f"# TYPE {name}" in text, f"{name} missing from /metrics"
    assert 'gr2_policy_requests_total{code="OK",method="Act"}' in text
    assert "gr2_policy_step_latency_seconds_count" in text
