"""Which work runs next: dynamic batching of control steps, video at lower priority.

Plain CPU code with no model and no clock of its own (the caller passes ``now``), so every
rule is testable with hand-built requests, as vLLM's scheduler.

Rules:
- Control steps from different episodes are batched. A batch goes as soon as it is full
  (``max_batch_size``), or holds a step of every live episode (nobody else can join, so
  waiting would only add latency), or its oldest step has waited ``max_batch_delay_s``.
- One step per episode per batch (a second step of an episode waits for the next batch).
- Video work comes in small units and runs only while no control step is queued, so a
  control step waits for at most one unit (one batch) of video.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
V = TypeVar("V")


@dataclass
class ControlRequest(Generic[T]):
    """One queued control step; ``payload`` is whatever the engine needs to run it."""

    episode_id: str
    arrival_s: float
    payload: T


@dataclass
class VideoJob(Generic[V]):
    """A video generation, run one unit at a time; ``payload`` is the engine's job state."""

    job_id: int
    payload: V


@dataclass
class Decision(Generic[T, V]):
    """What to run now: a control batch, or one unit of a video job (exactly one is set)."""

    batch: list[ControlRequest[T]] = field(default_factory=list)
    video: VideoJob[V] | None = None


class BatchScheduler(Generic[T, V]):
    """Queues of control steps and video jobs; ``next`` decides what runs."""

    def __init__(self, max_batch_size: int, max_batch_delay_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, got {max_batch_delay_s}")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self._control: deque[ControlRequest[T]] = deque()
        self._video: deque[VideoJob[V]] = deque()

    @property
    def queued_control(self) -> int:
        return len(self._control)

    @property
    def queued_video(self) -> int:
        return len(self._video)

    def add_control(self, request: ControlRequest[T]) -> None:
        self._control.append(request)

    def add_video(self, job: VideoJob[V]) -> None:
        self._video.append(job)

    def requeue_video(self, job: VideoJob[V]) -> None:
        """Put a job with units left at the back (round robin between video jobs)."""
        self._video.append(job)

    def remove_control(self, payload: T) -> None:
        """Drop a queued control step (its caller gave up before it ran)."""
        self._control = deque(r for r in self._control if r.payload is not payload)

    def drain_control(self) -> list[ControlRequest[T]]:
        """Take every queued control step (shutdown)."""
        drained, self._control = list(self._control), deque()
        return drained

    def remove_video(self, job_id: int) -> None:
        """Drop a queued job (its client went away)."""
        self._video = deque(j for j in self._video if j.job_id != job_id)

    def next(self, now: float, live_episodes: int) -> Decision[T, V] | None:
        """The work to run now, or None (then ``wait_s`` says how long until some is due).

        live_episodes: how many episodes could still send a step (at least the queued ones).
        """
        if self._control:
            if self._control_ready(now, live_episodes):
                return Decision(batch=self._take_batch())
            return None  # a batch is filling: video must not delay it
        if self._video:
            return Decision(video=self._video.popleft())
        return None

    def wait_s(self, now: float) -> float | None:
        """Seconds until the queued control steps are due (None: nothing is waiting)."""
        if not self._control:
            return None
        return max(0.0, self._control[0].arrival_s + self.max_batch_delay_s - now)

    def _control_ready(self, now: float, live_episodes: int) -> bool:
        distinct = len({r.episode_id for r in self._control})
        if distinct >= self.max_batch_size or distinct >= live_episodes:
            return True
        return now >= self._control[0].arrival_s + self.max_batch_delay_s  # as in wait_s

    def _take_batch(self) -> list[ControlRequest[T]]:
        batch: list[ControlRequest[T]] = []
        seen: set[str] = set()
        rest: deque[ControlRequest[T]] = deque()
        while self._control:
            request = self._control.popleft()
            if request.episode_id in seen or len(batch) >= self.max_batch_size:
                rest.append(request)
            else:
                seen.add(request.episode_id)
                batch.append(request)
        self._control = rest
        return batch
