"""API keys and per-key rate limits, shared by gRPC (a server interceptor) and REST (an ASGI
middleware). See docs/security.md.

- :class:`KeyRing` parses ``GR2_API_KEYS`` (``KEY`` or ``NAME:KEY`` entries) and verifies a
  presented key. It keeps only SHA-256 digests of the keys, compared with
  :func:`hmac.compare_digest` (equal-length digests: no timing signal about the key or its
  length), and names each key: the given name, or ``key-`` + 8 hex digits of its digest.
- :class:`RateLimiter` is a token bucket per API key name (per client address when no keys
  are configured), shared by both transports.
- :class:`AccessGuard` puts the two together and counts refusals in Prometheus
  (``gr2_policy_auth_failures_total{reason}``, ``gr2_policy_rate_limited_total{key}``).
- :class:`GrpcAccessInterceptor` refuses a call before its handler is entered (UNAUTHENTICATED,
  RESOURCE_EXHAUSTED); :class:`RestAccessMiddleware` answers 401 / 429 problem details before
  the request body is read. Exempt: gRPC health; REST health, metrics, the page, its static
  files and the API docs. Reflection needs a key like the PolicyService (it describes the API).
- StreamActions is charged per observation, not per call: the servicer calls
  :func:`charge_stream_observation` for each one.

A key never reaches a log line, a metric or an error message; only its name does.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from gr2_policy.api.problems import error_type, problem
from gr2_policy.errors import GR2Error, ResourceExhaustedError
from gr2_policy.logs import get_logger

if TYPE_CHECKING:
    from gr2_policy.metrics import PolicyMetrics
    from gr2_policy.settings import ServerSettings

log = get_logger("gr2_policy.auth")

Transport = Literal["grpc", "http"]
Reason = Literal["missing", "malformed", "invalid"]

#: gRPC services callable without a key: Kubernetes probes carry none.
GRPC_EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health"})
#: gRPC methods charged per request message instead of per call.
GRPC_PER_MESSAGE_METHODS = frozenset({"/gr2.v1.PolicyService/StreamActions"})
#: REST paths open without a key: probes, Prometheus, the page and the API docs. Everything
#: else (every /v1 route, and any route added later) needs one.
HTTP_EXEMPT_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
)
HTTP_EXEMPT_PREFIXES = ("/static/",)
#: Keys shorter than this are accepted with a startup warning.
MIN_RECOMMENDED_KEY_LENGTH = 16
#: Buckets kept at most; the least recently used goes first (a full bucket is a new one).
MAX_BUCKETS = 10_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeySettingsError(GR2Error, ValueError):
    """GR2_API_KEYS or the rate limit settings cannot be used (the server exits with 2)."""


class Unauthenticated(Exception):  # noqa: N818 - named after the status it becomes
    """The caller sent no key, a malformed authorization value, or an unknown key."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class RateLimitedError(ResourceExhaustedError):
    """Over the per-key rate limit (RESOURCE_EXHAUSTED / 429)."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for Retry-After (at least 1)."""
        return str(max(1, math.ceil(self.retry_after_s)))


