"""Shared fixtures: real redis-server instances (no mocks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, run_redis_server

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests use distinct keys or flush it."""
    with run_redis_server(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server
