"""REST API (FastAPI): health, readiness, model info, episodes, video prediction, samples,
the try-it page, Prometheus metrics.

Errors are RFC 9457 problem details (``application/problem+json``, see api.problems) with the
status code from api.status; unexpected errors return 500 with a reference id, never a
traceback.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gr2_policy import __version__
from gr2_policy.api.auth import AccessGuard, RestAccessMiddleware, add_openapi_security
from gr2_policy.api.problems import PROBLEM_JSON, Problem, UploadLimit, error_type, problem
from gr2_policy.api.protocol import PROTOCOL_VERSION
from gr2_policy.api.service import EpisodeService
from gr2_policy.api.status import http_status
from gr2_policy.api.video_rest import add_video_routes, openapi_components
from gr2_policy.errors import GR2Error
from gr2_policy.logs import get_logger
from gr2_policy.state import EpisodeRecord, EpisodeStatus

log = get_logger("gr2_policy.rest")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
_PLACEHOLDER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GR-2 Serve</title></head>
<body><h1>GR-2 Serve policy server</h1>
<p>The try-it page is not installed. See the <a href="/docs">API documentation</a>.</p>
</body></html>
"""


class Readiness:
    """Ready once the engine has warmed up, until the server starts draining."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False


class ViewOut(BaseModel):
    name: str
    width: int
    height: int


class InfoOut(BaseModel):
    model_name: str
    model_version: str
    preset: str
    views: list[ViewOut]
    action_horizon: int
    waypoint_dt_s: float
    history: int
    protocol_version: str
    server_version: str


class EpisodeList(BaseModel):
    episodes: list[EpisodeRecord]


class SampleOut(BaseModel):
    name: str
    instruction: str
    images: dict[str, str]


class SampleList(BaseModel):
    samples: list[SampleOut]


def load_samples() -> SampleList:
    """The bundled sample scenes (static/samples/samples.json), image paths under /static."""
    path = STATIC_DIR / "samples" / "samples.json"
    if not path.is_file():
        return SampleList(samples=[])
    raw = json.loads(path.read_text())
    return SampleList(
        samples=[
            SampleOut(
                name=s["name"],
                instruction=s["instruction"],
                images={view: f"/static/samples/{rel}" for view, rel in s["views"].items()},
            )
            for s in raw.get("samples", [])
        ]
    )


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with the video schemas added and every 422 documented as a problem."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(openapi_components())
    components["Problem"] = Problem.model_json_schema()
    problem_ref = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                responses["422"]["content"] = problem_ref
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema


def create_app(
    service: EpisodeService,
    readiness: Readiness,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    guard: AccessGuard | None = None,
) -> FastAPI:
    """The REST app. ``guard``: API keys and rate limits (api.auth), checked outside
    everything else, before a request body is read; health, metrics, the page and the API
    docs stay open."""
    app = FastAPI(
        title="GR-2 Serve policy server",
        version=__version__,
        description=(
            "Video prediction, model info, episode state, health and metrics of a GR-2 "
            "policy server. Errors are RFC 9457 problem details (application/problem+json). "
            "The control path (StreamActions, Act) is gRPC."
        ),
    )
    metrics = service.metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(f"{request.method} {path}", str(response.status_code)).inc()
        return response

    # Outside the request counting: a refused upload never reaches the app.
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    # Outermost (added last): an unauthenticated or rate-limited request is answered 401/429
    # before the upload limit, the counting or any handler sees it.
    if guard is not None and guard.active:
        app.add_middleware(RestAccessMiddleware, guard=guard)

    @app.exception_handler(GR2Error)
    async def gr2_error(_: Request, err: GR2Error) -> JSONResponse:
        name = type(err).__name__
        return problem(http_status(err), str(err), type_=error_type(name), code=name)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        detail = "; ".join(problems) or "invalid request"
        return problem(422, detail, type_=error_type("InvalidInputError"), code="InvalidInput")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return problem(err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("internal_error", ref=ref, exc_info=err)
        return problem(500, f"internal server error (reference {ref})", reference=ref)

    if guard is not None and guard.keyring is not None:
        app.openapi = lambda: add_openapi_security(_problem_openapi(app))  # type: ignore[method-assign]
    else:
        app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse(_PLACEHOLDER_PAGE)

    @app.get("/v1/samples", response_model=SampleList, summary="Sample scenes to try")
    async def samples() -> SampleList:
        return load_samples()

    add_video_routes(app, service)

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up, not draining")
    async def readyz() -> JSONResponse:
        store_ok = await service.store.ping()
        ready = readiness.ready and not readiness.draining
        body = {"ready": ready, "draining": readiness.draining, "store": store_ok}
        return JSONResponse(status_code=200 if ready else 503, content=body)

    @app.get("/v1/info", response_model=InfoOut, summary="The served model")
    async def info() -> InfoOut:
        i = service.info
        return InfoOut(
            model_name=i.model_name,
            model_version=i.model_version,
            preset=i.preset,
            views=[ViewOut(**asdict(v)) for v in i.views],
            action_horizon=i.action_horizon,
            waypoint_dt_s=i.waypoint_dt_s,
            history=i.history,
            protocol_version=PROTOCOL_VERSION,
            server_version=__version__,
        )

    @app.get("/v1/episodes", response_model=EpisodeList, summary="Recent episodes, newest first")
    async def list_episodes(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        status: EpisodeStatus | None = None,
    ) -> EpisodeList:
        return EpisodeList(episodes=await service.list_episodes(limit, status))

    @app.get(
        "/v1/episodes/{episode_id}",
        response_model=EpisodeRecord,
        summary="One episode's state and metrics",
        responses={
            404: {
                "description": "unknown episode",
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        },
    )
    async def get_episode(episode_id: str) -> EpisodeRecord:
        return await service.get_episode(episode_id)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
