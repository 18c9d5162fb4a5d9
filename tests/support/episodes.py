"""Drive episodes over real gRPC for reliability tests: fixed observations, chunk comparison,
metric scraping."""

from __future__ import annotations

import re

import httpx
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2_client import AsyncPolicyClient, PolicyClient, chunk_from_proto

from tests.support.observations import random_observation
from tests.support.servers import PolicyServer


def fixed_observations(server: PolicyServer, n: int, seed: int = 7) -> list[pb.Observation]:
    """``n`` seeded observations (seq 0..n-1, no episode id yet) of the server's views."""
    with PolicyClient(server.grpc_target) as client:
        info = client.server_info()
    rng = np.random.default_rng(seed)
    return [random_observation(rng, info, "", seq) for seq in range(n)]


def for_episode(observation: pb.Observation, episode_id: str) -> pb.Observation:
    out = pb.Observation()
    out.CopyFrom(observation)
    out.episode_id = episode_id
    return out


async def stream_steps(
    target: str, episode_id: str, observations: list[pb.Observation]
) -> list[pb.TrajectoryChunk]:
    """The chunks of ``observations`` sent on one StreamActions stream to ``target``."""
    async with AsyncPolicyClient(target) as client:
        stream = client.open_stream()
        chunks = [await stream.step(for_episode(obs, episode_id)) for obs in observations]
        await stream.close()
    return chunks


def start_episode(server: PolicyServer, instruction: str = "pick up the red block") -> str:
    with PolicyClient(server.grpc_target) as client:
        return client.start_episode(instruction, robot_id="reliability-test")


def waypoints(chunk: pb.TrajectoryChunk) -> np.ndarray:
    """(k, 8): position, quaternion (sign-aligned to w >= 0) and gripper of each waypoint."""
    c = chunk_from_proto(chunk)
    quats = c.quats_wxyz * np.where(c.quats_wxyz[:, :1] < 0, -1.0, 1.0)
    return np.concatenate([c.positions, quats, c.grippers[:, None]], axis=1)


def assert_same_chunks(
    got: list[pb.TrajectoryChunk], reference: list[pb.TrajectoryChunk], atol: float = 1e-4
) -> None:
    assert len(got) == len(reference)
    for seq, (a, b) in enumerate(zip(got, reference, strict=True)):
        assert a.seq == b.seq == seq
        np.testing.assert_allclose(waypoints(a), waypoints(b), atol=atol, err_msg=f"seq {seq}")


def metric(server: PolicyServer, name: str) -> float:
    """The value of an unlabelled sample (or the sum over a labelled family) on /metrics."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


def episode_record(server: PolicyServer, episode_id: str) -> dict:
    reply = httpx.get(f"{server.http_url}/v1/episodes/{episode_id}", timeout=5)
    reply.raise_for_status()
    return reply.json()
