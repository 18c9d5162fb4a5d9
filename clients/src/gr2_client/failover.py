"""A client that keeps an episode going across server failures (asyncio).

Robots hold one episode for minutes; the replica serving it may die, be drained for an
upgrade, or lose its network. ``FailoverClient`` hides that from the control code:

- Retryable failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, a stream closed
  without an answer, a step not answered within ``step_timeout_s``, a target that does not
  connect within ``connect_timeout_s``) close the channel, move to the next target (round
  robin over ``targets``; one DNS name that resolves to several replicas works too) and
  retry after a backoff with full jitter (``Backoff``), for up to ``give_up_after_s``.
- The episode resumes with the same id and the same seq: the observation that did not get its
  chunk is sent again. The server answers a seq it already recorded with the stored chunk
  (from Redis, on any replica) instead of running it twice, and rebuilds the episode's cache
  from the store otherwise, so no seq is lost or repeated.
- StartEpisode carries an idempotency key (generated when not given), so a retry whose first
  reply was lost returns the same episode instead of creating a second one; an EndEpisode
  retry that finds the episode already ended counts as done.

Other errors (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...) are raised at once: retrying
cannot fix them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from gr2.v1 import policy_pb2 as pb

from gr2_client.aio import AsyncActionStream, AsyncPolicyClient
from gr2_client.convert import ServerDescription
from gr2_client.errors import ClientError

log = logging.getLogger("gr2_client.failover")
T = TypeVar("T")

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class FailoverExhaustedError(ClientError):
    """No target answered within ``give_up_after_s``; the last failure is the cause."""


class _RetryableError(Exception):
    """A failure worth retrying elsewhere that is not a gRPC status (timeout, EOF)."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max_s,
    initial_s * multiplier**n)) seconds, so many robots that lost the same replica do not
    all reconnect in the same instant."""

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s) or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and multiplier >= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0-based) [s]."""
        return min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"a:50051,b:50051"`` or a list -> the list of HOST:PORT targets (at least one)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ValueError("no server address given (HOST:PORT, comma-separated for several)")
    return out


class FailoverClient:
    """An asyncio client over several server addresses that survives a replica's failure
    mid-episode (see the module docstring). Create and use it inside one event loop.

    ``client_options`` go to each ``AsyncPolicyClient`` (api_key, tls, max_message_bytes).
    ``on_failover(error, next_target)`` is called before each retry (for logs and metrics).
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        backoff: Backoff | None = None,
        give_up_after_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        step_timeout_s: float = 5.0,
        rng: random.Random | None = None,
        on_failover: Callable[[BaseException, str], None] | None = None,
        **client_options: Any,
    ) -> None:
        self.targets = parse_targets(targets)
        self.backoff = backoff or Backoff()
        self.give_up_after_s = give_up_after_s
        self.connect_timeout_s = connect_timeout_s
        self.step_timeout_s = step_timeout_s
        self.rng = rng or random.Random()
        self.on_failover = on_failover
        self.client_options = client_options
        self.failovers = 0  # retries after a failure, over the client's lifetime
        self._index = 0
        self._client: AsyncPolicyClient | None = None
        self._stream: AsyncActionStream | None = None

    @property
    def target(self) -> str:
        """The address in use (or tried next)."""
        return self.targets[self._index]

    async def __aenter__(self) -> FailoverClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._disconnect()

    async def _disconnect(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _connected(self) -> AsyncPolicyClient:
        if self._client is None:
            client = AsyncPolicyClient(self.target, **self.client_options)
            try:
                await client.wait_ready(self.connect_timeout_s)
            except TimeoutError as err:
                await client.close()
                raise _RetryableError(
                    f"{self.target} did not connect within {self.connect_timeout_s} s"
                ) from err
            self._client = client
        return self._client

    async def _call(self, what: str, fn: Callable[[AsyncPolicyClient], Awaitable[T]]) -> T:
        """``fn`` on a connected client, retried on other targets while that can help."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return await fn(await self._connected())
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE_CODES:
                    raise
                failure: BaseException = err
            except _RetryableError as err:
                failure = err
            await self._disconnect()
            if time.monotonic() - start + self.backoff.ceiling(attempt) > self.give_up_after_s:
                raise FailoverExhaustedError(
                    f"{what}: no server of {self.targets} answered within "
                    f"{self.give_up_after_s:g} s (last: {describe_failure(failure)})"
                ) from failure
            self._index = (self._index + 1) % len(self.targets)
            self.failovers += 1
            log.warning(
                "%s failed (%s); retrying on %s", what, describe_failure(failure), self.target
            )
            if self.on_failover is not None:
                self.on_failover(failure, self.target)
            await asyncio.sleep(self.backoff.delay(attempt, self.rng))
            attempt += 1

    async def server_info(self) -> ServerDescription:
        return await self._call("GetServerInfo", lambda c: c.server_info())

    async def start_episode(
        self, instruction: str, *, robot_id: str = "", idempotency_key: str = ""
    ) -> str:
        """The new episode's id; retries reuse one idempotency key (generated when empty)."""
        key = idempotency_key or uuid.uuid4().hex
        return await self._call(
            "StartEpisode",
            lambda c: c.start_episode(instruction, robot_id=robot_id, idempotency_key=key),
        )

    async def step(self, observation: pb.Observation) -> pb.TrajectoryChunk:
        """The chunk answering ``observation`` over a StreamActions stream (opened, and after
        a failure reopened on the next target, as needed)."""

        async def once(client: AsyncPolicyClient) -> pb.TrajectoryChunk:
            if self._stream is None:
                self._stream = client.open_stream()
            try:
                return await asyncio.wait_for(self._stream.step(observation), self.step_timeout_s)
            except TimeoutError as err:
                raise _RetryableError(f"no chunk within {self.step_timeout_s:g} s") from err
            except EOFError as err:
                raise _RetryableError(str(err)) from err
            except asyncio.InvalidStateError as err:  # writing to a call that already failed
                raise _RetryableError(f"the action stream broke ({err})") from err

        return await self._call(f"step {observation.seq}", once)

    async def close_stream(self) -> None:
        """Half-close the action stream and let the server finish it (the episode stays)."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        try:
            await asyncio.wait_for(stream.close(), self.step_timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError):
            stream.cancel()

    async def end_episode(
        self,
        episode_id: str,
        outcome: pb.EpisodeOutcome.ValueType = pb.EPISODE_OUTCOME_UNSPECIFIED,
        note: str = "",
    ) -> pb.EndEpisodeResponse | None:
        """End the episode; None when a retry found it already ended (by the earlier try)."""
        tries = 0

        async def once(client: AsyncPolicyClient) -> pb.EndEpisodeResponse | None:
            nonlocal tries
            tries += 1
            await self.close_stream()
            try:
                return await client.end_episode(episode_id, outcome, note)
            except grpc.aio.AioRpcError as err:
                if tries > 1 and err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return None
                raise

        return await self._call("EndEpisode", once)


def describe_failure(err: BaseException) -> str:
    """One line for logs: the status and details of an RPC error, else the message."""
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
