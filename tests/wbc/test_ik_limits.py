"""The collision/workspace limits and manipulability task of the IK QP, alone and inside
``default_ik`` driven by adversarial twists (pure kinematics, 200 Hz)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from gr2_wbc.control.ik_qp import (
    IKQP,
    AccelerationLimit,
    DampingTask,
    ManipulabilityTask,
    PoseTask,
    SelfCollisionDamper,
    TablePlaneDamper,
    VelocityLimit,
    WorkspaceBoxLimit,
)
from gr2_wbc.controller import (
    VELOCITY_MARGIN,
    WORKSPACE_LOWER_M,
    WORKSPACE_UPPER_M,
    default_ik,
)
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import TABLE_CAPSULES, CapsuleModel

RATE_HZ = 200.0
DT = 1.0 / RATE_HZ

# -- the pieces alone -------------------------------------------------------------------


def test_manipulability_gradient_matches_finite_differences() -> None:
    task = ManipulabilityTask(weight=0.3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        q = gen3.HOME_Q + rng.normal(scale=0.6, size=7)
        m, grad = task.compute_manipulability(q)
        assert m == pytest.approx(gen3.manipulability(q), rel=1e-10)
        h = 1e-6
        fd = [
            (gen3.manipulability(q + h * e) - gen3.manipulability(q - h * e)) / (2 * h)
            for e in np.eye(7)
        ]
        np.testing.assert_allclose(grad, fd, atol=1e-7)
        hess, c = task.compute_qp_objective(q)
        np.testing.assert_array_equal(hess, np.zeros((7, 7)))
        np.testing.assert_allclose(c, -0.3 * np.asarray(fd), atol=1e-7)


def test_manipulability_task_climbs_away_from_a_singularity() -> None:
    q = gen3.HOME_Q.copy()
    q[3] = 0.05  # elbow almost straight: near-singular
    ik = IKQP([ManipulabilityTask(weight=1.0), DampingTask(1e-2)], [VelocityLimit()], DT)
    m0 = gen3.manipulability(q)
    for _ in range(100):
        q = q + ik.solve(q).qd * DT
    assert gen3.manipulability(q) > m0 * 1.5


def test_damper_rows_follow_the_velocity_damper_formula() -> None:
    model = CapsuleModel()
    damper = TablePlaneDamper(model, min_distance=0.01, influence_distance=0.22, gain=0.1)
    assert damper.n_constraints == 2 * len(TABLE_CAPSULES)
    q = gen3.HOME_Q
    a_mat, lo, hi = damper.compute_qp_inequalities(q, DT)
    d, jac = model.table_distances(q)
    idx = [model.names.index(n) for n in TABLE_CAPSULES]
    d, jac = d[idx].ravel(), jac[idx].reshape(-1, 7)
    np.testing.assert_allclose(a_mat, jac)
    assert np.all(np.isposinf(hi))
    near = d < 0.22
    assert near.any() and (~near).any()  # the gripper is near the table, the elbow is not
    np.testing.assert_allclose(lo[near], -0.1 * (d[near] - 0.01) / DT)
    assert np.all(np.isneginf(lo[~near]))
    # inside the safe distance the demanded separation speed is capped
    capped = TablePlaneDamper(model, min_distance=0.5, influence_distance=0.6, recovery_speed=0.03)
    _, lo, _ = capped.compute_qp_inequalities(q, DT)
    assert lo.max() == pytest.approx(0.03)
    with pytest.raises(ValueError):
        TablePlaneDamper(model, min_distance=0.1, influence_distance=0.05)
    with pytest.raises(ValueError):
        TablePlaneDamper(model, gain=0.0)
    with pytest.raises(ValueError):
        WorkspaceBoxLimit((0, 0, 0), (1, -1, 1), model)
    with pytest.raises(ValueError):
        WorkspaceBoxLimit((0, 0, 0), (1, 1, 1), model, points=("elbow",))


def test_workspace_box_rows_are_face_distances() -> None:
    model = CapsuleModel()
    box = WorkspaceBoxLimit((0.4, -0.1, 0.15), (0.6, 0.1, 0.5), model, points=("tool", "wrist"))
    assert box.n_constraints == 12
    d, jac = box.compute_distances(gen3.HOME_Q)
    p, jp = model.point(gen3.HOME_Q, "tool")
    np.testing.assert_allclose(d[:3], p - [0.4, -0.1, 0.15])
    np.testing.assert_allclose(d[3:6], [0.6, 0.1, 0.5] - p)
    np.testing.assert_allclose(jac[:3], jp)
    np.testing.assert_allclose(jac[3:6], -jp)


def test_acceleration_bound_yields_to_the_table_damper() -> None:
    """Diving at the table just above it: keeping the acceleration bound would cross the
    clearance, so the bound is relaxed and the damper holds; the damper itself never yields."""
    model = CapsuleModel()
    pose = PoseTask()
    table = TablePlaneDamper(model, min_distance=0.005, influence_distance=0.1, gain=0.05)
    accel = AccelerationLimit(np.full(7, 8.0))
    ik = IKQP([pose, DampingTask()], [VelocityLimit(), accel, table], DT)
    q = gen3.HOME_Q.copy()
    for _ in range(200):  # lower the tool until the fingertips are ~2 cm above the table
        if (
            model.table_clearance(q).min(initial=1.0, where=np.isin(model.names, TABLE_CAPSULES))
            < 0.02
        ):
            break
        q = q - 0.01 * np.linalg.pinv(gen3.tool_jacobian(q))[:, 2]
    jz = gen3.tool_jacobian(q)[2]
    previous = -1.0 * jz / (jz @ jz)  # 1 m/s straight down
    ik.note_command(previous)
    pose.set_target_twist(np.array([0.0, 0.0, -1.0, 0.0, 0.0, 0.0]))
    res = ik.solve(q)
    assert res.solved and "acceleration bound relaxed" in res.status
    q_next = q + res.qd * DT
    assert model.table_clearance(q_next)[model.names.index("fingers")] > 0.005 - 1e-4


def test_infeasible_collision_constraints_fall_back_to_zero() -> None:
    """Below the clearance, the damper demands separation the velocity box cannot give:
    relaxing the acceleration bound does not help, the damper is not relaxed, zero is sent."""
    model = CapsuleModel()
    q = np.array([0.0, 2.1, 0.0, 1.2, 0.0, 1.0, 0.0])  # folded into the table
    pose = PoseTask()
    ik = IKQP(
        [pose, DampingTask()],
        [
            VelocityLimit(np.full(7, 1e-3)),
            AccelerationLimit(np.full(7, 8.0)),
            TablePlaneDamper(model),
        ],
        DT,
    )
    res = ik.solve(q)
    assert not res.solved and "relaxed" in res.status
    np.testing.assert_array_equal(res.qd, np.zeros(7))
    assert ik.solve(gen3.HOME_Q).solved


def test_default_ik_contains_the_collision_limits() -> None:
    ik = default_ik(RATE_HZ)
    kinds = {type(x) for x in ik.tasks + ik.limits}
    for kind in (ManipulabilityTask, TablePlaneDamper, SelfCollisionDamper, WorkspaceBoxLimit):
        assert kind in kinds
    models = {id(lim.model) for lim in ik.limits if hasattr(lim, "model")}
    assert len(models) == 1  # one shared kinematics cache
    qp = ik.build(gen3.HOME_Q)
    assert qp.A.shape == (ik.m, 7) and np.all(np.isfinite(qp.A))
    assert ik.solve(gen3.HOME_Q).solved


# -- adversarial targets through default_ik ---------------------------------------------


def _toward(target: np.ndarray, gain: float, omega: np.ndarray | None = None) -> Callable:
    def twist(q: np.ndarray, k: int) -> np.ndarray:
        out = np.zeros(6)
        out[:3] = gain * (target - gen3.tool_pose(q)[:3, 3])
        if omega is not None:
            out[3:] = omega
        return out

    return twist


def _random_huge(seed: int) -> Callable:
    rng = np.random.default_rng(seed)
    twists = rng.normal(scale=5.0, size=(2000, 6))

    def twist(q: np.ndarray, k: int) -> np.ndarray:
        return twists[k // 40]  # a new wild twist every 0.2 s

    return twist


SCENARIOS: dict[str, Callable] = {
    "0.5 m under the table": _toward(np.array([0.5, 0.0, -0.5]), 20.0),
    "under the table, huge gain": _toward(np.array([0.3, 0.2, -0.5]), 100.0),
    "under the table near the base": _toward(np.array([0.05, 0.0, -0.5]), 20.0),
    "far forward": _toward(np.array([3.0, 0.0, 0.3]), 20.0),
    "far up": _toward(np.array([0.0, 0.0, 3.0]), 20.0),
    "far behind and aside": _toward(np.array([-1.0, -1.0, 0.3]), 20.0),
    "into the base": _toward(np.array([0.0, 0.0, 0.1]), 20.0),
    "wild rotation": _toward(np.array([0.5, 0.0, 0.05]), 5.0, np.array([10.0, -5.0, 3.0])),
    "wild rotation low": _toward(np.array([0.4, 0.3, -0.2]), 5.0, np.array([-3.0, 8.0, -6.0])),
    "random huge twists": _random_huge(0),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_adversarial_twists_never_violate_the_limits(name: str) -> None:
    ik = default_ik(RATE_HZ)
    pose = ik.find_task(PoseTask)
    model = CapsuleModel()
    table = [model.names.index(n) for n in TABLE_CAPSULES]
    lower, upper = np.array(WORKSPACE_LOWER_M), np.array(WORKSPACE_UPPER_M)
    v_max = gen3.VELOCITY_LIMITS * VELOCITY_MARGIN
    twist = SCENARIOS[name]
    q = gen3.HOME_Q.copy()
    failures = []
    lowest, closest, outside = np.inf, np.inf, -np.inf
    for k in range(int(3.0 * RATE_HZ)):
        pose.set_target_twist(twist(q, k))
        res = ik.solve(q)
        if not res.solved:
            failures.append(res.status)
        ik.note_command(res.qd)
        assert np.all(np.abs(res.qd) <= v_max + 1e-4), res.qd
        q = q + res.qd * DT
        assert np.all(q >= gen3.JOINT_LOWER - 1e-6) and np.all(q <= gen3.JOINT_UPPER + 1e-6)
        lowest = min(lowest, model.table_clearance(q)[table].min())
        closest = min(closest, model.pair_distances(q)[0].min())
        p, _ = model.point(q, "tool")
        outside = max(outside, np.max(lower - p), np.max(p - upper))
    assert failures == []
    assert lowest >= 0.0  # every capsule above z = 0 (the clearance kept is 5 mm)
    assert closest >= 0.0
    assert outside <= 1e-3
