"""Failover between replicas that share one redis-server (real processes on loopback).

- A retried seq is answered from the store on another replica (not run twice), a replica
  whose copy of an episode went stale catches up from the store, and the chunks equal those
  of the same observations served by one replica throughout.
- The acceptance test of issue 7: the WBC agent streams an episode to replica A, A is killed
  with SIGKILL mid-episode (or drained with SIGTERM), the agent continues on B, and the
  episode finishes with the same id, every seq recorded exactly once, and the arm within its
  limits through the gap.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from tests.support.episodes import (
    assert_same_chunks,
    episode_record,
    fixed_observations,
    metric,
    start_episode,
    stream_steps,
)
from tests.support.processes import RedisServer, child_env, script_path
from tests.support.servers import PolicyServer, run_replicas

AGENT_STEPS = 30


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[PolicyServer]]:
    """Two replicas (same seeded weights) sharing the session's redis-server."""
    with run_replicas(tmp_path, redis_server.url) as servers:
        yield servers


async def test_retried_seq_and_stale_replica(replicas: list[PolicyServer]) -> None:
    a, b = replicas
    observations = fixed_observations(a, 10)
    reference = await stream_steps(a.grpc_target, start_episode(a), observations)

    episode = start_episode(a)
    chunks = await stream_steps(a.grpc_target, episode, observations[:5])
    # The robot lost A's reply to seq 4 and retries it on B: B answers from the store.
    (again,) = await stream_steps(b.grpc_target, episode, observations[4:5])
    assert again == chunks[4]  # the stored chunk, field for field (timings included)
    assert metric(b, "gr2_policy_replayed_steps_total") == 1
    assert episode_record(b, episode)["steps"] == 5  # not run or recorded twice

    chunks += await stream_steps(b.grpc_target, episode, observations[5:7])
    # Back to A, whose copy of the episode stopped at seq 4: it catches up from the store.
    chunks += await stream_steps(a.grpc_target, episode, observations[7:10])
    assert_same_chunks(chunks, reference)
    assert metric(b, "gr2_policy_episode_adoptions_total") == 1
    assert metric(a, "gr2_policy_episode_adoptions_total") == 1
    record = episode_record(a, episode)
    assert (record["steps"], record["last_seq"], record["status"]) == (10, 9, "active")


def _wait_for_steps(server: PolicyServer, at_least: int, agent: subprocess.Popen) -> str:
    """The id of the active episode once it has recorded ``at_least`` steps."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert agent.poll() is None, "the agent exited before the replica was killed"
        reply = httpx.get(f"{server.http_url}/v1/episodes?status=active", timeout=5).json()
        for record in reply["episodes"]:
            if record["robot_id"] == "failover-arm" and record["steps"] >= at_least:
                return str(record["episode_id"])
        time.sleep(0.05)
    raise TimeoutError(f"no episode reached {at_least} steps")


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "drain"])
def test_agent_continues_on_another_replica(
    tmp_path: Path,
    replicas: list[PolicyServer],
    redis_server: RedisServer,
    stop_signal: signal.Signals,
) -> None:
    """SIGKILL: a crash. SIGTERM: a rolling update (A drains and tells the stream to move)."""
    a, b = replicas
    summary_path = tmp_path / "summary.json"
    agent_log = tmp_path / "agent.log"
    with agent_log.open("wb") as log:
        agent = subprocess.Popen(
            [
                script_path("gr2-wbc-agent"), "run",
                "--server", f"{a.grpc_target},{b.grpc_target}",
                "--robot", "sim", "--instruction", "pick up the red block",
                "--steps", str(AGENT_STEPS), "--robot-id", "failover-arm", "--settle", "0.5",
                "--summary", str(summary_path), "--metrics-port", "0",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        )  # fmt: skip
    try:
        episode = _wait_for_steps(b, AGENT_STEPS // 3, agent)  # B reads the shared store
        a.proc.send_signal(stop_signal)
        a.proc.wait(timeout=30)
        assert agent.wait(timeout=240) == 0, agent_log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
    summary = json.loads(summary_path.read_text())
    assert summary["error"] is None, summary["error"]
    assert summary["episode_id"] == episode
    assert summary["steps"] == AGENT_STEPS
    assert summary["failovers"] >= 1 and summary["servers_used"][-1] == b.grpc_target

    # The store saw every seq once: the compare-and-set admits only last_seq + 1, so
    # steps == last_seq + 1 == AGENT_STEPS means none was lost, skipped or run twice.
    stored = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall(
        f"gr2:ep:{episode}"
    )
    assert stored["status"] == "ended"
    assert (int(stored["steps"]), int(stored["last_seq"])) == (AGENT_STEPS, AGENT_STEPS - 1)
    assert "episode_adopted" in b.log_text() and episode in b.log_text()

    # The arm stayed within its limits, through the gap too.
    from gr2_wbc.controller import VELOCITY_MARGIN
    from gr2_wbc.kinematics import gen3

    assert np.all(np.array(summary["q_min_seen"]) >= gen3.JOINT_LOWER - 1e-3)
    assert np.all(np.array(summary["q_max_seen"]) <= gen3.JOINT_UPPER + 1e-3)
    qd_cmd = np.array(summary["qd_cmd_max_abs"])
    assert np.all(qd_cmd <= gen3.VELOCITY_LIMITS * VELOCITY_MARGIN + 1e-6)
    assert np.all(np.array(summary["qd_max_abs_seen"]) <= gen3.VELOCITY_LIMITS)
    assert summary["loop"]["qp_failures"] == 0
    assert not summary["safety"]["estop_latched"]
