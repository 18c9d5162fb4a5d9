"""TrajectoryBuffer: interpolation, holds, chunk take-over with a min-jerk blend, threads."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest
from gr2_wbc.control.trajectory import (
    TrajectoryBuffer,
    TrajectorySample,
    min_jerk_weight,
    monotone_tangents,
)


def quat_z(angle: float) -> np.ndarray:
    """Rotation about z by ``angle`` [rad] as (w, x, y, z)."""
    return np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])


def chunk(
    t0: float, k: int, dt: float, p0: np.ndarray, v: np.ndarray, yaw0: float = 0.0, yaw_rate=0.0
):
    """Waypoints moving at constant velocity ``v`` [m/s] and yaw rate [rad/s] from ``t0``."""
    ts = t0 + dt * np.arange(k)
    pos = p0 + np.outer(ts - t0, v)
    quats = np.array([quat_z(yaw0 + yaw_rate * (t - t0)) for t in ts])
    grip = np.linspace(0.0, 1.0, k)
    return ts, pos, quats, grip


def sample(buf: TrajectoryBuffer, t: float) -> TrajectorySample:
    s = buf.sample(t)
    assert s is not None
    return s


def test_min_jerk_weight_endpoints_and_symmetry() -> None:
    assert min_jerk_weight(0.0) == 0.0
    assert min_jerk_weight(1.0) == pytest.approx(1.0)
    assert min_jerk_weight(0.5) == pytest.approx(0.5)
    assert min_jerk_weight(-1.0) == 0.0 and min_jerk_weight(2.0) == pytest.approx(1.0)
    h = 1e-4  # zero slope at both ends: the take-over starts and ends without a velocity step
    assert min_jerk_weight(h) / h < 1e-6
    assert (1.0 - min_jerk_weight(1.0 - h)) / h < 1e-6


def test_empty_buffer_samples_none() -> None:
    assert TrajectoryBuffer().sample(1.0) is None


def test_interpolates_positions_linearly_and_orientations_by_slerp() -> None:
    buf = TrajectoryBuffer(interpolation="linear")
    ts = np.array([1.0, 1.5, 2.5])
    pos = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.1, 0.2, 0.0]])
    quats = np.array([quat_z(0.0), quat_z(0.6), quat_z(1.6)])
    assert buf.add_chunk(3, ts, pos, quats, np.array([0.0, 1.0, 0.0]))
    s = sample(buf, 1.25)
    np.testing.assert_allclose(s.position, [0.05, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s.quat_wxyz, quat_z(0.3), atol=1e-9)
    assert s.gripper == pytest.approx(0.5)
    s = sample(buf, 2.25)  # 3/4 of the way through the second segment
    np.testing.assert_allclose(s.position, [0.1, 0.15, 0.0], atol=1e-12)
    np.testing.assert_allclose(s.quat_wxyz, quat_z(0.6 + 0.75), atol=1e-9)
    assert s.gripper == pytest.approx(0.25)
    assert np.linalg.norm(s.quat_wxyz) == pytest.approx(1.0)
    assert s.seq == 3 and not s.expired
    assert s.chunk_age_s == pytest.approx(1.25)


def test_cubic_interpolation_is_monotone_and_velocity_continuous() -> None:
    """The default cubic passes through every waypoint, stays within each segment's end
    values (no overshoot, even for a 0.5 m step), and its velocity is continuous across
    waypoints and equals the derivative of its position."""
    rng = np.random.default_rng(0)
    k = 12
    ts = 2.0 + np.cumsum(rng.uniform(0.03, 0.08, k))
    pos = np.cumsum(rng.normal(0.0, 0.02, (k, 3)), axis=0)
    pos[6:, 1] += 0.5  # a step
    quats = np.tile(quat_z(0.0), (k, 1))
    buf = TrajectoryBuffer()
    assert buf.interpolation == "cubic"
    assert buf.add_chunk(0, ts, pos, quats, np.zeros(k))
    for i in range(k):
        np.testing.assert_allclose(sample(buf, ts[i]).position, pos[i], atol=1e-12)
    h = 1e-6
    for i in range(k - 1):
        seg = np.linspace(ts[i], ts[i + 1], 9)[1:-1]
        lo, hi = np.minimum(pos[i], pos[i + 1]), np.maximum(pos[i], pos[i + 1])
        for t in seg:
            s = sample(buf, t)
            assert np.all(s.position >= lo - 1e-12) and np.all(s.position <= hi + 1e-12)
            fd = (sample(buf, t + h).position - sample(buf, t - h).position) / (2 * h)
            np.testing.assert_allclose(s.velocity, fd, atol=1e-5)
    for i in range(1, k - 1):  # continuity at the interior waypoints
        before, after = sample(buf, ts[i] - 1e-9).velocity, sample(buf, ts[i] + 1e-9).velocity
        np.testing.assert_allclose(before, after, atol=1e-6)


def test_monotone_tangents_flatten_at_extrema_and_match_a_straight_line() -> None:
    ts = np.array([0.0, 0.1, 0.3, 0.4])
    line = np.outer(ts, [1.0, -2.0, 0.0])
    slopes = np.diff(line, axis=0) / np.diff(ts)[:, None]
    np.testing.assert_allclose(monotone_tangents(ts, slopes), np.tile([1.0, -2.0, 0.0], (4, 1)))
    peak = np.array([[0.0], [1.0], [0.0], [-1.0]])
    slopes = np.diff(peak, axis=0) / np.diff(ts)[:, None]
    m = monotone_tangents(ts, slopes)
    assert m[1, 0] == 0.0  # extremum at a knot
    assert m[2, 0] < 0.0


def test_interpolation_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="interpolation must be one of"):
        TrajectoryBuffer(interpolation="spline")


def test_quaternions_are_normalised_and_take_the_short_way() -> None:
    buf = TrajectoryBuffer()
    q_far = -quat_z(0.4) * 3.0  # same rotation, other hemisphere, not unit
    buf.add_chunk(0, np.array([0.0, 1.0]), np.zeros((2, 3)), np.array([quat_z(0.0), q_far]), [0, 0])
    s = sample(buf, 0.5)
    assert np.linalg.norm(s.quat_wxyz) == pytest.approx(1.0)
    angle = 2 * np.arctan2(abs(s.quat_wxyz[3]), abs(s.quat_wxyz[0]))
    assert angle == pytest.approx(0.2, abs=1e-9)


def test_holds_first_waypoint_before_and_last_after_with_expired_flag() -> None:
    buf = TrajectoryBuffer()
    ts, pos, quats, grip = chunk(2.0, 5, 0.1, np.array([0.3, 0.0, 0.2]), np.array([0.1, 0, 0]))
    buf.add_chunk(0, ts, pos, quats, grip)
    early = sample(buf, 0.0)
    np.testing.assert_allclose(early.position, pos[0])
    assert not early.expired and early.chunk_age_s == pytest.approx(-2.0)
    late = sample(buf, 10.0)
    np.testing.assert_allclose(late.position, pos[-1])
    np.testing.assert_allclose(late.quat_wxyz, quats[-1], atol=1e-12)
    assert late.gripper == pytest.approx(1.0) and late.expired
    assert not sample(buf, float(ts[-1])).expired


def test_origin_time_sets_chunk_age() -> None:
    buf = TrajectoryBuffer()
    ts, pos, quats, grip = chunk(1.0, 3, 0.1, np.zeros(3), np.zeros(3))
    buf.add_chunk(0, ts, pos, quats, grip, origin_time_s=0.8)
    assert sample(buf, 1.1).chunk_age_s == pytest.approx(0.3)


def _sweep(buf: TrajectoryBuffer, t0: float, t1: float, dt: float = 1e-3) -> np.ndarray:
    ts = np.arange(t0, t1, dt)
    return np.array([sample(buf, t).position.copy() for t in ts])


def test_newer_chunk_takes_over_with_a_continuous_min_jerk_blend() -> None:
    blend = 0.1
    buf = TrajectoryBuffer(blend_s=blend)
    a = chunk(0.0, 11, 0.1, np.zeros(3), np.array([0.1, 0.0, 0.0]))
    b = chunk(0.5, 11, 0.1, np.array([0.0, 0.2, 0.0]), np.array([0.1, 0.0, 0.0]))
    buf.add_chunk(1, *a)
    np.testing.assert_allclose(sample(buf, 0.3).position, [0.03, 0, 0], atol=1e-12)
    buf.add_chunk(2, *b)  # arrives early: takes over at its first waypoint, t = 0.5
    np.testing.assert_allclose(sample(buf, 0.45).position, [0.045, 0, 0], atol=1e-12)
    mid = sample(buf, 0.5 + blend / 2)  # weight 0.5: halfway between A (0.055, 0) and B
    np.testing.assert_allclose(mid.position, [0.03, 0.1, 0.0], atol=1e-12)
    assert mid.seq == 2
    np.testing.assert_allclose(sample(buf, 0.5 + blend).position, [0.01, 0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(sample(buf, 0.8).position, [0.03, 0.2, 0.0], atol=1e-12)
    # Continuity over the whole take-over (1 ms samples): the largest step is bounded by the
    # min-jerk peak slope 1.875/blend times the 0.2 m offset, plus the chunks' own speed.
    buf2 = TrajectoryBuffer(blend_s=blend)
    buf2.add_chunk(1, *a)
    buf2.add_chunk(2, *b)
    steps = np.linalg.norm(np.diff(_sweep(buf2, 0.3, 0.8), axis=0), axis=1)
    assert steps.max() < 1e-3 * (1.875 * 0.2 / blend + 0.1) * 1.01
    assert steps.max() > 1e-3 * 1.5 * 0.2 / blend  # it did move across in one blend window


def test_late_chunk_skips_past_waypoints_without_a_jump() -> None:
    buf = TrajectoryBuffer(blend_s=0.1)
    buf.add_chunk(1, *chunk(0.0, 11, 0.1, np.zeros(3), np.zeros(3)))
    sample(buf, 0.55)
    # Its first waypoint (0.3) is already past at 0.6 (inference delay): the blend starts now.
    buf.add_chunk(2, *chunk(0.3, 11, 0.1, np.array([0.0, 0.0, 0.1]), np.zeros(3)))
    np.testing.assert_allclose(sample(buf, 0.6).position, [0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(sample(buf, 0.65).position, [0, 0, 0.05], atol=1e-12)
    np.testing.assert_allclose(sample(buf, 0.7).position, [0, 0, 0.1], atol=1e-12)


def test_chunk_arriving_during_a_blend_stays_continuous() -> None:
    buf = TrajectoryBuffer(blend_s=0.2)
    buf.add_chunk(1, *chunk(0.0, 11, 0.1, np.zeros(3), np.zeros(3)))
    buf.add_chunk(2, *chunk(0.5, 11, 0.1, np.array([0.1, 0, 0]), np.zeros(3)))
    before = _sweep(buf, 0.4, 0.6)
    buf.add_chunk(3, *chunk(0.6, 11, 0.1, np.array([0, 0.1, 0]), np.zeros(3)))
    after = _sweep(buf, 0.6, 1.2)
    path = np.vstack([before, after])
    assert np.linalg.norm(np.diff(path, axis=0), axis=1).max() < 2e-3
    np.testing.assert_allclose(path[-1], [0, 0.1, 0], atol=1e-12)
    assert sample(buf, 1.0).seq == 3


def test_older_and_duplicate_seq_are_ignored() -> None:
    buf = TrajectoryBuffer()
    assert buf.add_chunk(5, *chunk(0.0, 3, 0.1, np.zeros(3), np.zeros(3)))
    assert not buf.add_chunk(4, *chunk(0.0, 3, 0.1, np.ones(3), np.zeros(3)))
    assert not buf.add_chunk(5, *chunk(0.0, 3, 0.1, np.ones(3), np.zeros(3)))
    s = sample(buf, 1.0)
    np.testing.assert_allclose(s.position, np.zeros(3))
    assert s.seq == 5 and buf.latest_seq == 5
    buf.clear()
    assert buf.sample(1.0) is None and buf.add_chunk(
        0, *chunk(0.0, 3, 0.1, np.ones(3), np.zeros(3))
    )


@pytest.mark.parametrize(
    "times, n_pos",
    [([0.0, 0.1, 0.1], 3), ([0.0, 0.1, 0.2], 2), ([0.0, np.nan, 0.2], 3)],
)
def test_bad_chunks_are_rejected(times: list[float], n_pos: int) -> None:
    buf = TrajectoryBuffer()
    with pytest.raises(ValueError):
        buf.add_chunk(0, np.array(times), np.zeros((n_pos, 3)), np.tile(quat_z(0), (3, 1)), [0] * 3)
    assert buf.sample(0.0) is None


def test_chunk_longer_than_capacity_is_rejected() -> None:
    buf = TrajectoryBuffer(max_waypoints=4)
    with pytest.raises(ValueError, match="capacity"):
        buf.add_chunk(0, *chunk(0.0, 5, 0.1, np.zeros(3), np.zeros(3)))


def test_in_place_sample_reuses_the_output_object() -> None:
    buf = TrajectoryBuffer()
    buf.add_chunk(0, *chunk(0.0, 3, 0.1, np.zeros(3), np.array([1.0, 0, 0])))
    out = TrajectorySample()
    pos_array = out.position
    assert buf.sample(0.1, out=out) is out
    assert out.position is pos_array
    np.testing.assert_allclose(out.position, [0.1, 0, 0])


def test_concurrent_adds_and_samples_never_tear() -> None:
    """Every chunk has all three position components equal; so does any blend of them. A
    torn (half-written) chunk would break that, or the unit norm of the quaternion."""
    buf = TrajectoryBuffer(blend_s=0.01)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        for seq in range(1, 400):
            value = float(seq)
            k = 2 + seq % 20
            ts = 0.001 * seq + 0.002 * np.arange(k)
            pos = np.full((k, 3), value)
            quats = np.tile(quat_z(0.01 * seq), (k, 1))
            buf.add_chunk(seq, ts, pos, quats, np.zeros(k))
        stop.set()

    def reader() -> None:
        last_seq, t = -1, 0.0
        while not stop.is_set():
            s = buf.sample(t)
            t += 1e-4
            if s is None:
                continue
            if (
                not np.allclose(s.position, s.position[0])
                or abs(np.linalg.norm(s.quat_wxyz) - 1) > 1e-9
            ):
                errors.append(f"torn sample {s}")
            if s.seq < last_seq:
                errors.append(f"seq went back {last_seq} -> {s.seq}")
            last_seq = s.seq

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception as err:  # noqa: BLE001 - a crash in a thread must fail the test
                errors.append(f"{body.__name__}: {type(err).__name__}: {err}")
                stop.set()

        return run

    threads = [threading.Thread(target=guarded(writer)), threading.Thread(target=guarded(reader))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert buf.latest_seq == 399


def test_velocities_are_the_segment_rates() -> None:
    buf = TrajectoryBuffer()
    buf.add_chunk(0, *chunk(0.0, 5, 0.1, np.zeros(3), np.array([0.2, -0.1, 0.0]), 0.0, 0.5))
    s = sample(buf, 0.23)
    np.testing.assert_allclose(s.velocity, [0.2, -0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(s.angular_velocity, [0.0, 0.0, 0.5], atol=1e-9)
    held = sample(buf, 1.0)  # past the end: holding, so no feed-forward
    np.testing.assert_array_equal(held.velocity, np.zeros(3))
    np.testing.assert_array_equal(held.angular_velocity, np.zeros(3))


def test_blend_velocity_is_the_derivative_of_the_blended_pose() -> None:
    """Through a take-over the reported rates match finite differences of the output, so the
    feed-forward includes the cross-fade's own motion (the w' (new - old) term)."""
    blend = 0.1
    buf = TrajectoryBuffer(blend_s=blend)
    buf.add_chunk(1, *chunk(0.0, 11, 0.1, np.zeros(3), np.array([0.1, 0, 0]), 0.0, 0.3))
    buf.add_chunk(2, *chunk(0.5, 11, 0.1, np.array([0, 0.2, 0]), np.array([0, 0, 0.1]), 0.2, -0.2))
    h = 1e-6
    for t in np.linspace(0.505, 0.595, 10):
        s = sample(buf, t)
        vel, omega = s.velocity.copy(), s.angular_velocity.copy()
        p_plus, q_plus = sample(buf, t + h).position.copy(), sample(buf, t + h).quat_wxyz.copy()
        p_minus, q_minus = sample(buf, t - h).position.copy(), sample(buf, t - h).quat_wxyz.copy()
        np.testing.assert_allclose(vel, (p_plus - p_minus) / (2 * h), atol=1e-5)
        yaw = 2 * np.arctan2(q_plus[3], q_plus[0]) - 2 * np.arctan2(q_minus[3], q_minus[0])
        # 1e-4: for nearly parallel quaternions slerp falls back to normalised lerp.
        np.testing.assert_allclose(omega, [0, 0, yaw / (2 * h)], atol=1e-4)
    assert np.linalg.norm(sample(buf, 0.55).velocity) > 1.0  # 0.2 m crossed in 0.1 s


# -- temporal ensembling ------------------------------------------------------------------


def test_ensemble_averages_overlapping_chunks_with_decaying_weights() -> None:
    """Two overlapping chunks, both fully in: the output is their exp-weighted average."""
    decay = 2.0
    buf = TrajectoryBuffer(blend_s=0.05, max_chunks=8, blend="ensemble", ensemble_decay=decay)
    buf.add_chunk(1, *chunk(0.0, 11, 0.1, np.zeros(3), np.zeros(3)))
    sample(buf, 0.0)
    buf.add_chunk(2, *chunk(0.2, 11, 0.1, np.array([0.1, 0.0, 0.0]), np.zeros(3)))
    sample(buf, 0.2)  # chunk 2 is seen at its first waypoint: its ramp-in starts there
    out = sample(buf, 0.5)  # chunk 2 ramped in (0.2 + 0.05); chunk 1 not yet ramping out
    w_old = np.exp(-decay * 0.2)  # chunk 1 is 0.2 s older
    np.testing.assert_allclose(out.position[0], 0.1 / (1.0 + w_old), atol=1e-12)
    assert out.seq == 2
    # After chunk 1's last waypoint (1.0 s) it has ramped out: only chunk 2 remains.
    np.testing.assert_allclose(sample(buf, 1.1).position, [0.1, 0, 0], atol=1e-12)


def test_ensemble_is_continuous_as_chunks_enter_and_leave() -> None:
    """Chunks every 0.1 s, each 1 s long with an offset: 1 ms samples never jump."""
    buf = TrajectoryBuffer(blend_s=0.05, max_chunks=16, blend="ensemble", ensemble_decay=1.0)
    path = []
    t = 0.0
    for seq in range(20):
        offset = np.array([0.02 * (seq % 3), 0.01 * seq, 0.0])
        buf.add_chunk(seq, *chunk(0.1 * seq, 11, 0.1, offset, np.array([0.05, 0, 0])))
        for _ in range(100):
            path.append(sample(buf, t).position.copy())
            t += 1e-3
    for _ in range(1500):  # the stream stops: the last chunk runs out and holds
        s = sample(buf, t)
        assert np.all(np.isfinite(s.position)) and np.isfinite(s.gripper)
        path.append(s.position.copy())
        t += 1e-3
    steps = np.linalg.norm(np.diff(np.array(path), axis=0), axis=1)
    # Offsets of up to 4 cm between chunks enter over 50 ms ramps: ~1.9 x 0.04 / 0.05 m/s.
    assert steps.max() < 2.5e-3
    assert s.expired


def test_blend_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="blend must be one of"):
        TrajectoryBuffer(blend="average")


# -- chunk smoothing QP -------------------------------------------------------------------


def test_smoother_reduces_jerk_within_the_fidelity_band() -> None:
    from gr2_wbc.control.smoothing import ChunkSmoother

    rng = np.random.default_rng(0)
    times = 0.1 * np.arange(10)
    smooth_path = np.stack([0.3 + 0.1 * times, 0.05 * np.sin(3 * times), 0.2 + 0 * times], 1)
    noisy = smooth_path + rng.normal(scale=0.004, size=smooth_path.shape)
    smoother = ChunkSmoother(jerk_weight=1e-6, tolerance_m=0.01)
    out = smoother.smooth(times, noisy)

    def jerk(p: np.ndarray) -> float:
        return float(np.abs(np.diff(p, n=3, axis=0)).max())

    assert jerk(out) < 0.5 * jerk(noisy)
    assert np.abs(out - noisy).max() <= 0.01 + 1e-9  # never further than the tolerance
    # The solver instance is reused for the next chunk of the same shape.
    again = smoother.smooth(times, noisy)
    np.testing.assert_allclose(again, out, atol=1e-6)
    assert len(smoother._solvers) == 1
    # Short chunks pass through unchanged.
    np.testing.assert_array_equal(smoother.smooth(times[:3], noisy[:3]), noisy[:3])
