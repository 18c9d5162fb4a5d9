"""Channel settings shared by the clients and the server (message limits, keepalive)."""

from __future__ import annotations

PROTOCOL_VERSION = "1.0"

# Raw camera frames exceed gRPC's 4 MiB default; both sides set the same explicit limit.
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# Client keepalive pings every 20 s; the server allows pings at most every 10 s, so a
# healthy client is never sent GOAWAY(too_many_pings).
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
