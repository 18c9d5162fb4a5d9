"""The test harness's own servers when the free port they were given is taken before they bind
it (another test's server, on a busy CI machine): they start again on new ports instead of
failing, or worse, handing the test a connection to the process that took the port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import processes


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (and never answers like redis)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        yield squatter.getsockname()[1]


def test_redis_starts_again_on_a_new_port_when_its_port_is_taken(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed_out: list[int] = []
    real_free_port = processes.free_port

    def first_one_taken() -> int:
        handed_out.append(taken_port if not handed_out else real_free_port())
        return handed_out[-1]

    monkeypatch.setattr(processes, "free_port", first_one_taken)
    with processes.run_redis_server(tmp_path) as server:
        assert handed_out[0] == taken_port and server.port == handed_out[-1] != taken_port
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.info("server")["process_id"] == server.proc.pid
        client.close()
    log = (tmp_path / f"redis-{taken_port}.log").read_text()
    assert "Address already in use" in log


def test_a_port_given_by_the_caller_is_not_replaced(taken_port: int, tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="exited"),
        processes.run_redis_server(tmp_path, port=taken_port),
    ):
        pass
