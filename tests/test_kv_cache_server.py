"""Over gRPC, a server with GR2_KV_CACHE=off returns the same chunks as one with the cache
on (to 1e-4), over an episode longer than the receptive field R."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gr2_client import PolicyClient
from gr2_policy.model import GR2Config

from tests.support.observations import random_observation
from tests.support.servers import run_policy_server

pytestmark = pytest.mark.e2e


def episode_waypoints(target: str, n_steps: int) -> tuple[str, np.ndarray]:
    """Stream one seeded episode; returns the model version and (n_steps, k, 8) waypoints."""
    rng = np.random.default_rng(0)
    with PolicyClient(target) as client:
        info = client.server_info()
        episode = client.start_episode("stack the green block on the red one")
        observations = [random_observation(rng, info, episode, seq) for seq in range(n_steps)]
        chunks = list(client.stream_actions(iter(observations)))
    waypoints = np.array(
        [[[*w.position, *w.quat_wxyz, w.gripper] for w in c.waypoints] for c in chunks]
    )
    return info.model_version, waypoints


def test_cache_off_server_returns_the_same_chunks(tmp_path: Path) -> None:
    n_steps = GR2Config.from_preset("gr2-tiny").receptive_field + 3
    results = {}
    for mode in ("on", "off"):
        with run_policy_server(tmp_path / mode, env={"GR2_KV_CACHE": mode}) as server:
            results[mode] = episode_waypoints(server.grpc_target, n_steps)
            assert f'"kv_cache": {"true" if mode == "on" else "false"}' in server.log_text()
    (version_on, on), (version_off, off) = results["on"], results["off"]
    assert version_on == version_off
    assert on.shape == (n_steps, 10, 8)
    diff = float(np.abs(on - off).max())
    print(f"max |cache on - cache off| over {n_steps} steps: {diff:.2e}")
    assert diff < 1e-4
    # Not vacuous: the chunks change from step to step.
    assert float(np.abs(on[1:] - on[:-1]).max()) > 1e-3
