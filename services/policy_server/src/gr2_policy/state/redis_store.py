"""Redis episode store, shared by all replicas (standalone Redis; keys are not cluster-slotted).

Key layout (``P`` = key_prefix, default ``gr2:``):

- ``P ep:{id}``           hash: instruction, robot_id, replica, status, outcome, note,
                          created_s, updated_s, last_seq, steps
- ``P ep:{id}:lat``       list of chunk latencies [s], last 1000 (LTRIM)
- ``P ep:{id}:in``        list of compact step inputs, last ``history_cap`` (LTRIM), oldest first
- ``P ep:{id}:reply``     string: the encoded answer to step ``last_seq`` (for retries of that seq)
- ``P episodes``          sorted set id -> created_s (the listing index, newest = highest)
- ``P episodes:expiry``   sorted set id -> when the episode's keys expire (prunes the index)
- ``P idem:{key}``        string -> episode id (SET NX semantics inside the create script)

Create, step and end are Lua scripts, so the idempotency check, the seq compare-and-set and the
TTL renewal of every key of the episode are atomic. Timestamps come from Redis ``TIME``, so all
replicas agree. A retried step whose reply was lost fails the compare-and-set instead of being
applied twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from gr2_policy.errors import EpisodeEndedError, StoreError
from gr2_policy.state.store import (
    DEFAULT_REPLICA,
    LATENCY_WINDOW,
    EpisodeOutcome,
    EpisodeRecord,
    EpisodeStatus,
    StepSeqConflictError,
    check_create,
    check_end,
    check_limit,
    check_step,
    not_found,
    summarize_latencies,
)

_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"

# KEYS: index, expiry, idem, ep.  ARGV: id, instruction, robot_id, replica, ttl_ms, prefix, use_idem
_CREATE_LUA = (
    _NOW
    + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing and redis.call('EXISTS', ARGV[6] .. 'ep:' .. existing) == 1 then
    return {'existing', existing}
  end
end
local created = string.format('%.6f', now)
redis.call('HSET', KEYS[4], 'instruction', ARGV[2], 'robot_id', ARGV[3], 'replica', ARGV[4],
  'status', 'active', 'outcome', 'unspecified', 'note', '', 'created_s', created,
  'updated_s', created, 'last_seq', '-1', 'steps', '0')
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]) / 1000, ARGV[1])
if ARGV[7] == '1' then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5]) end
return {'created', ARGV[1], created}
"""
)

_RENEW_AND_RETURN = """
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[2]) / 1000, ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# The common part of a step and a resync: latency, reply (ARGV[6] has one, ARGV[7] the bytes).
_LATENCY_AND_REPLY = (
    """
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -"""
    + str(LATENCY_WINDOW)
    + """, -1)
if ARGV[6] == '1' then redis.call('SET', KEYS[4], ARGV[7]) else redis.call('DEL', KEYS[4]) end
"""
)

_ACTIVE_OR_RETURN = """
local h = redis.call('HMGET', KEYS[1], 'status', 'last_seq')
if not h[1] then return {'missing'} end
if h[1] == 'ended' then return {'ended'} end
local expected = string.format('%d', tonumber(h[2]) + 1)
"""

# KEYS: ep, lat, in, reply, expiry.
# ARGV: id, ttl_ms, seq, latency, history_cap, has_reply, reply, has_inputs, inputs
_STEP_LUA = (
    _NOW
    + _ACTIVE_OR_RETURN
    + """
if ARGV[3] ~= expected then return {'conflict', expected} end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3], 'updated_s', string.format('%.6f', now))
redis.call('HINCRBY', KEYS[1], 'steps', 1)
if ARGV[8] == '1' then
  redis.call('RPUSH', KEYS[3], ARGV[9])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
end
"""
    + _LATENCY_AND_REPLY
    + _RENEW_AND_RETURN
)

# KEYS: ep, lat, in, reply, expiry.
# ARGV: id, ttl_ms, seq, latency, history_cap, has_reply, reply, inputs... (oldest first)
_RESYNC_LUA = (
    _NOW
    + _ACTIVE_OR_RETURN
    + """
if tonumber(ARGV[3]) < tonumber(expected) then return {'conflict', expected} end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3], 'steps', tonumber(ARGV[3]) + 1,
  'updated_s', string.format('%.6f', now))
redis.call('DEL', KEYS[3])
if #ARGV > 7 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 8))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
end
"""
    + _LATENCY_AND_REPLY
    + _RENEW_AND_RETURN
)

# KEYS: ep, lat, in, reply, expiry.  ARGV: id, ttl_ms, outcome, note
_END_LUA = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'ended' then return {'ended'} end
redis.call('HSET', KEYS[1], 'status', 'ended', 'outcome', ARGV[3], 'note', ARGV[4],
  'updated_s', string.format('%.6f', now))
"""
    + _RENEW_AND_RETURN
)


