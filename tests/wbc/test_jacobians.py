"""Tool and capsule-point Jacobians against central finite differences (50 seeded configs)."""

from __future__ import annotations

import numpy as np
import pytest
from gr2_wbc.kinematics import gen3
from gr2_wbc.kinematics.collision import CapsuleModel
from gr2_wbc.kinematics.rotations import rotation_error

H = 1e-6
N_CONFIGS = 50


def random_configs(seed: int = 0, n: int = N_CONFIGS) -> np.ndarray:
    """Configurations within the limits (continuous joints in [-pi, pi]), shape (n, 7)."""
    rng = np.random.default_rng(seed)
    lo = np.where(np.isfinite(gen3.JOINT_LOWER), gen3.JOINT_LOWER, -np.pi)
    hi = np.where(np.isfinite(gen3.JOINT_UPPER), gen3.JOINT_UPPER, np.pi)
    return rng.uniform(lo, hi, size=(n, 7))


def fd_tool(q: np.ndarray) -> np.ndarray:
    """(6, 7): position by central differences, orientation as log(R+ R-^T) / 2h."""
    out = np.empty((6, 7))
    for i in range(7):
        dq = np.zeros(7)
        dq[i] = H
        tp, tm = gen3.tool_pose(q + dq), gen3.tool_pose(q - dq)
        out[:3, i] = (tp[:3, 3] - tm[:3, 3]) / (2 * H)
        out[3:, i] = rotation_error(tp[:3, :3], tm[:3, :3]) / (2 * H)
    return out


@pytest.mark.parametrize("q", list(random_configs()), ids=[f"q{i}" for i in range(N_CONFIGS)])
def test_tool_jacobian_matches_central_differences(q: np.ndarray) -> None:
    jac = gen3.tool_jacobian(q)
    fd = fd_tool(q)
    np.testing.assert_allclose(jac[:3], fd[:3], atol=1e-6)  # linear [m/rad]
    np.testing.assert_allclose(jac[3:], fd[3:], atol=1e-6)  # angular [rad/rad]
    # The cached model's Jacobian (used by the default IK) is the same matrix.
    np.testing.assert_allclose(CapsuleModel().tool_jacobian(q), jac, atol=1e-12)


def test_capsule_model_forward_kinematics_matches_gen3() -> None:
    model = CapsuleModel()
    for q in random_configs(seed=1):
        model.update(q)
        frames = gen3.joint_frames(q)
        np.testing.assert_allclose(model.R[:8], frames[:, :3, :3], atol=1e-12)
        np.testing.assert_allclose(model.p[:8], frames[:, :3, 3], atol=1e-12)
        np.testing.assert_allclose(model.point(q, "tool")[0], gen3.tool_pose(q)[:3, 3], atol=1e-12)


def test_capsule_point_jacobians_match_central_differences() -> None:
    """Every capsule endpoint and named point moves as its (3, 7) point Jacobian says."""
    model = CapsuleModel()
    for q in random_configs(seed=2):
        model.update(q)
        jacs = np.empty((len(model.capsules), 2, 3, 7))
        for c in range(len(model.capsules)):
            frame = model.capsules[c].frame
            n_active = min(frame + 1, 7) if frame >= 0 else 0
            for e in range(2):
                model._point_jacobian(model.ends[c, e].copy(), n_active, jacs[c, e])
        points = {name: model.point(q, name)[1].copy() for name in model.points}
        fd = np.empty_like(jacs)
        fd_points = {name: np.empty((3, 7)) for name in model.points}
        for i in range(7):
            dq = np.zeros(7)
            dq[i] = H
            model.update(q + dq)
            plus = model.ends.copy()
            p_plus = {name: model.point(q + dq, name)[0].copy() for name in model.points}
            model.update(q - dq)
            fd[..., i] = (plus - model.ends) / (2 * H)
            for name in model.points:
                fd_points[name][:, i] = (p_plus[name] - model.point(q - dq, name)[0]) / (2 * H)
        np.testing.assert_allclose(jacs, fd, atol=1e-6)
        for name in model.points:
            np.testing.assert_allclose(points[name], fd_points[name], atol=1e-6)
