"""Capsule model: distances against brute-force sampling, Jacobians against finite
differences, HOME_Q collision-free, folded configurations in collision."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import (
    CAPSULES,
    LINK_RADII_M,
    SELF_COLLISION_PAIRS,
    TABLE_CAPSULES,
    CapsuleModel,
)
from gr2_wbc.robots.sim import scene

from tests.wbc.test_jacobians import random_configs

H = 1e-6


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points ``p`` (k, 3) to the segment a-b (exact), shape (k,)."""
    d = b - a
    t = np.clip((p - a) @ d / (d @ d), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * d), axis=1)


def brute_force_segment_distance(
    a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray
) -> float:
    """Sample segment A densely, exact distance to segment B: accurate to ~1e-7 m."""
    s = np.linspace(0.0, 1.0, 20001)[:, None]
    return float(point_segment_distance(a0 + s * (a1 - a0), b0, b1).min())


def test_radii_cover_the_sim_geoms() -> None:
    assert LINK_RADII_M == scene._LINK_RADIUS_M  # the housings; link capsules are 0.85 x
    by_name = {c.name: c for c in CAPSULES}
    for i, r in enumerate(LINK_RADII_M):
        assert by_name[f"link_{i + 1}"].radius >= r
    assert {n for pair in SELF_COLLISION_PAIRS for n in pair} <= set(by_name)
    assert set(TABLE_CAPSULES) <= set(by_name) and "base" not in TABLE_CAPSULES


def test_pair_distances_match_brute_force_sampling() -> None:
    model = CapsuleModel()
    for q in random_configs(seed=3, n=8):
        d, _ = model.pair_distances(q)
        for k, (ia, ib) in enumerate(zip(model._ia, model._ib, strict=True)):
            ea, eb = model.ends[ia], model.ends[ib]
            brute = brute_force_segment_distance(ea[0], ea[1], eb[0], eb[1])
            expected = brute - model.radii[ia] - model.radii[ib]
            assert d[k] == pytest.approx(expected, abs=1e-6), model.pairs[k]
            # the reported closest points lie on the segments and realise the distance
            c1, c2 = model.closest[k]
            assert np.linalg.norm(c1 - c2) == pytest.approx(brute, abs=1e-6)


def test_table_clearance_matches_brute_force_sampling() -> None:
    model = CapsuleModel()
    s = np.linspace(0.0, 1.0, 1001)[:, None]
    for q in random_configs(seed=4, n=10):
        clearance = model.table_clearance(q)
        for c in range(len(model.capsules)):
            a, b = model.ends[c]
            lowest = float((a + s * (b - a))[:, 2].min()) - model.radii[c]
            assert clearance[c] == pytest.approx(lowest, abs=1e-12)


def _fd(fn: Callable[[np.ndarray], np.ndarray], q: np.ndarray) -> np.ndarray:
    cols = []
    for i in range(7):
        dq = np.zeros(7)
        dq[i] = H
        cols.append((np.array(fn(q + dq)) - np.array(fn(q - dq))) / (2 * H))
    return np.stack(cols, axis=-1)


def test_distance_jacobians_match_finite_differences() -> None:
    model = CapsuleModel()
    probe = CapsuleModel()
    for q in random_configs(seed=5, n=20):
        _, j_table = model.table_distances(q)
        d_pair, j_pair = model.pair_distances(q)
        j_table, j_pair = j_table.copy(), j_pair.copy()
        np.testing.assert_allclose(
            j_table, _fd(lambda x: probe.table_distances(x)[0].copy(), q), atol=1e-6
        )
        fd_pair = _fd(lambda x: probe.pair_distances(x)[0].copy(), q)
        # skip pairs whose segments are (numerically) touching: the normal is undefined there
        ok = d_pair + model._pair_r > 1e-4
        np.testing.assert_allclose(j_pair[ok], fd_pair[ok], atol=1e-6)
        _, j_tool = model.point(q, "tool")
        np.testing.assert_allclose(
            j_tool, _fd(lambda x: probe.point(x, "tool")[0].copy(), q), atol=1e-6
        )


def test_home_is_collision_free() -> None:
    model = CapsuleModel()
    clearance = model.table_clearance(gen3.HOME_Q)
    table = [model.names.index(n) for n in TABLE_CAPSULES]
    assert clearance[table].min() > 0.1  # the gripper is ~0.18 m above the table
    assert model.pair_distances(gen3.HOME_Q)[0].min() > 0.1


def test_folded_into_the_table_reports_negative_clearance() -> None:
    model = CapsuleModel()
    q = np.array([0.0, 2.1, 0.0, 1.2, 0.0, 1.0, 0.0])  # shoulder bent far down and forward
    assert gen3.tool_pose(q)[2, 3] < 0.0
    clearance = dict(zip(model.names, model.table_clearance(q), strict=True))
    for name in ("link_4", "link_5", "link_6", "link_7", "palm", "fingers", "camera"):
        assert clearance[name] < 0.0, name
    assert clearance["link_2"] > 0.0


def test_elbow_folded_back_reports_self_collision() -> None:
    model = CapsuleModel()
    q = np.array([0.0, 0.56, 0.0, 2.5, 0.0, 1.06, 0.0])  # gripper folded onto the upper arm
    d, _ = model.pair_distances(q)
    assert d.min() < 0.0
    worst = model.pairs[int(np.argmin(d))]
    assert worst[0] in ("housing_6", "link_6", "link_7", "palm", "fingers", "camera")


def test_results_are_cached_per_q_and_refreshed_when_q_changes() -> None:
    model = CapsuleModel()
    q = gen3.HOME_Q.copy()
    d1 = model.table_distances(q)[0].copy()
    assert model.table_distances(q)[0] is model.table_distances(q.copy())[0]
    q[1] += 0.2
    d2 = model.table_distances(q)[0]
    assert not np.allclose(d1, d2)
