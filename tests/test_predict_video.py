"""PredictVideo over gRPC against a real server: frames stream in order, equal the model's
own greedy generation, and bad requests get INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from gr2_client import PolicyClient, chunk_from_proto, encode_image, make_observation
from gr2_policy.model import GREEDY, init_random_policy, model_hash

from tests.support.servers import PolicyServer, run_policy_server
from tests.test_grpc_api import DOWN_QUAT, HOME_POS, camera_images, expect_status

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("video")), extra_args=("--random-weights",)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: PolicyServer) -> Iterator[PolicyClient]:
    with PolicyClient(server.grpc_target) as c:
        yield c


def state() -> pb.RobotState:
    return pb.RobotState(ee_position=HOME_POS, ee_quat_wxyz=DOWN_QUAT, gripper=0.0)


def test_frames_stream_in_order_and_equal_the_models_greedy_generation(
    client: PolicyClient,
) -> None:
    images = camera_images(client, seed=5)
    frames = list(client.predict_video("touch the red block", images, num_frames=3, state=state()))
    assert [f.frame_index for f in frames] == [0, 1, 2]
    views = [name for name, _, _ in client.server_info().views]
    for frame in frames:
        assert list(frame.images) == views
        assert all(
            img.shape == images[v].shape and img.dtype == np.uint8
            for v, img in frame.images.items()
        )

    model = init_random_policy("gr2-tiny", seed=0).eval()
    assert model_hash(model) == client.server_info().model_version
    with torch.inference_mode():
        pixels = torch.from_numpy(np.stack([images[v] for v in views])[None])
        lang = model.encode_instruction(["touch the red block"])
        cache = model.new_cache(1)
        raw = torch.tensor([[*HOME_POS, *DOWN_QUAT, 0.0]], dtype=torch.float32)
        model.step(cache, lang, model.tokenize_images(pixels), raw, want_actions=False)
        expected = model.decode_frames(model.generate_frames(cache, lang, 3, GREEDY))[0].numpy()
    got = np.stack([np.stack([f.images[v] for v in views]) for f in frames])
    np.testing.assert_array_equal(got, expected)


def test_no_state_and_seeded_sampling(client: PolicyClient) -> None:
    images = camera_images(client, seed=6)
    greedy = list(client.predict_video("push the blue block", images, num_frames=1))
    assert len(greedy) == 1
    sampling = pb.Sampling(mode=pb.SAMPLING_MODE_TOP_K, top_k=20, temperature=1.5, seed=3)
    a = list(client.predict_video("push the blue block", images, num_frames=2, sampling=sampling))
    b = list(client.predict_video("push the blue block", images, num_frames=2, sampling=sampling))
    for x, y in zip(a, b, strict=True):  # the same seed gives the same frames
        for view in x.images:
            np.testing.assert_array_equal(x.images[view], y.images[view])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.ClearField("instruction"), "instruction"),
        (lambda r: setattr(r, "num_frames", 0), "num_frames"),
        (lambda r: setattr(r, "num_frames", 17), "num_frames"),
        (lambda r: r.images.pop(), "missing image"),
        (lambda r: setattr(r.images[0], "width", 32), "size"),
        (lambda r: r.sampling.CopyFrom(pb.Sampling(mode=7)), "sampling mode"),
        (
            lambda r: r.sampling.CopyFrom(pb.Sampling(mode=pb.SAMPLING_MODE_TOP_K, temperature=-1)),
            "temperature",
        ),
        (
            lambda r: r.state.CopyFrom(pb.RobotState(ee_position=[0, 0], ee_quat_wxyz=DOWN_QUAT)),
            "ee_position",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(
    client: PolicyClient,
    server: PolicyServer,
    change,
    match: str,  # type: ignore[no-untyped-def]
) -> None:
    request = pb.PredictVideoRequest(
        instruction="touch the red block",
        images=[encode_image(v, img) for v, img in camera_images(client).items()],
        num_frames=1,
    )
    change(request)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.PolicyServiceStub(channel)
        details = expect_status(
            lambda: list(stub.PredictVideo(request, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT
        )
    assert match in details
    assert len(list(client.predict_video("still serving", camera_images(client)))) == 1


def test_an_observation_can_ask_for_the_next_frame(client: PolicyClient) -> None:
    """With predict_video the chunk carries one predicted image per view; the episode's
    chunks are the same as without it (the prediction leaves the episode alone)."""
    views = client.server_info().views
    chunks: dict[bool, list] = {}
    for predict in (True, False):
        episode = client.start_episode("touch the red block")
        chunks[predict] = []
        for seq in range(3):
            obs = make_observation(
                episode,
                seq,
                camera_images(client, seed=seq),
                HOME_POS,
                DOWN_QUAT,
                0.0,
                capture_time_s=0.1 * seq,
                predict_video=predict,
            )
            chunks[predict].append(chunk_from_proto(client.act(obs)))
    for chunk in chunks[True]:
        assert list(chunk.predicted_images) == [name for name, _, _ in views]
        assert all(
            img.shape == (h, w, 3)
            for (_, w, h), img in zip(views, chunk.predicted_images.values(), strict=True)
        )
    assert all(not c.predicted_images for c in chunks[False])
    for a, b in zip(chunks[True], chunks[False], strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
