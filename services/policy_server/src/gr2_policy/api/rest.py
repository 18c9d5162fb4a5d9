"""REST API (FastAPI): health, readiness, model info, episodes, Prometheus metrics.

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with the status code from
api.status; unexpected errors return 500 with a reference id, never a traceback.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from gr2_policy import __version__
from gr2_policy.api.protocol import PROTOCOL_VERSION
from gr2_policy.api.service import EpisodeService
from gr2_policy.api.status import http_status
from gr2_policy.errors import GR2Error
from gr2_policy.logs import get_logger
from gr2_policy.state import EpisodeRecord, EpisodeStatus

log = get_logger("gr2_policy.rest")


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


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


def create_app(service: EpisodeService, readiness: Readiness) -> FastAPI:
    app = FastAPI(
        title="GR-2 Serve policy server",
        version=__version__,
        description="Model info, episode state, health and metrics of a GR-2 policy server.",
    )
    metrics = service.metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(f"{request.method} {path}", str(response.status_code)).inc()
        return response

    @app.exception_handler(GR2Error)
    async def gr2_error(_: Request, err: GR2Error) -> JSONResponse:
        return _error(http_status(err), type(err).__name__, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "InvalidInput", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("internal_error", ref=ref, exc_info=err)
        return _error(500, "Internal", f"internal server error (reference {ref})")

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
        responses={404: {"description": "unknown episode"}},
    )
    async def get_episode(episode_id: str) -> EpisodeRecord:
        return await service.get_episode(episode_id)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
