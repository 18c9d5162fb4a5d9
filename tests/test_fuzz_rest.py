"""Schemathesis over the REST API of one real policy server process (seeded random gr2-tiny
weights): requests generated from the live /openapi.json for every operation, in
schemathesis' three ways - its deterministic coverage cases (boundary values, missing
fields, wrong types, undeclared methods and media types), hypothesis-generated valid
requests and hypothesis-generated invalid ones - plus valid video requests that carry real
PNGs, so generated sampling, state and format settings reach the model and the renderers.

Every response goes through all of schemathesis' default checks (no 5xx, status codes,
content types, headers and bodies as documented, invalid data refused with a 4xx, valid data
not refused as malformed, 405 with Allow for undeclared methods, ...) and one of ours: no
traceback text in a body. Afterwards the server must be alive with no internal error in its
log. The pytest plugin's ``schema.parametrize()`` is not used: with pytest 9 it fails
(``'Function' object has no attribute '_nodeid'``), so the cases are run directly.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e

OPERATIONS = [
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/info",
    "GET /v1/samples",
    "GET /v1/episodes",
    "GET /v1/episodes/{episode_id}",
    "POST /v1/predict-video",
    "POST /v1/predict-video/stream",
]
"""Every operation of the OpenAPI document (a test checks the list is complete)."""
VIDEO = ["/v1/predict-video", "/v1/predict-video/stream"]
TRACEBACK_MARKERS = ("Traceback", 'File "', '.py", line')
TEXT_TYPES = ("application/json", "application/problem+json", "text/")
FUZZ_EXAMPLES = 100
REAL_IMAGE_EXAMPLES = 60

CASES: Counter[str] = Counter()
"""Requests sent per phase and operation (the last test prints them)."""
STATUSES: Counter[int] = Counter()

CONFIG = {
    "checks": {
        # Valid by the schema but refused as 400: a PNG that is not one (generated images are
        # random bytes), the wrong number of images for the served views, a blank instruction,
        # a state 20 m away. OpenAPI cannot say these; 422 (malformed) stays a failure.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]},
    }
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("fuzz-rest")), extra_args=("--random-weights",)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server: PolicyServer) -> OpenApiSchema:
    return schemathesis.openapi.from_url(
        f"{server.http_url}/openapi.json", config=schemathesis.Config.from_dict(CONFIG)
    )


def operation(api_schema: OpenApiSchema, label: str) -> APIOperation:
    method, path = label.split(" ", 1)
    return api_schema[path][method]


def no_traceback(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Nothing in a textual body that looks like a Python traceback."""
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith(TEXT_TYPES):
        return None
    text = response.content.decode("utf-8", errors="replace")
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"traceback marker {marker!r} in the response body"
    return None


def validate(phase: str, case: Case) -> Response:
    """Send the case; every default check plus ``no_traceback`` must pass."""
    CASES[f"{phase} {case.operation.label}"] += 1
    response = case.call_and_validate(timeout=60, additional_checks=[no_traceback])
    STATUSES[response.status_code] += 1
    return response


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )


def test_every_operation_is_fuzzed(api_schema: OpenApiSchema) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_coverage_cases(api_schema: OpenApiSchema, label: str) -> None:
    """Schemathesis' deterministic cases, valid and invalid, for one operation."""
    op = operation(api_schema, label)
    cases = api_schema.iter_coverage_cases(
        op,
        generation_modes=list(GenerationMode),
        generation_config=api_schema.config.generation_for(operation=op, phase="coverage"),
    )
    sent = sum(1 for case in cases if validate("coverage", case) is not None)
    assert sent > 0


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests(api_schema: OpenApiSchema, label: str, mode: GenerationMode) -> None:
    """Hypothesis-generated requests, valid by the schema or not, for one operation."""
    op = operation(api_schema, label)
    has_input = bool(op.path_parameters or op.query or op.headers or op.body)
    if mode == GenerationMode.NEGATIVE and not has_input:
        pytest.skip("nothing to make invalid: the operation takes no input")

    @fuzz_settings(FUZZ_EXAMPLES if has_input else 1)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        validate(f"fuzzing-{mode.value}", case)

    try:
        run()
    except Unsatisfiable:  # GET /v1/episodes/{episode_id}: any string is a valid path value
        pytest.skip("schemathesis finds no invalid value for this operation's input")