def redact_url(url: str) -> str:
    """The URL with any password removed (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}"))


def _to_record(
    episode_id: str, fields: dict[bytes, bytes], latencies: list[bytes]
) -> EpisodeRecord:
    """Build a record from a raw hash (bytes -> str/int/float/enum) and its latency list."""
    try:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return EpisodeRecord(
            episode_id=episode_id,
            instruction=f["instruction"],
            robot_id=f["robot_id"],
            replica=f["replica"],
            status=EpisodeStatus(f["status"]),
            outcome=EpisodeOutcome(f["outcome"]),
            note=f["note"],
            created_s=float(f["created_s"]),
            updated_s=float(f["updated_s"]),
            last_seq=int(f["last_seq"]),
            steps=int(f["steps"]),
            chunk_latency=summarize_latencies([float(x) for x in latencies]),
        )
    except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise StoreError(f"episode {episode_id}: malformed record in redis ({exc})") from exc


class RedisEpisodeStore:
    """The EpisodeStore contract on Redis (``redis.asyncio``); failures raise StoreError."""

    def __init__(
        self,
        url: str,
        *,
        replica: str = DEFAULT_REPLICA,
        ttl_s: float = 86400.0,
        history_cap: int = 16,
        key_prefix: str = "gr2:",
        socket_timeout_s: float = 2.0,
    ) -> None:
        if history_cap < 1 or ttl_s <= 0:
            raise ValueError("history_cap must be >= 1 and ttl_s > 0")
        self.replica = replica
        self.history_cap = history_cap
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = key_prefix
        self.url = redact_url(url)
        # One quick retry (a pooled socket may be stale after a Redis restart), then fail fast.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),
        )
        self._create_script = self._redis.register_script(_CREATE_LUA)
        self._step_script = self._redis.register_script(_STEP_LUA)
        self._end_script = self._redis.register_script(_END_LUA)
        self._resync_script = self._redis.register_script(_RESYNC_LUA)

    def _ep_keys(self, episode_id: str) -> list[str]:
        ep = f"{self.prefix}ep:{episode_id}"
        return [ep, f"{ep}:lat", f"{ep}:in", f"{ep}:reply", f"{self.prefix}episodes:expiry"]

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(
                f"episode store (redis at {self.url}) failed to {what}: {type(exc).__name__}: {exc}"
            ) from exc

    async def create(
        self,
        instruction: str,
        robot_id: str,
        replica: str,
        idempotency_key: str | None = None,
    ) -> EpisodeRecord:
        """Start an episode; a repeated non-empty idempotency key returns the same one."""
        check_create(instruction, robot_id, idempotency_key)
        episode_id = uuid.uuid4().hex
        replica = replica or self.replica
        keys = [
            f"{self.prefix}episodes",
            f"{self.prefix}episodes:expiry",
            f"{self.prefix}idem:{idempotency_key or ''}",
            f"{self.prefix}ep:{episode_id}",
        ]
        args = [episode_id, instruction, robot_id, replica, self.ttl_ms, self.prefix]
        args.append("1" if idempotency_key else "0")
        with self._guard("create an episode"):
            reply = await self._create_script(keys=keys, args=args)
        if reply[0] == b"existing":
            return await self.get(reply[1].decode())
        created = float(reply[2])
        return EpisodeRecord(
            episode_id=episode_id,
            instruction=instruction,
            robot_id=robot_id,
            replica=replica,
            status=EpisodeStatus.ACTIVE,
            created_s=created,
            updated_s=created,
        )

    async def get(self, episode_id: str) -> EpisodeRecord:
        """The episode's record; EpisodeNotFoundError if unknown or expired."""
        ep, lat = self._ep_keys(episode_id)[:2]
        with self._guard("read an episode"):
            async with self._redis.pipeline(transaction=True) as pipe:
                fields, latencies = await pipe.hgetall(ep).lrange(lat, 0, -1).execute()
        if not fields:
            raise not_found(episode_id)
        return _to_record(episode_id, fields, latencies)

    async def list(
        self, limit: int = 100, status: EpisodeStatus | None = None
    ) -> list[EpisodeRecord]:
        """Up to ``limit`` episodes, newest first; index entries of expired episodes are pruned."""
        check_limit(limit)
        index = f"{self.prefix}episodes"
        page = max(limit, 100)
        out: list[EpisodeRecord] = []
        seen: set[str] = set()  # creates between pages shift the ranks; skip repeats
        start = 0
        with self._guard("list episodes"):
            while len(out) < limit:
                raw = await self._redis.zrevrange(index, start, start + page - 1)
                ids = [i.decode() for i in raw]
                if not ids:
                    break
                async with self._redis.pipeline(transaction=False) as pipe:
                    for episode_id in ids:
                        ep, lat = self._ep_keys(episode_id)[:2]
                        pipe.hgetall(ep).lrange(lat, 0, -1)
                    replies = await pipe.execute()
                gone: list[str] = []
                for n, episode_id in enumerate(ids):
                    fields, latencies = replies[2 * n], replies[2 * n + 1]
                    if episode_id in seen:
                        continue
                    seen.add(episode_id)
                    if not fields:
                        gone.append(episode_id)
                    elif status is None or fields[b"status"].decode() == status.value:
                        out.append(_to_record(episode_id, fields, latencies))
                if gone:
                    await self._redis.zrem(index, *gone)
                    await self._redis.zrem(f"{index}:expiry", *gone)
                start += page - len(gone)
                if len(ids) < page:
                    break
        return out[:limit]

    async def record_step(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: bytes | None = None,
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Compare-and-set the episode's seq, then record the step (see EpisodeStore)."""
        args = self._step_args(episode_id, seq, latency_s, reply)
        args += ["0", b""] if inputs is None else ["1", bytes(inputs)]
        with self._guard("record a step"):
            reply_ = await self._step_script(keys=self._ep_keys(episode_id), args=args)
        return self._stepped(episode_id, seq, reply_)

    async def resync(
        self,
        episode_id: str,
        seq: int,
        latency_s: float,
        inputs: Sequence[bytes],
        reply: bytes | None = None,
    ) -> EpisodeRecord:
        """Move a store that missed steps forward to ``seq`` (see EpisodeStore)."""
        args = self._step_args(episode_id, seq, latency_s, reply)
        args += [bytes(x) for x in inputs[-self.history_cap :]]
        with self._guard("resync an episode"):
            reply_ = await self._resync_script(keys=self._ep_keys(episode_id), args=args)
        return self._stepped(episode_id, seq, reply_)

    def _step_args(
        self, episode_id: str, seq: int, latency_s: float, reply: bytes | None
    ) -> list[Any]:
        latency = check_step(seq, latency_s)
        args: list[Any] = [episode_id, self.ttl_ms, str(seq), repr(latency), self.history_cap]
        return args + (["0", b""] if reply is None else ["1", bytes(reply)])

    def _stepped(self, episode_id: str, seq: int, reply: list[Any]) -> EpisodeRecord:
        if reply[0] == b"conflict":
            raise StepSeqConflictError(episode_id, int(reply[1]), seq)
        return self._script_record(episode_id, reply)

    async def last_reply(self, episode_id: str) -> tuple[int, bytes] | None:
        """(seq, reply) of the last recorded step, or None."""
        keys = self._ep_keys(episode_id)
        ep, reply_key = keys[0], keys[3]
        with self._guard("read the last reply"):
            async with self._redis.pipeline(transaction=True) as pipe:
                last_seq, reply = await pipe.hget(ep, "last_seq").get(reply_key).execute()
        if last_seq is None:
            raise not_found(episode_id)
        return None if reply is None else (int(last_seq), bytes(reply))

    async def recent_inputs(self, episode_id: str) -> list[bytes]:
        """The last (at most history_cap) step inputs, oldest first."""
        ep, _, inputs = self._ep_keys(episode_id)[:3]
        with self._guard("read step inputs"):
            async with self._redis.pipeline(transaction=True) as pipe:
                exists, items = await pipe.exists(ep).lrange(inputs, 0, -1).execute()
        if not exists:
            raise not_found(episode_id)
        return list(items)

    async def end(self, episode_id: str, outcome: EpisodeOutcome, note: str = "") -> EpisodeRecord:
        """Mark the episode ended; EpisodeEndedError if it already was."""
        parsed = check_end(outcome, note)
        args = [episode_id, self.ttl_ms, parsed.value, note]
        with self._guard("end an episode"):
            reply = await self._end_script(keys=self._ep_keys(episode_id), args=args)
        return self._script_record(episode_id, reply, ended_msg="has already ended")

    async def ping(self) -> bool:
        """True when Redis answers PING within the socket timeout."""
        try:
            return bool(await self._redis.ping())
        except (TimeoutError, RedisError, OSError):
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        with self._guard("close"):
            await self._redis.aclose()

    @staticmethod
    def _script_record(
        episode_id: str, reply: list[Any], ended_msg: str = "has ended; start a new one"
    ) -> EpisodeRecord:
        if reply[0] == b"missing":
            raise not_found(episode_id)
        if reply[0] == b"ended":
            raise EpisodeEndedError(f"episode {episode_id} {ended_msg}")
        return _to_record(
            episode_id, dict(zip(reply[1][::2], reply[1][1::2], strict=True)), reply[2]
        )
