"""Clock-offset estimation from round trips (robot and server clocks never compared)."""

from __future__ import annotations

import numpy as np
import pytest
from gr2_wbc.control.clock import ClockOffsetEstimator


def test_offset_from_symmetric_round_trips_is_exact() -> None:
    est = ClockOffsetEstimator()
    assert est.estimate() is None
    offset = 1234.5  # server clock ahead of the robot's
    for i in range(10):
        t_send = 10.0 + i
        est.add(t_send, t_send + 0.004 + offset, t_send + 0.008)  # 4 ms each way
    e = est.estimate()
    assert e is not None and e.samples == 10
    assert e.offset_s == pytest.approx(offset, abs=1e-9)
    assert e.round_trip_s == pytest.approx(0.008) and e.error_bound_s == pytest.approx(0.004)
    assert est.to_robot_time(20.0 + offset) == pytest.approx(20.0)


def test_queueing_delays_are_filtered_by_the_shortest_round_trips() -> None:
    """Random one-way queueing delays bias a naive average; the min-RTT filter stays within
    half the shortest round trip of the truth."""
    rng = np.random.default_rng(0)
    offset = -3.0
    est = ClockOffsetEstimator(window=64, best=4)
    naive = []
    for i in range(64):
        t_send = float(i)
        up = 0.002 + rng.exponential(0.02)  # queues only on the way up
        down = 0.002
        t_server = t_send + up + offset
        t_recv = t_send + up + down
        est.add(t_send, t_server, t_recv)
        naive.append(t_server - 0.5 * (t_send + t_recv))
    e = est.estimate()
    assert e is not None
    assert abs(e.offset_s - offset) <= e.error_bound_s
    assert abs(e.offset_s - offset) < 0.5 * abs(np.mean(naive) - offset)


def test_bad_samples_are_refused() -> None:
    est = ClockOffsetEstimator()
    with pytest.raises(ValueError, match="bad clock sample"):
        est.add(1.0, 5.0, 0.5)  # received before sent
    with pytest.raises(ValueError, match="bad clock sample"):
        est.add(1.0, float("nan"), 1.1)
    with pytest.raises(RuntimeError, match="no clock samples"):
        est.to_robot_time(3.0)
    with pytest.raises(ValueError):
        ClockOffsetEstimator(window=4, best=5)
