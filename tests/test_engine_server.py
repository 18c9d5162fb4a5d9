"""The batching engine behind a real server process: eviction with rebuild from a real Redis
store over gRPC, the ONNX Runtime runner, and the engine knobs' errors."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gr2_client import PolicyClient
from gr2_policy.engine.kv_pool import bytes_per_episode
from gr2_policy.model import GR2Config

from tests.support.observations import random_observation
from tests.support.processes import RedisServer, child_env, script_path
from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e
CONFIG = GR2Config.from_preset("gr2-tiny")
TOL = 1e-4


def interleaved_episodes(target: str, n_episodes: int, n_steps: int) -> np.ndarray:
    """Run episodes step by step in turn (each step of one follows a step of the others);
    returns waypoints (n_episodes, n_steps, k, 8)."""
    rng = np.random.default_rng(0)
    out = np.zeros((n_episodes, n_steps, CONFIG.action_horizon, 8))
    with PolicyClient(target) as client:
        info = client.server_info()
        episodes = [client.start_episode(f"touch block {i}") for i in range(n_episodes)]
        for seq in range(n_steps):
            for index, episode in enumerate(episodes):
                chunk = client.act(random_observation(rng, info, episode, seq))
                out[index, seq] = [[*w.position, *w.quat_wxyz, w.gripper] for w in chunk.waypoints]
    return out


def scrape(server: PolicyServer) -> str:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_episodes_evicted_every_step_are_rebuilt_from_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A pool of one slot and two episodes in turn: every step evicts the other episode,
    whose next step rebuilds its cache from the step records in Redis. The chunks equal
    those of a server whose pool holds both."""
    n_steps = CONFIG.receptive_field + 3
    one_slot = str(2 * bytes_per_episode(CONFIG))
    with run_policy_server(
        tmp_path / "small", redis_url=redis_server.url, env={"GR2_KV_POOL_BYTES": one_slot}
    ) as server:
        evicting = interleaved_episodes(server.grpc_target, 2, n_steps)
        metrics = scrape(server)
        assert sample(metrics, "gr2_policy_episode_evictions_total") >= 2 * n_steps - 1
        assert sample(metrics, "gr2_policy_kv_cache_usage_ratio") == 1.0
        assert '"pool_slots": 1' in server.log_text()
    with run_policy_server(tmp_path / "large") as server:
        resident = interleaved_episodes(server.grpc_target, 2, n_steps)
        assert sample(scrape(server), "gr2_policy_episode_evictions_total") == 0
    assert float(np.abs(evicting - resident).max()) < TOL


def test_the_onnx_runtime_runner_serves_the_same_chunks(tmp_path: Path) -> None:
    n_steps = CONFIG.receptive_field + 2
    results = {}
    for runner in ("eager", "onnx"):
        env = {"GR2_RUNNER": runner, "GR2_ENGINE_CACHE_DIR": str(tmp_path / "engines")}
        with run_policy_server(tmp_path / runner, env=env) as server:
            results[runner] = interleaved_episodes(server.grpc_target, 3, n_steps)
            assert f'"runner": "{runner}"' in server.log_text()
    assert float(np.abs(results["onnx"] - results["eager"]).max()) < TOL
    assert list((tmp_path / "engines").glob("*.onnx")), "the export is cached on disk"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GR2_RUNNER": "tensorflow"}, "runner"),
        ({"GR2_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"GR2_KV_CACHE_DTYPE": "int4"}, "kv_cache_dtype"),
        ({"GR2_PRECISION": "fp64"}, "precision"),
    ],
)
def test_bad_engine_settings_exit_2_with_a_message(env: dict[str, str], message: str) -> None:
    proc = subprocess.run(
        [script_path("gr2-policy-server"), "serve", "--random-weights"],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_budget_too_small_for_one_episode_fails_at_start_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [script_path("gr2-policy-server"), "serve", "--random-weights", "--grpc-port", "0"],
        env=child_env(GR2_KV_POOL_BYTES="1000", GR2_HTTP_PORT="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "GR2_KV_POOL_BYTES" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
