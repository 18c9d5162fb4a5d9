"""The one place where typed errors become gRPC status codes and HTTP status codes."""

from __future__ import annotations

import grpc

from gr2_policy import errors

_GRPC: list[tuple[type[errors.GR2Error], grpc.StatusCode]] = [
    (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.EpisodeNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.EpisodeEndedError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.SeqConflictError, grpc.StatusCode.ABORTED),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreError, grpc.StatusCode.UNAVAILABLE),
    (errors.CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
]

_HTTP: list[tuple[type[errors.GR2Error], int]] = [
    (errors.InvalidInputError, 400),
    (errors.EpisodeNotFoundError, 404),
    (errors.EpisodeEndedError, 409),
    (errors.SeqConflictError, 409),
    (errors.ResourceExhaustedError, 429),
    (errors.UnavailableError, 503),
    (errors.StoreError, 503),
    (errors.CheckpointError, 500),
]


def grpc_status(err: errors.GR2Error) -> grpc.StatusCode:
    for cls, code in _GRPC:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def http_status(err: errors.GR2Error) -> int:
    for cls, code in _HTTP:
        if isinstance(err, cls):
            return code
    return 500
