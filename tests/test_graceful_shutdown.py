"""SIGTERM drains the policy server (a real process): health goes NOT_SERVING, new episodes
are refused with UNAVAILABLE, a live action stream is told to move (UNAVAILABLE, while its
robot is between observations), and the process exits 0 within the grace period."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from gr2_client import AsyncPolicyClient, PolicyClient
from grpc_health.v1 import health_pb2

from tests.support.episodes import fixed_observations, for_episode, start_episode
from tests.support.servers import health_status, run_policy_server

GRACE_S = 20.0
DRAIN_MIN_S = 6.0  # NOT_SERVING and UNAVAILABLE stay observable this long after SIGTERM


async def test_sigterm_drains_and_tells_streams_to_move(tmp_path: Path) -> None:
    env = {
        "GR2_RANDOM_WEIGHTS": "1",
        "GR2_SHUTDOWN_GRACE_S": str(GRACE_S),
        "GR2_DRAIN_MIN_S": str(DRAIN_MIN_S),
    }
    with run_policy_server(tmp_path, env=env) as server:
        target = server.grpc_target
        observations = fixed_observations(server, 3)
        episode = start_episode(server)
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        async with AsyncPolicyClient(target) as client:
            stream = client.open_stream()
            for obs in observations[:2]:
                await stream.step(for_episode(obs, episode))

            server.proc.send_signal(signal.SIGTERM)
            # The robot is between observations: the server ends its stream, telling it
            # to continue elsewhere.
            with pytest.raises(grpc.aio.AioRpcError) as moved:
                await stream.recv()
            assert moved.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in moved.value.details()
            assert "another replica" in moved.value.details()

        assert health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with PolicyClient(target) as sync_client:
            with pytest.raises(grpc.RpcError) as refused:
                sync_client.start_episode("pick up the red block")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as refused:  # nor a step of a live episode
                sync_client.act(for_episode(observations[2], episode))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in server.log_text()

        try:
            code = server.proc.wait(timeout=GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within the grace period:\n{server.log_text()}")
        assert code == 0, server.log_text()
        assert "Traceback" not in server.log_text()
