"""REST video prediction: ``POST /v1/predict-video`` and ``POST /v1/predict-video/stream``.

Two request forms, the same fields:

- ``multipart/form-data``: ``image`` files (PNG or JPEG) repeated in the view order of
  ``/v1/info``, ``instruction``, ``num_frames``, ``format``, ``sampling``, ``top_k``,
  ``temperature``, ``seed`` and ``state`` (a JSON string);
- ``application/json``: :class:`PredictVideoJson` (images as base64 PNG/JPEG, or data URLs).

``/v1/predict-video`` answers with a GIF, an MP4, a PNG strip or JSON; the stream answers
with server-sent events, one ``frame`` event per predicted frame as soon as it is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import Response, StreamingResponse
from gr2.v1 import policy_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError
from starlette.datastructures import UploadFile

from gr2_policy.api import media
from gr2_policy.api.problems import PROBLEM_JSON, error_type, problem_body
from gr2_policy.api.service import EpisodeService
from gr2_policy.api.status import http_status
from gr2_policy.api.validation import (
    MAX_INSTRUCTION_BYTES,
    check_text,
    decode_image_bytes,
    decode_state,
)
from gr2_policy.engine.interface import (
    MAX_VIDEO_FRAMES,
    VideoRequest,
    VideoSampling,
    VideoState,
    ViewInfo,
)
from gr2_policy.engine.validation import MAX_TEMPERATURE, MIN_TEMPERATURE
from gr2_policy.errors import GR2Error, InvalidInputError
from gr2_policy.logs import get_logger

log = get_logger("gr2_policy.rest")

Format = Literal["gif", "mp4", "png", "json"]
MEDIA_TYPES: dict[str, str] = {
    "gif": "image/gif",
    "mp4": "video/mp4",
    "png": "image/png",
    "json": "application/json",
}
_STATE_EXAMPLE = {
    "ee_position": [0.4, 0.0, 0.3],
    "ee_quat_wxyz": [0.0, 1.0, 0.0, 0.0],
    "gripper": 0,
}


class StateIn(BaseModel):
    """The robot state the prediction starts from (metres, base frame; gripper 0 open..1)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_STATE_EXAMPLE]})

    ee_position: list[float] = Field(min_length=3, max_length=3)
    ee_quat_wxyz: list[float] = Field(min_length=4, max_length=4)
    gripper: float = Field(ge=0.0, le=1.0)


class SamplingIn(BaseModel):
    """greedy: argmax (deterministic). top_k: sample from the top_k tokens (0 = all) of the
    logits divided by temperature, with a generator seeded by seed."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["greedy", "top_k"] = "greedy"
    top_k: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    seed: int = Field(0, ge=0, lt=2**63)


class PredictVideoJson(BaseModel):
    """A video prediction request as JSON."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "instruction": "touch the red block",
                    "images": ["<base64 PNG of the head view>", "<base64 PNG of the wrist view>"],
                    "num_frames": 4,
                    "format": "json",
                    "sampling": {"mode": "greedy"},
                    "state": None,
                }
            ]
        },
    )

    instruction: str = Field(description="what the robot should do")
    images: list[str] = Field(
        description="one base64 PNG or JPEG (or data: URL) per view, in /v1/info view order"
    )
    num_frames: int = Field(4, ge=1, le=MAX_VIDEO_FRAMES, description="frames to predict")
    format: Format = Field("gif", description="response format (ignored by the stream)")
    sampling: SamplingIn = SamplingIn()
    state: StateIn | None = Field(None, description="start state; null: none")


class PredictVideoForm(BaseModel):
    """The non-file fields of a multipart/form-data video prediction request."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(description="what the robot should do")
    num_frames: int = Field(4, ge=1, le=MAX_VIDEO_FRAMES)
    format: Format = "gif"
    sampling: Literal["greedy", "top_k"] = "greedy"
    top_k: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    seed: int = Field(0, ge=0, lt=2**63)
    state: Json[StateIn] | None = Field(
        None, description='JSON: {"ee_position": [3], "ee_quat_wxyz": [4], "gripper": x}'
    )


def multipart_schema() -> dict[str, Any]:
    """The OpenAPI schema of the multipart form (files + PredictVideoForm's fields). ``state``
    is a StateIn object: in multipart/form-data that is a part holding its JSON (OpenAPI's
    default encoding of an object property, stated in the request body's ``encoding``).
    Other fields are refused, as the server does."""
    fields = PredictVideoForm.model_json_schema()
    props: dict[str, Any] = {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "PNG or JPEG, one per view, repeated in /v1/info view order",
        }
    }
    props.update(fields["properties"])
    props["state"] = {
        "$ref": "#/components/schemas/StateIn",
        "description": "start state, a JSON object: " + json.dumps(_STATE_EXAMPLE),
    }
    return {
        "type": "object",
        "properties": props,
        "required": ["image", "instruction"],
        "additionalProperties": False,
    }


class FrameOut(BaseModel):
    frame_index: int
    images: dict[str, str] = Field(description="view name -> base64 PNG")


class PredictVideoOut(BaseModel):
    """``format=json``: every predicted frame, one base64 PNG per view."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "3f2a9c...",
                    "views": ["head", "wrist"],
                    "frames": [
                        {"frame_index": 0, "images": {"head": "iVBORw0KG...", "wrist": "iVBO..."}}
                    ],
                }
            ]
        }
    )

    model_version: str
    views: list[str]
    frames: list[FrameOut]


