"""LocalEngine over a real gr2-tiny model: episodes, ring buffer order, isolation, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from gr2_policy.engine.interface import ActionChunk, Engine, StepInput
from gr2_policy.engine.local import LocalEngine
from gr2_policy.errors import EpisodeNotFoundError, InvalidInputError, UnavailableError
from gr2_policy.model import GR2Policy, init_random_policy, model_hash

VIEWS = ("head", "wrist")


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0)


@pytest.fixture
async def engine(policy: GR2Policy) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(policy, model_name="test-gr2")
    await engine.start()
    yield engine
    await engine.stop()


def make_steps(n: int, seed: int) -> list[StepInput]:
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n):
        quat = rng.normal(size=4)
        steps.append(
            StepInput(
                images={v: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for v in VIEWS},
                ee_position=rng.uniform(-0.5, 0.5, size=3),
                ee_quat_wxyz=quat / np.linalg.norm(quat),
                gripper=float(rng.uniform()),
            )
        )
    return steps


async def run_episode(engine: LocalEngine, episode_id: str, steps: list[StepInput]) -> list:
    await engine.open_episode(episode_id, f"instruction of {episode_id}")
    return [await engine.step(episode_id, step) for step in steps]


def assert_same_chunks(a: list[ActionChunk], b: list[ActionChunk]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.quats_wxyz, y.quats_wxyz)
        np.testing.assert_array_equal(x.grippers, y.grippers)


async def test_local_engine_satisfies_the_engine_protocol(policy: GR2Policy) -> None:
    engine: Engine = LocalEngine(policy)  # a static check as much as a runtime one
    info = engine.info
    await engine.stop()
    assert (info.model_name, info.preset, info.history, info.action_horizon) == (
        "gr2",
        "gr2-tiny",
        4,
        10,
    )
    assert [(v.name, v.width, v.height) for v in info.views] == [(v, 64, 64) for v in VIEWS]
    assert info.waypoint_dt_s == 0.1
    assert info.model_version == model_hash(policy)


async def test_episode_of_ten_steps(engine: LocalEngine) -> None:
    assert engine.active_episodes == 0  # the warm-up episode is gone
    await engine.open_episode("ep", "pick up the red block")
    assert engine.active_episodes == 1
    for step in make_steps(10, seed=0):
        chunk = await engine.step("ep", step)
        assert chunk.positions.shape == (10, 3) and chunk.positions.dtype == np.float64
        assert chunk.quats_wxyz.shape == (10, 4) and chunk.grippers.shape == (10,)
        np.testing.assert_allclose(chunk.time_offsets_s, 0.1 * np.arange(1, 11))
        np.testing.assert_allclose(np.linalg.norm(chunk.quats_wxyz, axis=1), 1.0, atol=1e-6)
        assert np.all((chunk.grippers >= 0) & (chunk.grippers <= 1))
        assert np.all(np.isfinite(chunk.positions))
        # An untrained model stays within a few cm of the observed position.
        assert np.abs(chunk.positions - step.ee_position).max() < 0.05
        assert chunk.queue_time_s >= 0 and chunk.compute_time_s > 0
    await engine.close_episode("ep")
    assert engine.active_episodes == 0


@pytest.mark.parametrize("kv_cache", [True, False])
async def test_steps_equal_the_model_over_the_whole_episode(
    policy: GR2Policy, kv_cache: bool
) -> None:
    """With the KV cache and without it (a ring of the last R steps, recomputed), after n
    steps the engine answers what the model answers over the whole episode so far. The
    episode is longer than R, so the no-cache ring wraps."""
    engine = LocalEngine(policy, kv_cache=kv_cache)
    r = policy.config.receptive_field
    steps = make_steps(r + 3, seed=1)
    chunks = await run_episode(engine, "ep", steps)
    await engine.stop()
    with torch.inference_mode():
        lang = policy.encode_instruction(["instruction of ep"])
        images = np.stack([[s.images[v] for v in VIEWS] for s in steps])
        tokens = policy.tokenize_images(torch.from_numpy(images))[None]
        states = np.stack([np.r_[s.ee_position, s.ee_quat_wxyz, s.gripper] for s in steps])
        states_t = torch.from_numpy(states.astype(np.float32))[None]
        out = policy(lang, tokens, states_t, act_steps="all")  # every step's [ACT] at once
        for n, chunk in enumerate(chunks):
            raw = policy.action_head.decode(out.act[:, n])
            expected = policy.decode_actions(raw, states_t[:, n])
            np.testing.assert_allclose(chunk.positions, expected.positions[0], atol=1e-5)
            np.testing.assert_allclose(chunk.quats_wxyz, expected.quats_wxyz[0], atol=1e-5)
            np.testing.assert_allclose(chunk.grippers, expected.grippers[0], atol=1e-5)


async def test_interleaved_episodes_stay_independent(policy: GR2Policy) -> None:
    steps_a, steps_b = make_steps(6, seed=2), make_steps(6, seed=3)
    alone = LocalEngine(policy)
    alone_a = await run_episode(alone, "a", steps_a)
    alone_b = await run_episode(alone, "b", steps_b)
    await alone.stop()

    engine = LocalEngine(policy)
    await engine.open_episode("a", "instruction of a")
    await engine.open_episode("b", "instruction of b")
    mixed_a, mixed_b = [], []
    for step_a, step_b in zip(steps_a, steps_b, strict=True):
        # Concurrent submissions: the worker serialises them, each to its own episode.
        chunk_a, chunk_b = await asyncio.gather(engine.step("a", step_a), engine.step("b", step_b))
        mixed_a.append(chunk_a)
        mixed_b.append(chunk_b)
    await engine.stop()
    assert_same_chunks(mixed_a, alone_a)
    assert_same_chunks(mixed_b, alone_b)
    assert not np.array_equal(mixed_a[-1].positions, mixed_b[-1].positions)


async def test_unknown_and_closed_episodes(engine: LocalEngine) -> None:
    step = make_steps(1, seed=4)[0]
    with pytest.raises(EpisodeNotFoundError, match="nope"):
        await engine.step("nope", step)
    await engine.open_episode("ep", "x")
    await engine.step("ep", step)
    await engine.close_episode("ep")
    await engine.close_episode("ep")  # closing twice (or an unknown id) is a no-op
    with pytest.raises(EpisodeNotFoundError):
        await engine.step("ep", step)


async def test_reopening_an_episode_starts_it_fresh(engine: LocalEngine) -> None:
    steps = make_steps(5, seed=5)
    first = await run_episode(engine, "ep", steps)
    again = await run_episode(engine, "ep", steps)
    assert_same_chunks(first, again)


async def test_invalid_inputs_are_rejected_with_the_view_named(engine: LocalEngine) -> None:
    await engine.open_episode("ep", "x")
    good = make_steps(1, seed=6)[0]
    small = {**good.images, "wrist": np.zeros((32, 64, 3), np.uint8)}
    cases = [
        (StepInput(small, good.ee_position, good.ee_quat_wxyz, 0.0), r"'wrist'.*\(32, 64, 3\)"),
        (
            StepInput({"head": good.images["head"]}, good.ee_position, good.ee_quat_wxyz, 0.0),
            "missing image for view 'wrist'",
        ),
        (
            StepInput(good.images, np.array([0.0, np.nan, 0.0]), good.ee_quat_wxyz, 0.0),
            "ee_position",
        ),
        (StepInput(good.images, good.ee_position, np.zeros(4), 0.0), "ee_quat_wxyz"),
    ]
    for step, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            await engine.step("ep", step)
    await engine.step("ep", good)  # the episode is still usable


async def test_event_loop_keeps_running_during_steps(engine: LocalEngine) -> None:
    await engine.open_episode("ep", "x")
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(heartbeat())
    for step in make_steps(5, seed=7):
        await engine.step("ep", step)
    done.set()
    await task
    # A model run on the loop would allow about one tick per step; off the loop, many.
    assert ticks > 50


async def test_factory_builds_on_the_worker_and_stop_refuses_new_work() -> None:
    built_on = []

    def factory() -> GR2Policy:
        built_on.append(threading.current_thread().name)
        return init_random_policy("gr2-tiny", seed=0)

    engine = LocalEngine(factory)
    assert len(built_on) == 1 and built_on[0].startswith("gr2-model")
    await engine.start()
    chunk = (await run_episode(engine, "ep", make_steps(1, seed=8)))[0]
    assert chunk.positions.shape == (10, 3)
    await engine.stop()
    assert engine.active_episodes == 0
    with pytest.raises(UnavailableError):
        await engine.open_episode("ep2", "x")
