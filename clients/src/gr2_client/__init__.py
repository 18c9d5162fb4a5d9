"""GR-2 Serve Python client (no torch): sync and asyncio clients over the gr2.v1 stubs."""

from gr2_client.aio import AsyncActionStream, AsyncPolicyClient
from gr2_client.client import PolicyClient
from gr2_client.convert import (
    Chunk,
    PredictedFrame,
    ServerDescription,
    chunk_from_proto,
    encode_image,
    frame_from_proto,
    make_observation,
    server_description,
)
from gr2_client.errors import ClientError, IncompatibleServerError
from gr2_client.failover import Backoff, FailoverClient, FailoverExhaustedError, parse_targets
from gr2_client.options import PROTOCOL_VERSION, channel_options
from gr2_client.tls import TlsConfig

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncActionStream",
    "AsyncPolicyClient",
    "Backoff",
    "Chunk",
    "ClientError",
    "FailoverClient",
    "FailoverExhaustedError",
    "IncompatibleServerError",
    "PolicyClient",
    "PredictedFrame",
    "ServerDescription",
    "TlsConfig",
    "channel_options",
    "chunk_from_proto",
    "encode_image",
    "frame_from_proto",
    "make_observation",
    "parse_targets",
    "server_description",
]
