"""Synchronous client for the PolicyService."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc

from gr2_client.convert import (
    PredictedFrame,
    ServerDescription,
    encode_image,
    frame_from_proto,
    server_description,
)
from gr2_client.options import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from gr2_client.tls import TlsConfig


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def channel_arguments(
    max_message_bytes: int, tls: TlsConfig | None
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """Channel options and, with ``tls``, the channel credentials (None: plaintext)."""
    options: list[tuple[str, Any]] = [*channel_options(max_message_bytes)]
    if tls is None:
        return options, None
    return [*options, *tls.channel_options()], tls.channel_credentials()


class PolicyClient:
    """Blocking client. Use as a context manager or call close().

    target: "host:port". timeout_s applies to unary calls; streams have no deadline.
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
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._metadata = auth_metadata(api_key)
        self._timeout_s = timeout_s

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def server_info(self) -> ServerDescription:
        return server_description(self.server_info_proto())

    def server_info_proto(self) -> pb.ServerInfo:
        return self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )

    def start_episode(
        self, instruction: str, *, robot_id: str = "", idempotency_key: str = ""
    ) -> str:
        reply = self._stub.StartEpisode(
            pb.StartEpisodeRequest(
                instruction=instruction, robot_id=robot_id, idempotency_key=idempotency_key
            ),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
        return reply.episode_id

    def act(self, observation: pb.Observation) -> pb.TrajectoryChunk:
        return self._stub.Act(observation, timeout=self._timeout_s, metadata=self._metadata)

    def stream_actions(
        self, observations: Iterable[pb.Observation]
    ) -> Iterator[pb.TrajectoryChunk]:
        """One chunk per observation, in order. The iterator is consumed by gRPC's thread."""
        return self._stub.StreamActions(iter(observations), metadata=self._metadata)

    def predict_video(
        self,
        instruction: str,
        images: dict[str, np.ndarray],
        *,
        num_frames: int = 1,
        state: pb.RobotState | None = None,
        sampling: pb.Sampling | None = None,
        encoding: str = "raw",
    ) -> Iterator[PredictedFrame]:
        """The model's imagined next frames from one observation (images: view name ->
        (H, W, 3) uint8, the served views), each as soon as the server decodes it."""
        request = pb.PredictVideoRequest(
            instruction=instruction,
            images=[encode_image(name, rgb, encoding) for name, rgb in images.items()],
            state=state,
            num_frames=num_frames,
            sampling=sampling,
        )
        for msg in self._stub.PredictVideo(request, metadata=self._metadata):
            yield frame_from_proto(msg)

    def end_episode(
        self,
        episode_id: str,
        outcome: pb.EpisodeOutcome.ValueType = pb.EPISODE_OUTCOME_UNSPECIFIED,
        note: str = "",
    ) -> pb.EndEpisodeResponse:
        return self._stub.EndEpisode(
            pb.EndEpisodeRequest(episode_id=episode_id, outcome=outcome, note=note),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
