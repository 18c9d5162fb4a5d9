"""The whole path, camera to arm, with real processes: a redis-server, the policy server and
the WBC agent driving the simulated Gen3 over StreamActions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from tests.support.processes import RedisServer, child_env, free_port, script_path
from tests.support.servers import run_policy_server

pytestmark = pytest.mark.e2e
STEPS = 50


def test_agent_runs_an_episode_against_the_server(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with run_policy_server(
        tmp_path, redis_url=redis_server.url, extra_args=("--torch-threads", "1")
    ) as server:
        summary_path = tmp_path / "summary.json"
        video_path = tmp_path / "episode.mp4"
        metrics_port = free_port()
        agent = subprocess.run(
            [
                script_path("gr2-wbc-agent"), "run", "--server", server.grpc_target,
                "--robot", "sim", "--instruction", "pick up the red block",
                "--steps", str(STEPS), "--robot-id", "e2e-sim", "--settle", "0.5",
                "--summary", str(summary_path), "--video", str(video_path),
                "--metrics-port", str(metrics_port),
            ],
            capture_output=True, text=True, timeout=240, env=child_env(),
        )  # fmt: skip
        assert agent.returncode == 0, f"agent failed:\n{agent.stderr}\nserver:\n{server.log_text()}"
        summary = json.loads(summary_path.read_text())
        episode = summary["episode_id"]

        # Every observation got its chunk.
        assert summary["steps"] == STEPS and summary["error"] is None
        assert summary["chunk_latency"]["round_trip_p50_s"] > 0

        # The episode's state is in Redis, and the server reports it.
        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        stored = r.hgetall(f"gr2:ep:{episode}")
        assert stored["status"] == "ended"
        assert int(stored["steps"]) == STEPS and int(stored["last_seq"]) == STEPS - 1
        assert stored["robot_id"] == "e2e-sim"
        assert r.llen(f"gr2:ep:{episode}:lat") == STEPS
        record = httpx.get(f"{server.http_url}/v1/episodes/{episode}").json()
        assert record["steps"] == STEPS and record["chunk_latency"]["count"] == STEPS

        # The simulated arm moved, and stayed within its joint limits.
        assert summary["joint_motion_rad"] > 0.01
        assert summary["tool_displacement_m"] > 0.005
        from gr2_wbc.kinematics import gen3

        q_min, q_max = np.array(summary["q_min_seen"]), np.array(summary["q_max_seen"])
        assert np.all(q_min >= gen3.JOINT_LOWER - 1e-3)
        assert np.all(q_max <= gen3.JOINT_UPPER + 1e-3)
        from gr2_wbc.controller import VELOCITY_MARGIN

        qd_cmd = np.array(summary["qd_cmd_max_abs"])
        assert np.all(qd_cmd <= gen3.VELOCITY_LIMITS * VELOCITY_MARGIN + 1e-6)
        assert np.all(np.array(summary["qd_max_abs_seen"]) <= gen3.VELOCITY_LIMITS)
        assert summary["loop"]["ticks"] >= STEPS * 0.2 * 200 * 0.8
        assert summary["loop"]["qp_failures"] == 0

        # The video holds both cameras.
        assert video_path.stat().st_size > 1000 and summary["video_frames"] > 10

        # The server counted the stream.
        text = httpx.get(f"{server.http_url}/metrics").text
        assert 'gr2_policy_requests_total{code="OK",method="StreamActions"} 1.0' in text
