"""Client-side errors."""

from __future__ import annotations


class ClientError(Exception):
    """Base class of gr2_client errors (gRPC failures surface as grpc.RpcError)."""


class IncompatibleServerError(ClientError):
    """The server speaks another protocol version or expects other cameras."""
