"""TLS (and mutual TLS) for the client's gRPC channel, from PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """How to reach a TLS policy server.

    ca_file: PEM bundle of the CA(s) that signed the server's certificate (None: the
    system's trusted roots). cert_file + key_file: this client's certificate and unencrypted
    key, for servers that require mutual TLS (give both or neither).
    server_name_override: the name to check the server's certificate against instead of the
    target's host (e.g. when dialling an IP address; for testing, not a security feature).
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "TLS client certificate and key go together: give both cert_file and key_file"
            )

    @property
    def mutual(self) -> bool:
        return self.cert_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now (raises OSError naming a file that cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments the credentials need (the server-name override, if any)."""
        if self.server_name_override:
            return [("grpc.ssl_target_name_override", self.server_name_override)]
        return []


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