def _validation_error(err: ValidationError) -> RequestValidationError:
    errors = []
    for e in err.errors(include_url=False):
        e = dict(e)
        e["loc"] = ("body", *e.get("loc", ()))
        e.pop("ctx", None)
        errors.append(e)
    return RequestValidationError(errors)


def _b64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"images[{index}] is not valid base64") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_video_request(
    request: Request, views: Sequence[ViewInfo]
) -> tuple[VideoRequest, str]:
    """Validate either request form into the engine's VideoRequest and the response format."""
    kind = _media_type(request)
    if kind == "application/json":
        try:
            body = PredictVideoJson.model_validate_json(await request.body())
        except ValidationError as err:
            raise _validation_error(err) from None
        sources: Sequence[str | UploadFile] = body.images
        instruction, num_frames, fmt, state = (
            body.instruction,
            body.num_frames,
            body.format,
            body.state,
        )
        s = body.sampling
        sampling_mode, top_k, temperature, seed = s.mode, s.top_k, s.temperature, s.seed
    elif kind == "multipart/form-data":
        form = await request.form()
        files = form.getlist("image")
        if any(not isinstance(f, UploadFile) for f in files):
            raise InvalidInputError("image fields must be files (PNG or JPEG)")
        fields = {k: v for k, v in form.multi_items() if k != "image"}
        if any(not isinstance(v, str) for v in fields.values()):
            raise InvalidInputError("only the image fields may be files")
        try:
            data = PredictVideoForm.model_validate(fields)
        except ValidationError as err:
            raise _validation_error(err) from None
        sources = [f for f in files if isinstance(f, UploadFile)]
        instruction, num_frames, fmt, state = (
            data.instruction,
            data.num_frames,
            data.format,
            data.state,
        )
        sampling_mode, top_k, temperature, seed = (
            data.sampling,
            data.top_k,
            data.temperature,
            data.seed,
        )
    else:
        raise HTTPException(
            415,
            f"unsupported content type {kind or '(none)'!r}; "
            "send multipart/form-data or application/json",
        )
    check_text("instruction", instruction, MAX_INSTRUCTION_BYTES, required=True)
    if len(sources) != len(views):  # before decoding any of them
        names = ", ".join(v.name for v in views)
        raise InvalidInputError(
            f"{len(sources)} image(s) sent, the model expects {len(views)}: one per view, "
            f"in the order of GET /v1/info ({names})"
        )
    encoded = [
        _b64(i, src) if isinstance(src, str) else await src.read() for i, src in enumerate(sources)
    ]
    images = {
        view.name: decode_image_bytes(data, view) for data, view in zip(encoded, views, strict=True)
    }
    video_state = None
    if state is not None:
        position, quat, gripper = decode_state(
            pb.RobotState(
                ee_position=state.ee_position,
                ee_quat_wxyz=state.ee_quat_wxyz,
                gripper=state.gripper,
            )
        )
        video_state = VideoState(position, quat, gripper)
    sampling = (
        VideoSampling()
        if sampling_mode == "greedy"
        else VideoSampling(greedy=False, top_k=top_k, temperature=temperature, seed=seed)
    )
    return VideoRequest(instruction, images, video_state, num_frames, sampling), fmt


def render(fmt: str, frames: list[np.ndarray], views: Sequence[ViewInfo], version: str) -> bytes:
    """The response body of ``/v1/predict-video`` in ``fmt``."""
    if fmt == "gif":
        return media.gif(frames)
    if fmt == "mp4":
        return media.mp4(frames)
    if fmt == "png":
        return media.png_strip(frames)
    body = PredictVideoOut(
        model_version=version,
        views=[v.name for v in views],
        frames=[
            FrameOut(
                frame_index=i,
                images={v.name: media.png_base64(frame[j]) for j, v in enumerate(views)},
            )
            for i, frame in enumerate(frames)
        ],
    )
    return body.model_dump_json().encode()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def frame_event(index: int, total: int, frame: np.ndarray, views: Sequence[ViewInfo]) -> bytes:
    images = {
        v.name: "data:image/png;base64," + media.png_base64(frame[j]) for j, v in enumerate(views)
    }
    return sse("frame", {"frame_index": index, "num_frames": total, "images": images})


SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event; the stream is a sequence of them, e.g.\n\n"
    '```\nevent: frame\ndata: {"frame_index":0,"num_frames":2,"images":{"head":'
    '"data:image/png;base64,iVBO...","wrist":"..."}}\n\n'
    'event: frame\ndata: {...}\n\nevent: done\ndata: {"frames":2}\n```',
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["frame", "done", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": 'frame: {"frame_index", "num_frames", "images": {view: data URL}}; '
            'done: {"frames"}; error: a problem details object',
        },
    },
}
"""The OpenAPI schema of one event of /v1/predict-video/stream (OpenAPI 3.1 has no
keyword for a stream's items, so a text/event-stream ``schema`` describes one event)."""

