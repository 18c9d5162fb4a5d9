"""BatchingEngine over a real gr2-tiny model: batched steps equal unbatched ones, eviction
and exact rebuild from step records, a full pool, video at lower priority, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from gr2_policy.engine.batching import BatchingEngine, EngineConfig
from gr2_policy.engine.interface import (
    MAX_VIDEO_FRAMES,
    ActionChunk,
    StepInput,
    VideoRequest,
    VideoSampling,
    VideoState,
)
from gr2_policy.engine.kv_pool import bytes_per_episode
from gr2_policy.engine.local import LocalEngine
from gr2_policy.engine.step_record import StepRecord
from gr2_policy.errors import (
    EpisodeNotResidentError,
    InvalidInputError,
    ResourceExhaustedError,
    StoreError,
    UnavailableError,
)
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.model import GREEDY, GR2Policy, init_random_policy

from tests.policy.test_engine import make_steps

TOL = 1e-4


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0)


def pool_bytes(policy: GR2Policy, slots: int) -> int:
    """A budget that holds exactly ``slots`` episodes (plus the scratch row)."""
    return (slots + 1) * bytes_per_episode(policy.config)


@pytest.fixture
async def reference(policy: GR2Policy) -> AsyncIterator[LocalEngine]:
    """The one-episode-at-a-time engine with the in-place rolling cache."""
    engine = LocalEngine(policy)
    await engine.start()
    yield engine
    await engine.stop()


async def started(
    policy: GR2Policy, metrics: PolicyMetrics | None = None, **knobs
) -> BatchingEngine:  # type: ignore[no-untyped-def]
    engine = BatchingEngine(policy, EngineConfig(**knobs), metrics=metrics)
    await engine.start()
    return engine


def video_state(step: StepInput) -> VideoState:
    return VideoState(step.ee_position, step.ee_quat_wxyz, step.gripper)


def max_diff(a: list[ActionChunk], b: list[ActionChunk]) -> float:
    assert len(a) == len(b)
    return max(
        float(np.abs(getattr(x, f) - getattr(y, f)).max())
        for x, y in zip(a, b, strict=True)
        for f in ("positions", "quats_wxyz", "grippers")
    )


async def reference_chunks(
    reference: LocalEngine, episode_id: str, instruction: str, steps: list[StepInput]
) -> list[ActionChunk]:
    await reference.open_episode(episode_id, instruction)
    return [await reference.step(episode_id, s) for s in steps]


def metric(metrics: PolicyMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_batched_steps_equal_unbatched_ones(
    policy: GR2Policy, reference: LocalEngine
) -> None:
    """Five episodes that start at different times and run concurrently, so batches mix
    episodes at different steps; each episode's chunks equal its serial run."""
    metrics = PolicyMetrics()
    engine = await started(policy, metrics, max_batch_size=4, max_batch_delay_ms=200)
    try:
        n_steps = policy.config.receptive_field + 3
        plans = {f"ep{i}": make_steps(n_steps - i, seed=i) for i in range(5)}

        async def run(episode_id: str, delay_steps: int) -> list[ActionChunk]:
            for _ in range(delay_steps):  # start later than the others
                await asyncio.sleep(0)
            await engine.open_episode(episode_id, f"instruction of {episode_id}")
            return [await engine.step(episode_id, s) for s in plans[episode_id]]

        results = await asyncio.gather(*(run(e, i * 3) for i, e in enumerate(plans)))
        for episode_id, chunks in zip(plans, results, strict=True):
            expected = await reference_chunks(
                reference, episode_id, f"instruction of {episode_id}", plans[episode_id]
            )
            assert max_diff(chunks, expected) < TOL
        batches = metric(metrics, "gr2_policy_batch_size_count")
        steps = metric(metrics, "gr2_policy_batch_size_sum")
        assert steps == sum(len(p) for p in plans.values())
        assert steps / batches > 2.0, "steps of different episodes should share batches"
    finally:
        await engine.stop()


