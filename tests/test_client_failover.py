"""gr2_client.FailoverClient against a real server and dead addresses, its backoff, and the
keepalive settings clients and server must agree on."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gr2_client import Backoff, FailoverClient, FailoverExhaustedError, parse_targets
from gr2_client.options import KEEPALIVE_TIME_MS, channel_options
from gr2_policy.api.grpc_server import server_options

from tests.support.episodes import episode_record, fixed_observations, for_episode
from tests.support.processes import free_port
from tests.support.servers import PolicyServer, run_policy_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        tmp_path_factory.mktemp("failover-client"), env={"GR2_RANDOM_WEIGHTS": "1"}
    ) as running:
        yield running


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0, multiplier=2.0)
    assert [backoff.ceiling(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.ceiling(10_000) == 1.0  # no overflow on long outages
    rng = random.Random(3)
    delays = [backoff.delay(5, rng) for _ in range(200)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.5  # spread out, not one instant for every robot
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0)


def test_parse_targets() -> None:
    assert parse_targets("a:1, b:2,,") == ["a:1", "b:2"]
    assert parse_targets(["a:1"]) == ["a:1"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_targets(" , ")


def test_keepalive_pings_are_slower_than_the_server_allows() -> None:
    """A client pinging more often than the server's minimum interval gets GOAWAY
    (too_many_pings) and loses its streams."""
    client = dict(channel_options())
    server = dict(server_options(32 << 20))
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= KEEPALIVE_TIME_MS
    # Clients ping only during calls; the server would accept pings without calls too.
    assert client["grpc.keepalive_permit_without_calls"] == 0
    assert server["grpc.keepalive_permit_without_calls"] == 1


async def test_fails_over_from_a_dead_address_and_keeps_the_episode(server: PolicyServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    observations = fixed_observations(server, 3)
    failures: list[str] = []
    async with FailoverClient(
        [dead, server.grpc_target],
        connect_timeout_s=0.5,
        on_failover=lambda err, target: failures.append(target),
    ) as client:
        episode = await client.start_episode("pick up the red block", robot_id="fo")
        assert failures == [server.grpc_target] and client.failovers == 1
        for obs in observations:
            chunk = await client.step(for_episode(obs, episode))
            assert (chunk.episode_id, chunk.seq) == (episode, obs.seq)
        await client.end_episode(episode)
    record = episode_record(server, episode)
    assert (record["steps"], record["status"]) == (3, "ended")


async def test_errors_retrying_cannot_fix_are_raised_at_once(server: PolicyServer) -> None:
    async with FailoverClient([server.grpc_target]) as client:
        episode = await client.start_episode("pick up the red block")
        bad = for_episode(fixed_observations(server, 1)[0], episode)
        bad.state.ee_position[0] = float("nan")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.step(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.failovers == 0


async def test_gives_up_when_no_server_answers(tmp_path: Path) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with FailoverClient(
        dead, give_up_after_s=1.0, connect_timeout_s=0.2, backoff=Backoff(0.05, 0.2)
    ) as client:
        with pytest.raises(FailoverExhaustedError, match="no server of") as err:
            await client.start_episode("pick up the red block")
    assert client.failovers >= 1 and err.value.__cause__ is not None
