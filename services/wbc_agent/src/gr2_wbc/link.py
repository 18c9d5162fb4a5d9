"""The link to the policy server: streams observations, feeds chunks to the trajectory buffer.

Runs its own asyncio loop in a background thread so the 200 Hz control loop never waits on
the network. Chunk waypoint times are converted to the robot's clock using the capture time
of the observation they answer (never by comparing the two machines' wall clocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2_client import FailoverClient, chunk_from_proto, make_observation
from gr2_client.failover import describe_failure

from gr2_wbc.control.clock import ClockOffsetEstimator
from gr2_wbc.control.smoothing import ChunkSmoother
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.loop import ObservationSample

logger = logging.getLogger("gr2_wbc.link")

OUTCOMES = {
    "unspecified": pb.EPISODE_OUTCOME_UNSPECIFIED,
    "success": pb.EPISODE_OUTCOME_SUCCESS,
    "failure": pb.EPISODE_OUTCOME_FAILURE,
    "aborted": pb.EPISODE_OUTCOME_ABORTED,
}


@dataclass
class LinkReport:
    """What the link saw during one episode."""

    episode_id: str = ""
    steps: int = 0
    round_trip_s: list[float] = field(default_factory=list)
    server_compute_s: list[float] = field(default_factory=list)
    server_queue_s: list[float] = field(default_factory=list)
    error: str | None = None
    failovers: int = 0  # reconnections after a failed server (same episode, same seq)
    targets: list[str] = field(default_factory=list)  # servers used, in order
    clock_offset_s: float | None = None  # server clock - robot clock, from round trips
    clock_error_bound_s: float | None = None

    def latency_summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, values in (
            ("round_trip", self.round_trip_s),
            ("server_compute", self.server_compute_s),
            ("server_queue", self.server_queue_s),
        ):
            if values:
                arr = np.asarray(values)
                for q in (50, 90, 99):
                    out[f"{name}_p{q}_s"] = float(np.percentile(arr, q))
                out[f"{name}_max_s"] = float(arr.max())
        return out


class PolicyLink(threading.Thread):
    """Background thread: one episode over StreamActions, up to ``max_steps`` steps."""

    def __init__(
        self,
        target: str,
        instruction: str,
        observations: queue.Queue[ObservationSample],
        buffer: TrajectoryBuffer,
        *,
        max_steps: int,
        robot_id: str = "",
        api_key: str | None = None,
        stop: threading.Event,
        robot_clock: Callable[[], float] | None = None,
        smoother: ChunkSmoother | None = None,
        keep_observations: bool = False,
        reconnect_timeout_s: float = 30.0,
        step_timeout_s: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        """robot_clock: reads the robot's clock (thread-safe); with it, each round trip feeds
        the clock-offset estimate reported in ``report``. smoother: optional chunk smoothing
        QP applied to waypoint positions before they reach the buffer. keep_observations:
        keep every observation sent, in order, in ``sent`` (for ``--record``)."""
        super().__init__(name="gr2-policy-link", daemon=True)
        self.target = target
        self.instruction = instruction
        self.observations = observations
        self.buffer = buffer
        self.max_steps = max_steps
        self.robot_id = robot_id
        self.api_key = api_key
        self.stop_event = stop
        self.finished = threading.Event()
        # The outcome EndEpisode reports when ``stop`` ends the episode before max_steps;
        # a caller that stops on success sets "success" before setting ``stop``.
        self.stop_outcome = "aborted"
        self.report = LinkReport()
        self.robot_clock = robot_clock
        self.smoother = smoother
        self.sent: list[ObservationSample] | None = [] if keep_observations else None
        self.clock = ClockOffsetEstimator()
        self.reconnect_timeout_s = reconnect_timeout_s
        self.step_timeout_s = step_timeout_s
        self.client_options = client_options or {}

    def run(self) -> None:
        try:
            asyncio.run(self._episode())
        except Exception as err:  # noqa: BLE001 - reported to the caller, not swallowed
            self.report.error = f"{type(err).__name__}: {err}"
        finally:
            self.finished.set()

    async def _next_observation(self) -> ObservationSample | None:
        while not self.stop_event.is_set():
            try:
                return await asyncio.to_thread(self.observations.get, True, 0.25)
            except queue.Empty:
                continue
        return None

    def _on_failover(self, error: BaseException, target: str) -> None:
        self.report.failovers += 1
        self.report.targets.append(target)
        logger.warning(
            "policy server failed (%s); continuing the episode on %s",
            describe_failure(error),
            target,
        )

    async def _episode(self) -> None:
        client = FailoverClient(
            self.target,
            api_key=self.api_key,
            give_up_after_s=self.reconnect_timeout_s,
            step_timeout_s=self.step_timeout_s,
            on_failover=self._on_failover,
            **self.client_options,
        )
        self.report.targets.append(client.target)
        async with client:
            episode_id = await client.start_episode(self.instruction, robot_id=self.robot_id)
            self.report.episode_id = episode_id
            outcome = "unspecified"
            try:
                while self.report.steps < self.max_steps:
                    sample = await self._next_observation()
                    if sample is None:
                        outcome = self.stop_outcome
                        break
                    await self._step(client, episode_id, sample)
                await client.close_stream()
            except BaseException:
                # Best effort: the original failure is what gets reported.
                with contextlib.suppress(grpc.RpcError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(
                        client.end_episode(episode_id, OUTCOMES["aborted"]), self.step_timeout_s
                    )
                raise
            await client.end_episode(episode_id, OUTCOMES[outcome])

    async def _step(
        self, client: FailoverClient, episode_id: str, sample: ObservationSample
    ) -> None:
        seq = self.report.steps
        state = sample.state
        obs = make_observation(
            episode_id,
            seq,
            sample.images,
            state.ee_position,
            state.ee_quat_wxyz,
            float(np.clip(state.gripper, 0.0, 1.0)),
            capture_time_s=sample.capture_time_s,
            joint_positions=state.q,
        )
        if self.sent is not None:
            self.sent.append(sample)
        t_send = self.robot_clock() if self.robot_clock else 0.0
        t0 = time.perf_counter()
        chunk = chunk_from_proto(await client.step(obs))
        self.report.round_trip_s.append(time.perf_counter() - t0)
        if seq == 0:
            logger.info("first chunk: round trip %.1f ms", self.report.round_trip_s[0] * 1e3)
        if self.robot_clock is not None and chunk.server_time_s > 0.0:
            self.clock.add(t_send, chunk.server_time_s, self.robot_clock())
            estimate = self.clock.estimate()
            assert estimate is not None
            self.report.clock_offset_s = estimate.offset_s
            self.report.clock_error_bound_s = estimate.error_bound_s
        self.report.server_compute_s.append(chunk.compute_time_s)
        self.report.server_queue_s.append(chunk.queue_time_s)
        if chunk.seq != seq:
            raise RuntimeError(f"chunk answers seq {chunk.seq}, expected {seq}")
        times = sample.capture_time_s + chunk.time_offsets_s
        positions = chunk.positions
        if self.smoother is not None:
            positions = self.smoother.smooth(times, positions)
        self.buffer.add_chunk(
            seq,
            times,
            positions,
            chunk.quats_wxyz,
            chunk.grippers,
        )
        self.report.steps = seq + 1