async def test_an_evicted_episode_is_rebuilt_exactly_from_its_records(
    policy: GR2Policy, reference: LocalEngine
) -> None:
    metrics = PolicyMetrics()
    engine = await started(policy, metrics, kv_pool_bytes=pool_bytes(policy, 2))
    try:
        assert engine.capacity == 2
        r = policy.config.receptive_field
        steps = make_steps(r + 6, seed=7)
        await engine.open_episode("a", "touch the red block")
        chunks = [await engine.step("a", s) for s in steps[: r + 2]]
        records = [c.record for c in chunks]
        await engine.open_episode("b", "b")
        await engine.open_episode("c", "c")  # the pool is full: "a" is least recently used
        assert not engine.is_resident("a")
        assert engine.evictions == 1 and metric(metrics, "gr2_policy_episode_evictions_total") == 1
        with pytest.raises(EpisodeNotResidentError):
            await engine.step("a", steps[r + 2])
        await engine.restore_episode("a", "touch the red block", records[-r:])
        chunks += [await engine.step("a", s) for s in steps[r + 2 :]]
        expected = await reference_chunks(reference, "a", "touch the red block", steps)
        assert max_diff(chunks, expected) < TOL
        # Fewer records than R give a different (approximate) cache: the test can fail.
        await engine.restore_episode("short", "touch the red block", records[-2:])
        short = await engine.step("short", steps[r + 2])
        assert max_diff([short], [expected[r + 2]]) > TOL
    finally:
        await engine.stop()


async def test_a_full_pool_of_busy_episodes_is_resource_exhausted(policy: GR2Policy) -> None:
    engine = await started(policy, kv_pool_bytes=pool_bytes(policy, 1))
    try:
        await engine.open_episode("busy", "x")
        engine.table.pin("busy")  # as while its step is queued or running
        with pytest.raises(ResourceExhaustedError, match="pool is full"):
            await engine.open_episode("new", "y")
        assert engine.is_resident("busy")
        engine.table.unpin("busy")
        await engine.open_episode("new", "y")  # now "busy" is idle and can be evicted
        assert engine.is_resident("new") and not engine.is_resident("busy")
    finally:
        await engine.stop()


async def test_video_frames_match_the_model_and_yield_to_control_steps(
    policy: GR2Policy,
) -> None:
    metrics = PolicyMetrics()
    unit = 4
    engine = await started(policy, metrics, video_tokens_per_unit=unit)
    try:
        observation = make_steps(1, seed=3)[0]
        cfg = policy.config
        with torch.inference_mode():
            images = np.stack([observation.images[v] for v in cfg.views])[None]
            state = np.concatenate(
                (observation.ee_position, observation.ee_quat_wxyz, [observation.gripper])
            )
            lang = policy.encode_instruction(["open the drawer"])
            cache = policy.new_cache(1)
            policy.step(
                cache,
                lang,
                policy.tokenize_images(torch.from_numpy(images)),
                torch.tensor(state, dtype=torch.float32)[None],
                want_actions=False,
            )
            expected = policy.decode_frames(policy.generate_frames(cache, lang, 2, GREEDY))[0]

        await engine.open_episode("robot", "touch the red block")
        frames = []
        video = engine.predict_video(
            VideoRequest("open the drawer", observation.images, video_state(observation), 2)
        )
        frames.append(await anext(video))
        # The video is generating its second frame; a control step must run after at most
        # the one unit of video work in flight.
        before = metric(metrics, "gr2_policy_video_tokens_total")
        await engine.step("robot", make_steps(1, seed=4)[0])
        after = metric(metrics, "gr2_policy_video_tokens_total")
        assert after - before <= unit
        frames += [f async for f in video]
        assert len(frames) == 2
        np.testing.assert_array_equal(np.stack(frames), expected.numpy())
        assert metric(metrics, "gr2_policy_video_tokens_total") == 2 * cfg.image_tokens_per_step
    finally:
        await engine.stop()


