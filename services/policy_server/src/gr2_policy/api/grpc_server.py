"""gr2.v1.PolicyService over grpc.aio, plus standard health and reflection services.

Handlers validate and decode, call the EpisodeService, and map typed errors to status codes
(api.status). Unexpected errors are logged with a reference id and reported as INTERNAL with
that id only: never a traceback to the client.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gr2_policy.api.protocol import PROTOCOL_VERSION
from gr2_policy.api.service import EpisodeService, StepResult
from gr2_policy.api.status import grpc_status
from gr2_policy.api.validation import (
    MAX_ID_BYTES,
    MAX_INSTRUCTION_BYTES,
    MAX_NOTE_BYTES,
    check_text,
    decode_observation,
    decode_video_request,
)
from gr2_policy.engine.interface import ViewInfo
from gr2_policy.errors import GR2Error, InvalidInputError
from gr2_policy.logs import get_logger
from gr2_policy.state import EpisodeOutcome

log = get_logger("gr2_policy.grpc")
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name

_OUTCOMES = {
    pb.EPISODE_OUTCOME_UNSPECIFIED: EpisodeOutcome.UNSPECIFIED,
    pb.EPISODE_OUTCOME_SUCCESS: EpisodeOutcome.SUCCESS,
    pb.EPISODE_OUTCOME_FAILURE: EpisodeOutcome.FAILURE,
    pb.EPISODE_OUTCOME_ABORTED: EpisodeOutcome.ABORTED,
}


def frame_image(view: ViewInfo, rgb: np.ndarray) -> pb.Image:
    """A predicted (H, W, 3) uint8 frame of one view as a RAW_RGB8 Image."""
    return pb.Image(
        view=view.name,
        encoding=pb.IMAGE_ENCODING_RAW_RGB8,
        width=view.width,
        height=view.height,
        data=np.ascontiguousarray(rgb).tobytes(),
    )


def chunk_to_proto(
    result: StepResult, model_version: str, views: Sequence[ViewInfo] = ()
) -> pb.TrajectoryChunk:
    """The wire form of a step result (``views``: the served views, for a predicted frame)."""
    c = result.chunk
    predicted = []
    if result.predicted_frame is not None:
        predicted = [frame_image(v, result.predicted_frame[i]) for i, v in enumerate(views)]
    return pb.TrajectoryChunk(
        predicted_images=predicted,
        episode_id=result.episode_id,
        seq=result.seq,
        waypoints=[
            pb.Waypoint(
                time_offset_s=float(c.time_offsets_s[i]),
                position=c.positions[i],
                quat_wxyz=c.quats_wxyz[i],
                gripper=float(c.grippers[i]),
            )
            for i in range(len(c.time_offsets_s))
        ],
        model_version=model_version,
        queue_time_s=c.queue_time_s,
        compute_time_s=c.compute_time_s,
        server_time_s=result.server_time_s,
    )


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, service: EpisodeService, max_message_bytes: int) -> None:
        self.service = service
        self.max_message_bytes = max_message_bytes

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.service.metrics.requests.labels(method, code.name).inc()

    def _failure(self, method: str, err: Exception) -> tuple[grpc.StatusCode, str]:
        if isinstance(err, GR2Error):
            return grpc_status(err), str(err)
        ref = uuid.uuid4().hex[:12]
        log.error("internal_error", method=method, ref=ref, exc_info=err)
        return grpc.StatusCode.INTERNAL, f"internal server error (reference {ref})"

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            reply = await fn()
        except Exception as err:  # noqa: BLE001 - the one place errors become statuses
            code, details = self._failure(method, err)
            self._count(method, code)
            await context.abort(code, details)
        self._count(method, grpc.StatusCode.OK)
        return reply

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        async def run() -> pb.ServerInfo:
            info = self.service.info
            return pb.ServerInfo(
                model_name=info.model_name,
                model_version=info.model_version,
                preset=info.preset,
                views=[
                    pb.ViewSpec(name=v.name, width=v.width, height=v.height) for v in info.views
                ],
                action_horizon=info.action_horizon,
                waypoint_dt_s=info.waypoint_dt_s,
                history=info.history,
                protocol_version=PROTOCOL_VERSION,
                max_message_bytes=self.max_message_bytes,
            )

        return await self._unary("GetServerInfo", context, run)

    async def StartEpisode(
        self, request: pb.StartEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartEpisodeResponse:
        async def run() -> pb.StartEpisodeResponse:
            instruction = check_text(
                "instruction", request.instruction, MAX_INSTRUCTION_BYTES, required=True
            )
            robot_id = check_text("robot_id", request.robot_id, MAX_ID_BYTES)
            key = check_text("idempotency_key", request.idempotency_key, MAX_ID_BYTES)
            record = await self.service.start_episode(instruction, robot_id, key or None)
            return pb.StartEpisodeResponse(episode_id=record.episode_id)

        return await self._unary("StartEpisode", context, run)

    async def _step(self, obs: pb.Observation) -> pb.TrajectoryChunk:
        check_text("episode_id", obs.episode_id, MAX_ID_BYTES, required=True)
        step = decode_observation(obs, self.service.info.views)
        result = await self.service.step(obs.episode_id, obs.seq, step, obs.predict_video)
        info = self.service.info
        return chunk_to_proto(result, info.model_version, info.views)

    async def Act(
        self, request: pb.Observation, context: grpc.aio.ServicerContext
    ) -> pb.TrajectoryChunk:
        return await self._unary("Act", context, lambda: self._step(request))

    async def StreamActions(
        self,
        request_iterator: AsyncIterator[pb.Observation],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TrajectoryChunk]:
        method = "StreamActions"
        failure: tuple[grpc.StatusCode, str] | None = None
        t0 = time.perf_counter()
        try:
            async for obs in request_iterator:
                yield await self._step(obs)
        except Exception as err:  # noqa: BLE001 - the one place errors become statuses
            failure = self._failure(method, err)
        await self._end_stream(method, context, failure)
        log.debug("stream_closed", seconds=round(time.perf_counter() - t0, 3))

    async def PredictVideo(
        self, request: pb.PredictVideoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictedFrame]:
        """Each predicted frame as soon as it is decoded, one RAW_RGB8 image per view."""
        method = "PredictVideo"
        views = self.service.info.views
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            video = decode_video_request(request, views)
            index = 0
            async for frame in self.service.predict_video(video):
                yield pb.PredictedFrame(
                    frame_index=index,
                    images=[frame_image(view, frame[i]) for i, view in enumerate(views)],
                )
                index += 1
        except Exception as err:  # noqa: BLE001 - the one place errors become statuses
            failure = self._failure(method, err)
        await self._end_stream(method, context, failure)

    async def _end_stream(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        failure: tuple[grpc.StatusCode, str] | None,
    ) -> None:
        """Count a finished streaming call; abort it with its status when it failed."""
        if failure is not None:
            self._count(method, failure[0])
            await context.abort(*failure)
        self._count(method, grpc.StatusCode.OK)

    async def EndEpisode(
        self, request: pb.EndEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndEpisodeResponse:
        async def run() -> pb.EndEpisodeResponse:
            check_text("episode_id", request.episode_id, MAX_ID_BYTES, required=True)
            note = check_text("note", request.note, MAX_NOTE_BYTES)
            outcome = _OUTCOMES.get(request.outcome)
            if outcome is None:
                raise InvalidInputError(f"unknown outcome {request.outcome}")
            record = await self.service.end_episode(request.episode_id, outcome, note)
            return pb.EndEpisodeResponse(episode_id=record.episode_id, steps=record.steps)

        return await self._unary("EndEpisode", context, run)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Accept client keepalive pings down to every 10 s (clients ping every 20 s).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    """The grpc.aio server with PolicyService, health and reflection."""

    def __init__(
        self, service: EpisodeService, host: str, port: int, max_message_bytes: int
    ) -> None:
        self.server = grpc.aio.server(options=server_options(max_message_bytes))
        pb_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(service, max_message_bytes), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {host}:{port}")

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