_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "bad input: not a PNG/JPEG, wrong image size (see /v1/info), wrong "
        "number of images, bad state or sampling",
        "content": _PROBLEM_CONTENT,
    },
    413: {"description": "body over the upload limit", "content": _PROBLEM_CONTENT},
    415: {"description": "not multipart/form-data or JSON", "content": _PROBLEM_CONTENT},
    422: {
        "description": "a field is missing or malformed (e.g. no instruction)",
        "content": _PROBLEM_CONTENT,
    },
    500: {"description": "unexpected error (with a reference id)", "content": _PROBLEM_CONTENT},
    503: {"description": "the server is draining or not ready", "content": _PROBLEM_CONTENT},
}


def _request_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"$ref": "#/components/schemas/PredictVideoMultipart"},
                    "encoding": {
                        "image": {"contentType": "image/png, image/jpeg"},
                        "state": {"contentType": "application/json"},
                    },
                },
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/PredictVideoJson"},
                },
            },
        }
    }


def add_video_routes(app: FastAPI, service: EpisodeService) -> None:
    """Register the two video prediction endpoints on ``app``."""

    @app.post(
        "/v1/predict-video",
        summary="Predict the next frames from camera images and an instruction",
        description=(
            "Send one image per view (PNG or JPEG, the size in /v1/info) in view order, as "
            "multipart/form-data `image` files or as base64 strings in JSON. The answer is "
            "`format`: an animated GIF or an H.264 MP4 (each frame's views side by side), a "
            "PNG strip (rows = frames, columns = views) or JSON with base64 PNGs.\n\n"
            "```\ncurl -F image=@head.png -F image=@wrist.png "
            "-F instruction='touch the red block' -F num_frames=4 -o video.gif "
            "http://127.0.0.1:8000/v1/predict-video\n```"
        ),
        response_class=Response,
        responses={
            200: {
                "description": "the predicted frames in the requested format",
                "content": {
                    "image/gif": {"schema": {"type": "string", "format": "binary"}},
                    "video/mp4": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/PredictVideoOut"}
                    },
                },
            },
            **_ERRORS,
        },
        openapi_extra=_request_body(),
    )
    async def predict_video(request: Request) -> Response:
        views = service.info.views
        video, fmt = await parse_video_request(request, views)
        frames = [frame async for frame in service.predict_video(video)]
        body = await asyncio.to_thread(render, fmt, frames, views, service.info.model_version)
        return Response(body, media_type=MEDIA_TYPES[fmt])

    @app.post(
        "/v1/predict-video/stream",
        summary="Predict the next frames, streamed as server-sent events",
        description=(
            "Same request as /v1/predict-video (`format` is ignored). The answer is "
            "`text/event-stream`: one `frame` event per predicted frame as soon as it is "
            'decoded, data `{"frame_index": i, "num_frames": n, "images": {"head": '
            '"data:image/png;base64,...", ...}}`; then a `done` event, data `{"frames": n}`. '
            "A failure after the stream started is an `error` event whose data is a problem "
            "details object. Bad input is refused before the stream starts."
        ),
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "frame events, then done",
                "content": {
                    "text/event-stream": {
                        "schema": SSE_EVENT_SCHEMA,
                        "example": {"event": "done", "data": '{"frames":2}'},
                    }
                },
            },
            **_ERRORS,
        },
        openapi_extra=_request_body(),
    )
    async def predict_video_stream(request: Request) -> Response:
        views = service.info.views
        video, _ = await parse_video_request(request, views)
        frames = service.predict_video(video)
        # The first frame before the response starts: the engine validates on the first
        # step, so bad input is still an ordinary 4xx rather than an event.
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            first = None
        total = video.num_frames

        async def events() -> AsyncIterator[bytes]:
            index = 0
            try:
                if first is not None:
                    yield await asyncio.to_thread(frame_event, 0, total, first, views)
                    index = 1
                    async for frame in frames:
                        yield await asyncio.to_thread(frame_event, index, total, frame, views)
                        index += 1
                yield sse("done", {"frames": index})
            except Exception as err:  # noqa: BLE001 - the stream has started: an error event
                yield sse("error", _stream_problem(err))
            finally:
                closer = getattr(frames, "aclose", None)
                if closer is not None:
                    await closer()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _stream_problem(err: Exception) -> dict[str, Any]:
    if isinstance(err, GR2Error):
        name = type(err).__name__
        return problem_body(http_status(err), str(err), type_=error_type(name), code=name)
    ref = uuid.uuid4().hex[:12]
    log.error("internal_error", ref=ref, exc_info=err)
    return problem_body(500, f"internal server error (reference {ref})", reference=ref)


def openapi_components() -> dict[str, Any]:
    """Schemas the video routes reference: add them to the OpenAPI components."""
    schemas: dict[str, Any] = {}
    for model in (PredictVideoJson, PredictVideoOut):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["PredictVideoMultipart"] = multipart_schema()
    return schemas