async def test_bad_input_is_refused_and_the_engine_keeps_serving(policy: GR2Policy) -> None:
    engine = await started(policy)
    try:
        await engine.open_episode("e", "x")
        good = make_steps(2, seed=1)
        bad = StepInput(
            images={"head": np.zeros((32, 32, 3), np.uint8), "wrist": good[0].images["wrist"]},
            ee_position=good[0].ee_position,
            ee_quat_wxyz=good[0].ee_quat_wxyz,
            gripper=0.0,
        )
        with pytest.raises(InvalidInputError, match="head"):
            await engine.step("e", bad)
        first = await engine.step("e", good[0])
        assert StepRecord.from_bytes(first.record).step == 0  # the refused step did not count
        with pytest.raises(EpisodeNotResidentError):
            await engine.step("never-opened", good[1])
        with pytest.raises(InvalidInputError, match="consecutive"):
            await engine.restore_episode("r", "x", [first.record, first.record])
        with pytest.raises(StoreError, match="truncated"):
            await engine.restore_episode("r", "x", [b"GR2"])
        for frames, sampling, match in (
            (0, VideoSampling(), "num_frames"),
            (MAX_VIDEO_FRAMES + 1, VideoSampling(), "num_frames"),
            (1, VideoSampling(greedy=False, temperature=0.0), "temperature"),
            (1, VideoSampling(greedy=False, top_k=10**6), "top_k"),
        ):
            with pytest.raises(InvalidInputError, match=match):
                await anext(
                    engine.predict_video(VideoRequest("x", good[1].images, None, frames, sampling))
                )
        assert StepRecord.from_bytes((await engine.step("e", good[1])).record).step == 1
    finally:
        await engine.stop()
    with pytest.raises(UnavailableError):
        await engine.step("e", good[1])


def test_a_budget_below_one_episode_is_refused(policy: GR2Policy) -> None:
    with pytest.raises(ResourceExhaustedError, match="GR2_KV_POOL_BYTES"):
        BatchingEngine(policy, EngineConfig(kv_pool_bytes=bytes_per_episode(policy.config)))


async def test_the_one_at_a_time_engine_predicts_the_same_frames(
    policy: GR2Policy, reference: LocalEngine
) -> None:
    observation = make_steps(1, seed=9)[0]
    request = VideoRequest("stack the blocks", observation.images, None, 2)
    engine = await started(policy)
    try:
        batched = [frame async for frame in engine.predict_video(request)]
    finally:
        await engine.stop()
    local = [frame async for frame in reference.predict_video(request)]
    assert len(local) == 2
    np.testing.assert_array_equal(np.stack(local), np.stack(batched))


async def test_next_frame_of_an_episode_matches_both_reference_engines(
    policy: GR2Policy, reference: LocalEngine
) -> None:
    """The pool engine's next-frame prediction equals the in-place cache's and the R-step
    recompute's, and leaves the episode as it was (its next chunks are unchanged)."""
    steps = make_steps(policy.config.history + 3, seed=11)
    engine = await started(policy)
    recompute = LocalEngine(policy, kv_cache=False)
    await recompute.start()
    try:
        got, expected, frames = [], [], {}
        for name, eng in (("pool", engine), ("cache", reference), ("recompute", recompute)):
            await eng.open_episode("e", "touch the green block")
            with pytest.raises(InvalidInputError, match="one step first"):
                await eng.predict_next_frame("e")
            chunks = [await eng.step("e", s) for s in steps[:-1]]
            frames[name] = await eng.predict_next_frame("e")
            chunks.append(await eng.step("e", steps[-1]))
            (got if name == "pool" else expected).append(chunks)
        assert frames["pool"].shape == (2, 64, 64, 3) and frames["pool"].dtype == np.uint8
        np.testing.assert_array_equal(frames["pool"], frames["cache"])
        np.testing.assert_array_equal(frames["pool"], frames["recompute"])
        assert max_diff(got[0], expected[0]) < TOL
    finally:
        await engine.stop()
        await recompute.stop()