def key_id(key: str) -> str:
    """A short, non-reversible name for an unnamed key: ``key-`` + 8 hex digits of SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class _Key:
    name: str
    digest: bytes = field(repr=False)
    short: bool = False


class KeyRing:
    """The configured API keys, as names and SHA-256 digests (the keys are not kept)."""

    def __init__(self, keys: Sequence[_Key]) -> None:
        self._keys = tuple(keys)

    @classmethod
    def parse(cls, entries: Iterable[str | SecretStr]) -> KeyRing:
        """Entries are ``KEY`` or ``NAME:KEY`` (the name: letters, digits, ``_.-``, at most
        64). Raises :class:`KeySettingsError` (naming the entry by position or name, never
        showing a key) for an empty key, a bad name, whitespace inside a key, or a name or
        key given twice."""
        keys: list[_Key] = []
        for position, entry in enumerate(entries, start=1):
            raw = entry.get_secret_value() if isinstance(entry, SecretStr) else entry
            raw = raw.strip()
            if not raw:
                continue
            name, sep, key = raw.partition(":")
            if sep:
                name, key = name.strip(), key.strip()
                if not _NAME.match(name):
                    raise KeySettingsError(
                        f"GR2_API_KEYS entry {position}: the name before ':' must be 1-64 "
                        "letters, digits, '_', '.' or '-', starting with a letter or digit"
                    )
                label = f"GR2_API_KEYS entry {position} ({name})"
            else:
                name, key = key_id(raw), raw
                label = f"GR2_API_KEYS entry {position}"
            if not key:
                raise KeySettingsError(f"{label}: the key is empty")
            if any(ch.isspace() for ch in key) or not key.isprintable():
                raise KeySettingsError(f"{label}: the key contains whitespace or control chars")
            digest = _digest(key)
            for other in keys:
                if other.name == name:
                    raise KeySettingsError(f"{label}: the name {name!r} is used twice")
                if hmac.compare_digest(other.digest, digest):
                    raise KeySettingsError(f"{label}: the same key as {other.name!r}")
            keys.append(_Key(name, digest, short=len(key) < MIN_RECOMMENDED_KEY_LENGTH))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing(names={list(self.names)!r})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self._keys)

    @property
    def short_names(self) -> tuple[str, ...]:
        """Names of keys shorter than :data:`MIN_RECOMMENDED_KEY_LENGTH` (guessable)."""
        return tuple(k.name for k in self._keys if k.short)

    def verify(self, presented: str) -> str | None:
        """The name of the key ``presented`` is, or None. Compares against every key (no
        early exit) so the time does not say which key was close."""
        digest = _digest(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found

    def authenticate(self, authorization: str | None, transport: Transport) -> str:
        """The key name for an ``authorization`` value (``Bearer KEY``), or raises
        :class:`Unauthenticated` with a message for the client."""
        if authorization is None or not authorization.strip():
            where = (
                "metadata 'authorization: Bearer <key>'"
                if transport == "grpc"
                else "the header 'Authorization: Bearer <key>'"
            )
            raise Unauthenticated("missing", f"missing API key: send {where}")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "malformed", "malformed authorization: expected 'Bearer <key>' (an API key)"
            )
        name = self.verify(token)
        if name is None:
            raise Unauthenticated("invalid", "invalid API key")
        return name


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets: ``rps`` tokens per second up to ``burst``, one bucket per caller.

    Each call (and each StreamActions observation) takes a token; with none left the call is
    refused and told how long until the next one. Buckets are kept for the
    :data:`MAX_BUCKETS` most recent callers; a forgotten caller starts again with a full
    bucket, which is what an idle one would have had anyway.
    """

    def __init__(
        self,
        rps: float,
        burst: int = 0,
        *,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (rps > 0 and math.isfinite(rps)):
            raise KeySettingsError(f"GR2_RATE_LIMIT_RPS must be a positive number, got {rps}")
        self.rps = float(rps)
        self.burst = burst if burst > 0 else max(1, math.ceil(rps))
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def describe(self) -> str:
        return f"{self.rps:g} requests/s with bursts of {self.burst}"

    def acquire(self, caller: str) -> float:
        """Take a token for ``caller``: 0.0 when granted, else the seconds until one is."""
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[caller] = bucket
            while len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rps)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rps


def client_address(peer: str | None) -> str:
    """The host part of a gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``) or an
    HTTP client address: connections from one host share a bucket."""
    if not peer:
        return "unknown"
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    if rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    return rest.rsplit(":", 1)[0]


