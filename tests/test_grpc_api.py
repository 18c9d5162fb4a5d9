"""The policy server's gRPC API against a real server process on loopback: the happy path,
seq semantics, and every bad input of the acceptance criteria (each with the status code of
DESIGN.md section 5), checking after each that the server keeps serving other episodes."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from gr2.v1 import policy_pb2 as pb
from gr2_client import PolicyClient, encode_image, make_observation
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e
HOME_POS = np.array([0.45, 0.0, 0.35])
DOWN_QUAT = np.array([0.0, 1.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(Path(tmp_path_factory.mktemp("grpc_api"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: PolicyServer) -> Iterator[PolicyClient]:
    with PolicyClient(server.grpc_target, max_message_bytes=64 * 1024 * 1024) as c:
        yield c


def camera_images(client: PolicyClient, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for name, w, h in client.server_info().views
    }


def observation(client: PolicyClient, episode_id: str, seq: int, seed: int = 0) -> pb.Observation:
    return make_observation(
        episode_id,
        seq,
        camera_images(client, seed),
        HOME_POS,
        DOWN_QUAT,
        0.0,
        capture_time_s=float(seq) * 0.2,
    )


def expect_status(call, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    details = info.value.details() or ""
    assert "Traceback" not in details and 'File "' not in details
    return details


class LiveEpisode:
    """An episode streaming in the background of the bad-input tests: it must keep working."""

    def __init__(self, client: PolicyClient) -> None:
        self.client = client
        self.episode_id = client.start_episode("keep going", robot_id="witness")
        self.seq = 0

    def step(self) -> pb.TrajectoryChunk:
        chunk = self.client.act(observation(self.client, self.episode_id, self.seq))
        assert chunk.seq == self.seq
        self.seq += 1
        return chunk


@pytest.fixture(scope="module")
def witness(client: PolicyClient) -> LiveEpisode:
    return LiveEpisode(client)


def test_server_info(client: PolicyClient) -> None:
    info = client.server_info()
    assert info.protocol_version == "1.0"
    assert [v[0] for v in info.views] == ["head", "wrist"]
    assert all(w > 0 and h > 0 for _, w, h in info.views)
    assert info.action_horizon > 0 and info.waypoint_dt_s > 0 and info.history > 0
    assert info.max_message_bytes >= 4 * 1024 * 1024


def test_health_and_reflection(server: PolicyServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "gr2.v1.PolicyService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "gr2.v1.PolicyService" in names


def test_act_returns_k_waypoints(client: PolicyClient) -> None:
    info = client.server_info()
    episode = client.start_episode("pick up the red block")
    chunk = client.act(observation(client, episode, 0))
    assert chunk.episode_id == episode and chunk.seq == 0
    assert len(chunk.waypoints) == info.action_horizon
    offsets = [w.time_offset_s for w in chunk.waypoints]
    assert np.allclose(np.diff(offsets), info.waypoint_dt_s) and offsets[0] > 0
    for w in chunk.waypoints:
        assert len(w.position) == 3 and len(w.quat_wxyz) == 4
        assert all(math.isfinite(v) for v in w.position)
        assert abs(np.linalg.norm(w.quat_wxyz) - 1.0) < 1e-6
        assert 0.0 <= w.gripper <= 1.0
    assert chunk.compute_time_s > 0 and chunk.server_time_s > 0
    assert chunk.model_version == info.model_version


def test_stream_actions_answers_each_observation_in_order(client: PolicyClient) -> None:
    episode = client.start_episode("touch the blue block")
    chunks = list(client.stream_actions(observation(client, episode, s) for s in range(6)))
    assert [c.seq for c in chunks] == list(range(6))
    reply = client.end_episode(episode, pb.EPISODE_OUTCOME_SUCCESS)
    assert reply.steps == 6


def test_the_model_sees_the_images(client: PolicyClient) -> None:
    a = client.start_episode("same instruction")
    b = client.start_episode("same instruction")
    ca = client.act(observation(client, a, 0, seed=1))
    cb = client.act(observation(client, b, 0, seed=2))
    pa = np.array([w.position for w in ca.waypoints])
    pb_ = np.array([w.position for w in cb.waypoints])
    assert not np.allclose(pa, pb_), "different images gave identical chunks"


def test_png_images_are_accepted(client: PolicyClient) -> None:
    episode = client.start_episode("png please")
    obs = observation(client, episode, 0)
    raw = {img.view: img for img in obs.images}
    del obs.images[:]
    for view, img in raw.items():
        rgb = np.frombuffer(img.data, np.uint8).reshape(img.height, img.width, 3)
        obs.images.append(encode_image(view, rgb, "png"))
    assert len(client.act(obs).waypoints) > 0


def test_duplicate_seq_returns_the_same_chunk_without_running_twice(
    client: PolicyClient, server: PolicyServer
) -> None:
    episode = client.start_episode("retry me")
    first = client.act(observation(client, episode, 0))
    again = client.act(observation(client, episode, 0))
    assert again == first
    record = httpx.get(f"{server.http_url}/v1/episodes/{episode}").json()
    assert record["steps"] == 1 and record["last_seq"] == 0


def test_seq_gap_is_aborted(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("gap")
    client.act(observation(client, episode, 0))
    expect_status(lambda: client.act(observation(client, episode, 2)), grpc.StatusCode.ABORTED)
    witness.step()


def test_wrong_image_size(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("bad size")
    obs = observation(client, episode, 0)
    img = obs.images[0]
    img.width, img.height = img.width * 2, img.height * 2
    img.data = bytes(img.width * img.height * 3)
    details = expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    assert "expects" in details
    witness.step()
    # Nothing was recorded: the episode can still start at seq 0.
    assert client.act(observation(client, episode, 0)).seq == 0


def test_raw_data_length_mismatch(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("short data")
    obs = observation(client, episode, 0)
    obs.images[1].data = obs.images[1].data[:-7]
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    witness.step()


def test_unknown_encoding(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("bad encoding")
    for encoding in (pb.IMAGE_ENCODING_UNSPECIFIED, 77):
        obs = observation(client, episode, 0)
        obs.images[0].encoding = encoding
        details = expect_status(lambda o=obs: client.act(o), grpc.StatusCode.INVALID_ARGUMENT)
        assert "encoding" in details
    witness.step()


def test_png_that_is_not_png(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("garbage png")
    obs = observation(client, episode, 0)
    obs.images[0].encoding = pb.IMAGE_ENCODING_PNG
    obs.images[0].data = b"\x89PNG not really"
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buf, format="JPEG")
    obs.images[0].data = buf.getvalue()
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    witness.step()


@pytest.mark.parametrize(
    "field, value",
    [
        ("ee_position", [float("nan"), 0.0, 0.3]),
        ("ee_position", [0.0, float("inf"), 0.3]),
        ("ee_quat_wxyz", [float("nan"), 1.0, 0.0, 0.0]),
        ("ee_position", [0.1, 0.2]),
        ("ee_quat_wxyz", [0.0, 0.0, 0.0, 0.0]),
        ("joint_positions", [0.0] * 6 + [float("nan")]),
        ("joint_positions", [0.0] * 3),
    ],
)
def test_bad_state(client: PolicyClient, witness: LiveEpisode, field: str, value: list) -> None:
    episode = client.start_episode("bad state")
    obs = observation(client, episode, 0)
    getattr(obs.state, field)[:] = value
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    witness.step()


def test_nan_gripper_and_missing_view(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("more bad input")
    obs = observation(client, episode, 0)
    obs.state.gripper = float("nan")
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    obs = observation(client, episode, 0)
    del obs.images[1]
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    obs = observation(client, episode, 0)
    obs.images[1].view = "left"
    expect_status(lambda: client.act(obs), grpc.StatusCode.INVALID_ARGUMENT)
    witness.step()


def test_unknown_episode(client: PolicyClient, witness: LiveEpisode) -> None:
    obs = observation(client, "0123456789abcdef", 0)
    expect_status(lambda: client.act(obs), grpc.StatusCode.NOT_FOUND)
    expect_status(lambda: client.end_episode("nope"), grpc.StatusCode.NOT_FOUND)
    stream = client.stream_actions(iter([obs]))
    expect_status(lambda: list(stream), grpc.StatusCode.NOT_FOUND)
    witness.step()


def test_step_after_end_is_failed_precondition(client: PolicyClient, witness: LiveEpisode) -> None:
    episode = client.start_episode("short episode")
    client.act(observation(client, episode, 0))
    client.end_episode(episode, pb.EPISODE_OUTCOME_FAILURE, note="dropped the block")
    expect_status(
        lambda: client.act(observation(client, episode, 1)), grpc.StatusCode.FAILED_PRECONDITION
    )
    expect_status(lambda: client.end_episode(episode), grpc.StatusCode.FAILED_PRECONDITION)
    witness.step()


def test_oversize_message(client: PolicyClient, server: PolicyServer, witness: LiveEpisode) -> None:
    limit = client.server_info().max_message_bytes
    episode = client.start_episode("huge")
    obs = observation(client, episode, 0)
    obs.images[0].data = bytes(limit + 1024)
    expect_status(lambda: client.act(obs), grpc.StatusCode.RESOURCE_EXHAUSTED)
    witness.step()
    assert server.proc.poll() is None


def test_bad_start_episode(client: PolicyClient, witness: LiveEpisode) -> None:
    expect_status(lambda: client.start_episode("   "), grpc.StatusCode.INVALID_ARGUMENT)
    expect_status(lambda: client.start_episode("x" * 600), grpc.StatusCode.INVALID_ARGUMENT)
    witness.step()


def test_idempotent_start(client: PolicyClient) -> None:
    a = client.start_episode("same", idempotency_key="robot-7-attempt-1")
    b = client.start_episode("same", idempotency_key="robot-7-attempt-1")
    c = client.start_episode("same", idempotency_key="robot-7-attempt-2")
    assert a == b != c


def test_a_stream_survives_bad_input_on_other_streams(client: PolicyClient) -> None:
    """Two concurrent streams: one gets a NaN state and fails, the other continues."""
    good = client.start_episode("good stream")
    bad = client.start_episode("bad stream")
    bad_obs = observation(client, bad, 0)
    bad_obs.state.ee_position[0] = float("nan")
    bad_stream = client.stream_actions(iter([observation(client, bad, 0), bad_obs]))
    good_chunks = client.stream_actions(observation(client, good, s) for s in range(4))
    expect_status(lambda: list(bad_stream), grpc.StatusCode.INVALID_ARGUMENT)
    assert [c.seq for c in good_chunks] == [0, 1, 2, 3]
