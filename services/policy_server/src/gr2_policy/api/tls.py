"""gRPC server TLS and mutual TLS from PEM files (GR2_TLS_CERT_FILE, GR2_TLS_KEY_FILE,
GR2_TLS_CLIENT_CA_FILE). See docs/security.md.

The files are read and checked once at startup with the standard library's ``ssl`` module
(the certificate and key parse and belong together, the CA bundle holds certificates), so a
bad setting stops the server with a one-line message instead of failing every handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gr2_policy.errors import GR2Error


class TlsSettingsError(GR2Error):
    """The TLS settings are incomplete or a file is unusable (the server exits with 2)."""


@dataclass(frozen=True)
class ServerTls:
    """The PEM bytes gRPC's server credentials are made of."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @property
    def mode(self) -> str:
        return "mutual TLS" if self.mutual else "TLS"

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TlsSettingsError(f"{setting}: cannot read {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise TlsSettingsError(f"{setting}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKeyError


def load_server_tls(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
) -> ServerTls | None:
    """The server's TLS material, or None when TLS is off; raises :class:`TlsSettingsError`
    for a certificate without a key (or the reverse), a client CA without a server
    certificate, an unreadable file, or a certificate and key that do not belong together."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise TlsSettingsError(
                "GR2_TLS_CLIENT_CA_FILE (mutual TLS) needs the server's own certificate: set "
                "GR2_TLS_CERT_FILE and GR2_TLS_KEY_FILE too"
            )
        return None
    if cert_file is None or key_file is None:
        given, missing = (
            ("GR2_TLS_CERT_FILE", "GR2_TLS_KEY_FILE")
            if key_file is None
            else ("GR2_TLS_KEY_FILE", "GR2_TLS_CERT_FILE")
        )
        raise TlsSettingsError(f"{given} is set but {missing} is not: TLS needs both")
    chain = _read(cert_file, "GR2_TLS_CERT_FILE")
    key = _read(key_file, "GR2_TLS_KEY_FILE")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKeyError:
        raise TlsSettingsError(
            f"GR2_TLS_KEY_FILE {key_file} is encrypted: gRPC needs an unencrypted PEM key "
            "(openssl pkey -in KEY -out PLAIN_KEY; keep it readable by this user only)"
        ) from None
    except ssl.SSLError as err:
        raise TlsSettingsError(
            f"GR2_TLS_CERT_FILE {cert_file} and GR2_TLS_KEY_FILE {key_file} cannot be used "
            f"together: {err.reason or err}"
        ) from None
    client_ca = None
    if client_ca_file is not None:
        client_ca = _read(client_ca_file, "GR2_TLS_CLIENT_CA_FILE")
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as err:
            raise TlsSettingsError(
                f"GR2_TLS_CLIENT_CA_FILE {client_ca_file}: not a CA certificate bundle: "
                f"{err.reason or err}"
            ) from None
    return ServerTls(chain, key, client_ca)
