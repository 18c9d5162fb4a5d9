"""Contract tests of the episode store: the same tests against the memory and the Redis backend.

The Redis backend runs against a real redis-server (the session fixture ``redis_server``); every
test uses its own key prefix so tests never see each other's episodes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gr2_policy.errors import (
    EpisodeEndedError,
    EpisodeNotFoundError,
    InvalidInputError,
    SeqConflictError,
    StoreError,
)
from gr2_policy.state import (
    EpisodeOutcome,
    EpisodeRecord,
    EpisodeStatus,
    EpisodeStore,
    MemoryEpisodeStore,
    RedisEpisodeStore,
    StepSeqConflictError,
    make_store,
)
from gr2_policy.state.redis_store import redact_url
from redis.asyncio import Redis

from tests.support.processes import RedisServer, free_port, run_redis_server

StoreFactory = Callable[..., EpisodeStore]
UNKNOWN = "0" * 32


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """A factory of stores of one backend (kwargs go to make_store); all closed at teardown."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    prefix = f"test:{uuid.uuid4().hex}:"
    made: list[EpisodeStore] = []

    def factory(**kwargs: Any) -> EpisodeStore:
        store = make_store(url, replica="r0", key_prefix=prefix, **kwargs)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
async def store(make: StoreFactory) -> EpisodeStore:
    return make()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _steps(store: EpisodeStore, episode_id: str, n: int, start: int = 0) -> EpisodeRecord:
    record = await store.get(episode_id)
    for seq in range(start, start + n):
        record = await store.record_step(episode_id, seq, 0.01, f"in-{seq}".encode())
    return record


async def test_create_get_list_order_and_status_filter(store: EpisodeStore) -> None:
    created = [await store.create(f"task {i}", f"robot-{i}", "r0") for i in range(3)]
    first = created[0]
    assert first.status is EpisodeStatus.ACTIVE and first.outcome is EpisodeOutcome.UNSPECIFIED
    assert (first.last_seq, first.steps, first.chunk_latency.count) == (-1, 0, 0)
    assert first.replica == "r0" and len(first.episode_id) == 32
    assert await store.get(first.episode_id) == first
    await store.end(created[1].episode_id, EpisodeOutcome.SUCCESS)

    newest_first = [r.episode_id for r in reversed(created)]
    assert [r.episode_id for r in await store.list()] == newest_first
    assert [r.episode_id for r in await store.list(limit=2)] == newest_first[:2]
    active = await store.list(status=EpisodeStatus.ACTIVE)
    assert [r.episode_id for r in active] == [created[2].episode_id, created[0].episode_id]
    ended = await store.list(status=EpisodeStatus.ENDED)
    assert [r.episode_id for r in ended] == [created[1].episode_id]
    with pytest.raises(InvalidInputError):
        await store.list(limit=0)


async def test_idempotency_key_sequential(store: EpisodeStore) -> None:
    a = await store.create("pick", "robot", "r0", idempotency_key="key-1")
    b = await store.create("pick", "robot", "r0", idempotency_key="key-1")
    c = await store.create("pick", "robot", "r0", idempotency_key="key-2")
    d = await store.create("pick", "robot", "r0", idempotency_key=None)
    e = await store.create("pick", "robot", "r0", idempotency_key="")
    assert a.episode_id == b.episode_id
    assert len({a.episode_id, c.episode_id, d.episode_id, e.episode_id}) == 4
    assert len(await store.list()) == 4


async def test_idempotency_key_concurrent(store: EpisodeStore) -> None:
    records = await asyncio.gather(
        *(store.create("pick", "robot", "r0", idempotency_key="same") for _ in range(10))
    )
    assert len({r.episode_id for r in records}) == 1
    assert len(await store.list()) == 1


