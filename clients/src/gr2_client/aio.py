"""asyncio client for the PolicyService (grpc.aio)."""

from __future__ import annotations

import asyncio

import grpc
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc

from gr2_client.client import auth_metadata, channel_arguments
from gr2_client.convert import ServerDescription, server_description
from gr2_client.options import DEFAULT_MAX_MESSAGE_BYTES
from gr2_client.tls import TlsConfig


class AsyncActionStream:
    """One open StreamActions call: ``await send(obs)`` then ``await recv()`` per step.

    The server answers every observation with exactly one chunk, in order.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def send(self, observation: pb.Observation) -> None:
        """Raises grpc.aio.AioRpcError with the call's status when the call has already
        ended (e.g. the server ended the stream while draining)."""
        try:
            await self._call.write(observation)
        except asyncio.InvalidStateError:
            raise grpc.aio.AioRpcError(
                await self._call.code(),
                await self._call.initial_metadata(),
                await self._call.trailing_metadata(),
                await self._call.details(),
            ) from None

    async def recv(self) -> pb.TrajectoryChunk:
        """The next chunk; raises grpc.aio.AioRpcError when the call failed, EOFError when the
        server closed the stream cleanly."""
        msg = await self._call.read()
        if msg is grpc.aio.EOF:
            raise EOFError("the server closed the action stream")
        return msg

    async def step(self, observation: pb.Observation) -> pb.TrajectoryChunk:
        await self.send(observation)
        return await self.recv()

    async def close(self) -> None:
        """Half-close our side and wait for the server to finish the call."""
        await self._call.done_writing()
        await self._call.wait_for_connection()
        await self._call.code()

    def cancel(self) -> None:
        self._call.cancel()


class AsyncPolicyClient:
    """asyncio client; create and use it inside one running event loop.

    api_key: sent as ``authorization: Bearer KEY``. tls: a :class:`TlsConfig` for a TLS
    (or mutual TLS) server; None: plaintext.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TlsConfig | None = None,
    ) -> None:
        self.target = target
        options, credentials = channel_arguments(max_message_bytes, tls)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._metadata = auth_metadata(api_key)
        self._timeout_s = timeout_s

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        import asyncio

        await asyncio.wait_for(self._channel.channel_ready(), timeout_s)

    async def server_info(self) -> ServerDescription:
        info = await self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return server_description(info)

    async def start_episode(
        self, instruction: str, *, robot_id: str = "", idempotency_key: str = ""
    ) -> str:
        reply = await self._stub.StartEpisode(
            pb.StartEpisodeRequest(
                instruction=instruction, robot_id=robot_id, idempotency_key=idempotency_key
            ),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
        return reply.episode_id

    async def act(self, observation: pb.Observation) -> pb.TrajectoryChunk:
        return await self._stub.Act(observation, timeout=self._timeout_s, metadata=self._metadata)

    def open_stream(self) -> AsyncActionStream:
        return AsyncActionStream(self._stub.StreamActions(metadata=self._metadata))

    async def end_episode(
        self,
        episode_id: str,
        outcome: pb.EpisodeOutcome.ValueType = pb.EPISODE_OUTCOME_UNSPECIFIED,
        note: str = "",
    ) -> pb.EndEpisodeResponse:
        return await self._stub.EndEpisode(
            pb.EndEpisodeRequest(episode_id=episode_id, outcome=outcome, note=note),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
