"""Redis restarts mid-episode (real redis-server with an fsynced append-only file, SIGKILLed
and started again on the same port): live episodes keep being served from the replica's
cache, new episodes are refused with UNAVAILABLE while Redis is away, and once it is back the
episode's state in Redis is brought up to date, so that another replica can take the episode
over exactly."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import redis
from gr2_client import PolicyClient

from tests.support.episodes import (
    assert_same_chunks,
    episode_record,
    fixed_observations,
    metric,
    start_episode,
    stream_steps,
)
from tests.support.processes import run_redis_server
from tests.support.servers import run_replicas


async def test_episode_survives_a_redis_restart(tmp_path: Path) -> None:
    with ExitStack() as stack:
        store = stack.enter_context(run_redis_server(tmp_path / "redis", persistent=True))
        port = store.port
        a, b = stack.enter_context(run_replicas(tmp_path, store.url))
        observations = fixed_observations(a, 16)
        reference = await stream_steps(a.grpc_target, start_episode(a), observations)

        episode = start_episode(a)
        chunks = await stream_steps(a.grpc_target, episode, observations[:5])

        store.proc.send_signal(signal.SIGKILL)
        store.proc.wait(timeout=10)
        # Steps go on from the replica's cache while Redis is away (fail open) ...
        chunks += await stream_steps(a.grpc_target, episode, observations[5:10])
        assert metric(a, "gr2_policy_store_errors_total") >= 5
        # ... but no new episode: one that was never recorded could not be recovered.
        with PolicyClient(a.grpc_target) as client, pytest.raises(grpc.RpcError) as refused:
            client.start_episode("pick up the blue block")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        stack.enter_context(run_redis_server(tmp_path / "redis", port=port, persistent=True))
        raw = redis.Redis(port=port)
        assert int(raw.hget(f"gr2:ep:{episode}", "last_seq")) == 4  # what was fsynced
        chunks += await stream_steps(a.grpc_target, episode, observations[10:12])
        record = episode_record(a, episode)
        assert (record["last_seq"], record["steps"], record["status"]) == (11, 12, "active")
        assert "store_resynced" in a.log_text()
        assert raw.llen(f"gr2:ep:{episode}:in") > 1  # the replica's window, not just one step

        # Another replica takes the episode over from the resynced records, exactly.
        chunks += await stream_steps(b.grpc_target, episode, observations[12:16])
        assert_same_chunks(chunks, reference)
        record = episode_record(b, episode)
        assert (record["last_seq"], record["steps"]) == (15, 16)