def real_pngs(server: PolicyServer) -> list[bytes]:
    """One random PNG of the served size per view, in view order."""
    views = httpx.get(f"{server.http_url}/v1/info", timeout=10).json()["views"]
    rng = np.random.default_rng(3)
    pngs = []
    for view in views:
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (view["height"], view["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs


@pytest.mark.parametrize("path", VIDEO)
def test_generated_video_requests_with_real_images(
    api_schema: OpenApiSchema, server: PolicyServer, path: str
) -> None:
    """Valid generated video requests with real PNGs in place of the generated bytes (one
    frame, so the model runs briefly): generated instructions, formats, sampling settings
    and states reach decoding, the model and the GIF/MP4/PNG/JSON/SSE renderers."""
    pngs = real_pngs(server)
    encoded = [base64.b64encode(png).decode("ascii") for png in pngs]
    answered: Counter[int] = Counter()

    def with_real_images(case: Case) -> Case:
        body = case.body
        if isinstance(body, dict):
            json_body = case.media_type == "application/json"
            body["images" if json_body else "image"] = list(encoded if json_body else pngs)
            body["num_frames"] = 1 if json_body else "1"
        return case

    strategy = operation(api_schema, f"POST {path}").as_strategy(GenerationMode.POSITIVE)

    @fuzz_settings(REAL_IMAGE_EXAMPLES)
    @given(case=strategy.map(with_real_images))
    def run(case: Case) -> None:
        answered[validate("real-images", case).status_code] += 1

    run()
    print(f"\n{path} with real images: {dict(answered)}")
    assert answered[200] >= REAL_IMAGE_EXAMPLES // 10, f"too few requests got through: {answered}"


def test_regression_tiny_temperature_is_refused(server: PolicyServer) -> None:
    """Found by fuzzing: top-k sampling at temperature 1e-300 (allowed: "> 0") turned the
    logits into infinities and the softmax into NaN; torch.multinomial raised: 500."""
    pngs = real_pngs(server)
    body = {
        "instruction": "touch the red block",
        "images": [base64.b64encode(p).decode("ascii") for p in pngs],
        "num_frames": 1,
        "format": "json",
        "sampling": {"mode": "top_k", "temperature": 1e-300},
    }
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        for path in VIDEO:
            response = http.post(path, json=body)
            assert response.status_code == 422, response.text
            assert "temperature" in response.json()["detail"]
        files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
        form = {"instruction": "go", "sampling": "top_k", "temperature": "1e-300"}
        response = http.post("/v1/predict-video", files=files, data=form)
        assert response.status_code == 422, response.text


def test_regression_broken_png_is_400(server: PolicyServer) -> None:
    """Found by fuzzing: a PNG whose IDAT length is wrong made PIL raise SyntaxError
    ("broken PNG file") while decoding, which the image decoder did not catch: 500."""
    png = real_pngs(server)[0]
    at = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[at : at + 4])
    broken = png[:at] + struct.pack(">I", length // 2) + png[at + 4 :]
    files = [("image", ("broken.png", broken, "image/png"))] * len(real_pngs(server))
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        response = http.post("/v1/predict-video", files=files, data={"instruction": "go"})
    assert response.status_code == 400, response.text
    assert "not a PNG or JPEG image" in response.json()["detail"]


def test_regression_documented_multipart_and_stream(
    api_schema: OpenApiSchema, server: PolicyServer
) -> None:
    """Found by schemathesis: the multipart form was documented open to any field (the
    server refuses unknown ones: 422) with ``state`` as any string (the server wants a
    StateIn JSON object: 422), and each server-sent event as a string (it is an event with
    ``event`` and ``data``)."""
    doc = api_schema.raw_schema
    form = doc["components"]["schemas"]["PredictVideoMultipart"]
    assert form["additionalProperties"] is False
    assert form["properties"]["state"]["$ref"] == "#/components/schemas/StateIn"
    stream = doc["paths"]["/v1/predict-video/stream"]["post"]["responses"]["200"]
    event = stream["content"]["text/event-stream"]["schema"]
    assert event["type"] == "object" and event["required"] == ["event", "data"]
    state = {"ee_position": [0.4, 0.0, 0.3], "ee_quat_wxyz": [0.0, 1.0, 0.0, 0.0], "gripper": 0}
    files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(real_pngs(server))]
    data = {"instruction": "go", "num_frames": "1", "format": "json", "state": json.dumps(state)}
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        assert http.post("/v1/predict-video", files=files, data=data).status_code == 200
        extra = http.post("/v1/predict-video", files=files, data={**data, "colour": "red"})
        assert extra.status_code == 422, extra.text


def test_server_survived(server: PolicyServer) -> None:
    """Alive and ready after all of the above, nothing on the internal-error path."""
    assert server.proc.poll() is None, "the server process died"
    assert httpx.get(f"{server.http_url}/readyz", timeout=10).status_code == 200
    log = server.log_text()
    assert "internal_error" not in log
    assert "Traceback" not in log
    if not CASES:
        pytest.skip("run with the whole module to count the requests")
    print(f"\nschemathesis: {sum(CASES.values())} requests, statuses {dict(STATUSES)}")
    for key, count in sorted(CASES.items()):
        print(f"  {count:5d} {key}")