class AccessGuard:
    """What both transports ask before a call runs: who is calling, and may they now."""

    def __init__(
        self,
        keyring: KeyRing | None,
        limiter: RateLimiter | None,
        metrics: PolicyMetrics | None = None,
    ) -> None:
        self.keyring = keyring if keyring else None  # an empty ring means no authentication
        self.limiter = limiter
        self.metrics = metrics

    @classmethod
    def from_settings(
        cls, settings: ServerSettings, metrics: PolicyMetrics | None = None
    ) -> AccessGuard:
        """Raises :class:`KeySettingsError` for unusable keys or limits."""
        keyring = KeyRing.parse(settings.api_keys)
        limiter = None
        if settings.rate_limit_rps > 0:
            limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        return cls(keyring, limiter, metrics)

    @property
    def active(self) -> bool:
        return self.keyring is not None or self.limiter is not None

    def describe(self) -> dict[str, Any]:
        """For the startup log: key names (never keys) and the limit."""
        return {
            "auth": f"api keys {list(self.keyring.names)}" if self.keyring else "off",
            "rate_limit": (
                f"{self.limiter.describe()} per {'key' if self.keyring else 'client address'}"
                if self.limiter
                else "off"
            ),
        }

    def log_startup(self, host: str, *, tls_on: bool) -> None:
        """One warning per risk at startup: no keys at all, guessable keys, keys sent in
        cleartext beyond this machine."""
        if self.keyring is None:
            log.warning(
                "unauthenticated",
                message="no API keys are configured (GR2_API_KEYS): anyone who can reach "
                "the gRPC and HTTP ports can call every RPC and /v1 route",
            )
            return
        if self.keyring.short_names:
            log.warning(
                "short_api_keys",
                keys=list(self.keyring.short_names),
                message=f"API keys shorter than {MIN_RECOMMENDED_KEY_LENGTH} characters can "
                "be guessed: use e.g. `openssl rand -hex 32`",
            )
        if not tls_on and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "cleartext_api_keys",
                host=host,
                message="API keys are checked but gRPC is not TLS (GR2_TLS_CERT_FILE): keys "
                "cross the network in cleartext",
            )

    def authenticate(
        self, authorization: str | None, transport: Transport, what: str
    ) -> str | None:
        """The caller's key name (None when keys are off); raises :class:`Unauthenticated`
        after counting and logging the refusal (``what``: the method or path)."""
        if self.keyring is None:
            return None
        try:
            return self.keyring.authenticate(authorization, transport)
        except Unauthenticated as err:
            if self.metrics is not None:
                self.metrics.auth_failures.labels(err.reason).inc()
            log.info("auth_failed", transport=transport, call=what, reason=err.reason)
            raise

    def charge(self, key_name: str | None, peer: str | None) -> None:
        """Take one request from the caller's budget or raise :class:`RateLimitedError`."""
        if self.limiter is None:
            return
        caller = key_name if key_name is not None else "addr:" + client_address(peer)
        wait = self.limiter.acquire(caller)
        if wait <= 0:
            return
        label = key_name if key_name is not None else "anonymous"
        if self.metrics is not None:
            self.metrics.rate_limited.labels(label).inc()
        who = f"API key {key_name!r}" if key_name is not None else "client address"
        raise RateLimitedError(
            f"rate limit exceeded: {self.limiter.describe()} per {who}; retry after {wait:.1f} s",
            wait,
        )


# ------------------------------------------------------------------------------ gRPC side

_STREAM_CHARGE: ContextVar[Callable[[], None] | None] = ContextVar(
    "gr2_stream_charge", default=None
)


def charge_stream_observation() -> None:
    """Charge one observation of the StreamActions call running in this task; raises
    :class:`RateLimitedError` over the limit. A no-op without a rate limit and outside
    StreamActions (Act is charged as a call)."""
    charge = _STREAM_CHARGE.get()
    if charge is not None:
        charge()


