"""Typed errors of the policy server.

Every layer raises one of these; the API layer maps them to gRPC status codes and HTTP
status codes in exactly one place (``gr2_policy.api.status``). Messages are written for the
client: they say what was wrong and what to do, and never carry a traceback.
"""

from __future__ import annotations


class GR2Error(Exception):
    """Base class of all policy-server errors."""


class InvalidInputError(GR2Error):
    """Bad shape, encoding, size or a non-finite value (INVALID_ARGUMENT / 400)."""


class EpisodeNotFoundError(GR2Error):
    """The episode id is unknown (NOT_FOUND / 404)."""


class EpisodeNotResidentError(EpisodeNotFoundError):
    """The engine holds no cache for a live episode (evicted, or started on another
    replica): the caller rebuilds it from the episode store's step records."""


class EpisodeEndedError(GR2Error):
    """A step or end on an episode that has already ended (FAILED_PRECONDITION / 409)."""


class SeqConflictError(GR2Error):
    """An observation's seq is not the next one expected (ABORTED / 409)."""


class ResourceExhaustedError(GR2Error):
    """Cache pool full or rate limit hit (RESOURCE_EXHAUSTED / 429)."""


class UnavailableError(GR2Error):
    """The server is draining or not ready (UNAVAILABLE / 503)."""


class DrainingError(UnavailableError):
    """The server is shutting down: continue on another replica (UNAVAILABLE / 503)."""


class StoreError(GR2Error):
    """The episode store failed (e.g. Redis unreachable)."""


class CheckpointError(GR2Error):
    """A checkpoint is missing, malformed, or disagrees with its config."""
