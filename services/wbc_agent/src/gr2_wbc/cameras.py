"""Camera frames for the policy and the recording, rendered off the control loop's thread.

The loop decides WHEN a frame is due (on robot time) and captures, in its own thread and in
microseconds, the arm state and the backend's scene snapshot (``capture_scene``: the sim's
joint positions; ``None`` for live cameras). :class:`CameraWorker` renders the views from that
snapshot in a thread of its own and publishes the :class:`ObservationSample` (or stores the
video frame). So a tick never waits for a camera (software EGL: ~3 ms a view, more than half
the 5 ms period), and the images and the state published together still describe the same
instant. MuJoCo releases the GIL while it renders, so the two threads really run in parallel.

Jobs: one pending observation (a newer one replaces it: the policy wants the newest) and one
pending video frame (a frame due while one is pending is dropped and counted); observations
go first. A render error is kept and raised in the loop's thread at its next submit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gr2_wbc.robots.base import ArmState, RobotBackend
from gr2_wbc.timing import TimingRing

logger = logging.getLogger("gr2_wbc.cameras")


@dataclass
class ObservationSample:
    """What the link sends to the policy: camera images and the arm state at one instant.

    Attributes:
        capture_time_s: robot-clock time of the images and the state [s].
        images: camera name -> RGB image, shape (height, width, 3), uint8.
        state: the arm state read at ``capture_time_s``.
    """

    capture_time_s: float
    images: dict[str, np.ndarray]
    state: ArmState


@dataclass
class CaptureJob:
    """Views to render for one observation (``kind="obs"``) or video frame (``"video"``)."""

    kind: str
    time_s: float
    state: ArmState
    scene: object | None
    width: int
    height: int


class VideoFrames:
    """Recorded video frames, cameras side by side, in one array reserved up front.

    ``np.empty`` only reserves: pages are touched when a frame is written."""

    def __init__(self, max_frames: int, width: int, height: int, names: tuple[str, ...]) -> None:
        self.names = names
        self.width = width
        self.frames = np.empty((max_frames, height, width * len(names), 3), np.uint8)
        self.count = 0
        self.dropped = 0

    def store(self, images: dict[str, np.ndarray]) -> None:
        if self.count >= self.frames.shape[0]:
            self.dropped += 1
            return
        frame, w = self.frames[self.count], self.width
        for i, name in enumerate(self.names):
            frame[:, i * w : (i + 1) * w] = images[name]
        self.count += 1

    def write(self, path: str | Path, fps: float) -> Path:
        """Write the frames as an MP4 (H.264)."""
        import imageio.v2 as imageio

        out = Path(path)
        with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1) as writer:
            for frame in self.frames[: self.count]:
                writer.append_data(frame)
        return out


class CameraWorker:
    """Renders :class:`CaptureJob` s in a daemon thread (started at the first job).

    Args:
        backend: renders with ``render_view(name, width, height, scene)``.
        observations: single-slot queue the observations go to (an unconsumed older one is
            replaced).
        video: where video frames go (``None``: video jobs are refused).
        stats_window: render timings kept (per view, observations only).

    Attributes:
        observations_produced: observations published.
        video_dropped: video frames not rendered because the previous one was still pending.
        render_times: :class:`TimingRing` of per-view render times [s].
    """

    def __init__(
        self,
        backend: RobotBackend,
        observations: queue.Queue[ObservationSample],
        video: VideoFrames | None = None,
        stats_window: int = 1 << 14,
    ) -> None:
        self.backend = backend
        self.observations = observations
        self.video = video
        self.render_times = TimingRing(stats_window)
        self.observations_produced = 0
        self.video_dropped = 0
        self._cond = threading.Condition()
        self._obs: CaptureJob | None = None
        self._frame: CaptureJob | None = None
        self._busy = False
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: CaptureJob) -> None:
        """Queue ``job`` without waiting for it (see the module docstring for the rules).

        Raises:
            Exception: the error a previous job's rendering raised.
        """
        with self._cond:
            self.raise_error()
            if job.kind == "obs":
                self._obs = job
            elif self._frame is not None or self.video is None:
                self.video_dropped += 1
                return
            else:
                self._frame = job
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gr2-cameras", daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    (self._obs is None and self._frame is None and not self._busy)
                    or self._error is not None
                ),
                timeout,
            )

    def raise_error(self) -> None:
        """Raise (once) the error a job's rendering raised, if any."""
        err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self) -> None:
        """Stop the thread after the job in progress; idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        names = self.backend.camera_names
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._obs or self._frame)
                if self._closing:
                    return
                if self._obs is not None:
                    job, self._obs = self._obs, None
                else:
                    job, self._frame = self._frame, None
                self._busy = True
            try:
                images = {}
                for name in names:
                    r0 = time.perf_counter()
                    images[name] = self.backend.render_view(name, job.width, job.height, job.scene)
                    if job.kind == "obs":
                        self.render_times.push(time.perf_counter() - r0)
                if job.kind == "obs":
                    self._publish(ObservationSample(job.time_s, images, job.state))
                elif self.video is not None:
                    self.video.store(images)
            except Exception as err:  # noqa: BLE001 - handed to the loop's thread
                logger.error("camera rendering failed: %s", err)
                with self._cond:
                    self._error = err
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _publish(self, obs: ObservationSample) -> None:
        """Put ``obs`` in the single-slot queue, replacing an unconsumed older one."""
        while True:
            try:
                self.observations.put_nowait(obs)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.observations.get_nowait()
        self.observations_produced += 1
