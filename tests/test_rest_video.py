"""REST video prediction against a real server process: GIF, MP4, PNG strip, JSON (equal to
gRPC PredictVideo), the server-sent-event stream, samples and the page, and every kind of bad
upload answered with a problem-details 4xx while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import imageio.v2 as imageio
import numpy as np
import pytest
from gr2.v1 import policy_pb2 as pb
from gr2_client import PolicyClient
from PIL import Image

from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e

INSTRUCTION = "touch the red block"
PROBLEM = "application/problem+json"
Views = list[tuple[str, int, int]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("rest-video")), extra_args=("--random-weights",)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: PolicyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def views(http: httpx.Client) -> Views:
    return [(v["name"], v["width"], v["height"]) for v in http.get("/v1/info").json()["views"]]


def camera_images(views: Views, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for n, w, h in views}


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def multipart(images: dict[str, np.ndarray]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{n}.png", png(rgb), "image/png")) for n, rgb in images.items()]


def predict(http: httpx.Client, views: Views, fmt: str, num_frames: int = 3) -> httpx.Response:
    response = http.post(
        "/v1/predict-video",
        files=multipart(camera_images(views)),
        data={"instruction": INSTRUCTION, "num_frames": str(num_frames), "format": fmt},
    )
    assert response.status_code == 200, response.text
    return response


def assert_problem(response: httpx.Response, status: int, words: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert "Traceback" not in body["detail"]
    assert words.lower() in body["detail"].lower(), body["detail"]
    return body


def assert_still_serving(http: httpx.Client, views: Views) -> None:
    response = predict(http, views, "png", num_frames=1)
    assert response.headers["content-type"] == "image/png"


def test_gif_has_one_frame_per_predicted_frame_views_side_by_side(
    http: httpx.Client, views: Views
) -> None:
    response = predict(http, views, "gif", num_frames=3)
    assert response.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(response.content)) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 3
        assert gif.size == (sum(w for _, w, _ in views), views[0][2])


def test_mp4_reads_back_with_one_frame_per_predicted_frame(
    http: httpx.Client, views: Views, tmp_path: Path
) -> None:
    response = predict(http, views, "mp4", num_frames=3)
    assert response.headers["content-type"] == "video/mp4"
    path = tmp_path / "video.mp4"
    path.write_bytes(response.content)
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frames = [frame for frame in reader]  # list() asks len(): inf
    assert len(frames) == 3
    assert frames[0].shape == (4 * views[0][2], 4 * sum(w for _, w, _ in views), 3)


def test_png_strip_rows_are_frames_columns_are_views(http: httpx.Client, views: Views) -> None:
    response = predict(http, views, "png", num_frames=2)
    with Image.open(io.BytesIO(response.content)) as strip:
        assert strip.format == "PNG"
        assert strip.size == (sum(w for _, w, _ in views), 2 * views[0][2])


def test_json_frames_equal_grpc_predict_video(
    http: httpx.Client, views: Views, server: PolicyServer
) -> None:
    images = camera_images(views, seed=3)
    body = {
        "instruction": INSTRUCTION,
        "images": [base64.b64encode(png(images[n])).decode() for n, _, _ in views],
        "num_frames": 2,
        "format": "json",
        "sampling": {"mode": "greedy"},
        "state": {"ee_position": [0.4, 0.0, 0.3], "ee_quat_wxyz": [0, 1, 0, 0], "gripper": 0.0},
    }
    response = http.post("/v1/predict-video", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["views"] == [n for n, _, _ in views]
    assert [f["frame_index"] for f in out["frames"]] == [0, 1]
    with PolicyClient(server.grpc_target) as client:
        assert out["model_version"] == client.server_info().model_version
        state = pb.RobotState(ee_position=[0.4, 0.0, 0.3], ee_quat_wxyz=[0, 1, 0, 0], gripper=0.0)
        grpc_frames = list(client.predict_video(INSTRUCTION, images, num_frames=2, state=state))
    for rest_frame, grpc_frame in zip(out["frames"], grpc_frames, strict=True):
        for name, w, h in views:
            rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(rest_frame["images"][name]))))
            assert rgb.shape == (h, w, 3)
            np.testing.assert_array_equal(rgb, grpc_frame.images[name])


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def test_stream_sends_frames_in_order_then_done(http: httpx.Client, views: Views) -> None:
    images = camera_images(views, seed=4)
    with http.stream(
        "POST",
        "/v1/predict-video/stream",
        files=multipart(images),
        data={"instruction": INSTRUCTION, "num_frames": "3", "format": "mp4"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    assert [e for e, _ in events] == ["frame", "frame", "frame", "done"]
    assert [d["frame_index"] for _, d in events[:3]] == [0, 1, 2]
    assert all(d["num_frames"] == 3 for _, d in events[:3])
    assert events[-1][1] == {"frames": 3}
    for _, data in events[:3]:
        assert list(data["images"]) == [n for n, _, _ in views]
        for (_, w, h), url in zip(views, data["images"].values(), strict=True):
            prefix = "data:image/png;base64,"
            assert url.startswith(prefix)
            with Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))) as img:
                assert img.size == (w, h)


def test_stream_yields_the_first_frame_before_the_last_is_decoded(
    http: httpx.Client, views: Views
) -> None:
    """Frames arrive one at a time: the first event is readable while more are coming."""
    body = {
        "instruction": INSTRUCTION,
        "images": [base64.b64encode(png(rgb)).decode() for rgb in camera_images(views).values()],
        "num_frames": 8,
    }
    with http.stream("POST", "/v1/predict-video/stream", json=body) as response:
        assert response.status_code == 200
        events = read_events(response)
        first = next(events)
        assert first[0] == "frame" and first[1]["frame_index"] == 0
        rest = list(events)
    assert [d.get("frame_index") for _, d in rest[:-1]] == list(range(1, 8))
    assert rest[-1] == ("done", {"frames": 8})


def test_stream_bad_input_is_a_plain_problem(http: httpx.Client, views: Views) -> None:
    body = {"instruction": INSTRUCTION, "images": ["aGVsbG8="] * len(views), "num_frames": 1}
    assert_problem(http.post("/v1/predict-video/stream", json=body), 400, "not a PNG or JPEG")


def test_samples_and_the_page_are_served(http: httpx.Client) -> None:
    samples = http.get("/v1/samples").json()["samples"]
    assert samples
    first = samples[0]
    assert first["name"] and first["instruction"]
    for url in first["images"].values():
        assert url.startswith("/static/samples/")
        image = http.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.content)) as img:
            assert img.format == "PNG"
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert_problem(http.get("/static/no-such-file.png"), 404)


def test_openapi_documents_the_video_endpoints(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    for path in ("/v1/predict-video", "/v1/predict-video/stream"):
        op = spec["paths"][path]["post"]
        content = op["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        for code in ("400", "413", "415", "422"):
            assert PROBLEM in op["responses"][code]["content"]
    ok = spec["paths"]["/v1/predict-video"]["post"]["responses"]["200"]["content"]
    assert {"image/gif", "video/mp4", "image/png", "application/json"} <= set(ok)
    schemas = spec["components"]["schemas"]
    for name in ("PredictVideoJson", "PredictVideoMultipart", "PredictVideoOut", "Problem"):
        assert name in schemas
    assert schemas["PredictVideoJson"]["examples"]
    assert "/v1/samples" in spec["paths"]


# -- bad uploads: one test each, and the server keeps serving ------------------------------


def test_not_an_image_is_400(http: httpx.Client, views: Views) -> None:
    files = [("image", ("x.png", b"this is not a picture", "image/png"))] * len(views)
    response = http.post("/v1/predict-video", files=files, data={"instruction": INSTRUCTION})
    assert_problem(response, 400, "not a PNG or JPEG image")
    assert_still_serving(http, views)


def test_wrong_size_is_400_and_names_the_expected_size(http: httpx.Client, views: Views) -> None:
    small = {n: np.zeros((h // 2, w // 2, 3), np.uint8) for n, w, h in views}
    response = http.post(
        "/v1/predict-video", files=multipart(small), data={"instruction": INSTRUCTION}
    )
    _, w, h = views[0]
    assert_problem(response, 400, f"the model expects {w}x{h}")
    assert_still_serving(http, views)


def test_too_many_views_is_400(http: httpx.Client, views: Views) -> None:
    files = multipart(camera_images(views)) * 2
    response = http.post("/v1/predict-video", files=files, data={"instruction": INSTRUCTION})
    assert_problem(response, 400, f"the model expects {len(views)}")
    assert_still_serving(http, views)


def test_too_few_views_is_400(http: httpx.Client, views: Views) -> None:
    body = {"instruction": INSTRUCTION, "images": [], "num_frames": 1}
    assert_problem(http.post("/v1/predict-video", json=body), 400, "0 image(s) sent")
    assert_still_serving(http, views)


def test_a_50_mb_body_is_413(http: httpx.Client, views: Views) -> None:
    junk = b"\0" * (50 * 1024 * 1024)
    files = [("image", ("huge.png", junk, "image/png"))]
    response = http.post("/v1/predict-video", files=files, data={"instruction": INSTRUCTION})
    assert_problem(response, 413, "larger than the limit")
    assert_still_serving(http, views)


def test_a_streamed_body_over_the_limit_is_413(http: httpx.Client, views: Views) -> None:
    """No Content-Length (chunked): the server counts the bytes as they arrive."""

    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b"x" * (1024 * 1024)

    response = http.post(
        "/v1/predict-video",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 413, "larger than the limit")
    assert_still_serving(http, views)


def test_missing_instruction_is_422(http: httpx.Client, views: Views) -> None:
    response = http.post("/v1/predict-video", files=multipart(camera_images(views)))
    assert_problem(response, 422, "instruction")
    assert_still_serving(http, views)


def test_unsupported_media_type_is_415(http: httpx.Client, views: Views) -> None:
    response = http.post(
        "/v1/predict-video", content=b"hello", headers={"content-type": "text/plain"}
    )
    assert_problem(response, 415, "multipart/form-data or application/json")
    assert_still_serving(http, views)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_frames": "17"},
        {"num_frames": "zero"},
        {"sampling": "beam"},
        {"temperature": "0"},
        {"state": "{not json"},
    ],
)
def test_bad_fields_are_422(http: httpx.Client, views: Views, fields: dict[str, str]) -> None:
    response = http.post(
        "/v1/predict-video",
        files=multipart(camera_images(views)),
        data={"instruction": INSTRUCTION, **fields},
    )
    assert_problem(response, 422, next(iter(fields)))
    assert_still_serving(http, views)


def test_top_k_beyond_the_codebook_is_400(http: httpx.Client, views: Views) -> None:
    response = http.post(
        "/v1/predict-video",
        files=multipart(camera_images(views)),
        data={"instruction": INSTRUCTION, "sampling": "top_k", "top_k": "100000000"},
    )
    assert_problem(response, 400, "top_k")
    assert_still_serving(http, views)


def test_bad_state_is_400(http: httpx.Client, views: Views) -> None:
    state = {"ee_position": [0.4, 0.0, 0.3], "ee_quat_wxyz": [3, 0, 0, 0], "gripper": 0}
    response = http.post(
        "/v1/predict-video",
        files=multipart(camera_images(views)),
        data={"instruction": INSTRUCTION, "state": json.dumps(state)},
    )
    assert_problem(response, 400, "unit quaternion")
    assert_still_serving(http, views)


def test_top_k_sampling_is_reproducible_with_a_seed(http: httpx.Client, views: Views) -> None:
    def run(seed: int) -> bytes:
        response = http.post(
            "/v1/predict-video",
            files=multipart(camera_images(views)),
            data={
                "instruction": INSTRUCTION,
                "num_frames": "1",
                "format": "png",
                "sampling": "top_k",
                "top_k": "8",
                "temperature": "1.5",
                "seed": str(seed),
            },
        )
        assert response.status_code == 200, response.text
        return response.content

    assert run(7) == run(7)
