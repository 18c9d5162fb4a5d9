"""Clock offset between the policy server and the robot, estimated from round trips.

The two machines' wall clocks are never compared directly. Each step gives one NTP-style
sample: the robot sends at ``t_send`` and receives at ``t_recv`` (robot clock), the server
stamps its reply at ``t_server`` (server clock). If the server stamped halfway through the
round trip, ``offset = t_server - (t_send + t_recv) / 2`` maps robot time to server time, with
an error of at most half the round trip. Network queues only ever lengthen a round trip, so the
estimate uses the samples with the shortest round trips in a sliding window (their error bound
is the tightest), as NTP's clock filter does.

Waypoint times do not need this (they are offsets from the observation's robot-clock capture
time); the offset serves diagnostics and anything the server stamps on its own clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ClockEstimate:
    """offset_s: server clock minus robot clock [s]; error_bound_s: half the round trip of
    the samples it is based on [s]; round_trip_s: the shortest round trip in the window [s];
    samples: how many samples the window holds."""

    offset_s: float
    error_bound_s: float
    round_trip_s: float
    samples: int


class ClockOffsetEstimator:
    """Sliding window of round-trip samples; the estimate averages the ``best`` shortest.

    Args:
        window: samples kept (older ones are forgotten, so slow drift is followed).
        best: how many of the shortest-round-trip samples are averaged.
    """

    def __init__(self, window: int = 64, best: int = 4) -> None:
        if window < 1 or not 1 <= best <= window:
            raise ValueError(f"need window >= 1 and 1 <= best <= window, got {window}, {best}")
        self.best = best
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (rtt, offset)

    def add(self, t_send: float, t_server: float, t_recv: float) -> None:
        """Record one round trip (robot send, server stamp, robot receive); a sample with a
        negative or non-finite round trip is refused with ValueError."""
        rtt = t_recv - t_send
        if not (math.isfinite(rtt) and math.isfinite(t_server)) or rtt < 0.0:
            raise ValueError(f"bad clock sample: send {t_send}, server {t_server}, recv {t_recv}")
        self._samples.append((rtt, t_server - 0.5 * (t_send + t_recv)))

    def estimate(self) -> ClockEstimate | None:
        """The current estimate, or None before the first sample."""
        if not self._samples:
            return None
        best = sorted(self._samples)[: self.best]
        offset = sum(o for _, o in best) / len(best)
        return ClockEstimate(
            offset_s=offset,
            error_bound_s=0.5 * max(r for r, _ in best),
            round_trip_s=best[0][0],
            samples=len(self._samples),
        )

    def to_robot_time(self, t_server: float) -> float:
        """A server-clock time on the robot's clock (raises before the first sample)."""
        est = self.estimate()
        if est is None:
            raise RuntimeError("no clock samples yet")
        return t_server - est.offset_s
