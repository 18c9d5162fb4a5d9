"""A quick latency check of a running policy server: one episode, N observations of random
images through Act, then N more through one StreamActions stream (one at a time, each sent
when the previous chunk came back), with round trip and server-reported times."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from gr2.v1 import policy_pb2 as pb

from gr2_client.client import PolicyClient
from gr2_client.convert import ServerDescription, make_observation

PERCENTILES = (50, 90, 99)


@dataclass
class Timings:
    """Per-step seconds of one transport (Act or StreamActions)."""

    round_trip_s: list[float] = field(default_factory=list)
    queue_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)

    def add(self, round_trip_s: float, chunk: pb.TrajectoryChunk) -> None:
        self.round_trip_s.append(round_trip_s)
        self.queue_s.append(chunk.queue_time_s)
        self.compute_s.append(chunk.compute_time_s)

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"count": len(self.round_trip_s)}
        for name, values in (
            ("round_trip", self.round_trip_s),
            ("server_queue", self.queue_s),
            ("server_compute", self.compute_s),
        ):
            if not values:
                continue
            arr = np.asarray(values)
            for q in PERCENTILES:
                out[f"{name}_p{q}_s"] = float(np.percentile(arr, q))
            out[f"{name}_mean_s"] = float(arr.mean())
        return out


def random_images(desc: ServerDescription, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        name: rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        for name, width, height in desc.views
    }


def _observation(
    desc: ServerDescription, episode_id: str, seq: int, rng: np.random.Generator
) -> pb.Observation:
    return make_observation(
        episode_id,
        seq,
        random_images(desc, rng),
        ee_position=np.array([0.45, 0.0, 0.35]),
        ee_quat_wxyz=np.array([0.0, 1.0, 0.0, 0.0]),
        gripper=0.0,
        capture_time_s=time.time(),
    )


def run_bench(
    client: PolicyClient,
    steps: int,
    *,
    instruction: str = "touch the red block",
    seed: int = 0,
    on_step: Callable[[str, int, float], None] | None = None,
) -> dict[str, object]:
    """Run the benchmark; ``on_step(transport, index, round_trip_s)`` reports progress.
    Returns ``{"server", "model_version", "steps", "act": {...}, "stream": {...}}``."""
    desc = client.server_info()
    rng = np.random.default_rng(seed)
    episode_id = client.start_episode(instruction, robot_id="gr2-bench")
    act, stream = Timings(), Timings()
    try:
        for i in range(steps):
            obs = _observation(desc, episode_id, i, rng)
            t0 = time.perf_counter()
            chunk = client.act(obs)
            act.add(time.perf_counter() - t0, chunk)
            if on_step:
                on_step("act", i, act.round_trip_s[-1])

        outbox: queue.Queue[pb.Observation | None] = queue.Queue()

        def requests() -> Iterator[pb.Observation]:
            while (item := outbox.get()) is not None:
                yield item

        replies = client.stream_actions(requests())
        try:
            for i in range(steps):
                obs = _observation(desc, episode_id, steps + i, rng)
                t0 = time.perf_counter()
                outbox.put(obs)
                chunk = next(replies)
                stream.add(time.perf_counter() - t0, chunk)
                if on_step:
                    on_step("stream", i, stream.round_trip_s[-1])
        finally:
            outbox.put(None)
            _drain(replies)
    finally:
        client.end_episode(episode_id, note="gr2 bench")
    return {
        "server": client.target,
        "model_version": desc.model_version,
        "preset": desc.preset,
        "views": [list(v) for v in desc.views],
        "episode_id": episode_id,
        "steps": steps,
        "act": act.summary(),
        "stream": stream.summary(),
    }


def _drain(replies: Iterator[pb.TrajectoryChunk]) -> None:
    """Let the stream finish (the request iterator has ended) without blocking forever."""
    done = threading.Event()

    def consume() -> None:
        try:
            for _ in replies:
                pass
        except Exception:  # noqa: BLE001 - the stream's end status does not matter here
            pass
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    if not done.wait(5.0) and hasattr(replies, "cancel"):
        replies.cancel()
