"""gr2.v1.PolicyService over grpc.aio, plus standard health and reflection services.

Handlers validate and decode, call the EpisodeService, and map typed errors to status codes
(api.status). Unexpected errors are logged with a reference id and reported as INTERNAL with
that id only: never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gr2_policy.api.auth import AccessGuard, GrpcAccessInterceptor, charge_stream_observation
from gr2_policy.api.protocol import PROTOCOL_VERSION
from gr2_policy.api.service import EpisodeService, StepResult
from gr2_policy.api.status import grpc_status
from gr2_policy.api.tls import ServerTls
from gr2_policy.api.validation import (
    MAX_ID_BYTES,
    MAX_INSTRUCTION_BYTES,
    MAX_NOTE_BYTES,
    check_text,
    decode_observation,
    decode_video_request,
    parse_message,
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
        self.open_streams = 0  # StreamActions calls in progress (the drain waits for them)

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
        charge_stream_observation()  # the rate limit counts each observation of a stream
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
        """One chunk per observation, in order. When the server starts draining, a stream
        waiting for its next observation is ended at once with UNAVAILABLE (a step in
        progress is answered first), which tells the robot to continue elsewhere."""
        method = "StreamActions"
        failure: tuple[grpc.StatusCode, str] | None = None
        t0 = time.perf_counter()
        self.open_streams += 1
        try:
            observations = aiter(request_iterator)
            while (obs := await self._next_or_drain(observations)) is not None:
                yield await self._step(obs)
        except Exception as err:  # noqa: BLE001 - the one place errors become statuses
            failure = self._failure(method, err)
        finally:
            self.open_streams -= 1
        await self._end_stream(method, context, failure)
        log.debug("stream_closed", seconds=round(time.perf_counter() - t0, 3))

    async def _next_or_drain(
        self, observations: AsyncIterator[pb.Observation]
    ) -> pb.Observation | None:
        """The stream's next observation (None at its end); DrainingError once the server
        drains, even while the client is between observations."""
        draining = self.service.draining
        if draining.is_set():
            self.service.check_accepting("continue the episode")
        read = asyncio.ensure_future(anext(observations))
        drain = asyncio.ensure_future(draining.wait())
        try:
            await asyncio.wait({read, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if not read.done():
            read.cancel()
            self.service.check_accepting("continue the episode")
        try:
            return read.result()
        except StopAsyncIteration:
            return None

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


class _MalformedRequest:
    """What a unary method gets in place of a request whose wire bytes do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInputError) -> None:
        self.error = error


def _deserializer(cls: type[Message], *, client_streaming: bool) -> Callable[[bytes], Any]:
    """Parse requests of ``cls``. In a request stream a bad message raises InvalidInputError
    inside the handler's read, where its ``except`` maps it; grpc would answer a unary
    request whose parsing raises with UNKNOWN and the parser's text, so that request becomes
    a _MalformedRequest that the handler refuses instead."""

    def parse(data: bytes) -> Any:
        try:
            return parse_message(cls, data)
        except InvalidInputError as err:
            if client_streaming:
                raise
            return _MalformedRequest(err)

    return parse


def _refuse_malformed(
    servicer: PolicyServicer, method: str, behavior: Callable[..., Any], *, streaming: bool
) -> Callable[..., Any]:
    """``behavior`` behind a check that answers a _MalformedRequest with INVALID_ARGUMENT."""

    async def refuse(request: _MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        servicer._count(method, grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _MalformedRequest):
            await refuse(request, context)
        return await behavior(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _MalformedRequest):
            await refuse(request, context)
        async for reply in behavior(request, context):
            yield reply

    return stream if streaming else unary


def add_policy_service(servicer: PolicyServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_PolicyServiceServicer_to_server``,
    except that a request whose wire bytes do not parse (corrupt encoding, a string field
    that is not UTF-8) is answered INVALID_ARGUMENT rather than grpc's UNKNOWN."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["PolicyService"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        codec: dict[str, Any] = {
            "request_deserializer": _deserializer(
                request_cls, client_streaming=method.client_streaming
            ),
            "response_serializer": response_cls.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(behavior, **codec)
        elif method.client_streaming:
            handler = grpc.stream_unary_rpc_method_handler(behavior, **codec)
        else:
            wrapped = _refuse_malformed(
                servicer, method.name, behavior, streaming=method.server_streaming
            )
            factory = (
                grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handler = factory(wrapped, **codec)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Accept client keepalive pings down to every 10 s (clients ping every 20 s).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


def _bind(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Bind ``address`` (TLS when given); raises OSError when it cannot be bound."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError as err:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind gRPC to {address}: {err}") from None
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return port


class GrpcServer:
    """The grpc.aio server with PolicyService, health and reflection.

    ``guard``: API keys and rate limits, checked by an interceptor before any handler but
    health. ``tls``: serve TLS (mutual TLS when it has a client CA); then health is also
    served in plaintext on ``health_port`` by a second server sharing the same
    HealthServicer, since Kubernetes' gRPC probes cannot speak TLS.
    """

    def __init__(
        self,
        service: EpisodeService,
        host: str,
        port: int,
        max_message_bytes: int,
        *,
        guard: AccessGuard | None = None,
        tls: ServerTls | None = None,
        health_port: int | None = None,
    ) -> None:
        interceptors = [GrpcAccessInterceptor(guard)] if guard is not None and guard.active else []
        self.server = grpc.aio.server(
            options=server_options(max_message_bytes), interceptors=interceptors
        )
        self.servicer = PolicyServicer(service, max_message_bytes)
        add_policy_service(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.tls = tls
        self.port = _bind(self.server, f"{host}:{port}", tls)
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if tls is not None and health_port is not None:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _bind(self.health_server, f"{host}:{health_port}", None)

    @property
    def security(self) -> str:
        """How the main port is served: plaintext, TLS or mutual TLS."""
        return "plaintext" if self.tls is None else self.tls.mode

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING on both ports, finish in-flight calls, then close the health port
        last so probes see NOT_SERVING while the main port drains."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(None)