def _metadata_value(metadata: Sequence[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def _replace_behavior(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior swapped, for whichever of the four kinds it is."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner_behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _refusing(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    detail: str,
    trailing: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler:
    """A handler of the same kind that aborts at once (the real one is never entered)."""
    if handler.response_streaming:

        async def refuse_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(code, detail, trailing)
            yield  # pragma: no cover - abort raises; this makes the function a generator

        return _replace_behavior(handler, refuse_stream)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, detail, trailing)

    return _replace_behavior(handler, refuse)


def _rate_limited(
    handler: grpc.RpcMethodHandler, guard: AccessGuard, key_name: str | None, per_message: bool
) -> grpc.RpcMethodHandler:
    """``handler`` charging the caller's bucket (the peer is only known inside the call, so
    the check runs in a thin wrapper): once per call, or for ``per_message`` methods once per
    request message, through :func:`charge_stream_observation` in the servicer."""
    inner = _inner_behavior(handler)

    async def admit(context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        if per_message:
            _STREAM_CHARGE.set(lambda: guard.charge(key_name, peer))
            return
        try:
            guard.charge(key_name, peer)
        except RateLimitedError as err:
            trailing = (("retry-after", err.retry_after_header),)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), trailing)

    if handler.response_streaming:

        async def limited_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await admit(context)
            result = inner(request, context)
            if inspect.isasyncgen(result):
                try:
                    async for message in result:
                        yield message
                finally:  # a cancelled call closes the handler now (its finally runs), not at GC
                    await result.aclose()
            elif inspect.isawaitable(result):  # a handler that writes with context.write()
                await result

        return _replace_behavior(handler, limited_stream)

    async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        return await inner(request, context)

    return _replace_behavior(handler, limited)


class GrpcAccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key (from the call's metadata) and the rate limit of every call but
    gRPC health, before the handler is entered."""

    def __init__(self, guard: AccessGuard) -> None:
        self.guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.lstrip("/").split("/", 1)[0] in GRPC_EXEMPT_SERVICES:
            return handler  # unknown method: UNIMPLEMENTED, as without the interceptor
        metadata = handler_call_details.invocation_metadata
        try:
            key_name = self.guard.authenticate(
                _metadata_value(metadata, "authorization"), "grpc", method
            )
        except Unauthenticated as err:
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, err.detail)
        if self.guard.limiter is None:
            return handler
        return _rate_limited(handler, self.guard, key_name, method in GRPC_PER_MESSAGE_METHODS)


# ------------------------------------------------------------------------------ REST side


def http_exempt(path: str) -> bool:
    return path in HTTP_EXEMPT_PATHS or path.startswith(HTTP_EXEMPT_PREFIXES)


class RestAccessMiddleware:
    """ASGI middleware: 401 (``WWW-Authenticate: Bearer``) or 429 (``Retry-After``) problem
    details for every path but the exempt ones, before the request body is read."""

    def __init__(self, app: ASGIApp, guard: AccessGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or http_exempt(path):
            await self.app(scope, receive, send)
            return
        authorization = None
        for k, v in scope.get("headers") or ():
            if k == b"authorization":
                authorization = v.decode("latin-1")
                break
        try:
            key_name = self.guard.authenticate(authorization, "http", path)
            client = scope.get("client")
            self.guard.charge(key_name, client[0] if client else None)
        except Unauthenticated as err:
            challenge = 'Bearer realm="gr2-policy"'
            if err.reason != "missing":
                challenge += ', error="invalid_token"'
            response = problem(
                401,
                err.detail,
                type_=error_type("UnauthenticatedError"),
                code="UnauthenticatedError",
                headers={"WWW-Authenticate": challenge},
            )
        except RateLimitedError as err:
            response = problem(
                429,
                str(err),
                type_=error_type("RateLimitedError"),
                code="RateLimitedError",
                headers={"Retry-After": err.retry_after_header},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def add_openapi_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Document the bearer key on every operation that needs one (so /docs can send it)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key of GR2_API_KEYS",
    }
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path, operations in schema.get("paths", {}).items():
        if http_exempt(path):
            continue
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}]
            responses = operation.setdefault("responses", {})
            for status, text in (("401", "missing or invalid API key"), ("429", "rate limited")):
                responses.setdefault(
                    status,
                    {
                        "description": text,
                        "content": {"application/problem+json": {"schema": problem_ref}},
                    },
                )
    return schema
