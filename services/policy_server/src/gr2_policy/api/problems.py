"""RFC 9457 problem details for every REST error, and the request-body size limit.

Every error the REST API returns is ``application/problem+json``::

    {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": "..."}

``type`` is ``about:blank`` for plain HTTP errors and ``urn:gr2:problem:<slug>`` for the
server's own typed errors (then ``code`` names the error class too). 500s carry a
``reference`` that is also in the server log; never a traceback.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    type: str = Field("about:blank", examples=["urn:gr2:problem:invalid-input"])
    title: str = Field(examples=["Bad Request"])
    status: int = Field(examples=[400])
    detail: str = Field(
        examples=["image 'head': size 32x32, the model expects 64x64 (see GET /v1/info)"]
    )
    code: str | None = Field(None, description="the server's error class, for typed errors")
    reference: str | None = Field(None, description="500s: the id in the server log")


def problem_body(
    status: int, detail: str, *, type_: str = "about:blank", **extra: Any
) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail, type_=type_, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def error_type(class_name: str) -> str:
    """``InvalidInputError`` -> ``urn:gr2:problem:invalid-input``."""
    name = class_name.removesuffix("Error")
    return "urn:gr2:problem:" + re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class BodyTooLargeError(Exception):
    """The request body passed the upload limit while it was being read."""


class UploadLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413.

    A declared Content-Length over the limit is refused before the body is read; a body
    without one (chunked) is counted as it streams in and cut off at the limit, so a huge
    upload never sits in memory. Whatever the app answered to the cut-off body is replaced
    by the 413 problem.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(problem_body(413, self._detail())).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._refuse(send)
                return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLargeError(self._detail())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large and not started:
                return  # the app's own answer to the cut-off body; the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # BodyTooLargeError, possibly wrapped (an ExceptionGroup from a middleware's task
            # group, or whatever the body parser made of it): answered with the 413 below.
            if not too_large:
                raise
        if too_large and not started:
            await self._refuse(send)