async def test_record_step_compare_and_set(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    with pytest.raises(SeqConflictError, match="expected seq 0, got 1"):
        await store.record_step(ep, 1, 0.01)
    record = await store.record_step(ep, 0, 0.01)
    assert (record.last_seq, record.steps) == (0, 1)
    with pytest.raises(SeqConflictError, match="expected seq 1, got 3"):
        await store.record_step(ep, 3, 0.01)  # a gap
    with pytest.raises(StepSeqConflictError) as replay:
        await store.record_step(ep, 0, 0.01)  # a replay of the step just recorded
    assert (replay.value.expected, replay.value.got) == (1, 0)
    record = await _steps(store, ep, 4, start=1)
    assert (record.last_seq, record.steps) == (4, 5)
    assert record.updated_s >= record.created_s
    assert await store.get(ep) == record


async def test_concurrent_steps_with_same_seq_exactly_one_wins(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    results = await asyncio.gather(
        *(store.record_step(ep, 0, 0.01, b"x") for _ in range(20)), return_exceptions=True
    )
    assert sum(isinstance(r, EpisodeRecord) for r in results) == 1
    assert sum(isinstance(r, SeqConflictError) for r in results) == 19
    record = await store.get(ep)
    assert (record.last_seq, record.steps) == (0, 1)
    assert await store.recent_inputs(ep) == [b"x"]


async def test_latency_summary_matches_numpy(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    values = [0.001 * v for v in random.Random(7).sample(range(1, 400), 37)]
    for seq, value in enumerate(values):
        record = await store.record_step(ep, seq, value)
    summary = record.chunk_latency
    assert summary.count == len(values)
    assert summary.mean_s == pytest.approx(np.mean(values))
    for q, got in ((50, summary.p50_s), (90, summary.p90_s), (99, summary.p99_s)):
        assert got == pytest.approx(np.percentile(values, q))
    assert summary.max_s == pytest.approx(max(values))
    with pytest.raises(InvalidInputError):
        await store.record_step(ep, len(values), float("nan"))


async def test_latency_window_keeps_last_1000(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    values = [9.0] * 5 + [0.001 * (i % 97) for i in range(1000)]  # the 9 s ones fall out
    for seq, value in enumerate(values):
        await store.record_step(ep, seq, value)
    summary = (await store.get(ep)).chunk_latency
    assert summary.count == 1000
    assert summary.max_s == pytest.approx(max(values[5:]))
    assert summary.p99_s == pytest.approx(np.percentile(values[5:], 99))


async def test_inputs_capped_and_oldest_first(make: StoreFactory) -> None:
    store = make(history_cap=4)
    ep = (await store.create("pick", "robot", "r0")).episode_id
    assert await store.recent_inputs(ep) == []
    await _steps(store, ep, 6)
    assert await store.recent_inputs(ep) == [f"in-{i}".encode() for i in range(2, 6)]
    blob = bytes(range(256))  # arbitrary binary survives unchanged
    await store.record_step(ep, 6, 0.01, blob)
    await store.record_step(ep, 7, 0.01, None)  # records no inputs
    assert await store.recent_inputs(ep) == [b"in-3", b"in-4", b"in-5", blob]


async def test_last_reply_is_the_answer_to_the_last_seq(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    assert await store.last_reply(ep) is None
    blob = bytes(range(256)) * 3  # binary replies survive unchanged
    await store.record_step(ep, 0, 0.01, b"in-0", reply=b"answer-0")
    assert await store.last_reply(ep) == (0, b"answer-0")
    await store.record_step(ep, 1, 0.01, b"in-1", reply=blob)
    assert await store.last_reply(ep) == (1, blob)
    await store.record_step(ep, 2, 0.01, b"in-2")  # no reply: the old one must not answer seq 2
    assert await store.last_reply(ep) is None
    with pytest.raises(EpisodeNotFoundError):
        await store.last_reply(UNKNOWN)


async def test_resync_moves_forward_only_and_replaces_inputs(make: StoreFactory) -> None:
    store = make(history_cap=3)
    ep = (await store.create("pick", "robot", "r0")).episode_id
    await _steps(store, ep, 4)  # last_seq 3, inputs in-1..in-3
    kept = [b"k-7", b"k-8", b"k-9", b"k-10"]  # the serving replica's window (one too many)
    record = await store.resync(ep, 10, 0.02, kept, reply=b"answer-10")
    assert (record.last_seq, record.steps, record.status) == (10, 11, EpisodeStatus.ACTIVE)
    assert await store.recent_inputs(ep) == kept[-3:]
    assert await store.last_reply(ep) == (10, b"answer-10")
    for stale in (10, 5):  # not ahead of the store: another writer got there
        with pytest.raises(StepSeqConflictError) as err:
            await store.resync(ep, stale, 0.01, [b"x"])
        assert err.value.expected == 11
    assert (await store.get(ep)).last_seq == 10
    await store.record_step(ep, 11, 0.01, b"in-11")  # ordinary steps go on from there
    assert await store.recent_inputs(ep) == [b"k-9", b"k-10", b"in-11"]
    await store.end(ep, EpisodeOutcome.SUCCESS)
    with pytest.raises(EpisodeEndedError):
        await store.resync(ep, 20, 0.01, [])
    with pytest.raises(EpisodeNotFoundError):
        await store.resync(UNKNOWN, 1, 0.01, [])


async def test_end_then_step_or_end_again_fails(store: EpisodeStore) -> None:
    ep = (await store.create("pick", "robot", "r0")).episode_id
    await _steps(store, ep, 3)
    record = await store.end(ep, EpisodeOutcome.SUCCESS, note="placed the cube")
    assert record.status is EpisodeStatus.ENDED and record.outcome is EpisodeOutcome.SUCCESS
    assert (record.note, record.steps, record.last_seq) == ("placed the cube", 3, 2)
    assert await store.get(ep) == record
    with pytest.raises(EpisodeEndedError):
        await store.record_step(ep, 3, 0.01)
    with pytest.raises(EpisodeEndedError):
        await store.end(ep, EpisodeOutcome.FAILURE)
    other = (await store.create("pick", "robot", "r0")).episode_id
    with pytest.raises(InvalidInputError, match="unknown outcome"):
        await store.end(other, "exploded")  # type: ignore[arg-type]
    assert (await store.end(other, "aborted")).outcome is EpisodeOutcome.ABORTED  # type: ignore[arg-type]


async def test_unknown_episode(store: EpisodeStore) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get(UNKNOWN),
        lambda: store.record_step(UNKNOWN, 0, 0.01),
        lambda: store.end(UNKNOWN, EpisodeOutcome.FAILURE),
        lambda: store.recent_inputs(UNKNOWN),
    ]
    for call in calls:
        with pytest.raises(EpisodeNotFoundError):
            await call()


async def test_record_json_round_trip(store: EpisodeStore) -> None:
    ep = (await store.create("stack the 'red' block \u2192 left", "robot", "r0")).episode_id
    await _steps(store, ep, 3)
    record = await store.end(ep, EpisodeOutcome.FAILURE, note='dropped "it"')
    text = record.model_dump_json()
    assert EpisodeRecord.model_validate_json(text) == record
    data = json.loads(text)
    assert (data["status"], data["outcome"], data["steps"]) == ("ended", "failure", 3)
    assert set(data["chunk_latency"]) == {"count", "mean_s", "p50_s", "p90_s", "p99_s", "max_s"}


async def test_episodes_expire_after_ttl(make: StoreFactory) -> None:
    store = make(ttl_s=0.3)
    old = (await store.create("pick", "robot", "r0", idempotency_key="k")).episode_id
    await asyncio.sleep(0.45)
    with pytest.raises(EpisodeNotFoundError):
        await store.get(old)
    new = await store.create("pick", "robot", "r0", idempotency_key="k")
    assert new.episode_id != old
    assert [r.episode_id for r in await store.list()] == [new.episode_id]


async def test_make_store_picks_backend(redis_server: RedisServer) -> None:
    assert isinstance(make_store(None), MemoryEpisodeStore)
    assert isinstance(make_store(""), MemoryEpisodeStore)
    store = make_store(redis_server.url, key_prefix=f"test:{uuid.uuid4().hex}:")
    assert isinstance(store, RedisEpisodeStore) and isinstance(store, EpisodeStore)
    assert await store.ping()
    await store.close()


# --- Redis only --------------------------------------------------------------------------------


async def test_redis_keys_have_ttl_renewed_by_step(
    redis_server: RedisServer, raw_redis: Redis
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisEpisodeStore(redis_server.url, key_prefix=prefix, ttl_s=60)
    try:
        ep = (await store.create("pick", "robot", "r0", idempotency_key="k")).episode_id
        await store.record_step(ep, 0, 0.01, b"x")
        await store.record_step(ep, 1, 0.01, b"y", reply=b"chunk")
        keys = [f"{prefix}ep:{ep}{s}" for s in ("", ":lat", ":in", ":reply")]
        for key in [*keys, f"{prefix}idem:k"]:
            assert 50_000 < await raw_redis.pttl(key) <= 60_000, key
        for key in keys:
            await raw_redis.pexpire(key, 1000)
        await store.record_step(ep, 2, 0.01, b"z", reply=b"chunk")
        for key in keys:
            assert await raw_redis.pttl(key) > 50_000, key
        await raw_redis.pexpire(keys[0], 1000)
        await store.end(ep, EpisodeOutcome.SUCCESS)
        assert await raw_redis.pttl(keys[0]) > 50_000  # an ended episode stays readable a while
    finally:
        await store.close()


async def test_redis_down_fails_fast_with_store_error(tmp_path: Path) -> None:
    with run_redis_server(tmp_path / "redis") as server:
        store = RedisEpisodeStore(server.url, key_prefix="test:")
        ep = (await store.create("pick", "robot", "r0")).episode_id
        assert await store.ping()
    try:  # the server is stopped now
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{server.port}"):
            await store.get(ep)
        with pytest.raises(StoreError):
            await store.record_step(ep, 0, 0.01)
        with pytest.raises(StoreError):
            await store.create("pick", "robot", "r0")
        assert not await store.ping()
        assert time.monotonic() - t0 < 3.0
    finally:
        await store.close()


async def test_redis_error_messages_hide_the_password() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    assert "s3cret" not in redact_url(url) and "user@127.0.0.1" in redact_url(url)
    store = RedisEpisodeStore(url)
    try:
        with pytest.raises(StoreError) as err:
            await store.get(UNKNOWN)
        assert "s3cret" not in str(err.value)
        assert not await store.ping()
    finally:
        await store.close()


# --- memory only -------------------------------------------------------------------------------


async def test_memory_store_keeps_at_most_max_ended() -> None:
    store = MemoryEpisodeStore(max_ended=3)
    ids = [(await store.create("pick", "robot", "r0")).episode_id for _ in range(6)]
    for ep in ids[:5]:
        await store.end(ep, EpisodeOutcome.SUCCESS)
    ended = await store.list(status=EpisodeStatus.ENDED)
    assert [r.episode_id for r in ended] == [ids[4], ids[3], ids[2]]
    for ep in ids[:2]:
        with pytest.raises(EpisodeNotFoundError):
            await store.get(ep)
    assert [r.episode_id for r in await store.list(status=EpisodeStatus.ACTIVE)] == [ids[5]]
